"""VLAQ: Vector of Locally Aggregated Queries, the aggregator of DC-VLAQ (Zhu et al., "DC-VLAQ:
Query-Residual Aggregation for Robust Visual Place Recognition"; ../shared/papers/dc_vlaq.txt).

Each block holds ``num_queries`` learnable queries ``q_k``. Every token ``z_i`` of an image is
encoded by its residual to each query, weighted by how strongly it answers that query (Sec. 3.3)::

    a_ik = softmax_i(q_k . z_i / sqrt(d))          (Eq. 5-6: softmax over the image's tokens)
    v_k  = sum_i a_ik (z_i - q_k)                  (Eq. 7; = sum_i a_ik z_i - q_k)

The blocks' ``(num_queries, d)`` matrices are concatenated and the whole vector L2-normalised
(Sec. 3.3); 2 blocks of 64 queries (Sec. 4.2). Unlike BoQ/QAA (which keep only attention
*outputs*), the residual keeps where the image sits relative to each query, which is the VLAD
idea with queries in place of cluster centres.

What the paper leaves open, and what is chosen here (configurable):

* ``dim``: with ``dim: null`` the queries live in the token space itself, as Eq. 5-7 are
  written (d = the fused token width: 2 x 64 x 768 = 98304-D with DINOv2-B,
  ``config/models/dcvlaq_dinov2b_paper.yaml``). With ``dim: D`` each block first maps the tokens
  with its own linear layer C -> D and its queries live there: not in the paper, our choice for
  a compact descriptor (``config/models/dcvlaq_dinov2b.yaml``: 2 x 64 x 64 = 8192-D, QAA's size).
  Without projections the blocks see the same tokens, and two blocks of 64 queries compute what
  one block of 128 would; the paper's "B blocks ... following BoQ" states no per-block transform
  (BoQ's encoder layers between blocks are not part of VLAQ's description), so none is added.
* ``intra_norm``: L2 per query vector before the global L2 (NetVLAD's intra-normalisation).
  Off by default: the paper concatenates and normalises once.
* queries start orthonormal (``nn.init.orthogonal_``) so that they begin spread out rather than
  collapsed onto one direction (no initialisation is stated).

Nothing here is image-independent beyond the raw query parameters, so there is nothing to cache;
the computation is two batched matrix products and a softmax, which export to ONNX as is.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.registry import register_aggregator


class VLAQBlock(nn.Module):
    """One set of learnable queries with its token projection (identity when ``dim`` is None)."""

    def __init__(self, in_channels: int, num_queries: int, dim: Optional[int]) -> None:
        super().__init__()
        self.dim = in_channels if dim is None else dim
        self.proj: nn.Module = nn.Identity() if dim is None else nn.Linear(in_channels, dim)
        self.queries = nn.Parameter(torch.empty(num_queries, self.dim))
        nn.init.orthogonal_(self.queries)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, C) -> residual vectors (B, Q, dim)."""
        z = self.proj(tokens)                                        # (B, N, d)
        logits = torch.matmul(z, self.queries.t()) * self.dim ** -0.5  # (B, N, Q)
        weights = torch.softmax(logits, dim=1)                       # over the tokens
        return torch.matmul(weights.transpose(1, 2), z) - self.queries  # (B, Q, d)


@register_aggregator("vlaq")
class VLAQAggregator(nn.Module):
    """Args:
        in_channels: backbone width C (injected by the model builder).
        num_blocks: query sets (2 in DC-VLAQ).
        num_queries: queries per block (64 in DC-VLAQ).
        dim: per-block token projection width; ``None`` keeps the backbone's tokens (d = C).
        intra_norm: L2-normalise each query's residual before the global L2.
    """

    def __init__(self, in_channels: int, num_blocks: int = 2, num_queries: int = 64,
                 dim: Optional[int] = None, intra_norm: bool = False) -> None:
        super().__init__()
        for name, v in (("num_blocks", num_blocks), ("num_queries", num_queries)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0):
            raise ValueError(f"dim must be a positive integer or null (no projection), "
                             f"got {dim!r}")
        self.in_channels = in_channels
        self.num_queries = num_queries
        self.intra_norm = intra_norm
        self.blocks = nn.ModuleList(VLAQBlock(in_channels, num_queries, dim)
                                    for _ in range(num_blocks))

    @property
    def out_dim(self) -> int:
        return sum(blk.dim for blk in self.blocks) * self.num_queries

    def forward(self, x: BackboneOutput) -> torch.Tensor:
        tokens = x.features.flatten(2).transpose(1, 2)              # (B, N, C)
        parts = []
        for blk in self.blocks:
            v = blk(tokens)
            if self.intra_norm:
                v = v / v.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)
            # static widths and a broadcasting division (F.normalize traces to Shape + Expand):
            # an exported graph then declares a static (batch, out_dim) output
            parts.append(v.reshape(-1, self.num_queries * blk.dim))
        out = torch.cat(parts, dim=1)
        return out / out.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)
