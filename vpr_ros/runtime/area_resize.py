"""OpenCV's ``INTER_AREA`` shrink + the normalisation table, fused and vectorised (numba).

Why: shrinking a camera frame to the network size is the largest CPU stage of the node's
frame after the encoder (640x480 -> 224x224: 2.2 ms warm, ~2.9 ms at camera pace, because
OpenCV runs a scalar loop that converts every uint8 source value on every use). Maps are built
with OpenCV's result, so a faster path must give the *same bytes*, not a similar image.

How it stays identical: OpenCV sums each source row across x with float32 coverage weights
(first product, then ``+ value * weight`` in tap order), then adds those row sums across y
the same way, and rounds half to even. Both passes are "combine whole rows with weights": the
x pass becomes one after transposing the frame (each output column is a weighted sum of source
columns, i.e. of rows of the transposed frame, all channels and rows at once), the y pass is
one as it stands. :func:`combine_rows` does exactly those float32 operations in that order,
over contiguous rows, which LLVM vectorises; no fused multiply-add is allowed (numba's default
without fastmath), as OpenCV's baseline build has none. The weights come from
:func:`area_taps`, which reproduces OpenCV's table, its 1e-3 tolerance for partial cells
included. ``test/test_area_resize.py`` checks equality with OpenCV on camera and odd sizes,
on noise, smooth, periodic and black/white frames. Whole-factor shrinks keep OpenCV's own integer
path (it rounds differently and is already fast).

numba is optional: without it :data:`AVAILABLE` is False and preprocessing uses OpenCV.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from vpr_ros.scratch_buffers import scratch

#: Whether numba is installed. It is imported only when the first frame needs it: ``import
#: numba`` costs about 0.3 s, which every ``vpr`` command would otherwise pay.
AVAILABLE = importlib.util.find_spec("numba") is not None


def area_cells(src: int, dst: int) -> tuple[list[int], list[int], list[float]]:
    """OpenCV's ``INTER_AREA`` coverage table of a ``src -> dst`` shrink along one axis, in
    double precision: ``starts`` (dst + 1 offsets), source ``index`` and ``weight`` per tap.

    Output cell ``i`` covers ``[i * s, i * s + s)`` with ``s = src / dst``; a partial first or
    last source pixel counts only when more than 1e-3 of it is covered, as in OpenCV. Taps are
    in the order OpenCV adds them. Shared by the CPU kernels (:func:`area_taps`) and the GPU
    twin (``torch_preprocess.area_weights``)."""
    scale = src / dst
    starts, index, weight = [0], [], []
    for d in range(dst):
        lo = d * scale
        hi = lo + scale
        cell = min(scale, src - lo)
        first, last = math.ceil(lo), math.floor(hi)
        last = min(last, src - 1)
        first = min(first, last)
        if first - lo > 1e-3:
            index.append(first - 1)
            weight.append((first - lo) / cell)
        for s in range(first, last):
            index.append(s)
            weight.append(1.0 / cell)
        if hi - last > 1e-3:
            index.append(last)
            weight.append(min(min(hi - last, 1.0), cell) / cell)
        starts.append(len(index))
    return starts, index, weight


def area_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`area_cells` as arrays, the weights rounded once to float32 as OpenCV stores
    them: output ``i`` is ``sum(weight[k] * in[index[k]] for k in starts[i]:starts[i+1])``."""
    starts, index, weight = area_cells(src, dst)
    return (np.asarray(starts, np.int64), np.asarray(index, np.int64),
            np.asarray(weight, np.float64).astype(np.float32))


#: Largest output (pixels) this path is used for. Above about 300x300 OpenCV splits its own
#: loop over two threads and is as fast or faster (one core, back to back: 640x480 -> 322x322
#: 2.3 vs 2.1 ms, 1280x720 -> 322x322 4.2 vs 3.7 ms; -> 224x224: 1.4 vs 2.5 ms, 3.0 vs 4.6 ms).
MAX_OUTPUT_PIXELS = 90_000


def applies(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> bool:
    """Whether this path computes ``src -> dst``: numba present, a shrink by a fractional
    factor on both axes (OpenCV's ``INTER_AREA`` generic case) to at most
    :data:`MAX_OUTPUT_PIXELS`."""
    (H, W), (h, w) = src_hw, dst_hw
    return (AVAILABLE and H > h and W > w and H % h != 0 and W % w != 0
            and h * w <= MAX_OUTPUT_PIXELS)


@dataclass(frozen=True)
class _Plan:
    x: tuple[np.ndarray, np.ndarray, np.ndarray]
    y: tuple[np.ndarray, np.ndarray, np.ndarray]


@functools.lru_cache(maxsize=32)
def _plan(H: int, W: int, h: int, w: int) -> _Plan:
    """Taps for one camera size (a camera has one): made once."""
    return _Plan(area_taps(W, w), area_taps(H, h))


@functools.lru_cache(maxsize=1)
def kernels() -> tuple[Any, Any]:
    """(combine_rows, normalise_levels), compiled by numba on first use, or loaded from its
    on-disk cache (next to this module, else the user's cache directory); where no cache can
    be written at all (a read-only install without a home), compiled in memory instead."""
    try:
        return _kernels(cache=True)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return _kernels(cache=False)


def _kernels(cache: bool) -> tuple[Any, Any]:
    import numba

    @numba.njit(cache=cache, nogil=True)
    def combine_rows(src, starts, index, weight, out):  # pragma: no cover - compiled
        """out[i, :] = w0 * src[j0, :] + w1 * src[j1, :] + ... in float32, in tap order."""
        n = src.shape[1]
        for i in range(starts.shape[0] - 1):
            k0 = starts[i]
            row, wk = index[k0], weight[k0]
            for t in range(n):
                out[i, t] = np.float32(src[row, t]) * wk
            for k in range(k0 + 1, starts[i + 1]):
                row, wk = index[k], weight[k]
                for t in range(n):
                    out[i, t] = out[i, t] + np.float32(src[row, t]) * wk

    @numba.njit(cache=cache, nogil=True)
    def normalise_levels(values, lut, top, left, out):  # pragma: no cover - compiled
        """Round (half to even) and saturate the interleaved RGB ``values`` (rows, cols * 3)
        to levels, look each up in ``lut`` (3, 256) and write the crop at (top, left) to
        ``out`` (3, h, w): OpenCV's cast, then the normalisation table."""
        h, w = out.shape[1], out.shape[2]
        for y in range(h):
            for x in range(w):
                for c in range(3):
                    v = np.rint(values[top + y, 3 * (left + x) + c])
                    level = 0 if v < 0 else (255 if v > 255 else np.int64(v))
                    out[c, y, x] = lut[c, level]

    return combine_rows, normalise_levels


def shrink_normalised(img: np.ndarray, resized_hw: tuple[int, int], crop: tuple[int, int],
                      lut: np.ndarray, out: np.ndarray) -> None:
    """``img`` (H, W, 3) uint8 shrunk to ``resized_hw`` as ``cv2.INTER_AREA`` does, cropped
    at ``crop`` (top, left) to ``out``'s size, normalised by ``lut`` into ``out`` (3, h, w)
    float32. Only where :func:`applies`."""
    H, W = img.shape[:2]
    rh, rw = resized_hw
    plan = _plan(H, W, rh, rw)
    combine_rows, normalise_levels = kernels()
    # Every intermediate lives in this thread's scratch buffers: fresh arrays of these sizes
    # are new pages each frame, and faulting them in cost more than the kernels (1280x720 ->
    # 322x322: 9 ms per frame against 3).
    transposed = scratch("area_t", (W, H, 3), np.uint8)
    cv2.transpose(np.ascontiguousarray(img), dst=transposed)       # x pass on rows of this
    cols = scratch("area_cols", (rw, H * 3), np.float32)
    combine_rows(transposed.reshape(W, H * 3), *plan.x, cols)
    rows = scratch("area_rows", (H, rw, 3), np.float32)
    cv2.transpose(cols.reshape(rw, H, 3), dst=rows)
    shrunk = scratch("area_out", (rh, rw * 3), np.float32)
    combine_rows(rows.reshape(H, rw * 3), *plan.y, shrunk)
    normalise_levels(shrunk, lut, crop[0], crop[1], out)


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels for both input types now, so that
    the first camera frame is not the one that waits for it (about 2 s on a cold cache)."""
    if not AVAILABLE:
        return
    lut = np.zeros((3, 256), np.float32)
    lut.setflags(write=False)  # as normalisation_table's: numba types read-only arrays apart
    img = np.zeros((9, 11, 3), np.uint8)
    shrink_normalised(img, (4, 5), (0, 0), lut, np.empty((3, 4, 5), np.float32))
