"""DINOv2 + CLIP tokens joined by DC-VLAQ's residual-guided fusion (Zhu et al., "DC-VLAQ:
Query-Residual Aggregation for Robust Visual Place Recognition", Sec. 3.2, Eq. 3-4).

DINOv2 gives fine appearance detail, CLIP (image-text pre-training) gives semantics; adding or
cross-attending their tokens naively shifts the token distribution the aggregator relies on.
DC-VLAQ keeps the representation anchored in DINOv2's space and adds only a learned correction
driven by the disagreement of the two models, token by token::

    X_dino = L2(dinov2 patch tokens),   X_clip = L2(clip patch tokens)      (per token)
    Z      = X_dino + W (X_clip - X_dino) + b                               (Eq. 4)

(F_C, "a linear layer applied token-wise", is ``W, b``; the per-encoder L2 is Sec. 4.2's "L2 norm
to each encoder's local feature".)

CLIP is frozen (no gradients, run without autograd, kept in eval mode); DINOv2 trains its last
``trainable_blocks`` blocks (2 in the paper, Sec. 4.2), and the fusion layer ``W, b`` trains. The
DINOv2 half is :class:`DinoV2Backbone` itself (state-dict prefix ``dino.``).

The CLIP half is a timm CLIP ViT (pre-norm ``norm_pre``, final ``norm`` = CLIP's ``ln_post``)
whose width must equal DINOv2's and whose token grid must equal DINOv2's grid, so that token i
of both models sees the same image patch:

* ``vitb14`` / ``vits14``: patch 14, the grids match directly. No public CLIP weights exist with
  this shape; they are random unless the user trained some (timm layout). ``vits16`` (width
  384, for DINOv2-S) has no public weights either; it is the small model of the patch-16 path.
* ``vitb16`` (OpenAI ViT-B/16), ``vitl14`` / ``vitl14_336`` (OpenAI ViT-L/14, for DINOv2-L):
  CLIP's input is resized to ``grid x clip_patch`` pixels (bilinear) so a 322 px DINOv2 input
  (23 x 23 patches) meets CLIP-B/16 at 368 px (23 x 23). CLIP's positional embedding is
  resampled from its pre-training grid (bicubic, as timm/open_clip do). Once the input size is
  fixed (``fix_input_size``, as for export) both are precomputed: the embedding as a constant
  and the resize as two interpolation matrices (``M_h @ image @ M_w^T``, the same bilinear
  arithmetic), so an exported graph has no ``Resize`` op, which TensorRT plans poorly.

CLIP expects its own normalisation; the images arrive normalised with the model's
``input.mean/std`` (``input_mean``/``input_std`` here, ImageNet by default: keep them equal to
the model config's ``input`` section), so the CLIP branch re-normalises with one per-channel
affine map.

Choices the paper leaves open (configurable): which DINOv2 and CLIP sizes (Eq. 3 only needs
equal widths d and the same token count M: the CLIP input is resized so its grid is DINOv2's);
CLIP's patch tokens are taken after its final LayerNorm (``clip_final_norm``); the fusion layer
starts at zero (``zero_init_fusion``) so training starts from pure DINOv2 tokens and the CLIP
correction is learned from there; the class token passed on is DINOv2's.

Weights: an official DINOv2 ``.pth`` goes into the DINOv2 half and a CLIP file in OpenAI/open_clip
layout (``visual.conv1.weight``, ``visual.transformer.resblocks.N`` ...; text-tower keys are
ignored) or timm layout (``patch_embed.proj.weight``, ``blocks.N`` ...) into the CLIP half, by
``vpr model import dcvlaq DINOV2 --clip CLIP`` or by ``weights.backbone: DINOV2:CLIP`` (the two
paths joined by ``os.pathsep``; see ``load_pretrained``). OpenAI weights use QuickGELU (``clip_act: quick_gelu``, the default);
open_clip's LAION weights use GELU (``clip_act: gelu``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import resample_abs_pos_embed
from torch import nn

from vpr_ros.errors import CheckpointError, ConfigError, ModelError
from vpr_ros.models.backbones.base import Backbone, BackboneOutput
from vpr_ros.models.backbones.dinov2 import PATCH, DinoV2Backbone
from vpr_ros.models.config import IMAGENET_MEAN, IMAGENET_STD
from vpr_ros.models.registry import register_backbone

if TYPE_CHECKING:  # model_dir imports the registry, which imports this module
    from vpr_ros.models.model_dir import ModelMeta

# name -> timm model the layers come from, patch size, width, heads, pre-training input (px)
CLIP_ARCHS: dict[str, dict[str, Any]] = {
    "vits14": {"timm": "vit_base_patch16_clip_224", "patch": 14, "dim": 384, "heads": 6,
               "depth": 12, "pretrain_px": 224},
    "vits16": {"timm": "vit_base_patch16_clip_224", "patch": 16, "dim": 384, "heads": 6,
               "depth": 12, "pretrain_px": 224},
    "vitb14": {"timm": "vit_base_patch16_clip_224", "patch": 14, "dim": 768, "heads": 12,
               "depth": 12, "pretrain_px": 224},
    "vitb16": {"timm": "vit_base_patch16_clip_224", "patch": 16, "dim": 768, "heads": 12,
               "depth": 12, "pretrain_px": 224},
    "vitl14": {"timm": "vit_large_patch14_clip_224", "patch": 14, "dim": 1024, "heads": 16,
               "depth": 24, "pretrain_px": 224},
    "vitl14_336": {"timm": "vit_large_patch14_clip_336", "patch": 14, "dim": 1024, "heads": 16,
                   "depth": 24, "pretrain_px": 336},
}
CLIP_ACTS = ("quick_gelu", "gelu")
# Keys of a CLIP visual tower that produce the joint image-text embedding, which this backbone
# never computes (it uses patch tokens): OpenAI's ``proj`` and timm's ``head``/``fc_norm``.
IGNORED_CLIP_KEYS = ("proj", "head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias")


class ClipVisionTower(nn.Module):
    """A CLIP ViT image encoder returning its patch tokens (class token dropped).

    Parameter names are timm's (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
    ``norm_pre``, ``blocks.N``, ``norm``), so timm-layout files load as they are.
    """

    def __init__(self, arch: str = "vitb14", act: str = "quick_gelu",
                 final_norm: bool = True) -> None:
        super().__init__()
        if arch not in CLIP_ARCHS:
            raise ValueError(f"clip_arch {arch!r} is not one of {sorted(CLIP_ARCHS)}")
        if act not in CLIP_ACTS:
            raise ValueError(f"clip_act {act!r} is not one of {list(CLIP_ACTS)} (OpenAI weights: "
                             "quick_gelu; open_clip LAION weights: gelu)")
        spec = CLIP_ARCHS[arch]
        self.arch = arch
        self.patch = int(spec["patch"])
        self.dim = int(spec["dim"])
        self.final_norm = final_norm
        self.pretrain_grid = int(spec["pretrain_px"]) // self.patch
        vit = timm.create_model(str(spec["timm"]), pretrained=False, num_classes=0,
                                patch_size=self.patch, embed_dim=self.dim,
                                num_heads=int(spec["heads"]), depth=int(spec["depth"]),
                                img_size=int(spec["pretrain_px"]), act_layer=act)
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        self.norm = vit.norm
        self._fixed_grid: Optional[tuple[int, int]] = None
        self.register_buffer("_fixed_pos", torch.empty(0), persistent=False)

    def pos_for(self, grid: tuple[int, int]) -> torch.Tensor:
        if self._fixed_grid is not None and grid == self._fixed_grid:
            return self._fixed_pos
        return resample_abs_pos_embed(self.pos_embed, list(grid),
                                      old_size=[self.pretrain_grid, self.pretrain_grid])

    def fix_grid(self, grid: tuple[int, int]) -> None:
        """Precompute the resampled positional embedding (an exported graph holds a constant)."""
        with torch.no_grad():
            self._fixed_pos = resample_abs_pos_embed(
                self.pos_embed, list(grid),
                old_size=[self.pretrain_grid, self.pretrain_grid]).detach().clone()
        self._fixed_grid = grid

    def release_fixed_size(self) -> None:
        self._fixed_grid = None
        self._fixed_pos = torch.empty(0, device=self.pos_embed.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images (B, 3, gh*patch, gw*patch) -> patch tokens (B, gh*gw, C)."""
        x = self.patch_embed.proj(images)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm_pre(x + self.pos_for(grid))
        for blk in self.blocks:
            x = blk(x)
        if self.final_norm:
            x = self.norm(x)
        return x[:, 1:]


@register_backbone("dinov2_clip_fusion")
class DinoV2ClipFusionBackbone(Backbone):
    """DINOv2 and frozen CLIP tokens fused as ``Z = X_dino + Linear(X_clip - X_dino)``.

    Args:
        arch, registers, trainable_blocks, final_norm: the DINOv2 half (see DinoV2Backbone).
        clip_arch: one of ``CLIP_ARCHS``; its width must equal DINOv2's.
        clip_act: ``quick_gelu`` (OpenAI weights) or ``gelu`` (open_clip LAION weights).
        clip_final_norm: apply CLIP's final LayerNorm (``ln_post``) to its patch tokens.
        zero_init_fusion: start the fusion layer at zero (Z = X_dino at initialisation).
        input_mean, input_std: the normalisation the model's input already has (the model
            config's ``input.mean``/``input.std``); CLIP's own is applied from there.
    """

    size_multiple = PATCH
    stride = PATCH

    def __init__(self, arch: str = "vitb14", registers: int = 0, trainable_blocks: int = 2,
                 final_norm: bool = True, clip_arch: str = "vitb14",
                 clip_act: str = "quick_gelu", clip_final_norm: bool = True,
                 zero_init_fusion: bool = True,
                 input_mean: Sequence[float] = IMAGENET_MEAN,
                 input_std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        mean, std = _triple("input_mean", input_mean), _triple("input_std", input_std)
        if min(std) <= 0:
            raise ValueError(f"input_std must be > 0 per channel, got {list(std)}")
        self.dino = DinoV2Backbone(arch=arch, registers=registers,
                                   trainable_blocks=trainable_blocks, final_norm=final_norm)
        self.clip = ClipVisionTower(clip_arch, clip_act, clip_final_norm)
        dim = self.dino.out_channels
        if self.clip.dim != dim:
            same = sorted(a for a, s in CLIP_ARCHS.items() if s["dim"] == dim)
            raise ValueError(f"clip_arch {clip_arch!r} has width {self.clip.dim} but DINOv2 "
                             f"{arch} has {dim}; the fusion adds tokens, so the widths must "
                             f"be equal (CLIP archs of width {dim}: {same})")
        self.out_channels = dim
        self.fusion = nn.Linear(dim, dim)
        if zero_init_fusion:
            nn.init.zeros_(self.fusion.weight)
            nn.init.zeros_(self.fusion.bias)
        clip_mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        clip_std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        in_mean = torch.tensor(mean).view(1, 3, 1, 1)
        in_std = torch.tensor(std).view(1, 3, 1, 1)
        # x_clip = (x * in_std + in_mean - clip_mean) / clip_std = x * scale + shift
        self.register_buffer("_clip_scale", in_std / clip_std, persistent=False)
        self.register_buffer("_clip_shift", (in_mean - clip_mean) / clip_std, persistent=False)
        self._resize_for: Optional[tuple[int, int]] = None            # fixed input (H, W)
        self.register_buffer("_resize_h", torch.empty(0), persistent=False)
        self.register_buffer("_resize_w", torch.empty(0), persistent=False)
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()

    # -- modes and sizes -------------------------------------------------------------------
    def train(self, mode: bool = True) -> "DinoV2ClipFusionBackbone":
        super().train(mode)
        self.clip.eval()  # frozen: never in training mode
        return self

    def fix_input_size(self, size: tuple[int, int]) -> None:
        self.check_input_size(size)
        self.dino.fix_input_size(size)
        grid = (size[0] // PATCH, size[1] // PATCH)
        self.clip.fix_grid(grid)
        if self.clip.patch != PATCH:
            dev = self._clip_scale.device
            self._resize_h = bilinear_matrix(size[0], grid[0] * self.clip.patch).to(dev)
            self._resize_w = bilinear_matrix(size[1], grid[1] * self.clip.patch).to(dev)
            self._resize_for = (int(size[0]), int(size[1]))

    def release_fixed_size(self) -> None:
        self.dino.release_fixed_size()
        self.clip.release_fixed_size()
        self._resize_for = None
        self._resize_h = torch.empty(0, device=self._clip_scale.device)
        self._resize_w = torch.empty(0, device=self._clip_scale.device)

    def load_pretrained(self, source: str) -> None:
        """``weights.backbone`` (``vpr model init --backbone-weights``, a recipe's
        ``model.backbone_weights``) names this backbone's two pre-trained halves as one string:
        the official DINOv2 ``.pth`` and the CLIP visual-tower file joined by ``os.pathsep``
        (``dinov2_vitb14_pretrain.pth:clip_vit_b16.bin``), in either order; each file goes to
        the half its keys identify. A single file loads its half alone."""
        from vpr_ros.models.checkpoints import read_state_dict

        paths = [p for p in str(source).split(os.pathsep) if p]
        if source == "package" or not paths:
            raise ConfigError(f"weights.backbone {source!r}: {type(self).__name__} needs the "
                              f"DINOv2 and CLIP weight files joined by {os.pathsep!r} (no pip "
                              "package ships them)")
        found: dict[str, str] = {}
        for path in paths:
            state = read_state_dict(path)
            half = "clip" if _looks_like_clip(state) else "dinov2"
            if half in found:
                raise ConfigError(f"weights.backbone: {found[half]} and {path} are both {half} "
                                  "weights; give one DINOv2 and one CLIP file")
            found[half] = path
            if half == "clip":
                _load_clip_state(self.clip, clip_to_ours(state), path)
            else:
                _load_dinov2_state(self.dino, state, path)
        self.release_fixed_size()

    # -- forward ---------------------------------------------------------------------------
    def clip_tokens(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """CLIP patch tokens (B, gh*gw, C) on DINOv2's grid, without autograd (frozen)."""
        with torch.no_grad():
            x = images * self._clip_scale + self._clip_shift
            if self.clip.patch != PATCH:
                hw = (int(images.shape[-2]), int(images.shape[-1]))
                if hw == self._resize_for:
                    x = torch.matmul(torch.matmul(self._resize_h, x), self._resize_w.t())
                else:
                    x = F.interpolate(x, size=(grid[0] * self.clip.patch,
                                               grid[1] * self.clip.patch),
                                      mode="bilinear", align_corners=False)
            return self.clip(x)

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        dino = self.dino(images)
        b, c, h, w = dino.features.shape
        x_dino = F.normalize(dino.features.flatten(2).transpose(1, 2), p=2, dim=-1)
        x_clip = F.normalize(self.clip_tokens(images, (h, w)), p=2, dim=-1)
        z = x_dino + self.fusion(x_clip - x_dino)
        return BackboneOutput(features=z.transpose(1, 2).reshape(b, c, h, w),
                              cls_token=dino.cls_token)


def bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` matrix of 1-D linear interpolation as ``F.interpolate`` does it
    (``align_corners=False``, no antialiasing). Bilinear resizing is separable, so
    ``M_h @ X @ M_w^T`` equals ``F.interpolate(X, (h_out, w_out), mode="bilinear")``."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(0)          # (1, n_in, n_in)
    cols = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)
    return cols[0].t().float()                                        # (n_out, n_in)


def _triple(name: str, value: Sequence[float]) -> tuple[float, float, float]:
    if isinstance(value, (str, bytes)) or len(value) != 3:
        raise ValueError(f"{name} must be three numbers (R, G, B), got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


# -- CLIP weight files -----------------------------------------------------------------------

_OPENAI_TO_TIMM = (
    (r"^conv1\.", "patch_embed.proj."),
    (r"^ln_pre\.", "norm_pre."),
    (r"^ln_post\.", "norm."),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
)


def clip_to_ours(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP state dict in OpenAI/open_clip layout (whole model with ``visual.`` keys, or the
    visual tower alone) or timm layout -> :class:`ClipVisionTower` names. Unknown keys keep
    their names so that loading reports them as unexpected."""
    if any(k.startswith("visual.") for k in sd):
        visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    else:
        visual = dict(sd)
    out: dict[str, torch.Tensor] = {}
    openai = "conv1.weight" in visual or "class_embedding" in visual
    for key, value in visual.items():
        if key in IGNORED_CLIP_KEYS:
            continue
        if openai:
            if key == "class_embedding":
                key, value = "cls_token", value.reshape(1, 1, -1)
            elif key == "positional_embedding":
                key, value = "pos_embed", value.unsqueeze(0)
            else:
                for pattern, repl in _OPENAI_TO_TIMM:
                    key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _describe_clip(state: Mapping[str, torch.Tensor]) -> Optional[dict[str, int]]:
    w = state.get("patch_embed.proj.weight")
    pos = state.get("pos_embed")
    if w is None or pos is None or w.dim() != 4:
        return None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    return {"patch": int(w.shape[-1]), "dim": int(w.shape[0]), "depth": depth, "grid": grid}


def _looks_like_clip(sd: Mapping[str, torch.Tensor]) -> bool:
    """OpenAI/open_clip (``visual.*``, ``conv1``, ``class_embedding``) or timm CLIP
    (``norm_pre``, which DINOv2 does not have) rather than an official DINOv2 file."""
    return any(k.startswith("visual.") or k in ("conv1.weight", "class_embedding",
                                                  "norm_pre.weight") for k in sd)


def _load_dinov2_state(dino: DinoV2Backbone, sd: Mapping[str, torch.Tensor],
                       source: str | Path) -> None:
    from vpr_ros.models.checkpoints import dinov2_state, load_exact

    load_exact(dino, dinov2_state(sd, dino.arch, dino.num_registers, source), str(source))
    dino.release_fixed_size()


def load_clip_weights(tower: ClipVisionTower, path: str | Path) -> None:
    """Load a CLIP visual tower file into ``tower`` (every key and shape checked, by name)."""
    from vpr_ros.models.checkpoints import read_state_dict

    _load_clip_state(tower, clip_to_ours(read_state_dict(path)), path)


def _load_clip_state(tower: ClipVisionTower, state: Mapping[str, torch.Tensor],
                     path: str | Path) -> None:
    from vpr_ros.models.checkpoints import load_exact

    found = _describe_clip(state)
    if found is None:
        raise CheckpointError(f"{path}: not a CLIP visual tower (no conv1/patch_embed and "
                              "positional embedding found); expected OpenAI/open_clip "
                              "('visual.conv1.weight', ...) or timm ('patch_embed.proj.weight', "
                              "...) layout")
    spec = CLIP_ARCHS[tower.arch]
    want = {"patch": tower.patch, "dim": tower.dim, "depth": int(spec["depth"]),
            "grid": tower.pretrain_grid}
    if found != want:
        fits = sorted(a for a, s in CLIP_ARCHS.items()
                      if (s["patch"], s["dim"], s["depth"], s["pretrain_px"] // s["patch"])
                      == (found["patch"], found["dim"], found["depth"], found["grid"]))
        raise CheckpointError(f"{path}: is a CLIP ViT with patch {found['patch']}, width "
                              f"{found['dim']}, {found['depth']} blocks, {found['grid']}x"
                              f"{found['grid']} positional grid, but clip_arch {tower.arch!r} "
                              f"is {want}; set backbone.params.clip_arch to "
                              f"{fits[0] if fits else 'an arch of that shape'!r}")
    load_exact(tower, state, str(path))
    tower.release_fixed_size()


def load_fusion_weights(backbone: DinoV2ClipFusionBackbone, dinov2: str | Path | None = None,
                        clip: str | Path | None = None) -> None:
    """Pretrained halves: an official DINOv2 ``.pth`` and/or a CLIP visual-tower file."""
    from vpr_ros.models.checkpoints import load_dinov2_weights

    if dinov2 is not None:
        load_dinov2_weights(backbone.dino, dinov2)
    if clip is not None:
        load_clip_weights(backbone.clip, clip)
    backbone.release_fixed_size()


def create_fusion_model_dir(config_path: str | Path, out: str | Path,
                            dinov2: str | None = None, clip: str | None = None,
                            seed: int = 0) -> ModelMeta:
    """``vpr model import dcvlaq``: a model directory from a config naming this backbone, with
    the DINOv2 and CLIP halves loaded from their own files (``None``/'none': random). The same
    as ``vpr model init CONFIG --backbone-weights DINOV2:CLIP`` with the two files as separate,
    named arguments (and a refusal of any other backbone). Returns the :class:`ModelMeta`.
    """
    from vpr_ros.models.config import load_yaml, model_config_from_dict
    from vpr_ros.models.model_dir import read_model_meta, save_model_dir
    from vpr_ros.models.vpr_model import build_model

    config = model_config_from_dict(load_yaml(config_path), source=str(config_path))
    if config.backbone.name != "dinov2_clip_fusion":
        raise ConfigError(f"{config_path}: backbone is {config.backbone.name!r}; the dcvlaq "
                          "import needs a 'dinov2_clip_fusion' backbone (e.g. "
                          "config/models/dcvlaq_dinov2b.yaml)")
    dinov2 = None if dinov2 in (None, "none", "random") else dinov2
    clip = None if clip in (None, "none", "random") else clip
    torch.manual_seed(seed)
    model = build_model(config)
    if not isinstance(model.backbone, DinoV2ClipFusionBackbone):
        raise ModelError("the registered 'dinov2_clip_fusion' is not this module's class")
    load_fusion_weights(model.backbone, dinov2=dinov2, clip=clip)
    save_model_dir(model, out, extra={"init_config": str(config_path),
                                      "backbone_weights": str(dinov2 or "none"),
                                      "clip_weights": str(clip or "none")})
    return read_model_meta(out)
