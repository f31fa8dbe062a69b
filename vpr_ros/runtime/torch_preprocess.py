"""The GPU twin of :mod:`vpr_ros.runtime.preprocess`: same resize policy, same arithmetic.

On a GPU backend the camera frame should be uploaded once as uint8 and resized there (a 4x
smaller copy than a float batch, and no CPU resize in the frame budget). For the descriptors to
stay backend-independent the twin computes what OpenCV computes on the CPU, method by method:

* growing (``INTER_LINEAR``, and ``INTER_AREA`` when only some axis shrinks): OpenCV's two-tap
  filters with its float32 phases, 11-bit fixed-point coefficients and the integer shifts of its
  vectorised vertical pass;
* shrinking by whole factors: integer block sums with OpenCV's rounding;
* shrinking by other factors: coverage weights (float32), rounded to uint8;

then normalised with the same float32 operations as the numpy path. The result matches OpenCV
bit for bit except for at most one grey level on a fraction of a percent of pixels (OpenCV's
scalar tails and border rows round differently from its vector body);
``test/test_backends_preprocess.py`` bounds that on real and synthetic frames of many sizes.

Models that record a release's float interpolation (``bilinear_antialias``,
``bicubic_antialias``) are resized by :mod:`vpr_ros.runtime.float_resize`, the very function the
CPU path runs, here on the encoder's device.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from vpr_ros.errors import InputError
from vpr_ros.runtime.area_resize import area_cells
from vpr_ros.runtime.preprocess import Preprocessing, check_image, resized_and_crop

TorchImages = Union[np.ndarray, Sequence[np.ndarray], torch.Tensor, Sequence[torch.Tensor]]


#: OpenCV's fixed-point scale for uint8 resize coefficients (INTER_RESIZE_COEF_BITS = 11).
COEF_SCALE = 2048


def linear_taps(src: int, dst: int, area_mode: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's two-tap filter along one axis: source indices (i0, i1) and fixed-point
    coefficients (c0, c1) summing to 2048, for INTER_LINEAR (or INTER_AREA's mode when the
    image grows along some axis). Phases are computed in float32 as OpenCV does."""
    scale = src / dst
    inv = 1.0 / scale
    i0 = np.empty(dst, dtype=np.int64)
    frac = np.empty(dst, dtype=np.float32)
    for d in range(dst):
        if area_mode:
            s = math.floor(d * scale)
            f = np.float32((d + 1) - (s + 1) * inv)
            f = np.float32(0.0) if f <= 0 else np.float32(f - math.floor(f))
        else:
            f = np.float32((d + 0.5) * scale - 0.5)
            s = math.floor(f)
            f = np.float32(f - s)
        if s < 0:
            s, f = 0, np.float32(0.0)
        if s >= src - 1:
            s, f = src - 1, np.float32(0.0)
        i0[d], frac[d] = s, f
    c1 = np.round(frac * COEF_SCALE).astype(np.int64)
    c0 = np.round((np.float32(1.0) - frac) * COEF_SCALE).astype(np.int64)
    return i0, np.minimum(i0 + 1, src - 1), c0, c1


def area_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) coverage weights of OpenCV's INTER_AREA when shrinking (src >= dst)."""
    starts, index, weight = area_cells(src, dst)
    w = np.zeros((dst, src), dtype=np.float64)
    for d in range(dst):
        w[d, index[starts[d]:starts[d + 1]]] = weight[starts[d]:starts[d + 1]]
    return w


@dataclass(frozen=True)
class ResizePlan:
    """How one source size maps to the network input: OpenCV's method and its parameters.

    ``mode``: ``identity``, ``linear`` (fixed-point two-tap filters, also INTER_AREA on a
    growing axis), ``area_int`` (integer block means) or ``area`` (coverage weights). ``crop``
    is (top, left) into the resized image for the center-crop policy.
    """

    mode: str
    resized: tuple[int, int]
    crop: tuple[int, int]
    area_mode: bool = False


def resize_plan(src_hw: tuple[int, int], prep: Preprocessing) -> ResizePlan:
    """Mirror :func:`vpr_ros.runtime.preprocess.resize_image`'s decisions for one size."""
    H, W = src_hw
    (rh, rw), (top, left) = resized_and_crop(src_hw, prep)
    if (H, W) == (rh, rw):
        return ResizePlan("identity", (rh, rw), (top, left))
    if H * W > rh * rw:  # preprocess._resize picks INTER_AREA when shrinking
        if H >= rh and W >= rw:
            integer = H % rh == 0 and W % rw == 0
            return ResizePlan("area_int" if integer else "area", (rh, rw), (top, left))
        return ResizePlan("linear", (rh, rw), (top, left), area_mode=True)
    return ResizePlan("linear", (rh, rw), (top, left))


@functools.lru_cache(maxsize=32)
def _taps(src: int, dst: int, area_mode: bool, device: torch.device
          ) -> tuple[torch.Tensor, ...]:
    """:func:`linear_taps` as device tensors, made once per size (a camera has one size)."""
    return tuple(torch.from_numpy(a).to(device, torch.int64 if i < 2 else torch.int32)
                 for i, a in enumerate(linear_taps(src, dst, area_mode)))


@functools.lru_cache(maxsize=32)
def _area(src: int, dst: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(area_weights(src, dst)).float().to(device)


def resize_uint8(stack: torch.Tensor, plan: ResizePlan, out_hw: tuple[int, int]) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, h, w, 3) float32 holding OpenCV's uint8 result."""
    (H, W), (rh, rw) = stack.shape[1:3], plan.resized
    (top, left), (h, w) = plan.crop, out_hw
    if plan.mode == "identity":
        return stack[:, top:top + h, left:left + w].float()
    if plan.mode == "linear":
        yi0, yi1, b0, b1 = (t[top:top + h] for t in _taps(H, rh, plan.area_mode, stack.device))
        xi0, xi1, a0, a1 = (t[left:left + w] for t in _taps(W, rw, plan.area_mode, stack.device))
        s = stack.to(torch.int32)
        horiz = (s.index_select(2, xi0) * a0[None, None, :, None]
                 + s.index_select(2, xi1) * a1[None, None, :, None])          # scale 2^11
        # OpenCV's vectorised vertical pass: (((r0 >> 4) * b0) >> 16) + ((r1 >> 4) * b1) >> 16,
        # then (+2) >> 2: scale 2^22 back to 2^0 with its intermediate truncations.
        v = (((horiz.index_select(1, yi0) >> 4) * b0[None, :, None, None] >> 16)
             + ((horiz.index_select(1, yi1) >> 4) * b1[None, :, None, None] >> 16))
        return ((v + 2) >> 2).clamp_(0, 255).float()
    if plan.mode == "area_int":
        ky, kx = H // rh, W // rw
        sums = stack.to(torch.int32).reshape(-1, rh, ky, rw, kx, 3).sum(dim=(2, 4))
        if (ky, kx) == (2, 2):  # OpenCV's 2x2 kernel rounds half up, the others half to even
            out = torch.div(sums + 2, 4, rounding_mode="floor").float()
        else:
            out = (sums.double() / (ky * kx)).round_().float()
        return out[:, top:top + h, left:left + w]
    wy = _area(H, rh, stack.device)[top:top + h]
    wx = _area(W, rw, stack.device)[left:left + w]
    rows = torch.einsum("oh,nhwc->nowc", wy, stack.float())
    return torch.einsum("pw,nowc->nopc", wx, rows).round_().clamp_(0, 255).float()


class TorchPreprocessor:
    """``(images) -> (B, 3, h, w) float32`` on ``device``, matching ``preprocess_batch``.

    Accepts what the numpy path accepts (a list of HxWx3 uint8 arrays or one (B, H, W, 3)
    array) and uint8 torch tensors of the same layouts, e.g. frames already decoded on the GPU.
    """

    def __init__(self, prep: Preprocessing, device: Union[str, torch.device] = "cpu",
                 ) -> None:
        self.prep = prep
        self.device = torch.device(device)
        self._mean = torch.tensor(prep.mean, dtype=torch.float32) * 255.0
        self._inv_std = 1.0 / (torch.tensor(prep.std, dtype=torch.float32) * 255.0)
        self._mean = self._mean.to(self.device)
        self._inv_std = self._inv_std.to(self.device)

    def _as_list(self, images: TorchImages) -> list[torch.Tensor]:
        if isinstance(images, (np.ndarray, torch.Tensor)):
            if images.ndim == 4:
                images = list(images)
            else:
                raise InputError(f"expected a list of (H, W, 3) images or a (B, H, W, 3) array, "
                                 f"got an array of shape {tuple(images.shape)}")
        if len(images) == 0:
            raise InputError("empty batch: nothing to encode")
        out = []
        for i, img in enumerate(images):
            if isinstance(img, torch.Tensor):
                if img.dtype != torch.uint8:
                    raise InputError(f"image {i}: expected dtype uint8 (0..255 RGB), got "
                                     f"{img.dtype}")
                if img.ndim != 3 or img.shape[2] != 3:
                    raise InputError(f"image {i}: expected shape (H, W, 3) RGB, got "
                                     f"{tuple(img.shape)}")
                if img.shape[0] == 0 or img.shape[1] == 0:
                    raise InputError(f"image {i}: empty image {tuple(img.shape)}")
                out.append(img.to(self.device, non_blocking=True))
            else:
                arr = np.ascontiguousarray(check_image(img, i))
                if not arr.flags.writeable:  # a view of a message (torch wants writable)
                    arr = arr.copy()
                out.append(torch.from_numpy(arr).to(self.device, non_blocking=True))
        return out

    def __call__(self, images: TorchImages) -> torch.Tensor:
        frames = self._as_list(images)
        if self.prep.interpolation != "opencv":
            from vpr_ros.runtime import float_resize

            return float_resize.preprocess_frames(frames, self.prep)
        h, w = self.prep.size
        out = torch.empty((len(frames), h, w, 3), dtype=torch.float32, device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, f in enumerate(frames):
            groups.setdefault((int(f.shape[0]), int(f.shape[1])), []).append(i)
        for hw, idx in groups.items():
            stack = torch.stack([frames[i] for i in idx])              # (n, H, W, 3) uint8
            out[idx] = resize_uint8(stack, resize_plan(hw, self.prep), (h, w))
        out -= self._mean
        out *= self._inv_std
        return out.permute(0, 3, 1, 2).contiguous()


class GpuPreprocessed:
    """Mixin for encoders that preprocess on their CUDA device (``self._gpu_prep``):
    ``encode``/``encode_all`` upload uint8 frames, run the twin there and hand the batch to
    ``encode_tensor_all``. Only classes that really preprocess on the GPU carry it, so callers
    that time preprocessing apart from inference (the node's pipeline checks whether ``encode``
    is overridden) keep that split on the CPU paths."""

    _gpu_prep: "TorchPreprocessor | None"

    def encode(self, images: TorchImages) -> np.ndarray:
        from vpr_ros.runtime.encoder import check_descriptors

        if self._gpu_prep is None:
            return super().encode(images)  # type: ignore[misc]
        batch = self._gpu_prep(images)
        out = self.encode_tensor_all(batch)["global"].float().cpu().numpy()  # type: ignore
        return check_descriptors(out, batch.shape[0], self.dim, self.backend)  # type: ignore

    def encode_all(self, images: TorchImages) -> dict[str, np.ndarray]:
        from vpr_ros.runtime.encoder import check_outputs

        if self._gpu_prep is None:
            return super().encode_all(images)  # type: ignore[misc]
        batch = self._gpu_prep(images)
        outs = {k: v.cpu().numpy() for k, v in
                self.encode_tensor_all(batch).items()}  # type: ignore[attr-defined]
        return check_outputs(outs, batch.shape[0], self.dim, self.backend)  # type: ignore
