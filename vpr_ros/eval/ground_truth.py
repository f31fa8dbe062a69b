"""Which database images are correct answers for each query.

Two conventions, one per kind of data:

* positioned images (UTM-named folders, MSLS): database images within ``threshold_m`` of the
  query (25 m is the convention of the VPR benchmarks, e.g. gmberton/VPR-methods-evaluation);
* index-aligned traversals (Nordland): database images whose index is within ``tolerance`` of
  the query's own index (+-1 file is the usual Nordland tolerance).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np

from vpr_ros.datasets.image_sets import ImageSet
from vpr_ros.errors import ConfigError, InputError


def positives_by_distance(db_pos: np.ndarray, q_pos: np.ndarray, threshold_m: float
                          ) -> list[np.ndarray]:
    """Per query, the sorted ids of database images within ``threshold_m`` metres.

    A hash grid with cells of the threshold size keeps this linear in the data (a million-image
    database times thousands of queries does not fit a dense distance matrix)."""
    if not threshold_m > 0:
        raise InputError(f"threshold_m={threshold_m} must be a positive distance in metres")
    db = np.asarray(db_pos, dtype=np.float64).reshape(-1, 2)
    qs = np.asarray(q_pos, dtype=np.float64).reshape(-1, 2)
    cells: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, c in enumerate(np.floor(db / threshold_m).astype(np.int64).tolist()):
        cells[(c[0], c[1])].append(i)
    out: list[np.ndarray] = []
    for q, (cx, cy) in zip(qs, np.floor(qs / threshold_m).astype(np.int64).tolist()):
        cand = [i for dx in (-1, 0, 1) for dy in (-1, 0, 1) for i in cells.get((cx + dx, cy + dy), ())]
        if not cand:
            out.append(np.empty(0, dtype=np.int64))
            continue
        ids = np.asarray(cand, dtype=np.int64)
        d = np.linalg.norm(db[ids] - q, axis=1)
        out.append(np.sort(ids[d <= threshold_m]))
    return out


def positives_by_tolerance(num_database: int, num_queries: int, tolerance: int
                           ) -> list[np.ndarray]:
    """Index-aligned sets: query i matches database images i - tolerance .. i + tolerance."""
    if num_database != num_queries:
        raise InputError(f"index-aligned evaluation needs as many database as query images "
                         f"(image N of each is the same place), got {num_database} and "
                         f"{num_queries}; use positioned (UTM/MSLS) folders with --threshold-m")
    if tolerance < 0:
        raise InputError(f"tolerance={tolerance} must be >= 0")
    return [np.arange(max(0, i - tolerance), min(num_database, i + tolerance + 1))
            for i in range(num_queries)]


def ground_truth_for(db: ImageSet, q: ImageSet, threshold_m: Optional[float],
                     tolerance: Optional[int]) -> tuple[list[np.ndarray], str]:
    """Positives per query and a label saying which rule made them."""
    if tolerance is not None:
        return positives_by_tolerance(len(db), len(q), tolerance), f"index tolerance +-{tolerance}"
    if db.positions is None or q.positions is None:
        raise ConfigError(f"{db.source} / {q.source}: these folders carry no positions (not "
                          "UTM-named, no MSLS csv); they are index-aligned, so give an index "
                          "tolerance (--tolerance N / tolerance: N)")
    thr = 25.0 if threshold_m is None else float(threshold_m)
    return positives_by_distance(db.positions, q.positions, thr), f"within {thr:g} m"
