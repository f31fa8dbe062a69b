"""What every backbone returns, so aggregators never depend on which backbone fed them."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn


class BackboneOutput(NamedTuple):
    """Dense features ``(B, C, h, w)`` and, for ViTs, the class token ``(B, C)``."""

    features: torch.Tensor
    cls_token: Optional[torch.Tensor] = None


class Backbone(nn.Module):
    """Base class: subclasses set ``out_channels`` and ``stride`` and implement ``forward``.

    ``size_multiple`` is the number the input height and width must be divisible by
    (14 for DINOv2, 1 for CNNs that accept any size).
    """

    out_channels: int
    stride: int
    size_multiple: int = 1

    def check_input_size(self, size: tuple[int, int]) -> None:
        from vpr_ros.errors import ModelError

        from vpr_ros.models.config import MAX_INPUT_SIDE

        h, w = size
        m = self.size_multiple
        if h % m or w % m or h <= 0 or w <= 0:
            raise ModelError(f"input size {h}x{w} is not usable by {type(self).__name__}: height "
                             f"and width must be positive multiples of {m} (e.g. "
                             f"{max(m, round(h / m) * m)}x{max(m, round(w / m) * m)})")
        if max(h, w) > MAX_INPUT_SIDE:
            raise ModelError(f"input size {h}x{w} exceeds the largest input side, "
                             f"{MAX_INPUT_SIDE} px (memory grows with its square); use a "
                             "smaller size")

    def fix_input_size(self, size: tuple[int, int]) -> None:
        """Precompute whatever depends on the input size (default: nothing)."""
        self.check_input_size(size)

    def load_pretrained(self, source: str) -> None:
        """Load pre-trained weights named by a config's ``weights.backbone`` (a file path, or
        'package' where weights ship with a pip package). Backbones that have such weights
        override this."""
        from vpr_ros.errors import ConfigError

        raise ConfigError(f"weights.backbone: {type(self).__name__} cannot load pre-trained "
                          f"weights ({source!r}); use 'none'")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
