"""CQVPR: landmark-aware contextual queries (Li et al., "CQVPR: Landmark-aware Contextual Queries
for Visual Place Recognition", arXiv:2503.08170; full text in ``../shared/papers/cqvpr.txt``).

Why: in cities many landmarks look alike; what tells two places apart is often the context around
them (trees, road, sky). CQVPR learns K contextual queries that find such contexts in every image
and appends, to every pixel's feature, a description of which contexts the pixel belongs to.

``design: paper`` (the default for new models) is the method as published, section by section
(Sec. III-A/B, IV-B; ``F_V`` = the backbone's (B, C, h, w) pixel features):

1. ``conv``: a 1x1 convolution C -> D_T = 256 (Eq. 1, IV-B), shared by Eq. 1 and Eq. 2;
2. the learnable contextual embedding T (K = 10 queries x 256) updated by one cross-attention
   layer, queries T, keys and values conv(F_V) (Eq. 1). The layer is TopicFM's [12] (the paper's
   reference for learnable queries) / LoFTR's attention layer: bias-free q/k/v and merge
   projections, softmax attention over 8 heads, LayerNorm on the message, an MLP on
   [T, message] (2D -> 2D -> D, GELU), LayerNorm, residual. It has 10 D^2 + 4 D = 656,384
   parameters at D = 256: the 0.656 M of Table VII's "context-aware feature" row;
3. the heatmap H = <T, conv(F_V)> (Eq. 2), normalised along its channel (query) axis and turned
   into the 256-D context feature F_T by an MLP (Eq. 3; K -> 256 -> 256, GELU);
4. global: G = L2(GeM([F_V, F_T])) (Eq. 4) over the 1280 channels (1024 + 256 with DINOv2-L);
5. local: L = L2(up-conv([F_V, F_T])) (Eq. 5): two 3x3 stride-2 padding-1 transposed
   convolutions 1280 -> 256 -> 128 with a ReLU between, 3,244,416 parameters = Table VII's
   3.24 M; a 16x16 grid (224 px) becomes 61x61x128 (H' = 4h - 3);

and in training mode ``forward_all`` also returns T as ``"contextual_queries"`` (B, K, 256) for the
query matching loss (Eq. 7, :mod:`vpr_ros.train.losses_extra`) and H as ``"heatmaps"``.

Choices where the paper is silent, each configurable:

* Eq. 3's "normalization along the channel dimension" is an L2 normalisation over the K query
  responses of each pixel (the paper writes softmax where it means one, Eq. 9);
* Eq. 4: each location's 1280-D vector is L2-normalised before GeM (``location_norm``), as in the
  aggregation of SelaVPR's released network (L2Norm, GeM, L2), the adapted backbone and local
  adaptation CQVPR builds on [10]; the GeM exponent starts at 3 and is learned (also SelaVPR's);
* the 1x1 convolution has a bias; the MLP of Eq. 3 has one hidden layer of 256; the local head's
  ReLU between its two up-convolutions is SelaVPR's ``LocalAdapt``'s.

``design: decoder`` is the layout vpr_ros used before the paper was available (a linear +
LayerNorm input projection, ``num_layers`` DETR-style decoder layers over the queries, a softmax
heatmap over the queries, per-part L2 before GeM, a local head on F_V alone). It stays so that
model directories made with it load and encode exactly as before: a model.json without
``design`` is one of them (``vpr_ros.models.config.LEGACY_DEFAULTS``).

Export: in the decoder design the first layer's query self-attention sees no image and is cached
in inference (an ONNX graph holds it as a constant); the paper design has no such part beyond
the queries themselves.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vpr_ros.models.aggregators.selavpr import GeMPool
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.registry import register_aggregator

DESIGNS = ("paper", "decoder")


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize``, written as a broadcast division (its ONNX export has no ``Expand`` to a
    runtime shape, which hides the output width from shape inference)."""
    return x / x.norm(p=2, dim=dim, keepdim=True).clamp(min=eps)


class ContextCrossAttention(nn.Module):
    """TopicFM's / LoFTR's attention layer, used as CQVPR's cross-attention (Eq. 1): queries
    ``t`` (B, K, D) attend to ``source`` (B, N, D); ``t + norm2(mlp([t, norm1(merge(attn))]))``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.dim = dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.merge = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 2 * dim, bias=False), nn.GELU(),
                                 nn.Linear(2 * dim, dim, bias=False))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        b = t.shape[0]
        q = self.q_proj(t).reshape(b, -1, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(source).reshape(b, -1, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(source).reshape(b, -1, self.heads, self.head_dim).transpose(1, 2)
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.head_dim ** -0.5, -1)
        msg = torch.matmul(att, v).transpose(1, 2).reshape(b, -1, self.dim)
        msg = self.norm1(self.merge(msg))
        return t + self.norm2(self.mlp(torch.cat([t, msg], dim=-1)))


class QueryDecoderLayer(nn.Module):
    """The decoder design's DETR-style post-norm layer: queries self-attend, cross-attend, FFN."""

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
    """Two stride-2 3x3 transposed convolutions (C -> hidden -> dim, ReLU between), L2 per
    location."""

    def __init__(self, in_channels: int, hidden: int = 256, dim: int = 128) -> None:
        super().__init__()
        self.upconv1 = nn.ConvTranspose2d(in_channels, hidden, 3, stride=2, padding=1)
        self.upconv2 = nn.ConvTranspose2d(hidden, dim, 3, stride=2, padding=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 4h-3, 4w-3, dim), unit norm along the last axis."""
        x = self.upconv2(torch.relu(self.upconv1(feats)))
        return l2_normalize(x.permute(0, 2, 3, 1))


@register_aggregator("cqvpr")
class CQVPRAggregator(nn.Module):
    """Args:
        in_channels: backbone width C (injected).
        num_queries: K contextual queries (10 in the paper, Sec. IV-B and Table VI).
        query_dim: D_T, the query width and the context-feature width (256 in the paper).
        design: ``paper`` (see the module docstring) or ``decoder`` (the earlier layout).
        num_heads: attention heads (8).
        num_layers: cross-attention layers (paper: 1, the default) or decoder layers (decoder
            design: default 2).
        ffn_dim: the decoder design's feed-forward width (default 4 * query_dim).
        context_hidden: hidden width of the heatmap -> context MLP (default query_dim).
        location_norm: paper design: L2-normalise each location before GeM (see Eq. 4 above).
        local_dim, local_hidden: local head widths (128 and 256 as in the paper); local_dim=0
            drops the local head (then there is no ``"local"`` output).
        p: initial GeM exponent.
    """

    def __init__(self, in_channels: int, num_queries: int = 10, query_dim: int = 256,
                 design: str = "paper", num_heads: int = 8, num_layers: int | None = None,
                 ffn_dim: int | None = None, context_hidden: int | None = None,
                 location_norm: bool = True, local_dim: int = 128, local_hidden: int = 256,
                 p: float = 3.0) -> None:
        super().__init__()
        if design not in DESIGNS:
            raise ValueError(f"design must be one of {list(DESIGNS)}, got {design!r}")
        num_layers = num_layers if num_layers is not None else (1 if design == "paper" else 2)
        for name, v in (("num_queries", num_queries), ("query_dim", query_dim),
                        ("num_layers", num_layers), ("num_heads", num_heads)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if query_dim % num_heads:
            raise ValueError(f"query_dim={query_dim} is not divisible by num_heads={num_heads}")
        if not isinstance(local_dim, int) or local_dim < 0:
            raise ValueError(f"local_dim must be 0 (no local head) or a positive integer, got "
                             f"{local_dim!r}")
        if design == "paper" and ffn_dim is not None:
            raise ValueError("ffn_dim belongs to the decoder design; the paper design's "
                             "cross-attention layer has a fixed 2 x query_dim MLP")
        self.design = design
        self.in_channels = in_channels
        self.num_queries = num_queries
        self.query_dim = query_dim
        self.location_norm = location_norm
        self.queries = nn.Parameter(torch.randn(1, num_queries, query_dim) * query_dim ** -0.5)
        hidden = context_hidden or query_dim
        if design == "paper":
            self.conv = nn.Linear(in_channels, query_dim)        # the 1x1 convolution
            self.cross_attn = nn.ModuleList(ContextCrossAttention(query_dim, num_heads)
                                            for _ in range(num_layers))
            self.context_mlp = nn.Sequential(nn.Linear(num_queries, hidden), nn.GELU(),
                                             nn.Linear(hidden, query_dim))
            local_in = in_channels + query_dim
        else:
            self.input_proj = nn.Linear(in_channels, query_dim)
            self.input_norm = nn.LayerNorm(query_dim)
            self.decoder = nn.ModuleList(
                QueryDecoderLayer(query_dim, num_heads, ffn_dim or 4 * query_dim)
                for _ in range(num_layers))
            self.context_mlp = nn.Sequential(nn.Linear(num_queries, hidden), nn.ReLU(),
                                             nn.Linear(hidden, query_dim))
            local_in = in_channels
        self.gem = GeMPool(p)
        self.local_head = LocalHead(local_in, local_hidden, local_dim) if local_dim else None
        self.extra_outputs: tuple[str, ...] = ("local",) if local_dim else ()
        self._query_cache: Optional[torch.Tensor] = None
        self._query_key: Optional[tuple] = None

    @property
    def out_dim(self) -> int:
        return self.in_channels + self.query_dim

    # -- the decoder design's image-independent part ------------------------------------------
    def initial_queries(self) -> torch.Tensor:
        """Decoder design: (1, K, d), the learned queries after the first layer's
        self-attention, which sees no image. Cached in inference (eval mode, no autograd),
        keyed on the parameters' storage and version counters and dropped on ``train()`` and
        state-dict loads, so it never goes stale; a warm cache is what puts it into an ONNX
        graph as a constant. Not cached under torch.compile/torch.export."""
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
        """tokens (B, N, C) -> contextual embeddings T (B, K, d) and the heatmaps (B, K, N) the
        context features are made from (paper: Eq. 2 normalised over the queries; decoder:
        softmax over the queries)."""
        if self.design == "paper":
            f = self.conv(tokens)                                            # conv(F_V)
            t = self.queries.expand(tokens.shape[0], -1, -1)
            for layer in self.cross_attn:
                t = layer(t, f)                                              # Eq. 1
            heat = torch.matmul(t, f.transpose(1, 2))                        # Eq. 2
            return t, l2_normalize(heat, dim=1)
        memory = self.input_norm(self.input_proj(tokens))
        q = self.initial_queries().expand(tokens.shape[0], -1, -1)
        q = self.decoder[0].attend_image(q, memory)
        for layer in list(self.decoder)[1:]:
            q = layer(q, memory)
        logits = torch.matmul(q, memory.transpose(1, 2)) * self.query_dim ** -0.5
        return q, logits.softmax(dim=1)

    def _parts(self, x: BackboneOutput, local: bool) -> dict[str, torch.Tensor]:
        feats = x.features
        b, _, h, w = feats.shape
        # Widths come from the module, not from the input's shape, and normalisation divides by
        # a broadcast norm: an exported graph then keeps the descriptor width static.
        tokens = feats.reshape(b, self.in_channels, -1).transpose(1, 2)   # (B, N, C)
        t, heat = self.contexts(tokens)
        ctx = self.context_mlp(heat.transpose(1, 2))                      # F_T (B, N, d), Eq. 3
        if self.design == "paper":
            joint = torch.cat([tokens, ctx], dim=-1)                      # [F_V, F_T]
            pooled_in = l2_normalize(joint) if self.location_norm else joint
        else:
            joint = None
            pooled_in = torch.cat([l2_normalize(tokens), l2_normalize(ctx)], dim=-1)
        g = l2_normalize(self.gem(pooled_in.transpose(1, 2).unsqueeze(-1)))  # Eq. 4
        parts = {"global": g, "contextual_queries": t,
                 "heatmaps": heat.reshape(b, self.num_queries, h, w)}
        if local and self.local_head is not None:
            local_in = feats if joint is None else joint.transpose(1, 2).reshape(
                b, self.in_channels + self.query_dim, h, w)
            parts["local"] = self.local_head(local_in)                    # Eq. 5
        return parts

    def forward(self, x: BackboneOutput) -> torch.Tensor:
        return self._parts(x, local=False)["global"]

    def forward_all(self, x: BackboneOutput) -> dict[str, torch.Tensor]:
        """``{"global": (B, C + d), "local": (B, 4h-3, 4w-3, local_dim)}``; in training mode
        also ``"contextual_queries"`` (B, K, d), what the query matching loss (Eq. 7) compares
        across images, and ``"heatmaps"`` (B, K, h, w)."""
        parts = self._parts(x, local=True)
        keep = {"global", *self.extra_outputs}
        if self.training:
            keep |= {"contextual_queries", "heatmaps"}
        return {k: v for k, v in parts.items() if k in keep}
