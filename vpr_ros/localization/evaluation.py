"""Offline evaluation of the *whole* decision, not of retrieval: loop closure and relocalization.

Retrieval recall (Recall@K) says whether the right keyframe is among the results; what a SLAM
back end suffers from is the detector's output after exclusion, sequence evidence, thresholds,
relative score and temporal consistency. :class:`LoopReplay` runs the search and the sequence
matcher once per frame of a recorded sequence, then replays the node's own
:class:`LoopClosureDetector` for as many configurations as asked: a threshold sweep (the PR
curve) and a calibration grid (:meth:`LoopReplay.calibrate`: the settings with the most recall
at 100 % precision). :class:`RelocReplay` does the same for the :class:`Relocalizer` against a
prebuilt database. Both take the search as a callable, so they work with any map (or a
precomputed similarity matrix) and do not depend on ``vpr_ros.mapdb``.

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
- The swept threshold is ``min_sequence_score`` with sequence matching (``sequence.length`` >
  1) and ``min_score`` without; every other tunable stays as configured.
- Relocalization: a relocalization is correct when its keyframe is among the query's positives;
  ``recall = correct / queries with a positive``; the relocalizer runs with ``one_shot`` off, so
  every frame it accepts counts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vpr_ros.errors import ConfigError, InputError
from vpr_ros.localization.geometry import Candidate, seconds_to_ns
from vpr_ros.localization.hypotheses import Hypothesis, build_hypotheses, evidence_margin
from vpr_ros.localization.loop_closure import LoopClosureConfig, LoopClosureDetector, SearchExclusion
from vpr_ros.localization.relocalizer import Relocalizer, RelocalizerConfig
from vpr_ros.localization.sequence import KeyframeTrack, SequenceConfig, SequenceMatcher

SearchFn = Callable[[int, SearchExclusion], tuple[Any, Any]]
"""``search(query_index, exclusion) -> (ids, scores)``: one query's ranked map results."""


@dataclass(frozen=True)
class OperatingPoint:
    """Precision and recall of one configuration."""

    precision: float
    recall: float
    true_positives: int
    false_positives: int

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "recall": self.recall,
                "true_positives": self.true_positives, "false_positives": self.false_positives}


def operating_point(tp: int, fp: int, positives: int) -> OperatingPoint:
    predicted = tp + fp
    return OperatingPoint(tp / predicted if predicted else 1.0, tp / positives if positives else 0.0,
                          int(tp), int(fp))


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
    swept: str = "min_score"
    at_config: Optional["OperatingPoint"] = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready figures (for ``vpr eval loop --json``)."""
        return {
            "swept": self.swept,
            "at_config": None if self.at_config is None else self.at_config.to_dict(),
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


def _swept_value(h: Hypothesis, swept: str) -> float:
    return h.sequence_score if swept == "min_sequence_score" else h.score


def _default_thresholds(queries: list[list[Hypothesis]], count: int, swept: str) -> np.ndarray:
    tops = [v for v in (max((_swept_value(h, swept) for h in hs), default=math.nan)
                        for hs in queries) if math.isfinite(v)]
    if not tops:
        return np.array([0.0])
    return np.unique(np.quantile(np.asarray(tops), np.linspace(0.0, 1.0, count)))


def _with_margins(hyps: list[Hypothesis], radius_m: float, window_ns: int) -> list[Hypothesis]:
    """The hypotheses with their relative score computed once (replays reuse it)."""
    return [dataclasses.replace(h, margin=evidence_margin(h, hyps, radius_m, window_ns))
            for h in hyps]


def _curve(ths: np.ndarray, tp: np.ndarray, fp: np.ndarray, positives: int, n: int,
           swept: str, at_config: OperatingPoint) -> LoopEvaluation:
    predicted = tp + fp
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 1.0)
    recall = tp / positives
    perfect = recall[fp == 0]
    return LoopEvaluation(
        thresholds=ths, precision=precision, recall=recall, true_positives=tp,
        false_positives=fp, num_positives=positives, num_queries=n,
        recall_at_100_precision=float(perfect.max()) if perfect.size else 0.0,
        auc=interpolated_auc(recall, precision), swept=swept, at_config=at_config)


@dataclass(frozen=True)
class Calibration:
    """The settings a calibration chose, and what they gave on the calibration data.

    ``values``: the chosen tunables (the swept threshold, ``min_margin``, the consistency
    setting, the cosine floor); ``reached``: whether any setting tried had precision 1 with a
    non-zero recall (if not, the strictest setting is returned: it accepts nothing).
    """

    values: dict[str, Any]
    config: Any
    point: OperatingPoint
    reached: bool
    settings_tried: int

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values, "reached_full_precision": self.reached,
                "settings_tried": self.settings_tried, **self.point.to_dict()}


MARGINS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
"""Relative-score thresholds a calibration tries (standard deviations)."""


def _pick(results: list[tuple[tuple, OperatingPoint, dict[str, Any]]]
          ) -> tuple[dict[str, Any], OperatingPoint, bool]:
    """Most recall at zero false positives; ties go to the strictest setting (the sort key's
    later fields, all "larger is stricter"), which leaves the most room on unseen data."""
    clean = [r for r in results if r[1].false_positives == 0 and r[1].true_positives > 0]
    if not clean:
        strictest = max(results, key=lambda r: r[0])
        return strictest[2], strictest[1], False
    best = max(clean, key=lambda r: (r[1].true_positives, *r[0]))
    return best[2], best[1], True


class LoopReplay:
    """One pass of search and sequence matching over a sequence; decisions replayed at will.

    Conventions in the module docstring. ``search(i, exclusion) -> (ids, scores)`` is called
    once per frame; ``positions`` are odometry (the detector's neighbourhoods and distance gate,
    the matcher's distance alignment), never used for scoring; ``gt_positions`` only score.
    ``sequence`` enables sequence matching (``descriptors``, the frames' own descriptors in
    sequence order, are then needed: frame j is keyframe j).
    """

    def __init__(self, stamps_ns: Sequence[int] | np.ndarray,
                 gt_positions: Sequence[Sequence[float]] | np.ndarray, search: SearchFn,
                 config: LoopClosureConfig, gt_distance_m: float, *,
                 positions: Optional[Sequence[Sequence[float]] | np.ndarray] = None,
                 sequence: Optional[SequenceConfig] = None,
                 descriptors: Optional[np.ndarray] = None, session: str = "eval") -> None:
        stamps = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
        n = len(stamps)
        if n == 0:
            raise InputError("the sequence is empty; nothing to evaluate")
        self.stamps = stamps
        self.gt = _as_positions(gt_positions, n, "gt_positions")
        self.odom = None if positions is None else _as_positions(positions, n, "positions")
        if not (np.isfinite(gt_distance_m) and gt_distance_m > 0):
            raise ConfigError(f"gt_distance_m = {gt_distance_m!r} must be a positive distance "
                              "in metres")
        self.gt_distance_m = float(gt_distance_m)
        self.config = config
        self.session = session
        self.sequence = sequence if sequence is not None else SequenceConfig(length=1)
        if descriptors is not None:
            descriptors = np.asarray(descriptors, dtype=np.float32)
            if descriptors.ndim != 2 or len(descriptors) != n:
                raise InputError(f"descriptors must be ({n}, D), one per frame, got "
                                 f"{descriptors.shape}")
        elif self.sequence.enabled:
            raise InputError("sequence matching needs the frames' descriptors")
        self.queries = self._probe(search, descriptors)
        self.positives = _positives(stamps, self.gt, config, self.gt_distance_m)
        self.num_positives = int(self.positives.sum())
        if self.num_positives == 0:
            raise InputError(
                f"no frame revisits an earlier place within {gt_distance_m} m outside the "
                "exclusion window, so loop recall is undefined; evaluate on a sequence with "
                "revisits or shorten exclusion_window_s / exclusion_recent_keyframes")

    @property
    def swept(self) -> str:
        return "min_sequence_score" if self.sequence.enabled else "min_score"

    def _probe(self, search: SearchFn, desc: Optional[np.ndarray]) -> list[list[Hypothesis]]:
        stamps, n, odom, session = self.stamps, len(self.stamps), self.odom, self.session
        probe = LoopClosureDetector(self.config, session=session)
        matcher = None
        track = KeyframeTrack()
        if desc is not None:
            matcher = SequenceMatcher(self.sequence, track, lambda ids: desc[ids])

        def candidates_of(ids: np.ndarray, scores: np.ndarray) -> list[Candidate]:
            return [Candidate(id=int(j), score=float(s), stamp_ns=int(stamps[j]), session=session,
                              position=None if odom is None else tuple(odom[j]))  # type: ignore
                    for j, s in zip(ids.tolist(), scores.tolist())]

        window_ns = seconds_to_ns(self.config.consistency_stamp_window_s)
        out: list[list[Hypothesis]] = []
        for i in range(n):
            exclusion = probe.search_exclusion(int(stamps[i]))
            ids, scores = search(i, exclusion)
            id_arr = np.asarray(ids).reshape(-1).astype(np.int64)
            score_arr = np.asarray(scores, dtype=np.float64).reshape(-1)
            if id_arr.shape != score_arr.shape:
                raise InputError(f"search({i}) returned {id_arr.size} ids but {score_arr.size} "
                                 "scores")
            if np.any(id_arr >= n):
                raise InputError(f"search({i}) returned id {int(id_arr.max())}, beyond the "
                                 f"sequence ({n} frames); ids must be sequence indices")
            keep = (id_arr >= 0) & (id_arr < i)
            cands = candidates_of(id_arr[keep], score_arr[keep])
            result = None
            if matcher is not None:
                result = matcher.update(int(stamps[i]), desc[i], id_arr[keep],  # type: ignore
                                        position=None if odom is None else odom[i],
                                        exclusion=exclusion)
            hyps = build_hypotheses(cands, result, candidates_of, self.sequence.enabled)
            out.append(_with_margins(hyps, self.config.consistency_radius_m, window_ns))
            probe.mark_inserted(i, int(stamps[i]))
            track.extend([session], stamps[i:i + 1],
                         None if odom is None else odom[i:i + 1])
        return out

    def run(self, config: LoopClosureConfig, floor: Optional[float] = None
            ) -> OperatingPoint:
        """Replay the detector with ``config``; ``floor``: drop hypotheses below this value of
        the swept variable beforehand (they would fail its gate anyway; margins are fixed)."""
        det = LoopClosureDetector(config, session=self.session,
                                  sequence_length=self.sequence.length)
        tp = fp = 0
        swept = self.swept
        for i in range(len(self.stamps)):
            hyps = self.queries[i]
            if floor is not None:
                hyps = [h for h in hyps if _swept_value(h, swept) >= floor]
            closure = det.process(int(self.stamps[i]), hyps,
                                  query_position=None if self.odom is None else self.odom[i])
            det.mark_inserted(i, int(self.stamps[i]))
            if closure is None:
                continue
            if np.linalg.norm(self.gt[i] - self.gt[closure.match_id]) <= self.gt_distance_m:
                tp += 1
            else:
                fp += 1
        return operating_point(tp, fp, self.num_positives)

    def sweep(self, config: Optional[LoopClosureConfig] = None,
              thresholds: Optional[Sequence[float] | np.ndarray] = None,
              num_thresholds: int = 50) -> LoopEvaluation:
        """PR curve over the swept threshold, and the operating point at ``config`` itself."""
        config = config or self.config
        if num_thresholds < 1:
            raise ConfigError(f"num_thresholds = {num_thresholds} must be at least 1")
        swept = self.swept
        ths = (_default_thresholds(self.queries, num_thresholds, swept) if thresholds is None
               else np.asarray(thresholds, dtype=np.float64).reshape(-1))
        tp = np.zeros(len(ths), dtype=np.int64)
        fp = np.zeros(len(ths), dtype=np.int64)
        for t, threshold in enumerate(ths.tolist()):
            point = self.run(dataclasses.replace(config, **{swept: float(threshold)}),
                             floor=float(threshold))
            tp[t], fp[t] = point.true_positives, point.false_positives
        at_config = self.run(config)
        return _curve(ths, tp, fp, self.num_positives, len(self.stamps), swept, at_config)

    def calibrate(self, config: Optional[LoopClosureConfig] = None,
                  num_thresholds: int = 30) -> Calibration:
        """The settings with the most recall at 100 % precision on this sequence: the swept
        threshold, ``min_margin`` (:data:`MARGINS`), ``consistency_k`` (1-3, ``consistency_n``
        raised to it when needed) and, with sequence matching, the cosine floor (as configured,
        or off)."""
        config = config or self.config
        swept = self.swept
        ths = _default_thresholds(self.queries, num_thresholds, swept).tolist()
        tops = [max((_swept_value(h, swept) for h in hs), default=-math.inf)
                for hs in self.queries]
        ths.append(max(tops) + 1e-6)  # accepts nothing: always at 100 % precision
        floors = sorted({-1.0, config.min_score}) if swept == "min_sequence_score" \
            else [None]
        results = []
        for k in (1, 2, 3):
            for margin in MARGINS:
                for floor in floors:
                    for th in ths:
                        over: dict[str, Any] = {swept: float(th), "min_margin": float(margin),
                                                "consistency_k": k,
                                                "consistency_n": max(k, config.consistency_n)}
                        if floor is not None:
                            over["min_score"] = float(floor)
                        cfg = dataclasses.replace(config, **over)
                        point = self.run(cfg, floor=float(th))
                        key = (float(th), float(margin), k, -2.0 if floor is None else floor)
                        results.append((key, point, over))
        values, point, reached = _pick(results)
        return Calibration(values, dataclasses.replace(config, **values), point, reached,
                           len(results))


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
    sequence: Optional[SequenceConfig] = None,
    descriptors: Optional[np.ndarray] = None,
) -> LoopEvaluation:
    """Run the detector over a sequence at each threshold and score it against ground truth.

    ``search`` is called once per query (the results are replayed for every threshold).
    ``positions`` are the keyframe poses the detector may use (odometry); leave ``None`` to
    evaluate the pose-free mode. ``gt_positions`` are only used for scoring. ``thresholds``
    default to ``num_thresholds`` quantiles of the queries' best values of the swept variable.
    ``sequence`` (with ``descriptors``) evaluates sequence matching; see :class:`LoopReplay`.
    """
    if num_thresholds < 1:
        raise ConfigError(f"num_thresholds = {num_thresholds} must be at least 1")
    replay = LoopReplay(stamps_ns, gt_positions, search, config, gt_distance_m,
                        positions=positions, sequence=sequence, descriptors=descriptors,
                        session=session)
    return replay.sweep(config, thresholds, num_thresholds)


# ------------------------------------------------------------------------------ relocalization

@dataclass
class RelocReplay:
    """Relocalizer decisions over query frames in order against a prebuilt database.

    ``hypotheses[i]``: query i's hypotheses (from :func:`build_hypotheses`, margins filled by
    :meth:`from_hypotheses`); ``positives[i]``: the database ids that are correct for it.
    """

    hypotheses: list[list[Hypothesis]]
    stamps_ns: np.ndarray
    positives: list[np.ndarray]
    config: RelocalizerConfig
    sequence_length: int = 1
    num_positives: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_positives = int(sum(1 for p in self.positives if len(p)))
        if self.num_positives == 0:
            raise InputError("no query has a correct database image; relocalization recall is "
                             "undefined")
        self._pos = [set(np.asarray(p).tolist()) for p in self.positives]

    @classmethod
    def from_hypotheses(cls, hypotheses: list[list[Hypothesis]], stamps_ns: np.ndarray,
                        positives: list[np.ndarray], config: RelocalizerConfig,
                        sequence_length: int = 1) -> "RelocReplay":
        window = seconds_to_ns(config.agreement_stamp_window_s)
        hyps = [_with_margins(h, config.agreement_radius_m, window) for h in hypotheses]
        return cls(hyps, np.asarray(stamps_ns, np.int64), positives, config, sequence_length)

    @property
    def swept(self) -> str:
        return "min_sequence_score" if self.sequence_length > 1 else "min_score"

    def run(self, config: RelocalizerConfig, floor: Optional[float] = None) -> OperatingPoint:
        rel = Relocalizer(dataclasses.replace(config, one_shot=False),
                          sequence_length=self.sequence_length)
        tp = fp = 0
        for i, hyps in enumerate(self.hypotheses):
            if floor is not None:
                hyps = [h for h in hyps if _swept_value(h, self.swept) >= floor]
            out = rel.update(int(self.stamps_ns[i]), hyps)
            if out is None:
                continue
            if out.keyframe_id in self._pos[i]:
                tp += 1
            else:
                fp += 1
        return operating_point(tp, fp, self.num_positives)

    def sweep(self, config: Optional[RelocalizerConfig] = None, num_thresholds: int = 50
              ) -> LoopEvaluation:
        config = config or self.config
        ths = _default_thresholds(self.hypotheses, num_thresholds, self.swept)
        tp = np.zeros(len(ths), dtype=np.int64)
        fp = np.zeros(len(ths), dtype=np.int64)
        for t, threshold in enumerate(ths.tolist()):
            point = self.run(dataclasses.replace(config, **{self.swept: float(threshold)}),
                             floor=float(threshold))
            tp[t], fp[t] = point.true_positives, point.false_positives
        return _curve(ths, tp, fp, self.num_positives, len(self.hypotheses), self.swept,
                      self.run(config))

    def calibrate(self, config: Optional[RelocalizerConfig] = None, num_thresholds: int = 30
                  ) -> Calibration:
        """Most recall at 100 % precision over the swept threshold, ``min_margin`` and
        ``min_consistent`` (1-3) and, with sequence matching, the cosine floor."""
        config = config or self.config
        swept = self.swept
        ths = _default_thresholds(self.hypotheses, num_thresholds, swept).tolist()
        tops = [max((_swept_value(h, swept) for h in hs), default=-math.inf)
                for hs in self.hypotheses]
        ths.append(max(tops) + 1e-6)
        floors = sorted({-1.0, config.min_score}) if swept == "min_sequence_score" else [None]
        results = []
        for k in (1, 2, 3):
            for margin in MARGINS:
                for floor in floors:
                    for th in ths:
                        over: dict[str, Any] = {swept: float(th), "min_margin": float(margin),
                                                "min_consistent": k}
                        if floor is not None:
                            over["min_score"] = float(floor)
                        point = self.run(dataclasses.replace(config, **over), floor=float(th))
                        key = (float(th), float(margin), k, -2.0 if floor is None else floor)
                        results.append((key, point, over))
        values, point, reached = _pick(results)
        return Calibration(values, dataclasses.replace(config, **values), point, reached,
                           len(results))
