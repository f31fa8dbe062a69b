"""CQVPR: landmark-aware contextual queries (Li et al., 2025, arXiv:2503.08170).

Why: in cities many landmarks look alike; what tells two places apart is often the context around
them (trees, road, sky). CQVPR learns K contextual queries (K=10, 256-D) that find such contexts
in every image and appends, to every pixel's feature, a description of which contexts the pixel
belongs to:

1. pixel tokens ``F`` (B, N, C) are projected to the query width (linear + LayerNorm);
2. the learned queries are refined by ``num_layers`` transformer decoder layers (self-attention
   among queries, cross-attention over the projected pixels, FFN; post-norm residuals);
3. heatmaps: the scaled dot product of every refined query with every projected pixel, softmax
   over the K queries, so each pixel gets a distribution over contexts; ``heatmaps[k]`` is the
   region query k attends to;
4. an MLP (K -> 256 -> 256) turns each pixel's K heatmap values into a 256-D context feature;
5. pixel features and context features are L2-normalised per location (equal weight per pixel),
   concatenated (C + 256; 1280 with a 1024-D ViT-L) and GeM-pooled, then L2-normalised.

The local head (the SelaVPR local adaptation CQVPR re-ranks with) upsamples the pixel features
with two stride-2 3x3 transposed convolutions (C -> 256, ReLU, -> 128), L2-normalised per
location: ``forward_all`` returns it as ``"local"`` of shape (B, H', W', 128), H' = 4h - 3, for
mutual-nearest-neighbour re-ranking (:mod:`vpr_ros.models.rerank`).

No official code is public; the layer layout above follows the paper's description, with choices
where it is silent (decoder depth 2 with 8 heads and a 4x FFN, no positional encoding, softmax
over queries, the MLP's width) made explicit as parameters.

Export: the first decoder layer's query self-attention sees no image, so in inference it is
computed once and cached (as QAA and BoQ do with their query banks); an ONNX graph then holds it
as a constant instead of recomputing it for every frame.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vpr_ros.models.aggregators.selavpr import GeMPool
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.registry import register_aggregator


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize`` along the last axis, written as a broadcast division (its ONNX export
    has no ``Expand`` to a runtime shape, which hides the output width from shape inference)."""
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp(min=eps)


class QueryDecoderLayer(nn.Module):
    """DETR-style post-norm decoder layer: queries self-attend, cross-attend, FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norm3 = nn.LayerNorm(dim)

    def attend_self(self, q: torch.Tensor) -> torch.Tensor:
        return self.norm1(q + self.self_attn(q, q, q, need_weights=False)[0])

    def attend_image(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.norm2(q + self.cross_attn(q, memory, memory, need_weights=False)[0])
        return self.norm3(q + self.ffn(q))

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.attend_image(self.attend_self(q), memory)


class LocalHead(nn.Module):
    """Two stride-2 3x3 transposed convolutions (C -> hidden -> dim), L2 per location."""

    def __init__(self, in_channels: int, hidden: int = 256, dim: int = 128) -> None:
        super().__init__()
        self.upconv1 = nn.ConvTranspose2d(in_channels, hidden, 3, stride=2, padding=1)
        self.upconv2 = nn.ConvTranspose2d(hidden, dim, 3, stride=2, padding=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 4h-3, 4w-3, dim), unit norm along the last axis."""
        x = self.upconv2(F.relu(self.upconv1(feats)))
        return l2_normalize(x.permute(0, 2, 3, 1))


@register_aggregator("cqvpr")
class CQVPRAggregator(nn.Module):
    """Args:
        in_channels: backbone width C (injected).
        num_queries: K contextual queries (10 in the paper).
        query_dim: query width, also the context-feature width (256 in the paper).
        num_layers, num_heads, ffn_dim: the query decoder (defaults 2, 8, 4 * query_dim).
        context_hidden: hidden width of the heatmap -> context MLP (default query_dim).
        local_dim, local_hidden: local head widths (128 and 256 as in SelaVPR); local_dim=0
            drops the local head (then there is no ``"local"`` output).
        p: initial GeM exponent.
    """

    def __init__(self, in_channels: int, num_queries: int = 10, query_dim: int = 256,
                 num_layers: int = 2, num_heads: int = 8, ffn_dim: int | None = None,
                 context_hidden: int | None = None, local_dim: int = 128,
                 local_hidden: int = 256, p: float = 3.0) -> None:
        super().__init__()
        for name, v in (("num_queries", num_queries), ("query_dim", query_dim),
                        ("num_layers", num_layers), ("num_heads", num_heads)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if query_dim % num_heads:
            raise ValueError(f"query_dim={query_dim} is not divisible by num_heads={num_heads}")
        if not isinstance(local_dim, int) or local_dim < 0:
            raise ValueError(f"local_dim must be 0 (no local head) or a positive integer, got "
                             f"{local_dim!r}")
        self.in_channels = in_channels
        self.num_queries = num_queries
        self.query_dim = query_dim
        self.queries = nn.Parameter(torch.randn(1, num_queries, query_dim) * query_dim ** -0.5)
        self.input_proj = nn.Linear(in_channels, query_dim)
        self.input_norm = nn.LayerNorm(query_dim)
        self.decoder = nn.ModuleList(
            QueryDecoderLayer(query_dim, num_heads, ffn_dim or 4 * query_dim)
            for _ in range(num_layers))
        hidden = context_hidden or query_dim
        self.context_mlp = nn.Sequential(nn.Linear(num_queries, hidden), nn.ReLU(),
                                         nn.Linear(hidden, query_dim))
        self.gem = GeMPool(p)
        self.local_head = LocalHead(in_channels, local_hidden, local_dim) if local_dim else None
        self.extra_outputs: tuple[str, ...] = ("local",) if local_dim else ()
        self._query_cache: Optional[torch.Tensor] = None
        self._query_key: Optional[tuple] = None

    @property
    def out_dim(self) -> int:
        return self.in_channels + self.query_dim

    # -- the image-independent part ----------------------------------------------------------
    def initial_queries(self) -> torch.Tensor:
        """(1, K, d): the learned queries after the first layer's self-attention, which sees no
        image. Cached in inference (eval mode, no autograd), keyed on the parameters' storage
        and version counters and dropped on ``train()`` and state-dict loads, so it never goes
        stale; a warm cache is what puts it into an ONNX graph as a constant. Not cached under
        torch.compile/torch.export (fake tensors have no data pointer to key on)."""
        layer = self.decoder[0]
        caching = (not self.training and not torch.is_grad_enabled()
                   and not torch.compiler.is_compiling())
        if caching:
            params = [self.queries, *layer.self_attn.parameters(), *layer.norm1.parameters()]
            key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
            if self._query_cache is not None and self._query_key == key:
                return self._query_cache
        q = layer.attend_self(self.queries)
        if caching:
            self._query_cache, self._query_key = q, key
        else:
            self._query_cache = self._query_key = None
        return q

    def train(self, mode: bool = True) -> "CQVPRAggregator":
        self._query_cache = self._query_key = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        self._query_cache = self._query_key = None
        super()._load_from_state_dict(*args, **kwargs)

    # -- forward ----------------------------------------------------------------------------
    def contexts(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, C) -> refined queries (B, K, d) and heatmaps (B, K, N) (softmax over K)."""
        memory = self.input_norm(self.input_proj(tokens))
        q = self.initial_queries().expand(tokens.shape[0], -1, -1)
        q = self.decoder[0].attend_image(q, memory)
        for layer in list(self.decoder)[1:]:
            q = layer(q, memory)
        logits = torch.matmul(q, memory.transpose(1, 2)) * self.query_dim ** -0.5
        return q, logits.softmax(dim=1)

    def _global(self, x: BackboneOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = x.features
        b, _, h, w = feats.shape
        # Widths come from the module, not from the input's shape, and normalisation divides by
        # a broadcast norm: an exported graph then keeps the descriptor width static.
        tokens = feats.reshape(b, self.in_channels, -1).transpose(1, 2)   # (B, N, C)
        queries, heat = self.contexts(tokens)
        ctx = self.context_mlp(heat.transpose(1, 2))                      # (B, N, d)
        pix = l2_normalize(tokens)
        joint = torch.cat([pix, l2_normalize(ctx)], dim=-1)               # (B, N, C + d)
        g = l2_normalize(self.gem(joint.transpose(1, 2).unsqueeze(-1)))   # GeM over the N axis
        return g, {"heatmaps": heat.reshape(b, self.num_queries, h, w), "pixels": pix,
                   "queries": queries}

    def forward(self, x: BackboneOutput) -> torch.Tensor:
        return self._global(x)[0]

    def forward_all(self, x: BackboneOutput) -> dict[str, torch.Tensor]:
        """``{"global": (B, C + d), "local": (B, 4h-3, 4w-3, local_dim)}``.

        In training mode it adds what the CQVPR losses read: ``heatmaps`` (B, K, h, w) and
        ``query_features`` (B, K, C), each query's heatmap-weighted mean of the L2-normalised
        pixel features, L2-normalised (the region descriptor the query matching loss compares
        across images of one place)."""
        g, parts = self._global(x)
        out = {"global": g}
        if self.local_head is not None:
            out["local"] = self.local_head(x.features)
        if self.training:
            heat = parts["heatmaps"].flatten(2)                                  # (B, K, N)
            weights = heat / heat.sum(dim=-1, keepdim=True).clamp(min=1e-6)
            out["heatmaps"] = parts["heatmaps"]
            out["query_features"] = l2_normalize(torch.matmul(weights, parts["pixels"]))
        return out
