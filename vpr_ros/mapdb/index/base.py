"""The interface every index kind implements, and the exact scan they all fall back on.

Why one rule for scores: an approximate stage (HNSW graph, IVF-PQ codes, Hamming codes) only
proposes candidates; the score handed back is always the exact inner product of the query with the
stored descriptor. A loop-closure threshold of 0.8 therefore means the same thing with every index
kind, and switching kinds changes recall and speed, never the meaning of a score.

Why exclusion lives here: loop-closure search must never return excluded keyframes, even when they
fill most of the approximate top-k. Each kind gets the "allowed" mask, hands it to faiss as an
``IDSelector`` where faiss supports one, filters its candidates anyway, fetches more when too few
survive, and completes a query from an exact scan of the allowed rows when the approximate stage
cannot find enough of them.
"""

from __future__ import annotations

import abc
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

import numpy as np

from vpr_ros.mapdb.index.faiss_loader import load_faiss
from vpr_ros.mapdb.index.vectors import DescriptorStore, half_to_float

#: Score given to padding slots (id -1) of a result row.
PAD_SCORE = np.float32(-np.inf)

# Exact scan blocks. float32 rows are read in place by BLAS: large blocks keep every core busy
# (one small matrix-vector product per block would leave threads waiting). float16 rows are
# converted to a float32 buffer first, which should stay in cache. The score block of a big batch
# is bounded too.
SCAN_F32_BLOCK_BYTES = 256 << 20
SCAN_F16_BUFFER_BYTES = 16 << 20
SCAN_SCORE_BYTES = 64 << 20

#: Batches up to this size run faiss on one OpenMP thread where the caller already spreads the
#: work over its own threads (the fp16 exact scan), so the two kinds of threads do not compete.
SMALL_BATCH = 4

Artifact = Any  # np.ndarray (saved as .npy) or a faiss index (saved with faiss.write_index)


class VectorIndex(abc.ABC):
    """Search structure over a :class:`DescriptorStore`; ids are row numbers of the store."""

    kind: ClassVar[str]
    #: The GPU copy searched instead of the CPU structure (flat and binary kinds only; see
    #: :mod:`vpr_ros.mapdb.index.gpu`), attached by ``PlaceMap.use_gpu``.
    gpu: Any = None

    def __init__(self, store: DescriptorStore, params: Mapping[str, Any]) -> None:
        self.store = store
        self.params = dict(params)

    @classmethod
    @abc.abstractmethod
    def resolve_params(cls, dim: int, given: Mapping[str, Any]) -> dict[str, Any]:
        """Validated parameters with defaults filled in; raises ConfigError on bad values."""

    @abc.abstractmethod
    def add(self, start: int, rows: np.ndarray, codes: np.ndarray | None) -> None:
        """Index ``rows`` (float32, already appended to the store) with ids start, start+1, ..."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
               query_codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` allowed ids (B, k) int64, -1 padded, and their exact scores, best first."""

    def artifacts(self) -> dict[str, Artifact]:
        """Named files that must be saved with the map (besides descriptors and keyframes)."""
        return {}

    def restore(self, files: Mapping[str, Path]) -> None:
        """Load the files :meth:`artifacts` named, or rebuild from the store; check agreement."""
        for start, block in self.store.chunks(65536):
            self.add(start, np.asarray(block, dtype=np.float32), None)

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params}

    def manifest_params(self) -> dict[str, Any]:
        """What the manifest records to rebuild this index exactly."""
        return {"kind": self.kind, **self.params}


@contextmanager
def faiss_threads(queries: int) -> Iterator[None]:
    """One OpenMP thread for the calling thread's faiss calls when the batch is small (the
    setting is per calling thread in OpenMP, so other threads are not affected).

    Why: faiss parallelises searches over queries, so a one-query search gains nothing from a
    thread team, but still wakes it and waits for it at the region's end. In ``vpr_node`` that
    wait blocked the encoder thread in the binary index's Hamming scan in 21-30% of frames
    (0.75-1.8 ms at p95 when it did; 0-4% of frames with one thread)."""
    if queries > SMALL_BATCH:
        yield
        return
    faiss = load_faiss()

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def scan_block_rows(dim: int, dtype: np.dtype, queries: int) -> int:
    limit = SCAN_F32_BLOCK_BYTES if dtype == np.float32 else SCAN_F16_BUFFER_BYTES
    return max(256, min(limit // (4 * dim), SCAN_SCORE_BYTES // (4 * max(1, queries))))


def _merge_topk(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    cat_s = np.concatenate([best_s, s], axis=1)
    cat_i = np.concatenate([best_i, i], axis=1)
    if cat_s.shape[1] > k:
        part = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]
        cat_s = np.take_along_axis(cat_s, part, axis=1)
        cat_i = np.take_along_axis(cat_i, part, axis=1)
    return cat_s, cat_i


def sort_results(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Order each row best first (ties by smaller id), pad to ``k`` with (-1, PAD_SCORE) and turn
    slots whose score is -inf (excluded or missing) into padding."""
    b = scores.shape[0]
    out_i = np.full((b, k), -1, np.int64)
    out_s = np.full((b, k), PAD_SCORE, np.float32)
    for r in range(b):
        valid = (ids[r] >= 0) & np.isfinite(scores[r])
        s, i = scores[r][valid], ids[r][valid]
        order = np.lexsort((i, -s))[:k]
        out_i[r, : len(order)] = i[order]
        out_s[r, : len(order)] = s[order]
    return out_i, out_s


def exact_search(store: DescriptorStore, queries: np.ndarray, k: int,
                 allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner product over every stored row (in blocks, either storage dtype)."""
    b = queries.shape[0]
    best_s = np.full((b, 0), PAD_SCORE, np.float32)
    best_i = np.full((b, 0), -1, np.int64)
    rows = scan_block_rows(store.dim, store.dtype, b)
    qt = np.ascontiguousarray(queries.T, dtype=np.float32)
    half = store.dtype == np.float16
    buf = np.empty((rows, store.dim), np.float32) if half else None
    for start, block in store.chunks(rows):
        if buf is not None:
            blk = half_to_float(block, buf[: len(block)])
        else:
            blk = block
        s = np.matmul(blk, qt).T  # (b, rows)
        if allowed is not None:
            s[:, ~allowed[start: start + len(block)]] = PAD_SCORE
        ids = np.arange(start, start + len(block), dtype=np.int64)
        if len(block) > k:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s = np.take_along_axis(s, part, axis=1)
            ids = ids[part]
        else:
            ids = np.broadcast_to(ids, s.shape)
        best_s, best_i = _merge_topk(best_s, best_i, s, ids, k)
    return sort_results(best_s, best_i, k)


def rerank(store: DescriptorStore, queries: np.ndarray, candidates: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of each query's candidate ids (-1 = none); the best ``k`` per query."""
    b = queries.shape[0]
    scores = np.full(candidates.shape, PAD_SCORE, np.float32)
    for r in range(b):
        valid = candidates[r] >= 0
        if valid.any():
            scores[r, valid] = store.dot(candidates[r, valid], queries[r])
    return sort_results(scores, candidates, k)


def filtered_candidates(fetch: Callable[[np.ndarray, int, int], np.ndarray], b: int, want: int,
                        allowed: np.ndarray | None, n_total: int, rounds: int = 3
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ids (B, want), -1 padded, never disallowed, from an approximate ``fetch``.

    ``fetch(rows, kk, effort)`` returns (len(rows), kk) candidate ids of those query rows, best
    first; ``effort`` (1, 4, 16, ...) asks the index to search harder (more probes, larger beam).
    Rows still short after ``rounds`` are reported in the returned boolean (B,) array so the
    caller can complete them exactly.
    """
    n_allowed = n_total if allowed is None else int(allowed.sum())
    need = min(want, n_allowed)
    out = np.full((b, want), -1, np.int64)
    todo = np.arange(b)
    kk, effort = min(want, n_total), 1
    for _ in range(rounds):
        if not len(todo) or kk <= 0:
            break
        cand = fetch(todo, kk, effort)
        still = []
        for j, r in enumerate(todo):
            c = cand[j]
            c = c[(c >= 0) & (c < n_total)]
            if allowed is not None:
                c = c[allowed[c]]
            c = c[:want]
            out[r, : len(c)] = c
            if len(c) < need:
                still.append(r)
        todo = np.asarray(still, dtype=np.int64)
        if kk >= n_total:
            break
        kk, effort = min(n_total, kk * 4 + (n_total - n_allowed)), effort * 4
    short = np.zeros(b, dtype=bool)
    short[todo] = True
    return out, short


def allowed_selector(allowed: np.ndarray | None):
    """A faiss IDSelectorBitmap keeping the ``allowed`` ids (and the bitmap it points to, which
    must outlive the search), or (None, None)."""
    if allowed is None:
        return None, None
    faiss = load_faiss()

    bitmap = np.packbits(allowed, bitorder="little")
    return faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap)), bitmap


def approximate_search(store: DescriptorStore, queries: np.ndarray, k: int,
                       allowed: np.ndarray | None, candidates: int,
                       fetch: Callable[[np.ndarray, int, int], np.ndarray],
                       narrow: Callable[[np.ndarray], np.ndarray] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The common tail of every approximate kind: allowed candidates from ``fetch``, optionally
    cut down by a cheaper scorer (``narrow``: (B, n) ids -> (B, m) ids, -1 padded), exact
    re-rank, and an exact scan for the queries whose candidates ran short."""
    cand, short = filtered_candidates(fetch, queries.shape[0], max(k, candidates), allowed,
                                      len(store))
    if narrow is not None:
        cand = narrow(cand)
    ids, scores = rerank(store, queries, cand, k)
    if short.any():
        ids[short], scores[short] = exact_search(store, queries[short], k, allowed)
    return ids, scores
