"""GeM (generalised mean) pooling: the classic baseline every VPR paper compares against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.registry import register_aggregator


@register_aggregator("gem")
class GeMAggregator(nn.Module):
    """``(mean(x^p))^(1/p)`` over space with a learnable p, optional linear projection, L2.

    Args:
        in_channels: backbone width (injected).
        p: initial exponent (3 in Radenovic et al.).
        out_dim: if given, a linear layer maps C -> out_dim after pooling.
    """

    def __init__(self, in_channels: int, p: float = 3.0, eps: float = 1e-6,
                 out_dim: int | None = None) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps
        self.proj = nn.Linear(in_channels, out_dim) if out_dim else None
        self._out_dim = out_dim or in_channels

    @property
    def out_dim(self) -> int:
        return self._out_dim

    def forward(self, x: BackboneOutput) -> torch.Tensor:
        f = x.features.clamp(min=self.eps).pow(self.p)
        pooled = f.mean(dim=(-2, -1)).pow(1.0 / self.p)
        if self.proj is not None:
            pooled = self.proj(pooled)
        return F.normalize(pooled, p=2, dim=-1)
