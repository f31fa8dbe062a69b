"""Offline loop-closure evaluation: precision/recall of the *whole* decision, not of retrieval.

Retrieval recall (Recall@K) says whether the right keyframe is among the results; what a SLAM
back end suffers from is the detector's output after exclusion, threshold and temporal
consistency. This module replays :class:`LoopClosureDetector` over a recorded sequence at many
score thresholds and scores every emitted closure against ground-truth positions. It takes the
search as a callable, so it works with any map (or a precomputed similarity matrix) and does
not depend on ``vpr_ros.mapdb``.

Conventions (stated because PR figures are only comparable under the same ones):

- Every frame of the sequence is a keyframe, inserted after it is queried; the map's ids are
  the sequence indices. Results with an id at or after the query index are dropped (a live
  detector can only match the past), so ``search`` may index the whole sequence.
- A closure is a true positive when the query and match ground-truth positions are within
  ``gt_distance_m``; otherwise a false positive.
- A query is a positive when some earlier frame outside the detector's exclusion (time window
  and recent-keyframe count) is within ``gt_distance_m``: a revisit the detector was allowed to
  find. ``recall = TP / positives``.
- With no closure at a threshold, precision is 1 (nothing wrong was said) and recall 0.
- ``auc`` is the area under the interpolated PR curve (precision at recall r = best precision
  at any recall >= r), summed over the recall steps from 0: the PASCAL VOC all-point form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vpr_ros.errors import ConfigError, InputError
from vpr_ros.localization.geometry import Candidate, seconds_to_ns
from vpr_ros.localization.loop_closure import LoopClosureConfig, LoopClosureDetector, SearchExclusion

SearchFn = Callable[[int, SearchExclusion], tuple[Any, Any]]
"""``search(query_index, exclusion) -> (ids, scores)``: one query's ranked map results."""


@dataclass(frozen=True)
class LoopEvaluation:
    """Precision/recall of the detector at each score threshold, plus summary figures."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    true_positives: np.ndarray
    false_positives: np.ndarray
    num_positives: int
    num_queries: int
    recall_at_100_precision: float
    auc: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready figures (for ``vpr eval loop --json``)."""
        return {
            "thresholds": self.thresholds.tolist(),
            "precision": self.precision.tolist(),
            "recall": self.recall.tolist(),
            "true_positives": self.true_positives.tolist(),
            "false_positives": self.false_positives.tolist(),
            "num_positives": self.num_positives,
            "num_queries": self.num_queries,
            "recall_at_100_precision": self.recall_at_100_precision,
            "auc": self.auc,
        }


def interpolated_auc(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the PR curve, precision interpolated to the best at any higher recall."""
    order = np.argsort(recall, kind="stable")
    r = np.asarray(recall, dtype=np.float64)[order]
    p = np.asarray(precision, dtype=np.float64)[order]
    p_interp = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], r]))
    return float(np.sum(steps * p_interp))


def _as_positions(values: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n, 3):
        raise InputError(f"{what} must have shape ({n}, 3) (one x, y, z per frame), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what} has non-finite values; drop or interpolate those frames first")
    return arr


def _positives(stamps: np.ndarray, gt: np.ndarray, config: LoopClosureConfig,
               gt_distance_m: float) -> np.ndarray:
    """Per query: is there an earlier, non-excluded frame within the ground-truth distance?"""
    window_ns = seconds_to_ns(config.exclusion_window_s)
    recent = config.exclusion_recent_keyframes
    out = np.zeros(len(stamps), dtype=bool)
    for i in range(len(stamps)):
        last = i - recent  # frames [last, i) are the recent keyframes
        if last <= 0:
            continue
        allowed = np.abs(stamps[:last] - stamps[i]) > window_ns
        close = np.linalg.norm(gt[:last] - gt[i], axis=1) <= gt_distance_m
        out[i] = bool(np.any(allowed & close))
    return out


def _default_thresholds(queries: list[list[Candidate]], count: int) -> np.ndarray:
    tops = [max(c.score for c in cands) for cands in queries if cands]
    if not tops:
        return np.array([0.0])
    return np.unique(np.quantile(np.asarray(tops), np.linspace(0.0, 1.0, count)))


def evaluate_loop_closure(
    stamps_ns: Sequence[int] | np.ndarray,
    gt_positions: Sequence[Sequence[float]] | np.ndarray,
    search: SearchFn,
    config: LoopClosureConfig,
    gt_distance_m: float,
    *,
    positions: Optional[Sequence[Sequence[float]] | np.ndarray] = None,
    thresholds: Optional[Sequence[float] | np.ndarray] = None,
    num_thresholds: int = 50,
    session: str = "eval",
) -> LoopEvaluation:
    """Run the detector over a sequence at each threshold and score it against ground truth.

    ``search`` is called once per query (the results are replayed for every threshold, since
    only ``min_score`` changes). ``positions`` are the keyframe poses the detector may use for
    its consistency neighbourhood (odometry); leave ``None`` to evaluate the pose-free mode,
    which then groups matches by stamp. ``gt_positions`` are only used for scoring.
    ``thresholds`` default to ``num_thresholds`` quantiles of the queries' top scores.
    """
    stamps = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
    n = len(stamps)
    if n == 0:
        raise InputError("the sequence is empty; nothing to evaluate")
    gt = _as_positions(gt_positions, n, "gt_positions")
    odom = None if positions is None else _as_positions(positions, n, "positions")
    if not (np.isfinite(gt_distance_m) and gt_distance_m > 0):
        raise ConfigError(f"gt_distance_m = {gt_distance_m!r} must be a positive distance in metres")
    if num_thresholds < 1:
        raise ConfigError(f"num_thresholds = {num_thresholds} must be at least 1")

    probe = LoopClosureDetector(config, session=session)
    queries: list[list[Candidate]] = []
    for i in range(n):
        ids, scores = search(i, probe.search_exclusion(int(stamps[i])))
        id_arr = np.asarray(ids).reshape(-1).astype(np.int64)
        score_arr = np.asarray(scores, dtype=np.float64).reshape(-1)
        if id_arr.shape != score_arr.shape:
            raise InputError(f"search({i}) returned {id_arr.size} ids but {score_arr.size} scores")
        if np.any(id_arr >= n):
            raise InputError(f"search({i}) returned id {int(id_arr.max())}, beyond the sequence "
                             f"({n} frames); ids must be sequence indices")
        cands = [
            Candidate(id=j, score=s, stamp_ns=int(stamps[j]), session=session,
                      position=None if odom is None else tuple(odom[j]))  # type: ignore[arg-type]
            for j, s in zip(id_arr.tolist(), score_arr.tolist()) if 0 <= j < i
        ]
        queries.append(cands)
        probe.mark_inserted(i, int(stamps[i]))

    positives = _positives(stamps, gt, config, gt_distance_m)
    num_pos = int(positives.sum())
    if num_pos == 0:
        raise InputError(
            f"no frame revisits an earlier place within {gt_distance_m} m outside the exclusion "
            "window, so loop recall is undefined; evaluate on a sequence with revisits or "
            "shorten exclusion_window_s / exclusion_recent_keyframes"
        )

    ths = (_default_thresholds(queries, num_thresholds) if thresholds is None
           else np.asarray(thresholds, dtype=np.float64).reshape(-1))
    tp = np.zeros(len(ths), dtype=np.int64)
    fp = np.zeros(len(ths), dtype=np.int64)
    for t, threshold in enumerate(ths):
        det = LoopClosureDetector(dataclasses.replace(config, min_score=float(threshold)),
                                  session=session)
        for i in range(n):
            closure = det.process(int(stamps[i]), queries[i])
            det.mark_inserted(i, int(stamps[i]))
            if closure is None:
                continue
            if np.linalg.norm(gt[i] - gt[closure.match_id]) <= gt_distance_m:
                tp[t] += 1
            else:
                fp[t] += 1

    predicted = tp + fp
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 1.0)
    recall = tp / num_pos
    perfect = recall[fp == 0]
    return LoopEvaluation(
        thresholds=ths, precision=precision, recall=recall, true_positives=tp,
        false_positives=fp, num_positives=num_pos, num_queries=n,
        recall_at_100_precision=float(perfect.max()) if perfect.size else 0.0,
        auc=interpolated_auc(recall, precision),
    )
