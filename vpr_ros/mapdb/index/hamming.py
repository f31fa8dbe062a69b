"""Exact Hamming k-NN over packed codes, split into shards that one query scans in parallel.

Why not one faiss ``IndexBinaryFlat``: faiss parallelises a binary search over queries only, so a
single query (the node's case: one keyframe at a time) scans all N codes on one core. At 1M
512-bit codes that is ~7.5 ms of CPU; on a shared 2-core machine (load ~8) one thread waited so
long for the CPU that the scan took 15-38 ms wall. Shards of at most ``SHARD_ROWS`` codes, each a
faiss ``IndexBinaryFlat`` searched from its own Python thread (faiss releases the GIL), use both
cores for one query: 8.5 ms wall for the same CPU time under the same load. Batches of queries
keep faiss's own OpenMP parallelism over queries and visit the shards one after another.

Results are those of one flat index (the same distances, in order; equal distances may come in
another order): each shard returns its best ``k`` (distance, id) and the merge keeps the best
``k`` overall, ties by smaller id.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from vpr_ros.cpu_cores import usable_cores
from vpr_ros.mapdb.index.faiss_loader import load_faiss

#: Codes per shard: 2**18 x 64 bytes = 16 MiB, so a 1M-code map is 4 shards for 2 to 4 cores;
#: small maps stay one shard (no thread hand-off for a scan that takes microseconds).
SHARD_ROWS = 1 << 18
#: Up to this many queries per search, shards are scanned in parallel threads; larger batches
#: are parallel over queries inside faiss.
PARALLEL_SHARDS_MAX_QUERIES = 4

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _single_omp_thread() -> None:
    """Worker initializer: faiss in this thread runs one OpenMP thread (the setting is per
    calling thread), the parallelism comes from the shards."""
    load_faiss().omp_set_num_threads(1)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="hamming",
                                       initializer=_single_omp_thread)
        return _POOL


class ShardedHamming:
    """Packed codes (bits/8 uint8 per row) in shards; ids are row numbers in insertion order."""

    def __init__(self, bits: int, shard_rows: int | None = None) -> None:
        self.bits = bits
        self.shard_rows = shard_rows or SHARD_ROWS
        self.shards: list[Any] = []
        self.starts: list[int] = []
        self.ntotal = 0

    def reset(self) -> None:
        self.shards, self.starts, self.ntotal = [], [], 0

    def add(self, codes: np.ndarray) -> None:
        faiss = load_faiss()

        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        done = 0
        while done < len(codes):
            if not self.shards or self.shards[-1].ntotal >= self.shard_rows:
                shard = faiss.IndexBinaryFlat(self.bits)
                # Counting-sort selection instead of a heap: the same cost for k = 100 and for
                # the binary index's 1000-code shortlist (a heap took 28 ms instead of 7 for
                # k = 1000 over 1M real 512-bit codes, which cluster: many heap insertions).
                shard.use_heap = False
                self.shards.append(shard)
                self.starts.append(self.ntotal)
            last = self.shards[-1]
            take = min(len(codes) - done, self.shard_rows - last.ntotal)
            last.add(codes[done: done + take])
            done += take
            self.ntotal += take

    def _search_shard(self, j: int, queries: np.ndarray, k: int,
                      allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        faiss = load_faiss()

        shard, lo = self.shards[j], self.starts[j]
        kk = min(k, shard.ntotal)
        if allowed is None:
            dist, ids = shard.search(queries, kk)
        else:
            bitmap = np.packbits(allowed[lo: lo + shard.ntotal], bitorder="little")
            params = faiss.SearchParameters()
            params.sel = faiss.IDSelectorBitmap(shard.ntotal, faiss.swig_ptr(bitmap))
            dist, ids = shard.search(queries, kk, params=params)
        ids = ids.astype(np.int64)
        return dist, np.where(ids >= 0, ids + lo, -1)

    def search(self, queries: np.ndarray, k: int,
               allowed: np.ndarray | None = None) -> np.ndarray:
        """(B, k) int64 ids of the nearest codes, -1 padded (fewer codes, or fewer allowed)."""
        b = len(queries)
        out = np.full((b, k), -1, np.int64)
        if not self.shards or k < 1:
            return out
        queries = np.ascontiguousarray(queries, dtype=np.uint8)
        n = len(self.shards)
        if n > 1 and b <= PARALLEL_SHARDS_MAX_QUERIES:
            futures = [_pool().submit(self._search_shard, j, queries, k, allowed)
                       for j in range(n)]
            parts = [f.result() for f in futures]
        else:
            parts = [self._search_shard(j, queries, k, allowed) for j in range(n)]
        if n == 1:
            ids = parts[0][1]
            out[:, : ids.shape[1]] = ids
            return out
        dist = np.concatenate([d for d, _ in parts], axis=1).astype(np.int64)
        ids = np.concatenate([i for _, i in parts], axis=1)
        # One sort key: distance, then id; padding (-1) last.
        key = np.where(ids >= 0, (dist << 40) | ids, np.iinfo(np.int64).max)
        take = min(k, key.shape[1])
        part = np.argpartition(key, take - 1, axis=1)[:, :take]
        best = np.take_along_axis(key, part, axis=1)
        order = np.argsort(best, axis=1)
        chosen = np.take_along_axis(np.take_along_axis(ids, part, axis=1), order, axis=1)
        out[:, :take] = chosen
        return out
