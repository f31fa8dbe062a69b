"""Exact inner-product search: the reference every other kind is measured against.

Why no faiss IndexFlatIP for float32 storage: it would copy the whole (memory-mapped) descriptor
matrix into its own buffer, doubling memory for a 16 GB map, and for one query it scans on one core
(about 10 GB/s here), while a BLAS matrix-vector product over the mapped file uses every core
(about 20 GB/s here). Float16 storage has no fast numpy path (numpy converts half floats at about
1 GB/s), so for a few queries the fp16 rows are held in a faiss ``IndexScalarQuantizer`` (QT_fp16:
same bytes, SIMD conversion), scanned by one thread per core on disjoint id ranges. Batches
convert blocks to float32 once and use BLAS matrix-matrix products.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np

from vpr_ros.errors import ConfigError
from vpr_ros.mapdb.index.faiss_loader import load_faiss
from vpr_ros.mapdb.index.base import (PAD_SCORE, VectorIndex, allowed_selector, exact_search,
                                      faiss_threads, rerank, sort_results)
from vpr_ros.mapdb.index.gpu import COPY_ROWS, FLAT_MARGIN, GPU_SCORE_SLACK, GpuFailed

# Below this many queries a per-query scan of the fp16 codes beats block conversion + BLAS.
FP16_SCAN_MAX_QUERIES = 8


def _threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


class FlatIndex(VectorIndex):
    """Exhaustive search; scores and ids equal a brute-force numpy reference."""

    kind = "flat"

    def __init__(self, store, params: Mapping[str, Any]) -> None:
        super().__init__(store, params)
        self._sq = None  # faiss IndexScalarQuantizer over fp16 rows, built lazily
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def resolve_params(cls, dim: int, given: Mapping[str, Any]) -> dict[str, Any]:
        if given:
            raise ConfigError(f"index kind 'flat' takes no parameters, got {sorted(given)}; "
                              "use index='flat'")
        return {}

    def add(self, start: int, rows: np.ndarray, codes: np.ndarray | None) -> None:
        if self._sq is not None:
            self._sq_sync()

    def restore(self, files) -> None:
        return None

    def _sq_sync(self) -> None:
        """Bring the fp16 scan index up to the store's row count."""
        faiss = load_faiss()

        if self._sq is None:
            self._sq = faiss.IndexScalarQuantizer(self.store.dim, faiss.ScalarQuantizer.QT_fp16,
                                                  faiss.METRIC_INNER_PRODUCT)
        have, n = int(self._sq.ntotal), len(self.store)
        if have == n:
            return
        width = self._sq.code_size  # QT_fp16 codes are exactly the fp16 bytes of a row
        self._sq.codes.resize(n * width)
        codes = faiss.rev_swig_ptr(self._sq.codes.data(), n * width).reshape(n, width)
        for start, block in self.store.chunks(65536):
            end = start + len(block)
            if end <= have:
                continue
            skip = max(0, have - start)
            part = np.ascontiguousarray(block[skip:], dtype=np.float16)
            codes[start + skip: end] = part.view(np.uint8).reshape(len(part), width)
        self._sq.ntotal = n

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
               query_codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self.gpu is not None and self.gpu.ready(len(self.store), self._gpu_rows):
            found = self._gpu_search(queries, k, allowed)
            if found is not None:
                return found
        if self.store.dtype == np.float16 and queries.shape[0] < FP16_SCAN_MAX_QUERIES \
                and len(self.store):
            return self._fp16_scan(queries, k, allowed)
        return exact_search(self.store, queries, k, allowed)

    def _fp16_scan(self, queries: np.ndarray, k: int,
                   allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        faiss = load_faiss()

        if self._sq is None or self._sq.ntotal != len(self.store):
            self._sq_sync()
        n = len(self.store)
        parts = _threads() if n >= 65536 else 1
        bounds = np.linspace(0, n, parts + 1).astype(np.int64)
        base_sel, _bitmap = allowed_selector(allowed)
        kk = min(k, n)

        def one(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
            sel = faiss.IDSelectorRange(int(a), int(b))
            params = faiss.SearchParameters()
            params.sel = faiss.IDSelectorAnd(sel, base_sel) if base_sel is not None else sel
            with faiss_threads(len(queries)):
                return self._sq.search(queries, kk, params=params)

        if parts == 1:
            params = faiss.SearchParameters()
            if base_sel is not None:
                params.sel = base_sel
            with faiss_threads(len(queries)):
                d, i = self._sq.search(queries, kk, params=params)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(parts, thread_name_prefix="vpr-flat")
            results = list(self._pool.map(one, bounds[:-1], bounds[1:]))
            d = np.concatenate([r[0] for r in results], axis=1)
            i = np.concatenate([r[1] for r in results], axis=1)
        d = np.where(i >= 0, d, PAD_SCORE).astype(np.float32)
        return sort_results(d, i.astype(np.int64), k)

    def _gpu_rows(self, start: int):
        return self.store.float_blocks(start, COPY_ROWS)

    def _gpu_search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Candidates from the GPU, exact scores from the store: the CPU scan's result.

        A query's list is trusted when its ``k``-th allowed candidate scores more than
        ``2 * GPU_SCORE_SLACK`` above the last one listed: no unlisted row (GPU score at most
        the last, exact score within the slack of it) can then enter the exact top ``k``, not
        even by a tie. Otherwise, and when too few allowed candidates came back (GPU indexes
        ignore selectors, so exclusions are filtered here), the list asked for grows up to the
        GPU's selection limit; rows still unsettled, and any GPU failure, go to the CPU scan."""
        n = len(self.store)
        n_allowed = n if allowed is None else int(allowed.sum())
        limit = self.gpu.max_k
        m = min(n, limit, k + FLAT_MARGIN + (n - n_allowed))
        if m < min(n, k + FLAT_MARGIN):
            return None
        q = np.ascontiguousarray(queries, dtype=np.float32)
        chosen: list[np.ndarray] = [np.empty(0, np.int64)] * len(q)
        todo = np.arange(len(q))
        try:
            while len(todo):
                dist, cand = self.gpu.search(q[todo], m)
                still = []
                for j, r in enumerate(todo):
                    valid = (cand[j] >= 0) & (cand[j] < n)
                    c, d = cand[j][valid], dist[j][valid]
                    last = d[-1] if len(d) else np.inf
                    if allowed is not None:
                        keep = allowed[c]
                        c, d = c[keep], d[keep]
                    if m >= n:
                        chosen[r] = c
                    elif len(c) >= k and d[k - 1] - last > 2 * GPU_SCORE_SLACK:
                        chosen[r] = c[d >= d[k - 1] - 2 * GPU_SCORE_SLACK]
                    else:
                        still.append(r)
                todo = np.asarray(still, dtype=np.int64)
                if m >= min(n, limit):
                    break
                m = min(n, limit, 4 * m)
        except GpuFailed:
            return None
        rows = np.full((len(q), max(k, max(len(c) for c in chosen))), -1, np.int64)
        for r, c in enumerate(chosen):
            rows[r, : len(c)] = c
        ids, scores = rerank(self.store, queries, rows, k)
        if len(todo):  # too many near-equal or excluded rows for the GPU's limit
            ids[todo], scores[todo] = exact_search(self.store, queries[todo], k, allowed)
        return ids, scores
