"""Retrieval Recall@K, measured through the same map the node searches.

Why through :class:`~vpr_ros.mapdb.place_map.PlaceMap` and not a bare faiss call: the index kind
(exact, HNSW, IVF-PQ, binary + re-rank) changes what comes back, and the user wants the recall
the robot will get. The database descriptors are added to a map built exactly as the map builder
builds one (``PlaceMap.create(dim, fingerprint, index=kind)``), and queries go through
``PlaceMap.search``.

Recall@K: the share of queries with at least one correct database image among the first K
results. Queries without any correct database image (nothing within the threshold) cannot be
answered and are left out, as the standard VPR evaluation does; their number is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vpr_ros.errors import InputError

DEFAULT_KS = (1, 5, 10, 20)


def recall_at_k(ranked_ids: np.ndarray, positives: Sequence[np.ndarray],
                ks: Sequence[int] = DEFAULT_KS) -> tuple[dict[int, float], np.ndarray]:
    """Recall at each K, and per query the rank (0-based) of its first correct result
    (-1 if none in the list, -2 if the query has no positive at all)."""
    ranked = np.asarray(ranked_ids)
    if ranked.ndim != 2 or len(ranked) != len(positives):
        raise InputError(f"ranked ids {ranked.shape} do not match {len(positives)} queries")
    first = np.full(len(ranked), -1, dtype=np.int64)
    for q, (row, pos) in enumerate(zip(ranked, positives)):
        if len(pos) == 0:
            first[q] = -2
            continue
        hit = np.flatnonzero(np.isin(row, pos))
        if hit.size:
            first[q] = int(hit[0])
    valid = first != -2
    n = int(valid.sum())
    if n == 0:
        raise InputError("no query has a correct database image within the ground-truth "
                         "threshold/tolerance; check that database and queries cover the same "
                         "places (and the threshold or tolerance)")
    out = {int(k): float(np.mean((first[valid] >= 0) & (first[valid] < k))) for k in ks}
    return out, first


@dataclass
class RecallResult:
    """Figures of one evaluation (``to_dict`` is the ``--json`` output)."""

    recalls: dict[int, float]
    num_queries: int
    num_database: int
    queries_without_positives: int
    index: str
    ground_truth: str
    ranked_ids: np.ndarray
    scores: np.ndarray
    first_correct_rank: np.ndarray
    model: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"recall": {f"R@{k}": round(v, 6) for k, v in self.recalls.items()},
                "num_queries": self.num_queries, "num_database": self.num_database,
                "queries_without_positives": self.queries_without_positives,
                "index": self.index, "ground_truth": self.ground_truth, "model": self.model}


def search_map(db_desc: np.ndarray, q_desc: np.ndarray, fingerprint: str, k: int,
               index: str | Mapping[str, Any] = "flat",
               database_paths: Sequence[Path] | None = None,
               db_codes: np.ndarray | None = None, query_codes: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Build a PlaceMap of the database descriptors and search it with the queries.

    ``index`` is a kind or a PlaceMap index dict; ``db_codes`` / ``query_codes`` are a hash
    head's packed codes for a binary index with ``codes: model`` (as the map builder and the
    node pass them)."""
    from vpr_ros.mapdb.keyframe import Keyframe
    from vpr_ros.mapdb.place_map import PlaceMap

    db = np.ascontiguousarray(db_desc, dtype=np.float32)
    pm = PlaceMap.create(int(db.shape[1]), fingerprint, index=index)
    names = [p.name for p in database_paths] if database_paths is not None else None
    keyframes = [Keyframe(session="database", stamp_ns=i,
                          frame_id=names[i] if names else "") for i in range(len(db))]
    pm.add(db, keyframes, binary_codes=db_codes)
    return pm.search(np.ascontiguousarray(q_desc, dtype=np.float32), int(k),
                     query_codes=query_codes)


def evaluate_descriptors(db_desc: np.ndarray, q_desc: np.ndarray,
                         positives: Sequence[np.ndarray], fingerprint: str,
                         ks: Sequence[int] = DEFAULT_KS, index: str = "flat",
                         ground_truth: str = "", database_paths: Sequence[Path] | None = None
                         ) -> RecallResult:
    ks = check_ks(ks)
    ids, scores = search_map(db_desc, q_desc, fingerprint, max(ks), index, database_paths)
    return evaluate_ranking(ids, scores, positives, ks, int(len(db_desc)), str(index),
                            ground_truth)


def check_ks(ks: Sequence[int]) -> list[int]:
    """Sorted distinct K values; InputError unless all are positive."""
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise InputError(f"K values {out} must be positive integers")
    return out


def evaluate_ranking(ids: np.ndarray, scores: np.ndarray, positives: Sequence[np.ndarray],
                     ks: Sequence[int], num_database: int, index: str, ground_truth: str = ""
                     ) -> RecallResult:
    """Recall@K of ranked result ids (however they were searched and re-ranked)."""
    recalls, first = recall_at_k(ids, positives, ks)
    return RecallResult(recalls=recalls, num_queries=int(len(ids)), num_database=num_database,
                        queries_without_positives=int((first == -2).sum()), index=index,
                        ground_truth=ground_truth, ranked_ids=ids, scores=scores,
                        first_correct_rank=first)


def encode_paths(encoder, paths: Sequence[Path], batch_size: int = 32, desc: str = "encoding",
                 progress: bool = True) -> np.ndarray:
    """Descriptors of image files through an :class:`~vpr_ros.runtime.encoder.Encoder`."""
    from tqdm import tqdm

    from vpr_ros.datasets.images import read_rgb

    out = np.empty((len(paths), encoder.dim), dtype=np.float32)
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for s in range(0, len(paths), batch_size):
            chunk = paths[s:s + batch_size]
            out[s:s + len(chunk)] = encoder.encode([read_rgb(p) for p in chunk])
            bar.update(len(chunk))
    return out
