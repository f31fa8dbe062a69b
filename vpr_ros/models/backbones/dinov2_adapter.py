"""DINOv2 with SelaVPR's global adaptation: adapters inside every transformer block.

Why: CQVPR (Sec. III-A: "the adapted DINOv2 [10]") extracts its pixel features with SelaVPR's
adapter-tuned DINOv2-L (Lu et al., ICLR 2024, ``Lu-Feng/SelaVPR``): the pre-trained ViT stays
frozen and each block gains two small bottleneck MLPs that are trained, so the backbone adapts
to places without forgetting what DINOv2 learned. CQVPR's Table VII counts this "fine-tuned
DINOv2" at 354.77 M parameters; DINOv2-L (304.37 M) plus two adapters of 1024 -> 512 -> 1024
in each of its 24 blocks (50.41 M) is 354.77 M.

Per block, as SelaVPR's released ``Block`` computes it::

    x = x + ls1(serial(attn(norm1(x))))              serial(y)   = y + fc2(relu(fc1(y)))
    x = x + ls2(mlp(norm2(x)) + 0.2 * parallel(norm2(x)))   parallel(y) = fc2(relu(fc1(y)))

Adapters have a 0.5 bottleneck (``adapter_ratio``), their second layer starts at zero (SelaVPR's
training script initialises ``D_fc2`` so; the adapted network starts as DINOv2 itself), and the
parameter names are the release's (``blocks.N.adapter1.D_fc1.weight`` ...). Only the adapters
train; the blocks run with autograd so that gradients reach every block's adapters.

The token preparation (positional-embedding resize, registers) is :class:`DinoV2Backbone`'s; an
official DINOv2 ``.pth`` loads into the frozen part and leaves the adapters at their start.
"""

from __future__ import annotations

import torch
from torch import nn

from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.backbones.dinov2 import DinoV2Backbone
from vpr_ros.models.registry import register_backbone


class Adapter(nn.Module):
    """``fc2(relu(fc1(x)))``, plus ``x`` when ``skip`` (SelaVPR's serial adapter)."""

    def __init__(self, dim: int, ratio: float, skip: bool) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.skip = skip
        self.D_fc1 = nn.Linear(dim, hidden)
        self.D_fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.D_fc2(torch.relu(self.D_fc1(x)))
        return x + y if self.skip else y


class AdaptedBlock(nn.Module):
    """A timm DINOv2 block (its modules under their own names, so official keys load) with a
    serial adapter after attention and a parallel adapter beside the MLP."""

    def __init__(self, block: nn.Module, dim: int, ratio: float, parallel_scale: float) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1 = block.norm1, block.attn, block.ls1
        self.norm2, self.mlp, self.ls2 = block.norm2, block.mlp, block.ls2
        self.adapter1 = Adapter(dim, ratio, skip=True)
        self.adapter2 = Adapter(dim, ratio, skip=False)
        self.parallel_scale = parallel_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.adapter1(self.attn(self.norm1(x))))
        h = self.norm2(x)
        return x + self.ls2(self.mlp(h) + self.parallel_scale * self.adapter2(h))


@register_backbone("dinov2_adapter")
class DinoV2AdapterBackbone(DinoV2Backbone):
    """DINOv2 ViT-{S,B,L,G}/14 with SelaVPR's block adapters (only they train).

    Args:
        arch, registers, final_norm: as :class:`DinoV2Backbone` (SelaVPR and CQVPR: ``vitl14``,
            no registers, final norm on: the ``x_norm_patchtokens``).
        adapter_ratio: adapter bottleneck as a fraction of the width (0.5).
        parallel_scale: weight of the parallel adapter beside the MLP (0.2).
    """

    def __init__(self, arch: str = "vitl14", registers: int = 0, final_norm: bool = True,
                 adapter_ratio: float = 0.5, parallel_scale: float = 0.2) -> None:
        if not 0 < adapter_ratio <= 4:
            raise ValueError(f"adapter_ratio must be in (0, 4], got {adapter_ratio}")
        super().__init__(arch=arch, registers=registers, trainable_blocks=0,
                         final_norm=final_norm)
        self.blocks = nn.ModuleList(AdaptedBlock(b, self.out_channels, adapter_ratio,
                                                 parallel_scale) for b in self.blocks)
        self._apply_freeze()

    def _apply_freeze(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(".adapter" in name)

    def load_pretrained(self, source: str) -> None:
        """An official DINOv2 ``.pth`` into the frozen part; the adapters keep their start
        values (every other key and shape is checked as for DINOv2 itself)."""
        from vpr_ros.errors import ConfigError
        from vpr_ros.models.checkpoints import dinov2_state, load_exact, read_state_dict

        if source == "package":
            raise ConfigError("weights.backbone: no pip package ships DINOv2 weights; give the "
                              "path of the official dinov2_*_pretrain.pth file")
        state = dinov2_state(read_state_dict(source), self.arch, self.num_registers, source)
        own = self.state_dict()
        adapters = {k: v for k, v in own.items() if ".adapter" in k and k not in state}
        load_exact(self, {**state, **adapters}, str(source))
        self.release_fixed_size()

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check_input_size((int(images.shape[-2]), int(images.shape[-1])))
        x, (h, w) = self.prepare_tokens(images)
        for blk in self.blocks:
            x = blk(x)
        if self.final_norm:
            x = self.norm(x)
        patches = x[:, 1 + self.num_registers:]
        feats = patches.transpose(1, 2).reshape(x.shape[0], self.out_channels, h, w)
        return BackboneOutput(features=feats, cls_token=x[:, 0])
