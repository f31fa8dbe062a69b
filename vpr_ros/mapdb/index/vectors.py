"""The map's descriptor matrix: a memory-mapped part as loaded plus an in-memory part added since.

Why two parts: a prebuilt map of a million 4096-d descriptors is 8 to 16 GB. Loading it must not
read it into RAM (the file is memory-mapped read-only, the page cache does the rest), and live
mapping must still append rows. Appending to the mapped file would break the atomic-save guarantee
and copying it would double memory, so new rows go to a growable in-memory block; search scans both
parts, and a save writes them out as one ``.npy`` file.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from vpr_ros.mapdb.index.faiss_loader import load_faiss
from vpr_ros.scratch_buffers import scratch

STORAGE_DTYPES = ("float32", "float16")


_HALF_DECODERS: dict[int, Any] = {}


def half_to_float(block: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float16 rows -> ``out`` (float32) through faiss's SIMD decoder, about twice as fast as
    numpy's cast, which is not vectorised for half floats on this class of CPU."""
    faiss = load_faiss()

    dim = block.shape[1]
    sq = _HALF_DECODERS.get(dim)
    if sq is None:
        sq = _HALF_DECODERS[dim] = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)
    src = np.ascontiguousarray(block, dtype=np.float16)
    sq.decode_c(faiss.swig_ptr(src.view(np.uint8)), faiss.swig_ptr(out), len(src))
    return out


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
    """(N, D) descriptors in the map's storage dtype; row i belongs to keyframe id i.

    Rows added after loading live in blocks of about ``BLOCK_BYTES``: small appends fill an open
    block, large ones become blocks of their own, so a million-row bulk build never pays for the
    doubling copies (and 2x peak memory) of one ever-growing array.
    """

    BLOCK_BYTES = 64 << 20

    def __init__(self, dim: int, dtype: str, base: np.ndarray | None = None) -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype {dtype!r} not in {STORAGE_DTYPES}")
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        if base is None:
            base = np.empty((0, self.dim), self.dtype)
        self._base = base
        self._blocks: list[np.ndarray] = []
        self._open = GrowableArray(self.dtype, self.dim)
        self._count = len(base)

    def __len__(self) -> int:
        return self._count

    @property
    def base_count(self) -> int:
        return len(self._base)

    def _close_open_block(self) -> None:
        if len(self._open):
            self._blocks.append(self._open.view().copy())
            self._open = GrowableArray(self.dtype, self.dim)

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=self.dtype)
        if not len(rows):
            return
        if rows.nbytes >= self.BLOCK_BYTES // 4:
            self._close_open_block()
            self._blocks.append(np.array(rows, dtype=self.dtype, copy=True))
        else:
            self._open.extend(rows)
            if len(self._open) * self.dim * self.dtype.itemsize >= self.BLOCK_BYTES:
                self._close_open_block()
        self._count += len(rows)

    def segments(self) -> list[tuple[int, np.ndarray]]:
        """(first id, rows) of each non-empty part, in id order."""
        out = []
        start = 0
        for seg in [self._base, *self._blocks, self._open.view()]:
            if len(seg):
                out.append((start, seg))
                start += len(seg)
        return out

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first id, block) blocks of at most ``rows`` rows covering all descriptors."""
        for start, seg in self.segments():
            for s in range(0, len(seg), rows):
                yield start + s, seg[s: s + rows]

    def float_blocks(self, start: int, rows: int) -> Iterator[np.ndarray]:
        """float32 blocks of at most ``rows`` rows covering ids ``start`` .. N-1 (what a GPU
        copy of the map lacks)."""
        for first, block in self.chunks(rows):
            end = first + len(block)
            if end <= start:
                continue
            yield np.ascontiguousarray(block[max(0, start - first):], dtype=np.float32)

    def array(self) -> np.ndarray:
        """All rows as one array: the mapped file itself when nothing was added since loading,
        otherwise a copy."""
        segs = self.segments()
        if len(segs) == 1:
            return segs[0][1]
        if not segs:
            return np.empty((0, self.dim), self.dtype)
        return np.concatenate([seg for _, seg in segs])

    def dot(self, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
        """float32 inner products of rows ``ids`` (each 0 <= id < N) with one float32 ``query``
        (D,): the exact re-rank of a query's candidates. Rows are gathered in id order (a
        memory-mapped file is read front to back) into per-thread scratch buffers and converted
        there, so no row copies are allocated per call (see :func:`vpr_ros.scratch_buffers.scratch`)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty(len(ids), np.float32)
        if not len(ids):
            return out
        query = np.ascontiguousarray(query, dtype=np.float32)
        order = np.argsort(ids, kind="stable")
        ordered = ids[order]
        half = self.dtype == np.float16
        segs = self.segments()
        starts = np.array([s for s, _ in segs], dtype=np.int64)
        bounds = np.searchsorted(ordered, np.append(starts[1:], self._count))
        lo = 0
        for (start, seg), hi in zip(segs, bounds):
            if hi <= lo:
                continue
            m = hi - lo
            raw = scratch("gather", (m, self.dim), self.dtype)
            np.take(seg, ordered[lo:hi] - start, axis=0, out=raw, mode="clip")
            rows = half_to_float(raw, scratch("f32", (m, self.dim), np.float32)) if half else raw
            out[order[lo:hi]] = rows @ query
            lo = hi
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 copies of the rows ``ids`` (each 0 <= id < N)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        segs = self.segments()
        if len(segs) == 1:
            # Sorted gathers read a memory-mapped file front to back.
            order = np.argsort(ids, kind="stable")
            picked = segs[0][1][ids[order]]
            if self.dtype == np.float16 and len(ids):
                out[order] = half_to_float(picked, np.empty_like(out))
            else:
                out[order] = picked
            return out
        starts = np.array([s for s, _ in segs], dtype=np.int64)
        which = np.searchsorted(starts, ids, side="right") - 1
        for j in np.unique(which):
            sel = which == j
            out[sel] = segs[j][1][ids[sel] - starts[j]]
        return out
