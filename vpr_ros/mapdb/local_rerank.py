"""Map search followed by mutual-NN re-ranking with the map's stored local features.

Why the scores are carried over by rank: the decision layers (relocalizer, loop-closure
detector) take the best-scored candidate and gate it with thresholds on the global cosine
similarity. After re-ranking, candidate i is given the i-th best global score of the query, so
the decisions follow the mutual-NN order while their thresholds still read the same scale
(``min_score`` asks "is anything in the map globally similar enough", the re-rank chooses which
keyframe it is). Re-ranking costs one (L x L x C) product per candidate (L local locations), so
its depth is a latency budget: see the node parameter ``rerank.local_top_k``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.models.rerank import rerank_mutual_nn


def rerank_row(place_map: Any, query_local: np.ndarray, ids: np.ndarray, scores: np.ndarray,
               top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank one query's ranked results (``ids``, ``scores`` of length k, padding -1 last) by
    mutual-NN count of local features over the first ``top_n`` valid ids.

    Returns ``(ids, scores)`` of the same length: ids in the re-ranked order, scores the
    original ones sorted best first (so each rank keeps its score; see the module docstring).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if ids.shape != scores.shape:
        raise InputError(f"ids ({ids.shape}) and scores ({scores.shape}) differ in length")
    if place_map.local_grid is None:
        raise InputError("the map stores no local features; nothing to re-rank with")
    new_ids, _counts = rerank_mutual_nn(query_local, ids, place_map.local_features, top_n)
    return new_ids, np.sort(scores)[::-1].copy()


def search_reranked(place_map: Any, queries: np.ndarray, k: int, rerank_top_n: int,
                    query_local: np.ndarray | None = None, exclude: Any = None,
                    query_codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``PlaceMap.search`` for the best ``k``, re-ranking the global top ``rerank_top_n`` with
    local features when ``rerank_top_n`` > 0 (``query_local``: ``(B, *local_grid)``)."""
    if rerank_top_n <= 0:
        return place_map.search(queries, k, exclude=exclude, query_codes=query_codes)
    if query_local is None:
        raise InputError("re-ranking needs the queries' local features (the model's 'local' "
                         "output)")
    depth = max(int(k), int(rerank_top_n))
    ids, scores = place_map.search(queries, depth, exclude=exclude, query_codes=query_codes)
    local = np.asarray(query_local)
    if len(local) != len(ids):
        raise InputError(f"{len(local)} query local feature grids for {len(ids)} queries")
    out_ids = np.empty((len(ids), k), np.int64)
    out_scores = np.empty((len(ids), k), np.float32)
    for b in range(len(ids)):
        row_ids, row_scores = rerank_row(place_map, local[b], ids[b], scores[b], rerank_top_n)
        out_ids[b], out_scores[b] = row_ids[:k], row_scores[:k]
    return out_ids, out_scores
