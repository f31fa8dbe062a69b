"""The decision stages on hypotheses: sequence gate, relative score, odometry gate, the
verification seam, and the loop-closure message fields that carry the evidence."""

from __future__ import annotations

import math

import pytest

from vpr_ros.localization import (Candidate, Hypothesis, LoopClosureConfig, LoopClosureDetector,
                                  Relocalizer, RelocalizerConfig, SequenceMatch,
                                  evidence_margin)

S = 1_000_000_000


def hyp(kf: int, x: float, cosine: float, seq: float | None = None, session: str = "old",
        stamp_s: float = 0.0) -> Hypothesis:
    match = None if seq is None else SequenceMatch(
        id=kf, score=seq, frame_score=seq, cosine=cosine, steps=10, frames=10, speed=1.0,
        reverse=False, by_distance=True)
    return Hypothesis(Candidate(kf, cosine, int(stamp_s * S), (x, 0.0, 0.0), session=session),
                      match, seq if seq is not None else math.nan)


def detector(**over: object) -> LoopClosureDetector:
    values: dict[str, object] = dict(min_score=0.3, exclusion_window_s=0.0,
                                     exclusion_recent_keyframes=0, consistency_k=1,
                                     consistency_n=1, consistency_radius_m=5.0,
                                     min_sequence_score=2.0, min_margin=0.0)
    values.update(over)
    return LoopClosureDetector(LoopClosureConfig(**values), session="live",  # type: ignore
                               sequence_length=10)


def test_sequence_gate_needs_sequence_evidence() -> None:
    det = detector()
    assert det.process(100 * S, [hyp(1, 0.0, 0.9)]) is None  # no path: no sequence evidence
    assert det.stats.candidates_below_sequence == 1
    assert det.process(101 * S, [hyp(1, 0.0, 0.9, seq=1.5)]) is None
    closure = det.process(102 * S, [hyp(1, 0.0, 0.5, seq=2.5)])
    assert closure is not None and closure.sequence_score == 2.5 and closure.sequence_steps == 10
    # Single-frame detectors ignore the sequence gate (today's behaviour).
    single = LoopClosureDetector(det.config, session="live")
    assert single.process(100 * S, [hyp(1, 0.0, 0.9)]) is not None


def test_relative_score_rejects_a_frame_that_looks_like_two_places() -> None:
    det = detector(min_margin=0.5)
    ambiguous = [hyp(1, 0.0, 0.8, seq=3.0), hyp(2, 1.0, 0.8, seq=2.9),   # same place
                 hyp(50, 100.0, 0.8, seq=2.8)]                           # elsewhere
    assert det.process(100 * S, ambiguous) is None
    assert det.stats.candidates_low_margin >= 1
    clear = [hyp(1, 0.0, 0.8, seq=3.0), hyp(2, 1.0, 0.8, seq=2.9), hyp(50, 100.0, 0.8, seq=1.0)]
    closure = det.process(101 * S, clear)
    assert closure is not None and closure.match_id == 1
    assert closure.margin == pytest.approx(2.0)
    assert evidence_margin(clear[0], clear, 5.0, 0) == pytest.approx(2.0)
    # With no rival elsewhere, the lead over the weakest returned hypothesis (a lower bound).
    assert evidence_margin(clear[0], clear[:2], 5.0, 0) == pytest.approx(0.1)


def test_odometry_gate_applies_to_the_live_session_only() -> None:
    det = detector(max_odometry_distance_m=20.0)
    far_live = hyp(3, 100.0, 0.9, seq=3.0, session="live", stamp_s=0.0)
    assert det.process(100 * S, [far_live], query_position=(0.0, 0.0, 0.0)) is None
    assert det.stats.candidates_beyond_odometry == 1
    near_live = hyp(4, 10.0, 0.9, seq=3.0, session="live", stamp_s=0.0)
    assert det.process(101 * S, [near_live], query_position=(0.0, 0.0, 0.0)) is not None
    # Another session's positions are in the map frame, not the live odometry frame.
    far_old = hyp(5, 100.0, 0.9, seq=3.0, session="old")
    assert det.process(102 * S, [far_old], query_position=(0.0, 0.0, 0.0)) is not None
    # Without a query position the gate cannot apply.
    assert det.process(103 * S, [far_live]) is not None


def test_verifier_is_tried_best_first_and_its_evidence_travels() -> None:
    det = detector()
    seen: list[int] = []

    def verifier(h: Hypothesis):
        seen.append(h.id)
        return {"inliers": 42} if h.id == 2 else None

    hyps = [hyp(2, 50.0, 0.8, seq=2.5), hyp(1, 0.0, 0.8, seq=3.0), hyp(3, 90.0, 0.8, seq=1.0)]
    closure = det.process(100 * S, hyps, verifier=verifier)
    assert seen == [1, 2]                       # by evidence; 3 failed the sequence gate
    assert closure is not None and closure.match_id == 2
    assert closure.verification == {"inliers": 42}
    assert det.stats.candidates_unverified == 1
    assert det.process(101 * S, hyps[1:], verifier=lambda h: None) is None


def test_relocalizer_votes_with_the_same_stages() -> None:
    cfg = RelocalizerConfig(min_score=0.3, min_consistent=2, min_sequence_score=2.0,
                            min_margin=0.5)
    rel = Relocalizer(cfg, sequence_length=10)
    good = [hyp(1, 0.0, 0.6, seq=3.0), hyp(9, 80.0, 0.6, seq=1.0)]
    assert rel.update(1 * S, good) is None
    out = rel.update(2 * S, good)
    assert out is not None and out.keyframe_id == 1
    assert out.sequence_score == 3.0 and out.evidence_margin == pytest.approx(2.0)
    rel.reset()
    ambiguous = [hyp(1, 0.0, 0.6, seq=3.0), hyp(9, 80.0, 0.6, seq=2.8)]
    assert rel.update(3 * S, ambiguous) is None and rel.consistent_count == 0
    assert rel.rejected["low_margin"] >= 1
    rel.reset()
    calls: list[int] = []
    out = None
    for t in (4, 5):
        out = rel.update(t * S, good, verifier=lambda h: calls.append(h.id) or "ok")
    assert out is not None and out.verification == "ok" and calls == [1, 1]
    # Plain candidates keep the single-frame behaviour: top cosine, min_score.
    plain = Relocalizer(RelocalizerConfig(min_score=0.5, min_consistent=1, min_margin=0.0))
    assert plain.update(1, [Candidate(7, 0.7, 0, (0.0, 0.0, 0.0))]).keyframe_id == 7


def test_loop_closure_message_appends_the_evidence_fields() -> None:
    pytest.importorskip("std_msgs")
    from vpr_ros.ros.messages import LOOP_CLOSURE_FIELDS, loop_closure_msg, parse_loop_closure

    det = detector()
    closure = det.process(100 * S, [hyp(1, 0.0, 0.5, seq=2.5)])
    assert closure is not None
    fields = parse_loop_closure(loop_closure_msg(closure, 7))
    assert LOOP_CLOSURE_FIELDS[:13][-1] == "match_qw"  # existing labels keep their places
    assert fields["sequence_score"] == 2.5 and fields["sequence_steps"] == 10
    assert math.isfinite(fields["margin"]) and fields["query_keyframe_id"] == 7
