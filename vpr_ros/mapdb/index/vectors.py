"""The map's descriptor matrix: a memory-mapped part as loaded plus an in-memory part added since.

Why two parts: a prebuilt map of a million 4096-d descriptors is 8 to 16 GB. Loading it must not
read it into RAM (the file is memory-mapped read-only, the page cache does the rest), and live
mapping must still append rows. Appending to the mapped file would break the atomic-save guarantee
and copying it would double memory, so new rows go to a growable in-memory block; search scans both
parts, and a save writes them out as one ``.npy`` file.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

STORAGE_DTYPES = ("float32", "float16")


class GrowableArray:
    """A numpy array that grows by amortised doubling, so appending a few rows at a time (live
    mapping) costs O(rows) rather than O(total)."""

    def __init__(self, dtype: np.dtype | type | str, width: int = 0,
                 fill: float | int = 0) -> None:
        self._width = width
        self._fill = fill
        self._buf = np.full((0, width) if width else (0,), fill, dtype=dtype)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def extend(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self._buf.dtype)
        need = self._n + len(values)
        if need > len(self._buf):
            cap = max(need, 2 * len(self._buf), 64)
            grown = np.full((cap, self._width) if self._width else (cap,), self._fill,
                            dtype=self._buf.dtype)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n: need] = values
        self._n = need

    def view(self) -> np.ndarray:
        return self._buf[: self._n]


class DescriptorStore:
    """(N, D) descriptors in the map's storage dtype; row i belongs to keyframe id i."""

    def __init__(self, dim: int, dtype: str, base: np.ndarray | None = None) -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype {dtype!r} not in {STORAGE_DTYPES}")
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        if base is None:
            base = np.empty((0, self.dim), self.dtype)
        self._base = base
        self._tail = GrowableArray(self.dtype, self.dim)

    def __len__(self) -> int:
        return len(self._base) + len(self._tail)

    @property
    def base_count(self) -> int:
        return len(self._base)

    def append(self, rows: np.ndarray) -> None:
        self._tail.extend(rows)

    def segments(self) -> list[tuple[int, np.ndarray]]:
        """(first id, rows) of each non-empty part, in id order."""
        out = []
        if len(self._base):
            out.append((0, self._base))
        if len(self._tail):
            out.append((len(self._base), self._tail.view()))
        return out

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first id, block) blocks of at most ``rows`` rows covering all descriptors."""
        for start, seg in self.segments():
            for s in range(0, len(seg), rows):
                yield start + s, seg[s: s + rows]

    def array(self) -> np.ndarray:
        """All rows as one array: the mapped file itself when nothing was added since loading,
        otherwise a copy."""
        if not len(self._tail):
            return self._base
        if not len(self._base):
            return self._tail.view()
        return np.concatenate([self._base, self._tail.view()])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 copies of the rows ``ids`` (each 0 <= id < N)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        nb = len(self._base)
        in_base = ids < nb
        if in_base.all():
            # Sorted gathers read a memory-mapped file front to back.
            order = np.argsort(ids, kind="stable")
            out[order] = self._base[ids[order]]
            return out
        if in_base.any():
            out[in_base] = self._base[ids[in_base]]
        out[~in_base] = self._tail.view()[ids[~in_base] - nb]
        return out
