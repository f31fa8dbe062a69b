"""VPRModel = backbone + aggregator, built from a :class:`ModelConfig` through the registry.

This is the one model definition: the node (through the runtime encoders), the trainer, the
exporter and the evaluator all construct it with :func:`build_model` from the same config.
"""

from __future__ import annotations

import torch
from torch import nn

from vpr_ros.errors import ModelError
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.config import ModelConfig
from vpr_ros.models.registry import build_component


class VPRModel(nn.Module):
    """``forward(images)``: normalised (B, 3, H, W) float -> L2-normalised (B, D) descriptors."""

    def __init__(self, config: ModelConfig, backbone: nn.Module, aggregator: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.aggregator = aggregator

    @property
    def descriptor_dim(self) -> int:
        return int(self.aggregator.out_dim)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.config.input.size

    def fix_input_size(self, size: tuple[int, int] | None = None) -> None:
        """Precompute size-dependent constants (DINOv2 positional embedding) for inference
        and export at ``size`` (default: the configured input size)."""
        self.backbone.fix_input_size(tuple(size or self.input_size))

    @property
    def extra_outputs(self) -> tuple[str, ...]:
        """Names of per-image outputs besides the global descriptor, e.g. ``("binary",)`` for a
        hash head or ``("local",)`` for a local-feature head. Aggregators declare them with an
        ``extra_outputs`` attribute and compute them in ``forward_all``."""
        return tuple(getattr(self.aggregator, "extra_outputs", ()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aggregator(self.backbone(images))

    def forward_all(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"global": (B, D), **extras}``: what exporters and map builders store."""
        return self.head_all(self.backbone(images))

    def head_all(self, feats: BackboneOutput) -> dict[str, torch.Tensor]:
        """:meth:`forward_all` after the backbone: the outputs of already computed backbone
        features. One code path for both, so an evaluation that caches the features of a
        frozen backbone (``vpr eval zoo``) gets exactly what full encoding gives."""
        if not self.extra_outputs:
            return {"global": self.aggregator(feats)}
        out = self.aggregator.forward_all(feats)
        missing = {"global", *self.extra_outputs} - set(out)
        if missing:
            raise ModelError(f"aggregator {self.config.aggregator.name!r} did not return "
                             f"{sorted(missing)}")
        return out


def build_model(config: ModelConfig) -> VPRModel:
    """Instantiate a model (random aggregator; backbone weights are loaded separately)."""
    backbone = build_component("backbone", config.backbone.name, config.backbone.params)
    backbone.check_input_size(config.input.size)
    aggregator = build_component("aggregator", config.aggregator.name, config.aggregator.params,
                                 in_channels=backbone.out_channels)
    if not hasattr(aggregator, "out_dim"):
        raise ModelError(f"aggregator {config.aggregator.name!r} does not declare out_dim")
    return VPRModel(config, backbone, aggregator)
