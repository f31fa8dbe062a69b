"""Mutual-nearest-neighbour re-ranking with dense local features (SelaVPR / CQVPR second stage).

Why: global descriptors rank the right place among the top 100 far more often than at rank 1.
Dense, L2-normalised local features of the query and of each candidate are matched both ways; a
pair of locations is a match when each is the other's nearest neighbour (cosine). The number of
such mutual matches measures how much of the two images corresponds, needs no RANSAC, and
re-sorts the candidates. Plain numpy, so the evaluator and the node use the same code with no
torch at run time.

Local features are ``(L, D)`` or ``(H, W, D)`` per image (CQVPR's ``"local"`` output is
``(B, H, W, 128)``); they must be L2-normalised along D so that inner product = cosine.
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np

from vpr_ros.errors import InputError

#: Candidates re-ranked by default (the papers re-rank the global top 100).
DEFAULT_TOP_N = 100
#: Rows of the similarity matrix computed at once.
BLOCK = 1024

LocalSource = Union[np.ndarray, Callable[[np.ndarray], np.ndarray]]


def _as_locations(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 3:
        a = a.reshape(-1, a.shape[-1])
    if a.ndim != 2 or not len(a) or not np.issubdtype(a.dtype, np.floating):
        raise InputError(f"{what}: expected float local features (L, D) or (H, W, D), got shape "
                         f"{np.shape(x)} and dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def mutual_nn_count(a: np.ndarray, b: np.ndarray) -> int:
    """Number of mutual nearest neighbours between two sets of local features.

    Location i of ``a`` and j of ``b`` match when j is i's most similar location in ``b`` and i
    is j's most similar location in ``a`` (ties go to the lower index).
    """
    fa, fb = _as_locations(a, "a"), _as_locations(b, "b")
    if fa.shape[1] != fb.shape[1]:
        raise InputError(f"local feature widths differ: {fa.shape[1]} vs {fb.shape[1]}")
    # Blocks of rows keep memory at BLOCK x len(b) floats (a full 89x89-grid similarity matrix
    # would be 250 MB); the column-wise best is carried across blocks.
    ab = np.empty(len(fa), dtype=np.int64)                   # best j for every i
    best = np.full(len(fb), -np.inf, dtype=np.float32)
    ba = np.zeros(len(fb), dtype=np.int64)                   # best i for every j
    for start in range(0, len(fa), BLOCK):
        sim = fa[start: start + BLOCK] @ fb.T
        ab[start: start + len(sim)] = sim.argmax(axis=1)
        col = sim.argmax(axis=0)
        colmax = sim[col, np.arange(len(fb))]
        better = colmax > best                               # strict: ties keep the lower i
        best[better] = colmax[better]
        ba[better] = col[better] + start
    return int(np.count_nonzero(ba[ab] == np.arange(len(fa))))


def mutual_nn_counts(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(N,) int64 mutual-NN counts of one query against N candidates' local features
    (``(N, L, D)`` or ``(N, H, W, D)``)."""
    cands = np.asarray(candidates)
    if cands.ndim not in (3, 4):
        raise InputError(f"candidates: expected (N, L, D) or (N, H, W, D), got shape "
                         f"{cands.shape}")
    q = _as_locations(query, "query")
    return np.array([mutual_nn_count(q, c) for c in cands], dtype=np.int64)


def rerank_mutual_nn(query_local: np.ndarray, ids: np.ndarray, local: LocalSource,
                     top_n: int = DEFAULT_TOP_N) -> tuple[np.ndarray, np.ndarray]:
    """Re-sort one query's ranked candidate ids by mutual-NN count.

    Args:
        query_local: the query's local features, (L, D) or (H, W, D).
        ids: candidate ids best first, as ``PlaceMap.search`` returns them (-1 = padding).
        local: the candidates' local features, either an array aligned with ``ids`` ((k, L, D)
            or (k, H, W, D); rows of padding ids are ignored) or a function mapping an id array
            to such an array (e.g. a lookup in a local-feature store).
        top_n: how many of the first valid candidates are re-ranked; the rest keep their order.

    Returns:
        (ids, counts): the re-ranked ids (same length as ``ids``, padding last) and each one's
        mutual-NN count (-1 for candidates that were not re-ranked and for padding). Equal counts
        keep the global order.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 1:
        raise InputError(f"top_n={top_n!r} must be a positive integer")
    valid = np.flatnonzero(ids >= 0)
    head = valid[:top_n]
    counts = np.full(len(ids), -1, dtype=np.int64)
    if len(head):
        if callable(local):
            feats = np.asarray(local(ids[head]))
        else:
            arr = np.asarray(local)
            if len(arr) != len(ids):
                raise InputError(f"local has {len(arr)} rows for {len(ids)} candidate ids; give "
                                 "one row per id (or a function id -> local features)")
            feats = arr[head]
        if len(feats) != len(head):
            raise InputError(f"local features for {len(head)} candidates expected, got "
                             f"{len(feats)}")
        counts[head] = mutual_nn_counts(query_local, feats)
    order = np.concatenate([head[np.argsort(-counts[head], kind="stable")], valid[top_n:],
                            np.flatnonzero(ids < 0)])
    return ids[order], counts[order]
