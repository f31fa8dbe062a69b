"""BoQ: Bag of Learnable Queries (Ali-bey, Chaib-draa, Giguere, CVPR 2024), as released.

The backbone map is projected by a convolution (``proj_c``, 3x3 with padding 1 in the release:
the README notes that this neighbourhood mixing is why BoQ needs no positional encoding) and
LayerNorm-ed (``norm_input``). Then ``num_layers`` BoQ blocks run in cascade, each:

* refines the tokens with one ``nn.TransformerEncoderLayer`` (ReLU, 4x feed-forward, no dropout,
  post-norm) and passes them to the next block;
* refines its own learnable queries by residual self-attention + LayerNorm (``self_attn``,
  ``norm_q``). This depends on parameters only, so in inference it is computed once and cached;
* lets the queries cross-attend over its refined tokens, then LayerNorm (``cross_attn``,
  ``norm_out``).

The blocks' outputs are concatenated along the query axis, ``fc`` maps the ``num_layers *
num_queries`` axis to ``row_dim`` (one linear layer applied to every channel), the
``(proj_channels, row_dim)`` matrix is flattened channel-major and L2-normalised. Attention
heads are ``proj_channels // 64`` as in the release.

The released DINOv2 model: projection 384, 64 queries, 2 layers, row dim 32 -> 12288-D and
8.63M aggregator parameters with DINOv2-B (the "8.6M" of the QAA paper's comparison; 2.65M of
them are the 3x3 projection, so a 1x1 projection would give only 6.27M). Module and parameter
names equal the release's, so its checkpoint loads with a backbone prefix map only
(``models/official_boq.py``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.registry import register_aggregator


@contextmanager
def _composite_attention(active: bool) -> Iterator[None]:
    """Switch off torch's fused attention kernels while ``active`` (TorchScript-based ONNX
    tracing): in inference they replace ``MultiheadAttention``/``TransformerEncoderLayer`` by
    ``aten::_native_multi_head_attention``/``_transformer_encoder_layer_fwd``, which have no ONNX
    export; the composite path is the same arithmetic. The global flag is restored after."""
    if not active:
        yield
        return
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


class BoQBlock(nn.Module):
    """One BoQ block: token encoder, learnable queries (self-attention), cross-attention."""

    def __init__(self, dim: int, num_queries: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"proj_channels {dim} is not divisible by num_heads={num_heads}")
        self.encoder = nn.TransformerEncoderLayer(d_model=dim, nhead=num_heads,
                                                  dim_feedforward=4 * dim, dropout=0.0,
                                                  batch_first=True)
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, num_heads=num_heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads=num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def refined_queries(self) -> torch.Tensor:
        """``(1, Q, dim)``: the queries after self-attention + LayerNorm (image-independent)."""
        q = self.queries
        q = q + self.self_attn(q, q, q, need_weights=False)[0]
        return self.norm_q(q)

    def forward(self, tokens: torch.Tensor, queries: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, dim), refined queries (1, Q, dim) -> (next tokens, (B, Q, dim))."""
        x = self.encoder(tokens)
        q = queries.expand(x.shape[0], -1, -1)
        out = self.cross_attn(q, x, x, need_weights=False)[0]
        return x, self.norm_out(out)


@register_aggregator("boq")
class BoQAggregator(nn.Module):
    """Args:
        in_channels: backbone width C (injected by the model builder).
        proj_channels: width of the projected tokens and of the queries (384 for the released
            DINOv2 model, 512 for ResNet-50).
        num_queries: learnable queries per block (64 in the releases).
        num_layers: BoQ blocks in cascade (2).
        row_dim: output rows of ``fc``; descriptor = ``proj_channels * row_dim``.
        num_heads: attention heads; ``None`` means the release's ``proj_channels // 64``.
        proj_kernel: kernel of the ``proj_c`` convolution (release: 3, padding 1); odd.
    """

    def __init__(self, in_channels: int, proj_channels: int = 384, num_queries: int = 64,
                 num_layers: int = 2, row_dim: int = 32, num_heads: Optional[int] = None,
                 proj_kernel: int = 3) -> None:
        super().__init__()
        for name, v in (("proj_channels", proj_channels), ("num_queries", num_queries),
                        ("num_layers", num_layers), ("row_dim", row_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(proj_kernel, int) or proj_kernel <= 0 or proj_kernel % 2 == 0:
            raise ValueError(f"proj_kernel must be a positive odd integer (the release uses 3), "
                             f"got {proj_kernel!r}")
        heads = proj_channels // 64 if num_heads is None else num_heads
        if heads <= 0:
            raise ValueError(f"proj_channels={proj_channels} gives no attention head with the "
                             "release's proj_channels // 64 rule; set num_heads explicitly")
        self.in_channels = in_channels
        self.proj_channels = proj_channels
        self.row_dim = row_dim
        self.proj_c = nn.Conv2d(in_channels, proj_channels, kernel_size=proj_kernel,
                                padding=proj_kernel // 2)
        self.norm_input = nn.LayerNorm(proj_channels)
        self.boqs = nn.ModuleList(BoQBlock(proj_channels, num_queries, heads)
                                  for _ in range(num_layers))
        self.fc = nn.Linear(num_layers * num_queries, row_dim)
        self._query_cache: Optional[tuple[torch.Tensor, ...]] = None
        self._query_key: Optional[tuple] = None

    @property
    def out_dim(self) -> int:
        return self.proj_channels * self.row_dim

    # -- the image-independent part ---------------------------------------------------------
    def _query_params(self) -> list[torch.Tensor]:
        return [p for blk in self.boqs
                for p in (blk.queries, *blk.self_attn.parameters(), *blk.norm_q.parameters())]

    def block_queries(self) -> tuple[torch.Tensor, ...]:
        """Refined queries of every block; cached in inference (eval mode, no autograd) and
        recomputed whenever a query parameter changes (version counters), on ``train()`` and on
        state-dict loads, so a cache can never go stale. A warm cache is what makes an ONNX
        trace hold the queries as constants (no image-independent attention at run time).
        Not cached under torch.compile/torch.export: fake tensors have no data pointer to key
        a cache on (there the compiler folds the parameter-only work itself)."""
        caching = (not self.training and not torch.is_grad_enabled()
                   and not torch.compiler.is_compiling())
        if caching:
            key = tuple((p.data_ptr(), p._version, p.device, p.dtype)
                        for p in self._query_params())
            if self._query_cache is not None and self._query_key == key:
                return self._query_cache
        queries = tuple(blk.refined_queries() for blk in self.boqs)
        if caching:
            self._query_cache, self._query_key = queries, key
        else:
            self._query_cache = self._query_key = None
        return queries

    def train(self, mode: bool = True) -> "BoQAggregator":
        self._query_cache = self._query_key = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        self._query_cache = self._query_key = None
        super()._load_from_state_dict(*args, **kwargs)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: BackboneOutput) -> torch.Tensor:
        feats = self.proj_c(x.features)                         # (B, P, h, w)
        tokens = self.norm_input(feats.flatten(2).transpose(1, 2))
        outs = []
        with _composite_attention(torch.jit.is_tracing()):
            for blk, q in zip(self.boqs, self.block_queries()):
                tokens, out = blk(tokens, q)
                outs.append(out)
        out = torch.cat(outs, dim=1)                            # (B, L*Q, P)
        out = self.fc(out.transpose(1, 2))                      # (B, P, row_dim)
        # The width is spelled out and the norm divides by broadcasting (F.normalize traces to
        # Shape + Expand): traced attention computes the channel axis from shapes, and an
        # exported graph must declare a static (batch, out_dim) output.
        out = out.reshape(-1, self.out_dim)
        return out / out.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)
