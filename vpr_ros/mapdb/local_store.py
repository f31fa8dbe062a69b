"""Per-keyframe dense local features (CQVPR / SelaVPR local heads) for mutual-NN re-ranking.

Why a store of its own: a local grid is large (a 25x25x128 grid is 160 KB per keyframe in
float16, 1/50 of the descriptor count of a global search per byte), it is read only for the few
candidates a query re-ranks, and it must stay row-aligned with the keyframes through live adds,
saves and merges. So it is kept as float16 (half the bytes; re-ranking counts mutual nearest
neighbours, which fp16 rounding does not change in practice), memory-mapped when loaded (only
the pages of re-ranked candidates are ever read), and appended in memory like the descriptors.

Storage reuses :class:`~vpr_ros.mapdb.index.vectors.DescriptorStore` with one flattened grid per
row; the file on disk is an ``(N, H, W, C)`` float16 ``.npy`` so other tools read it as a grid.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.mapdb.index.vectors import DescriptorStore

#: dtype of the store in memory and on disk.
LOCAL_DTYPE = "float16"
#: Manifest role of the local-feature file.
ROLE = "local_features"


def check_grid_shape(shape: Sequence[int], what: str = "local feature grid") -> tuple[int, ...]:
    """``(H, W, C)`` or ``(L, C)`` positive ints; InputError otherwise."""
    try:
        out = tuple(int(v) for v in shape)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} {shape!r} must be a sequence of integers") from exc
    if len(out) not in (2, 3) or any(v < 1 for v in out):
        raise InputError(f"{what} {shape!r} must be (H, W, C) or (L, C) positive integers")
    return out


class LocalFeatureStore:
    """``(N, *grid)`` float16 local features; row i belongs to keyframe id i."""

    def __init__(self, grid: Sequence[int], base: np.ndarray | None = None) -> None:
        self.grid = check_grid_shape(grid)
        self.width = int(np.prod(self.grid))
        flat = None if base is None else base.reshape(len(base), self.width)
        self._rows = DescriptorStore(self.width, LOCAL_DTYPE, flat)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        return len(self) * self.width * np.dtype(LOCAL_DTYPE).itemsize

    def as_rows(self, features: np.ndarray, rows: int, what: str = "local_features"
                ) -> np.ndarray:
        """``features`` as ``(rows, width)`` float16 after checking shape and values; InputError
        naming what was expected when they do not fit this store."""
        arr = np.asarray(features)
        if arr.shape != (rows, *self.grid):
            raise InputError(f"{what} have shape {arr.shape}; this map stores local features "
                             f"of shape {(rows, *self.grid)} (one {self.grid} grid per "
                             "keyframe): use the map's model")
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise InputError(f"{what} must be finite floats (got {arr.dtype}, or NaN/Inf); the "
                             "encoder output is corrupt")
        return arr.reshape(rows, self.width).astype(LOCAL_DTYPE, copy=False)

    def append(self, rows: np.ndarray) -> None:
        """Append rows already checked by :meth:`as_rows`."""
        self._rows.append(rows)

    def extend_from(self, other: "LocalFeatureStore", block: int = 256) -> None:
        for _, rows in other._rows.chunks(block):
            self._rows.append(np.asarray(rows))

    def get(self, ids: np.ndarray) -> np.ndarray:
        """float32 ``(len(ids), *grid)`` features of keyframes ``ids`` (each 0 <= id < N)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise InputError(f"local features of ids {ids.tolist()} asked; the store holds "
                             f"ids 0..{len(self) - 1}")
        return self._rows.rows(ids).reshape(len(ids), *self.grid)

    def segments(self) -> list[np.ndarray]:
        """The stored rows in id order (flattened grids), for saving without a copy."""
        return [seg for _, seg in self._rows.segments()]
