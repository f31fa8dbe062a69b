"""SelaVPR++ heads (Lu et al., T-PAMI 2025): a float GeM head and a 512-bit hash head.

Each head is the release's ``linear -> per-location L2 -> GeM -> linear``: a C -> C projection of
every patch token, L2-normalised per location, GeM-pooled (learnable p, init 3), then projected
(float: C -> 2048 for ViT-B, 4096 for ViT-L; hash: C -> 512) and L2-normalised.

Why two heads: SelaVPR++ searches a map with compact binary codes first (a 512-bit code is 64
bytes; Hamming distance over millions of codes takes milliseconds) and re-ranks the top
candidates with the float descriptors, which restores the float ranking whenever the true match
is among the candidates. The hash code is the sign of the hash head's output (``>= 0`` -> bit
1); training passes gradients through the sign unchanged (straight-through estimator).

Binary-code contract with :class:`vpr_ros.mapdb.place_map.PlaceMap`: ``forward_all`` returns
``"binary"`` as **packed** ``uint8`` of shape ``(B, bits / 8)`` in ``np.packbits`` order (bit
``k`` of the code is bit ``7 - k % 8`` of byte ``k // 8``, i.e. most significant bit first), the
layout PlaceMap's binary index stores and faiss ``IndexBinaryFlat`` searches. Pass it unchanged
as ``binary_codes=`` to ``PlaceMap.add`` and as ``query_codes=`` to ``PlaceMap.search`` on a map
created with ``{"kind": "binary", "bits": 512, "codes": "model"}``. Packing happens inside the
model (one matrix product, ONNX-exportable) so exported graphs hand back 64 bytes per image, not
512 floats.

Two-branch input: with ``branches=2`` the backbone (``dinov2_side_adapter``) stacks the float
branch's and the hash branch's token maps along channels, ``[float | hash]``; each head reads its
half. With ``branches=1`` both heads read the same features (any backbone).

Module names follow the release (``linear1``/``linear2`` float, ``linear3``/``linear4`` hash) so
its checkpoints load with a key map only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.registry import register_aggregator

#: Byte weights of np.packbits' default (big-endian) bit order.
_BIT_WEIGHTS = (128.0, 64.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0)


class GeMPool(nn.Module):
    """Generalised mean over space, ``mean(clamp(x, eps)^p)^(1/p)``, learnable p of shape (1,)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM p must be > 0, got {p}")
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C)."""
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


def sign_ste(z: torch.Tensor) -> torch.Tensor:
    """+1 where ``z >= 0`` else -1, with the identity as gradient (straight-through)."""
    codes = torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
    return z + (codes - z).detach()


def pack_sign_bits(z: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, bits) real -> (B, bits/8) uint8, bit = ``z >= 0``, ``np.packbits`` order.

    ``weights`` are the eight byte weights (128 ... 1); modules pass them as a buffer so an
    exported graph holds them as an initializer."""
    b, bits = z.shape
    ones = (z >= 0).to(z.dtype).reshape(b, bits // 8, 8)
    if weights is None:
        weights = torch.tensor(_BIT_WEIGHTS, device=z.device)
    return torch.matmul(ones, weights.to(z.dtype)).round().to(torch.uint8)


def tokenwise_gem_head(feats: torch.Tensor, token_fc: nn.Linear, gem: GeMPool,
                       out_fc: nn.Linear) -> torch.Tensor:
    """The release's head: per-token linear, per-location L2, GeM, linear (not normalised)."""
    t = token_fc(feats.permute(0, 2, 3, 1))                    # (B, h, w, C)
    t = F.normalize(t, p=2, dim=-1).permute(0, 3, 1, 2)       # (B, C, h, w)
    return out_fc(gem(t))


@register_aggregator("selavpr")
class SelaVPRAggregator(nn.Module):
    """Args:
        in_channels: backbone width (injected); 2C for a two-branch side-adapter backbone.
        out_dim: float descriptor size (2048 with ViT-B, 4096 with ViT-L in the paper).
        hash_bits: hash code length (512 in the paper; a multiple of 8); 0 = no hash head.
        branches: 1 (both heads read the same features) or 2 (features are ``[float | hash]``).
        p: initial GeM exponent of both heads.
    """

    def __init__(self, in_channels: int, out_dim: int = 2048, hash_bits: int = 512,
                 branches: int = 1, p: float = 3.0) -> None:
        super().__init__()
        if branches not in (1, 2):
            raise ValueError(f"branches must be 1 or 2, got {branches!r}")
        if in_channels % branches:
            raise ValueError(f"branches=2 needs the backbone's stacked [float | hash] features, "
                             f"but in_channels={in_channels} is odd")
        if not isinstance(out_dim, int) or out_dim <= 0:
            raise ValueError(f"out_dim must be a positive integer, got {out_dim!r}")
        if not isinstance(hash_bits, int) or hash_bits < 0 or hash_bits % 8:
            raise ValueError(f"hash_bits must be 0 (no hash head) or a positive multiple of 8, "
                             f"got {hash_bits!r}")
        if branches == 2 and not hash_bits:
            raise ValueError("branches=2 feeds a hash branch, but hash_bits=0 disables the hash "
                             "head; set hash_bits (512) or use branches=1")
        c = in_channels // branches
        self.branches = branches
        self.branch_channels = c
        self._out_dim = out_dim
        self.hash_bits = hash_bits
        self.linear1 = nn.Linear(c, c)
        self.gem = GeMPool(p)
        self.linear2 = nn.Linear(c, out_dim)
        self.extra_outputs: tuple[str, ...] = ()
        if hash_bits:
            self.linear3 = nn.Linear(c, c)
            self.gem_hashing = GeMPool(p)
            self.linear4 = nn.Linear(c, hash_bits)
            self.extra_outputs = ("binary",)
            self.register_buffer("bit_weights", torch.tensor(_BIT_WEIGHTS), persistent=False)

    @property
    def out_dim(self) -> int:
        return self._out_dim

    def _split(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.jit.is_tracing() and feats.shape[1] != self.branch_channels * self.branches:
            raise ValueError(f"selavpr aggregator expects {self.branch_channels * self.branches} "
                             f"feature channels, got {feats.shape[1]}")
        if self.branches == 1:
            return feats, feats
        c = self.branch_channels
        return feats[:, :c], feats[:, c:]

    def float_descriptor(self, feats: torch.Tensor) -> torch.Tensor:
        g = tokenwise_gem_head(feats, self.linear1, self.gem, self.linear2)
        return F.normalize(g, p=2, dim=-1)

    def hash_float(self, feats: torch.Tensor) -> torch.Tensor:
        """The hash head before the sign: L2-normalised (B, hash_bits)."""
        z = tokenwise_gem_head(feats, self.linear3, self.gem_hashing, self.linear4)
        return F.normalize(z, p=2, dim=-1)

    def forward(self, x: BackboneOutput) -> torch.Tensor:
        return self.float_descriptor(self._split(x.features)[0])

    def forward_all(self, x: BackboneOutput) -> dict[str, torch.Tensor]:
        """``{"global": (B, out_dim) float, "binary": (B, hash_bits/8) uint8 packed}``.

        In training mode it adds what the SelaVPR++ hashing loss reads: ``hash_float`` (the
        L2-normalised hash head output) and ``hash_codes`` (its +-1 signs, straight-through)."""
        f, h = self._split(x.features)
        out = {"global": self.float_descriptor(f)}
        if self.hash_bits:
            z = self.hash_float(h)
            out["binary"] = pack_sign_bits(z, self.bit_weights)
            if self.training:
                out["hash_float"] = z
                out["hash_codes"] = sign_ste(z)
        return out
