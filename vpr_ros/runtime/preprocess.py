"""Image preprocessing shared by every backend: resize policy + normalisation.

The policy is recorded in the model (``input`` section of model.json) and in every exported
artifact, and all backends call this one implementation (or, on CUDA, its torch twin with the
same arithmetic), so "same inputs give the same descriptors" does not depend on the backend.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import cv2
import numpy as np

from vpr_ros.cpu_cores import usable_cores
from vpr_ros.errors import InputError


@dataclass(frozen=True)
class Preprocessing:
    size: tuple[int, int]                  # (H, W) the network sees
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "stretch"                # "stretch" | "center_crop"

    @classmethod
    def from_input_config(cls, inp) -> "Preprocessing":
        return cls(size=tuple(inp.size), mean=tuple(inp.mean), std=tuple(inp.std),
                   resize=inp.resize)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize}


def check_image(img: np.ndarray, index: int = 0) -> np.ndarray:
    """An HxWx3 uint8 RGB image, or a clear InputError saying what it is instead."""
    if not isinstance(img, np.ndarray):
        raise InputError(f"image {index}: expected a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise InputError(f"image {index}: expected dtype uint8 (0..255 RGB), got {img.dtype}; "
                         "convert with (img * 255).clip(0, 255).astype(np.uint8) if it is float")
    if img.ndim != 3 or img.shape[2] != 3:
        raise InputError(f"image {index}: expected shape (H, W, 3) RGB, got {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise InputError(f"image {index}: empty image {img.shape}")
    return img


def resize_image(img: np.ndarray, prep: Preprocessing) -> np.ndarray:
    h, w = prep.size
    if prep.resize == "center_crop":
        scale = max(h / img.shape[0], w / img.shape[1])
        rh, rw = max(h, round(img.shape[0] * scale)), max(w, round(img.shape[1] * scale))
        img = _resize(img, rh, rw)
        top, left = (rh - h) // 2, (rw - w) // 2
        return img[top:top + h, left:left + w]
    return _resize(img, h, w)


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    if img.shape[:2] == (h, w):
        return img
    shrinking = img.shape[0] * img.shape[1] > h * w
    if shrinking:
        bands = area_bands(img.shape[0], img.shape[1], h, w, _band_workers())
        if len(bands) > 1:
            return _banded_area_resize(img, h, w, bands)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


#: Below this many source pixels a frame is resized in one call: handing a band to another
#: thread costs tens of microseconds, more than a small resize saves.
BAND_MIN_PIXELS = 150_000
#: At most this many bands (threads) per frame.
BAND_MAX = 4

_BAND_POOL: ThreadPoolExecutor | None = None
_BAND_LOCK = threading.Lock()


def _band_workers() -> int:
    return min(BAND_MAX, usable_cores())


def area_bands(src_h: int, src_w: int, dst_h: int, dst_w: int, workers: int
               ) -> list[tuple[int, int, int, int]]:
    """Row bands ``(src_top, src_bottom, dst_top, dst_bottom)`` that resize independently to
    exactly what one ``INTER_AREA`` call gives, or ``[]`` when the frame is not split.

    Why this is exact: shrinking by ``src_h / dst_h`` maps every ``p_in = src_h / g`` source rows
    onto ``p_out = dst_h / g`` output rows (``g = gcd(src_h, dst_h)``) with the same coverage
    weights, period after period; a band that starts and ends on a period boundary therefore
    has the same scale, the same weights and the same method (OpenCV picks its integer-factor
    path by the same ratio) as the rows it replaces. ``test_backends_preprocess.py`` checks the
    bands against one call bit for bit on many camera sizes.

    Why split at all: OpenCV runs a non-integer ``INTER_AREA`` shrink of a camera frame to
    network size on one thread (it parallelises by output size, and 224x224 is below its stripe
    size), 1.8-2.2 ms for 640x480 -> 224x224 on the development machine, the largest cost of a
    frame in the node after the network itself. Bands on separate threads (OpenCV releases the
    GIL) divide that wall time by the cores available."""
    if workers < 2 or src_h * src_w < BAND_MIN_PIXELS or src_h < dst_h or src_w < dst_w:
        return []
    periods = math.gcd(src_h, dst_h)
    n = min(workers, periods)
    if n < 2:
        return []
    p_in, p_out = src_h // periods, dst_h // periods
    cuts = [periods * b // n for b in range(n + 1)]
    return [(cuts[b] * p_in, cuts[b + 1] * p_in, cuts[b] * p_out, cuts[b + 1] * p_out)
            for b in range(n)]


def _band_pool() -> ThreadPoolExecutor:
    global _BAND_POOL
    with _BAND_LOCK:
        if _BAND_POOL is None:
            _BAND_POOL = ThreadPoolExecutor(max_workers=BAND_MAX - 1,
                                            thread_name_prefix="resize-band")
        return _BAND_POOL


def _banded_area_resize(img: np.ndarray, h: int, w: int,
                        bands: list[tuple[int, int, int, int]],
                        finish: Callable[[np.ndarray, int, int], None] | None = None
                        ) -> np.ndarray:
    """``cv2.resize(img, (w, h), INTER_AREA)`` computed band by band, the first band on the
    calling thread and the others on the pool, written into one output array; ``finish(rows,
    top, bottom)``, if given, runs on each band's thread right after its rows are resized."""
    out = np.empty((h, w, img.shape[2]), dtype=img.dtype)

    def one(band: tuple[int, int, int, int]) -> float:
        cpu = time.thread_time()
        s0, s1, d0, d1 = band
        cv2.resize(img[s0:s1], (w, d1 - d0), dst=out[d0:d1], interpolation=cv2.INTER_AREA)
        if finish is not None:
            finish(out[d0:d1], d0, d1)
        return time.thread_time() - cpu

    futures = [_band_pool().submit(one, b) for b in bands[1:]]
    one(bands[0])
    _OFFLOADED.cpu_s = offloaded_cpu_seconds() + sum(f.result() for f in futures)
    return out


_OFFLOADED = threading.local()


def offloaded_cpu_seconds() -> float:
    """CPU seconds that pool threads have spent on resize bands for the calling thread, so
    far. Per-thread CPU accounting (the node's stage timings use ``time.thread_time``) adds
    this, or work moved to the pool would vanish from the CPU figures."""
    return getattr(_OFFLOADED, "cpu_s", 0.0)


def preprocess_batch(images: Union[np.ndarray, Sequence[np.ndarray]], prep: Preprocessing
                     ) -> np.ndarray:
    """RGB uint8 images (list or (B, H, W, 3) array) -> (B, 3, H, W) float32, normalised."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, np.ndarray):
        raise InputError(f"expected a list of (H, W, 3) images or a (B, H, W, 3) array, got an "
                         f"array of shape {images.shape}")
    if len(images) == 0:
        raise InputError("empty batch: nothing to encode")
    h, w = prep.size
    lut = normalisation_table(prep.mean, prep.std)
    out = np.empty((len(images), 3, h, w), dtype=np.float32)
    for i, img in enumerate(images):
        img = check_image(img, i)
        bands = area_bands(img.shape[0], img.shape[1], h, w, _band_workers()) \
            if prep.resize == "stretch" else []
        if bands:  # each band thread normalises the rows it resized, too
            target = out[i]
            _banded_area_resize(img, h, w, bands, finish=lambda rows, d0, d1, target=target:
                                _normalise_into(rows, lut, target[:, d0:d1]))
        else:
            _normalise_into(resize_image(img, prep), lut, out[i])
    return out


def _normalise_into(rgb: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:
    """(h, w, 3) uint8 -> ``out`` (3, h, w) float32 through the per-channel table: a lookup
    writes the planar (CHW) layout directly."""
    for c in range(3):
        np.take(lut[c], rgb[:, :, c], out=out[c])


@functools.lru_cache(maxsize=16)
def normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: the normalised value of every uint8 level, per channel.

    Why a table: resized pixels are still uint8, so ``(v - mean) / std`` has only 256 possible
    results per channel. Looking them up costs a quarter of the float subtract, multiply and
    HWC -> CHW copy it replaces (0.24 vs 0.98 ms for 224x224 on this machine) and gives the
    same float32 values bit for bit, computed with the same two float32 operations."""
    m = np.asarray(mean, dtype=np.float32) * np.float32(255.0)
    inv_std = np.float32(1.0) / (np.asarray(std, dtype=np.float32) * np.float32(255.0))
    levels = np.arange(256, dtype=np.float32)
    table = (levels[None, :] - m[:, None]) * inv_std[:, None]
    table.setflags(write=False)
    return table
