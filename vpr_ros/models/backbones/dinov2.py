"""DINOv2 ViT backbones (S/B/L/G, patch 14, with or without registers) built on timm blocks.

The transformer blocks, patch embedding and final norm are timm modules (their parameter names
match facebookresearch/dinov2 checkpoints one to one, see ``models/checkpoints.py``). The token
preparation is ours so that it follows the official DINOv2 recipe exactly: the positional
embedding is stored at the pre-training grid (37x37 for 518 px) and resized bicubically; the
released models without registers resize with a scale factor of ``(n + 0.1) / 37`` and no
antialiasing, the ``*_reg4`` releases (facebookresearch/dinov2's ``dinov2_*_reg`` hub entries)
with antialiasing and the output size itself (offset 0.0), so each checkpoint is run as it was
trained; registers are inserted after the class token and carry no positional embedding. Training may use any multiple of 14; ``fix_input_size`` precomputes the
resized positional embedding so an exported graph holds it as a constant (no resize op).
"""

from __future__ import annotations

import math
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vpr_ros.models.backbones.base import Backbone, BackboneOutput
from vpr_ros.models.registry import register_backbone

PATCH = 14
PRETRAIN_GRID = 37  # 518 / 14, the grid of the official positional embedding
ARCHS: dict[str, dict[str, int | str]] = {
    "vits14": {"timm": "vit_small_patch14_dinov2", "dim": 384, "depth": 12},
    "vitb14": {"timm": "vit_base_patch14_dinov2", "dim": 768, "depth": 12},
    "vitl14": {"timm": "vit_large_patch14_dinov2", "dim": 1024, "depth": 24},
    "vitg14": {"timm": "vit_giant_patch14_dinov2", "dim": 1536, "depth": 40},
}


#: (antialias, offset) of DINOv2's positional-embedding resize: the plain releases and the
#: register (``*_reg4``) releases are built with different settings upstream.
PLAIN_INTERPOLATION = (False, 0.1)
REGISTER_INTERPOLATION = (True, 0.0)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int],
                          antialias: bool = False, offset: float = 0.1) -> torch.Tensor:
    """Resize an official ``(1, 1 + M*M, C)`` positional embedding to ``grid_hw`` patches.

    Same arithmetic as DINOv2's own ``interpolate_pos_encoding``: bicubic, with a scale factor of
    ``(n + offset) / M`` when ``offset`` is non-zero and with the output size itself when it is
    0.0, antialiased or not; height and width are kept in their own axes. The defaults are the
    plain releases' settings, :data:`REGISTER_INTERPOLATION` the register releases'.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    m = int(math.isqrt(patch_pos.shape[1]))
    h, w = grid_hw
    if (h, w) == (m, m):
        return pos_embed
    dim = patch_pos.shape[-1]
    grid = patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        grid = F.interpolate(grid, scale_factor=((h + offset) / m, (w + offset) / m),
                             mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)
    if grid.shape[-2:] != (h, w):  # guards against float rounding of the scale factor
        raise RuntimeError(f"positional embedding resized to {tuple(grid.shape[-2:])}, "
                           f"expected {(h, w)}")
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


@register_backbone("dinov2")
class DinoV2Backbone(Backbone):
    """DINOv2 ViT-{S,B,L,G}/14.

    Args:
        arch: one of ``vits14``, ``vitb14``, ``vitl14``, ``vitg14``.
        registers: number of register tokens (0, or 4 for the ``*_reg4`` releases). It also
            selects the positional-embedding resize the release was built with
            (:data:`PLAIN_INTERPOLATION` or :data:`REGISTER_INTERPOLATION`).
        trainable_blocks: how many of the last blocks receive gradients; the rest is frozen
            (and run without autograd to save memory). The QAA/SALAD recipes use 2.
        final_norm: apply the backbone's last LayerNorm to the tokens (the released QAA
            models set ``norm_layer: True``).
    """

    size_multiple = PATCH
    stride = PATCH

    def __init__(self, arch: str = "vitb14", registers: int = 0, trainable_blocks: int = 2,
                 final_norm: bool = True) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch {arch!r} is not one of {sorted(ARCHS)}")
        if registers not in (0, 4):
            raise ValueError(f"registers must be 0 or 4 (the released DINOv2 models), got "
                             f"{registers}")
        spec = ARCHS[arch]
        depth = int(spec["depth"])
        if not 0 <= trainable_blocks <= depth:
            raise ValueError(f"trainable_blocks must be in [0, {depth}] for {arch}, got "
                             f"{trainable_blocks}")
        self.arch = arch
        self.num_registers = registers
        self.pos_interpolation = REGISTER_INTERPOLATION if registers else PLAIN_INTERPOLATION
        self.final_norm = final_norm
        self.out_channels = dim = int(spec["dim"])
        vit = timm.create_model(str(spec["timm"]), pretrained=False, num_classes=0,
                                img_size=PATCH * PRETRAIN_GRID)
        self.patch_embed = vit.patch_embed.proj  # Conv2d(3, C, 14, 14)
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + PRETRAIN_GRID ** 2, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        self.trainable_blocks = trainable_blocks
        self._fixed_grid: Optional[tuple[int, int]] = None
        self.register_buffer("_fixed_pos", torch.empty(0), persistent=False)
        self._apply_freeze()

    # -- training set-up -------------------------------------------------------------------
    def _apply_freeze(self) -> None:
        first_trainable = len(self.blocks) - self.trainable_blocks
        for p in self.parameters():
            p.requires_grad_(False)
        for blk in list(self.blocks)[first_trainable:]:
            for p in blk.parameters():
                p.requires_grad_(True)
        if self.trainable_blocks > 0 and self.final_norm:
            for p in self.norm.parameters():
                p.requires_grad_(True)

    def load_pretrained(self, source: str) -> None:
        """An official DINOv2 ``.pth`` (or a safetensors copy of it)."""
        from vpr_ros.errors import ConfigError
        from vpr_ros.models.checkpoints import load_dinov2_weights

        if source == "package":
            raise ConfigError("weights.backbone: no pip package ships DINOv2 weights; give the "
                              "path of the official dinov2_*_pretrain.pth file")
        load_dinov2_weights(self, source)

    # -- size handling ---------------------------------------------------------------------
    def fix_input_size(self, size: tuple[int, int]) -> None:
        """Precompute the positional embedding for ``size`` (pixels); forward then only
        accepts that size. This is what ONNX/TensorRT export uses."""
        self.check_input_size(size)
        grid = (size[0] // PATCH, size[1] // PATCH)
        with torch.no_grad():
            self._fixed_pos = self._resized_pos(grid).detach().clone()
        self._fixed_grid = grid

    def release_fixed_size(self) -> None:
        self._fixed_grid = None
        self._fixed_pos = torch.empty(0, device=self.pos_embed.device)

    def _pos_for(self, grid: tuple[int, int]) -> torch.Tensor:
        if self._fixed_grid is not None:
            if grid != self._fixed_grid:
                from vpr_ros.errors import ModelError
                fh, fw = self._fixed_grid
                raise ModelError(f"this backbone is fixed to {fh * PATCH}x{fw * PATCH} input; got "
                                 f"{grid[0] * PATCH}x{grid[1] * PATCH}. Resize images to the "
                                 "model's input size first.")
            return self._fixed_pos
        return self._resized_pos(grid)

    def _resized_pos(self, grid: tuple[int, int]) -> torch.Tensor:
        antialias, offset = self.pos_interpolation
        return interpolate_pos_embed(self.pos_embed, grid, antialias=antialias, offset=offset)

    # -- forward ---------------------------------------------------------------------------
    def prepare_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        b = x.shape[0]
        x = self.patch_embed(x)  # (B, C, h, w)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self._pos_for(grid)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        return x, grid

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check_input_size((int(images.shape[-2]), int(images.shape[-1])))
        first_trainable = len(self.blocks) - self.trainable_blocks
        grad_needed = torch.is_grad_enabled() and self.training
        with torch.set_grad_enabled(grad_needed and first_trainable == 0):
            x, (h, w) = self.prepare_tokens(images)
            for blk in list(self.blocks)[:first_trainable]:
                x = blk(x)
        if grad_needed and first_trainable > 0:
            x = x.detach()
        for blk in list(self.blocks)[first_trainable:]:
            x = blk(x)
        if self.final_norm:
            x = self.norm(x)
        cls_tok = x[:, 0]
        patches = x[:, 1 + self.num_registers:]
        feats = patches.transpose(1, 2).reshape(x.shape[0], self.out_channels, h, w)
        return BackboneOutput(features=feats, cls_token=cls_tok)
