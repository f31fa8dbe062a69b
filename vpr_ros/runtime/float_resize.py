"""The official releases' evaluation resize: antialiased bilinear or bicubic on float RGB.

Why it exists beside OpenCV's uint8 resize: a model is only the released model if it sees the
inputs it was evaluated with. The QAA release is evaluated by VPR-methods-evaluation
(``ToTensor -> Normalize -> Resize([322, 322], antialias=True)``: bilinear on the normalised
float tensor) and BoQ's README prescribes ``ToTensor -> Resize(bicubic, antialias=True) ->
Normalize``; OpenCV's ``INTER_AREA`` gives those models inputs that differ by 0.016 on average
(up to 0.55, normalised units) at 960x540 -> 322. Models record which one they take
(``input.interpolation``, see :data:`vpr_ros.models.config.INTERPOLATIONS`).

What is computed, for both modes: RGB uint8 -> float32 / 255 (``ToTensor``), torch's
``interpolate(size, mode, align_corners=False, antialias=True)`` (what torchvision's tensor
``resize`` calls; nothing when the size already matches, as torchvision returns the image
itself), then ``(x - mean) / std`` (``Normalize``). Normalising after the resize instead of
before changes the result by float rounding only (the filter weights sum to one), far below the
1e-5 that ``test/test_float_resize.py`` checks against torchvision on real images. No rounding
and no clamping: a bicubic overshoot stays, as it does on a float tensor upstream.

One function serves every backend: the CPU path (:func:`vpr_ros.runtime.preprocess.
preprocess_batch`, which ONNX Runtime, OpenVINO and CPU torch encoders call) runs it on CPU
tensors, the GPU twin (:class:`vpr_ros.runtime.torch_preprocess.TorchPreprocessor`) on the
encoder's device; the exported graph's input stays the resized, normalised tensor.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vpr_ros.runtime.preprocess import Preprocessing, check_image, resized_and_crop

#: ``input.interpolation`` -> torch interpolation mode.
MODES = {"bilinear_antialias": "bilinear", "bicubic_antialias": "bicubic"}


def applies(prep: Preprocessing) -> bool:
    """Whether ``prep`` asks for this resize (rather than OpenCV's)."""
    return prep.interpolation in MODES


def resize_unit(stack: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """(n, H, W, 3) uint8 frames of one size -> (n, 3, h, w) float32 in [0, 1] units, resized
    (and centre-cropped where the policy says so) by the antialiased filter of ``prep``."""
    h, w = prep.size
    (rh, rw), (top, left) = resized_and_crop((int(stack.shape[1]), int(stack.shape[2])), prep)
    x = stack.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    if (int(x.shape[-2]), int(x.shape[-1])) != (rh, rw):
        x = F.interpolate(x, size=(rh, rw), mode=MODES[prep.interpolation],
                          align_corners=False, antialias=True)
    return x[:, :, top:top + h, left:left + w]


def normalise(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place, with torchvision ``Normalize``'s float32
    operations."""
    mean = torch.tensor(prep.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(prep.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def preprocess_frames(frames: Sequence[torch.Tensor], prep: Preprocessing) -> torch.Tensor:
    """uint8 (H, W, 3) tensors (any sizes, one device) -> (B, 3, h, w) float32 on that device:
    frames of one size are resized together."""
    h, w = prep.size
    out = torch.empty((len(frames), 3, h, w), dtype=torch.float32, device=frames[0].device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault((int(f.shape[0]), int(f.shape[1])), []).append(i)
    for idx in groups.values():
        out[idx] = resize_unit(torch.stack([frames[i] for i in idx]), prep)
    return normalise(out, prep)


def preprocess_numpy(images: Sequence[np.ndarray], prep: Preprocessing) -> np.ndarray:
    """The CPU path: checked RGB uint8 arrays -> (B, 3, h, w) float32 numpy array."""
    frames = []
    for i, img in enumerate(images):
        arr = np.ascontiguousarray(check_image(img, i))
        if not arr.flags.writeable:  # a read-only view of a message: torch wants writable
            arr = arr.copy()
        frames.append(torch.from_numpy(arr))
    with torch.inference_mode():
        return preprocess_frames(frames, prep).numpy()
