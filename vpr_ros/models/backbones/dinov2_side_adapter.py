"""SelaVPR++ backbone: a frozen DINOv2 with a MultiConv-adapter side network (Lu et al., T-PAMI 2025).

Why a side network: SelaVPR++'s "memory-efficient MultiConv adaptation" never back-propagates
through the foundation model. The DINOv2 trunk runs without autograd; a light side network reads
the trunk's intermediate block outputs and refines its own token stream ``y``:

    y <- tokens entering the first adapted block (the patch embedding for ViT-B, the output of
    block 7 for ViT-L)
    for every adapted block i:   x_i = block_i(x_{i-1})          (frozen, no autograd)
                                 y   = y + adapter_i(y + x_i)     (trained)
    features = final_norm(y)      (the trunk's frozen LayerNorm, applied with autograd)

so training memory and time scale with the adapters, not with the ViT. The float and the hash
branch of the two-branch (re-ranking) model each have their own side network over the same trunk
(``branches=2``); their normalised token maps are stacked along channels, ``[float | hash]``, so
that one :class:`BackboneOutput` carries both to the ``selavpr`` aggregator.

A MultiConv adapter (``MultiConvAdapter``) is a bottleneck whose middle sees the patch tokens as an
image: down-projection C -> C/2 + ReLU; three convolution branches over the patch grid (1x1 ->
C/4; 1x1 -> C/32 then 3x3 -> C/8; 1x1 -> C/32 then 5x5 -> C/8; each conv + BatchNorm(eps 1e-3) +
ReLU) concatenated back to C/2; a residual of the down-projected tokens; up-projection C/2 -> C.
The class token (and register tokens) bypass the convolutions: their row of the concatenation is
their own down-projection, to which the residual is added as well (so they carry twice their
down-projection, as in the release). Parameter and module names follow the released
``MulConvAdapter`` / ``adapters`` / ``adapters_hashing`` so the official checkpoints load with a
prefix map only.

Initialisation follows the release: up-projections start at zero (the side network begins as an
identity carrier of its input tokens and the trunk's features reach the heads unchanged) and the
convolutions at a small constant (1e-5); the down-projection's random init and the residual break
the symmetry between channels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.backbones.dinov2 import ARCHS, DinoV2Backbone
from vpr_ros.models.registry import register_backbone

#: Adapted (last) blocks per architecture when not given. ViT-S/B: every block; ViT-L: the last
#: 16 of 24, as released. ViT-g has no release; 2/3 of its depth mirrors the ViT-L choice.
DEFAULT_ADAPTED_BLOCKS = {"vits14": 12, "vitb14": 12, "vitl14": 16, "vitg14": 26}
CONV_INIT = 1e-5
BN_EPS = 1e-3


class ConvBNReLU(nn.Module):
    """Conv2d (with bias) -> BatchNorm2d(eps=1e-3) -> ReLU (the release's ``BasicConv2d``)."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=True)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class MultiConvAdapter(nn.Module):
    """Token bottleneck with multi-scale convolutions over the patch grid (see module docstring).

    Args:
        dim: token width C; the bottleneck is C/2, split C/4 (1x1) + C/8 (3x3) + C/8 (5x5) with
            C/32-wide 1x1 reductions before the 3x3 and 5x5 convolutions.
        prefix_tokens: tokens before the patches (class token + registers) that bypass the convs.
    """

    def __init__(self, dim: int, prefix_tokens: int = 1) -> None:
        super().__init__()
        if dim % 32:
            raise ValueError(f"MultiConv adapter width {dim} must be a multiple of 32")
        hidden = dim // 2
        reduced = dim // 32
        self.prefix_tokens = prefix_tokens
        self.D_fc1 = nn.Linear(dim, hidden)
        self.branch1 = ConvBNReLU(hidden, dim // 4, 1)
        self.branch2 = nn.Sequential(ConvBNReLU(hidden, reduced, 1), ConvBNReLU(reduced, dim // 8, 3))
        self.branch3 = nn.Sequential(ConvBNReLU(hidden, reduced, 1), ConvBNReLU(reduced, dim // 8, 5))
        self.D_fc2 = nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's start: zero up-projection, convolutions at a small constant."""
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.constant_(m.weight, CONV_INIT)
                nn.init.constant_(m.bias, CONV_INIT)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tokens (B, prefix + h*w, C), grid (h, w) -> (B, prefix + h*w, C)."""
        x0 = F.relu(self.D_fc1(tokens))
        b, _, hidden = x0.shape
        h, w = grid
        prefix = x0[:, : self.prefix_tokens]
        patches = x0[:, self.prefix_tokens:].transpose(1, 2).reshape(b, hidden, h, w)
        conv = torch.cat([self.branch1(patches), self.branch2(patches), self.branch3(patches)], 1)
        conv = conv.flatten(2).transpose(1, 2)
        return self.D_fc2(torch.cat([prefix, conv], dim=1) + x0)


@register_backbone("dinov2_side_adapter")
class DinoV2SideAdapterBackbone(DinoV2Backbone):
    """Frozen DINOv2 ViT-{S,B,L,G}/14 + MultiConv side network(s) (SelaVPR++).

    Args:
        arch: ``vits14`` | ``vitb14`` | ``vitl14`` | ``vitg14``.
        registers: 0, or 4 for the ``*_reg4`` releases (registers bypass the convolutions like the
            class token; the SelaVPR++ release itself uses no registers).
        adapted_blocks: how many of the last blocks feed the side network (default
            :data:`DEFAULT_ADAPTED_BLOCKS`: 12 for ViT-B, 16 for ViT-L as released).
        branches: 1 = one side network; 2 = the two-branch re-ranking model (float branch
            ``adapters`` and hash branch ``adapters_hashing``), features stacked ``[float | hash]``
            so ``out_channels`` is 2C.
        final_norm: apply the trunk's final LayerNorm to the side tokens (the release does).
    """

    def __init__(self, arch: str = "vitb14", registers: int = 0,
                 adapted_blocks: Optional[int] = None, branches: int = 1,
                 final_norm: bool = True) -> None:
        # Checked before the (slow) trunk is built, so a bad config fails at once.
        if arch not in ARCHS:
            raise ValueError(f"arch {arch!r} is not one of {sorted(ARCHS)}")
        depth = int(ARCHS[arch]["depth"])
        if adapted_blocks is None:
            adapted_blocks = DEFAULT_ADAPTED_BLOCKS[arch]
        if isinstance(adapted_blocks, bool) or not isinstance(adapted_blocks, int) \
                or not 1 <= adapted_blocks <= depth:
            raise ValueError(f"adapted_blocks must be an integer in [1, {depth}] for {arch}, got "
                             f"{adapted_blocks!r}")
        if branches not in (1, 2) or isinstance(branches, bool):
            raise ValueError(f"branches must be 1 (one side network) or 2 (float + hash side "
                             f"networks, the re-ranking model), got {branches!r}")
        super().__init__(arch=arch, registers=registers, trainable_blocks=0,
                         final_norm=final_norm)
        dim = int(ARCHS[arch]["dim"])
        self.trunk_channels = dim
        self.adapted_blocks = adapted_blocks
        self.branches = branches
        self.out_channels = dim * branches
        prefix = 1 + registers
        self.adapters = nn.ModuleList(MultiConvAdapter(dim, prefix) for _ in range(adapted_blocks))
        self.adapters_hashing: Optional[nn.ModuleList] = None
        if branches == 2:
            self.adapters_hashing = nn.ModuleList(MultiConvAdapter(dim, prefix)
                                                  for _ in range(adapted_blocks))

    def _apply_freeze(self) -> None:
        # Called by the parent constructor before the adapters exist: the trunk is frozen for
        # good; the adapters created afterwards keep requires_grad=True.
        for p in self.parameters():
            p.requires_grad_(False)

    def init_hash_branch_from_float(self) -> None:
        """Copy the float side network into the hash one: the release's start for training the
        hash branch of the re-ranking model after the float model has been trained."""
        if self.adapters_hashing is None:
            from vpr_ros.errors import ModelError
            raise ModelError("this backbone has one side network (branches=1); there is no hash "
                             "branch to initialise (use branches: 2 in the config)")
        self.adapters_hashing.load_state_dict(self.adapters.state_dict())

    def load_pretrained(self, path: str) -> None:
        """Load an official DINOv2 ``.pth`` into the frozen trunk; the adapters keep their
        weights. Every trunk key must be present with the right shape (named errors)."""
        from vpr_ros.errors import CheckpointError
        from vpr_ros.models.checkpoints import dinov2_state, load_exact, read_state_dict

        state = dinov2_state(read_state_dict(path), self.arch, self.num_registers, path)
        side = {k: v for k, v in self.state_dict().items()
                if k.startswith(("adapters.", "adapters_hashing."))}
        clash = sorted(set(side) & set(state))
        if clash:
            raise CheckpointError(f"{path}: contains side-network keys {clash[:4]}; it is not a "
                                  "plain DINOv2 checkpoint")
        load_exact(self, {**state, **side}, str(path))
        self.release_fixed_size()

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check_input_size((int(images.shape[-2]), int(images.shape[-1])))
        first = len(self.blocks) - self.adapted_blocks
        with torch.no_grad():  # the trunk is frozen: no autograd graph, no stored activations
            x, grid = self.prepare_tokens(images)
            for blk in list(self.blocks)[:first]:
                x = blk(x)
        side = [x] * self.branches  # each branch starts from the tokens entering block `first`
        heads = [self.adapters] + ([self.adapters_hashing] if self.adapters_hashing is not None
                                   else [])
        for i, blk in enumerate(list(self.blocks)[first:]):
            with torch.no_grad():
                x = blk(x)
            side = [y + adapters[i](y + x, grid) for y, adapters in zip(side, heads)]
        if self.final_norm:
            side = [self.norm(y) for y in side]
        b, (h, w), c = images.shape[0], grid, self.trunk_channels
        maps = [y[:, 1 + self.num_registers:].transpose(1, 2).reshape(b, c, h, w) for y in side]
        feats = maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)
        return BackboneOutput(features=feats, cls_token=side[0][:, 0])

