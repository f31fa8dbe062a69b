"""``vpr eval recall --sequence-length L`` and the relocalization decisions behind it.

Queries are taken in folder (sequence) order: query i is decided with the evidence of queries
i-L+1..i, exactly as the node's sequence matcher sees a camera stream, against a database that
is one mapping run in folder order (one keyframe per image, ``period_s`` apart). The database's
search shortlist of each query (the top max(K) of the chosen index) is the only retrieval the
matcher gets, as in the node. Recall@K is then counted over the sequence matches (one per
place, best first). The same hypotheses feed the node's :class:`Relocalizer` (``one_shot`` off)
for the relocalization figures and ``--calibrate``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.localization.evaluation import Calibration, LoopEvaluation, RelocReplay
from vpr_ros.localization.geometry import Candidate
from vpr_ros.localization.hypotheses import Hypothesis, build_hypotheses
from vpr_ros.localization.relocalizer import RelocalizerConfig
from vpr_ros.localization.sequence import KeyframeTrack, SequenceConfig, SequenceMatcher

NS_PER_S = 1_000_000_000
DATABASE = "database"


def sequence_hypotheses(db_desc: np.ndarray, q_desc: np.ndarray, ids: np.ndarray,
                        scores: np.ndarray, sequence: SequenceConfig, period_s: float = 1.0,
                        db_positions: Optional[np.ndarray] = None,
                        db_period_s: Optional[float] = None) -> list[list[Hypothesis]]:
    """Per query (in order), its hypotheses: the shortlist with normalised scores (single
    frame, ``sequence.length`` 1) or the sequence matches. Queries are ``period_s`` apart,
    database images ``db_period_s`` (default: the same)."""
    db = np.asarray(db_desc, dtype=np.float32)
    q = np.asarray(q_desc, dtype=np.float32)
    if len(ids) != len(q):
        raise InputError(f"{len(ids)} result rows for {len(q)} queries")
    db_period_s = period_s if db_period_s is None else db_period_s
    if not (period_s > 0 and db_period_s > 0):
        raise InputError(f"period_s = {period_s} and db_period_s = {db_period_s} must be "
                         "positive")
    stamps = (np.arange(len(db)) * db_period_s * NS_PER_S).astype(np.int64)
    track = KeyframeTrack()
    track.extend([DATABASE] * len(db), stamps)
    matcher = SequenceMatcher(sequence, track, lambda sel: db[sel])
    pos = None if db_positions is None else np.asarray(db_positions, dtype=np.float64)

    def candidates_of(sel: np.ndarray, cos: np.ndarray) -> list[Candidate]:
        return [Candidate(int(j), float(c), int(stamps[j]), session=DATABASE,
                          position=None if pos is None else (float(pos[j][0]), float(pos[j][1]),
                                                             0.0))
                for j, c in zip(sel.tolist(), cos.tolist())]

    out = []
    for i in range(len(q)):
        row = np.asarray(ids[i], dtype=np.int64)
        keep = row >= 0
        cands = candidates_of(row[keep], np.asarray(scores[i], dtype=np.float64)[keep])
        result = matcher.update(int(i * period_s * NS_PER_S), q[i], row[keep])
        out.append(build_hypotheses(cands, result, candidates_of, sequence.enabled))
    return out


def ranking(hypotheses: Sequence[Sequence[Hypothesis]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of each query's first ``k`` hypotheses by evidence, padded with -1."""
    ids = np.full((len(hypotheses), k), -1, np.int64)
    scores = np.full((len(hypotheses), k), -np.inf, np.float64)
    for i, hyps in enumerate(hypotheses):
        ranked = sorted(hyps, key=lambda h: h.evidence, reverse=True)[:k]
        ids[i, :len(ranked)] = [h.id for h in ranked]
        scores[i, :len(ranked)] = [h.evidence for h in ranked]
    return ids, scores


def relocalization_figures(hypotheses: list[list[Hypothesis]], positives: list[np.ndarray],
                           config: RelocalizerConfig, sequence_length: int,
                           period_s: float = 1.0, calibrate: bool = False,
                           num_thresholds: int = 50
                           ) -> tuple[dict[str, Any], LoopEvaluation, Optional[Calibration]]:
    """The relocalizer's recall at 100 % precision, AUC and operating point at ``config``
    (``one_shot`` off), and with ``calibrate`` the best settings on this data (in-sample)."""
    stamps = (np.arange(len(hypotheses)) * period_s * NS_PER_S).astype(np.int64)
    replay = RelocReplay.from_hypotheses(hypotheses, stamps, positives, config, sequence_length)
    ev = replay.sweep(config, num_thresholds)
    at = ev.at_config
    fig: dict[str, Any] = {
        "recall_at_100_precision": ev.recall_at_100_precision, "auc": ev.auc,
        "precision": None if at is None else at.precision,
        "recall": None if at is None else at.recall,
        "true_positives": None if at is None else at.true_positives,
        "false_positives": None if at is None else at.false_positives,
        "swept": ev.swept, "curve": ev.to_dict()}
    calib = None
    if calibrate:
        calib = replay.calibrate(config)
        fig["calibrated"] = {**calib.to_dict(), "in_sample": True}
    return fig, ev, calib


def reloc_configs(path: Optional[str], params: Sequence[str]
                  ) -> tuple[RelocalizerConfig, SequenceConfig]:
    """RelocalizerConfig and SequenceConfig from a node params file / sections (as
    :func:`vpr_ros.eval.loop.decision_configs`) and ``key=value`` overrides (relocalization
    names plain, sequence names with their ``sequence.`` prefix)."""
    from vpr_ros.eval.loop import decision_sections

    reloc, seq = decision_sections(path, params, "relocalization")
    return RelocalizerConfig.from_mapping(reloc), SequenceConfig.from_mapping(seq)


def with_length(sequence: SequenceConfig, length: Optional[int]) -> SequenceConfig:
    return sequence if length is None else dataclasses.replace(sequence, length=int(length))
