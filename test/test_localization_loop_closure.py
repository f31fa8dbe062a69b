"""LoopClosureDetector on recorded (synthetic) sequences: exclusion, threshold, k-of-n, keyframes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from vpr_ros.errors import ConfigError, InputError
from vpr_ros.localization import (
    Candidate,
    LoopClosureConfig,
    LoopClosureDetector,
    SearchExclusion,
)

S = 1_000_000_000  # ns per second


@dataclass
class TwoLaps:
    """A robot driving the same 60 m loop twice at 1 m/s, one frame per second."""

    stamps: np.ndarray  # (N,) ns
    positions: np.ndarray  # (N, 3)
    descriptors: np.ndarray  # (N, D) unit rows
    lap: int = 60


def two_laps(seed: int = 0, dim: int = 64, noise: float = 0.04) -> TwoLaps:
    """Descriptors are a per-place code blurred over neighbouring places plus per-frame noise.

    Same place on the other lap: cosine ~0.9+; neighbouring frames ~0.6; elsewhere ~0.
    """
    rng = np.random.default_rng(seed)
    lap = 60
    base = rng.standard_normal((lap, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    place = base + 0.5 * np.roll(base, 1, axis=0) + 0.5 * np.roll(base, -1, axis=0)
    idx = np.arange(2 * lap) % lap
    desc = place[idx] + noise * rng.standard_normal((2 * lap, dim))
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    radius = lap / (2 * math.pi)
    angle = 2 * math.pi * idx / lap
    pos = np.stack([radius * np.cos(angle), radius * np.sin(angle), np.zeros_like(angle)], axis=1)
    return TwoLaps(np.arange(2 * lap, dtype=np.int64) * S, pos, desc.astype(np.float32))


def search_ignoring_exclusion(seq: TwoLaps, i: int, k: int = 5) -> list[Candidate]:
    """Exact search over frames before ``i`` that deliberately ignores any exclusion.

    The detector must be safe against a map that does not honour the exclusion it was given.
    """
    if i == 0:
        return []
    scores = seq.descriptors[:i] @ seq.descriptors[i]
    order = np.argsort(-scores)[:k]
    return [Candidate(int(j), float(scores[j]), int(seq.stamps[j]), tuple(seq.positions[j]),
                      session="run") for j in order]


def lap_config(**over: object) -> LoopClosureConfig:
    values: dict[str, object] = dict(min_score=0.8, exclusion_window_s=20.0,
                                     exclusion_recent_keyframes=10, consistency_k=3,
                                     consistency_n=5, consistency_radius_m=3.0)
    values.update(over)
    return LoopClosureConfig(**values)  # type: ignore[arg-type]


def run(seq: TwoLaps, det: LoopClosureDetector) -> dict[int, object]:
    closures = {}
    for i in range(len(seq.stamps)):
        out = det.process(int(seq.stamps[i]), search_ignoring_exclusion(seq, i))
        if out is not None:
            closures[i] = out
        det.mark_inserted(i, int(seq.stamps[i]), seq.positions[i])
    return closures


def test_two_laps_close_loops_only_on_the_revisit_lap() -> None:
    seq = two_laps()
    det = LoopClosureDetector(lap_config(), session="run")
    closures = run(seq, det)
    assert closures, "the revisit lap must produce closures"
    assert min(closures) == 62  # k=3: third revisit query is the first with 3 agreeing queries
    assert all(i >= seq.lap for i in closures)
    assert len(closures) == seq.lap - 2  # every revisit query from the third on
    for i, c in closures.items():
        assert c.query_stamp_ns == seq.stamps[i]
        # Right place (ground truth: same position on the circle, 1 m between frames).
        assert np.linalg.norm(seq.positions[c.match_id] - seq.positions[i]) <= 1.01
        assert abs(c.query_stamp_ns - c.match_stamp_ns) > 20 * S
        assert 3 <= c.consistent_count <= 5
    assert det.stats.closures == len(closures) and det.stats.queries == 2 * seq.lap


def test_acceptance_index_follows_k() -> None:
    seq = two_laps()
    for k, first in [(1, 60), (2, 61), (4, 63)]:
        closures = run(seq, LoopClosureDetector(lap_config(consistency_k=k), session="run"))
        assert min(closures) == first, k


def test_nothing_inside_the_exclusion_window_even_when_it_scores_best() -> None:
    # Robot at t = 100..109 s; its last frames look identical (0.99); an old visit (t = 10 s) to
    # the same spot scores 0.85. A map ignoring the exclusion returns both.
    cfg = LoopClosureConfig(min_score=0.8, exclusion_window_s=30.0, exclusion_recent_keyframes=3,
                            consistency_k=2, consistency_n=3)
    det = LoopClosureDetector(cfg, session="run")
    outs = []
    for t in range(100, 110):
        recent = [Candidate(1000 + t - d, 0.99, (t - d) * S, (0.0, 0.0, 0.0), session="run")
                  for d in range(1, 6)]
        old = Candidate(10, 0.85, 10 * S, (0.5, 0.0, 0.0), session="run")
        outs.append(det.process(t * S, recent + [old]))
    assert outs[0] is None  # no temporal support yet
    assert all(o is not None and o.match_id == 10 for o in outs[1:])
    assert det.stats.candidates_excluded == 50


def test_recent_keyframes_are_excluded_by_count_and_passed_to_the_search() -> None:
    cfg = LoopClosureConfig(min_score=0.5, exclusion_window_s=5.0, exclusion_recent_keyframes=2,
                            consistency_k=1, consistency_n=1)
    det = LoopClosureDetector(cfg, session="live")
    for kf_id, t in [(1, 0), (2, 100), (3, 200)]:
        det.mark_inserted(kf_id, t * S)
    ex = det.search_exclusion(300 * S)
    assert ex == SearchExclusion(ids=frozenset({2, 3}), around_stamp_ns=300 * S, window_ns=5 * S,
                                 window_session="live")
    assert ex.as_kwargs()["ids"] == frozenset({2, 3})
    # Keyframe 3 is long ago in time (a parked robot) but among the last two inserted.
    parked = Candidate(3, 0.99, 200 * S, session="live")
    older = Candidate(1, 0.6, 0, session="live")
    out = det.process(300 * S, [parked, older])
    assert out is not None and out.match_id == 1


def test_time_window_applies_to_the_live_session_only() -> None:
    cfg = LoopClosureConfig(min_score=0.5, exclusion_window_s=30.0, consistency_k=1,
                            consistency_n=1)
    det = LoopClosureDetector(cfg, session="live")
    same_stamp_other_run = Candidate(5, 0.9, 100 * S, session="yesterday")
    assert det.process(100 * S, [same_stamp_other_run]) is not None
    unknown_session = Candidate(6, 0.9, 100 * S, session=None)  # conservative: excluded
    assert det.process(101 * S, [unknown_session]) is None
    # Without a live session name every session's window is excluded.
    anon = LoopClosureDetector(cfg)
    assert anon.process(100 * S, [same_stamp_other_run]) is None


def test_single_spurious_match_without_temporal_support_is_rejected() -> None:
    cfg = LoopClosureConfig(min_score=0.8, exclusion_window_s=10.0, consistency_k=3,
                            consistency_n=5, consistency_radius_m=5.0)
    det = LoopClosureDetector(cfg)
    far = (500.0, 0.0, 0.0)
    for t in range(100, 110):
        cands = [Candidate(1, 0.99, 0, far)] if t == 105 else [Candidate(2, 0.3, 0, (0.0, 0, 0))]
        assert det.process(t * S, cands) is None
    assert det.stats.inconsistent_queries == 1
    # The same match repeated over three queries is a loop: the rejection above was the rule,
    # not an inability to accept.
    outs = [det.process(t * S, [Candidate(1, 0.99, 0, far)]) for t in range(110, 113)]
    assert outs[:2] == [None, None] and outs[2] is not None and outs[2].consistent_count == 3


def test_below_threshold_never_closes_and_threshold_is_inclusive() -> None:
    cfg = LoopClosureConfig(min_score=0.8, exclusion_window_s=0.0, consistency_k=1,
                            consistency_n=1)
    det = LoopClosureDetector(cfg)
    assert det.process(10 * S, [Candidate(1, 0.7999, 0)]) is None
    out = det.process(11 * S, [Candidate(1, 0.8, 0)])
    assert out is not None and out.score == 0.8
    assert det.stats.candidates_below_threshold == 1


def test_one_closure_per_query_is_the_best_consistent_candidate() -> None:
    cfg = LoopClosureConfig(min_score=0.5, exclusion_window_s=10.0, consistency_k=2,
                            consistency_n=3, consistency_radius_m=2.0)
    det = LoopClosureDetector(cfg)
    place_a, place_b = (0.0, 0.0, 0.0), (100.0, 0.0, 0.0)
    assert det.process(100 * S, [Candidate(1, 0.8, 0, place_a)]) is None
    out = det.process(101 * S, [
        Candidate(9, 0.95, 0, place_b),  # best score, but nothing before agreed on B
        Candidate(2, 0.86, S, (1.0, 0.0, 0.0)),
        Candidate(3, 0.84, 2 * S, (1.5, 0.0, 0.0)),
    ])
    assert out is not None and out.match_id == 2 and out.consistent_count == 2
    assert out.match_position == (1.0, 0.0, 0.0)


def test_consistency_without_poses_groups_by_stamp_within_a_session() -> None:
    cfg = LoopClosureConfig(min_score=0.5, exclusion_window_s=10.0, consistency_k=2,
                            consistency_n=2, consistency_stamp_window_s=3.0)
    det = LoopClosureDetector(cfg, session="live")
    assert det.process(100 * S, [Candidate(1, 0.9, 20 * S, session="map")]) is None
    # 2 s apart in the same session: same stretch of route.
    assert det.process(101 * S, [Candidate(2, 0.9, 22 * S, session="map")]) is not None
    # Same stamp, other session: unrelated clocks, no support.
    assert det.process(102 * S, [Candidate(3, 0.9, 22 * S, session="other")]) is None
    # 4 s apart: outside the window.
    assert det.process(103 * S, [Candidate(4, 0.9, 26 * S, session="other")]) is None


def test_queries_without_candidates_count_against_consistency() -> None:
    cfg = LoopClosureConfig(min_score=0.5, exclusion_window_s=1.0, consistency_k=2,
                            consistency_n=2)
    det = LoopClosureDetector(cfg)
    here = (0.0, 0.0, 0.0)
    assert det.process(100 * S, [Candidate(1, 0.9, 0, here)]) is None
    assert det.process(101 * S, []) is None
    assert det.process(102 * S, [Candidate(1, 0.9, 0, here)]) is None  # the empty query broke it
    assert det.process(103 * S, [Candidate(1, 0.9, 0, here)]) is not None


def test_time_jump_and_reset_clear_consistency() -> None:
    cfg = LoopClosureConfig(min_score=0.5, exclusion_window_s=1.0, consistency_k=2,
                            consistency_n=2)
    det = LoopClosureDetector(cfg, session="a")
    here = [Candidate(1, 0.9, 0, (0.0, 0.0, 0.0), session="old")]
    assert det.process(100 * S, here) is None
    assert det.process(50 * S, here) is None  # bag restarted: earlier stamp, no carried support
    assert det.stats.time_jumps == 1
    assert det.process(51 * S, here) is not None
    det.mark_inserted(7, 51 * S)
    det.reset(session="b")
    assert det.session == "b"
    assert det.search_exclusion(52 * S).ids == frozenset()
    assert det.process(52 * S, here) is None
    assert det.should_insert(52 * S).reason == "first"


def yaw(deg: float) -> tuple[float, float, float, float]:
    a = math.radians(deg)
    return (0.0, 0.0, math.sin(a / 2), math.cos(a / 2))


def test_keyframe_insertion_by_distance_rotation_and_time() -> None:
    cfg = LoopClosureConfig(keyframe_min_distance_m=1.0, keyframe_min_rotation_deg=15.0,
                            keyframe_max_interval_s=5.0)
    det = LoopClosureDetector(cfg)
    assert det.should_insert(0, (0, 0, 0), yaw(0)).reason == "first"
    det.mark_inserted(0, 0, (0, 0, 0), yaw(0))
    still = det.should_insert(S, (0.6, 0.7, 0), yaw(10))
    assert not still and still.distance_m == pytest.approx(math.hypot(0.6, 0.7))
    assert still.rotation_deg == pytest.approx(10.0)
    assert not det.should_insert(S, (0.6, 0.7, 0), yaw(10))  # no side effects: same answer
    moved = det.should_insert(2 * S, (0.6, 0.8, 0), yaw(10))
    assert moved and moved.reason == "distance"
    turned = det.should_insert(2 * S, (0.1, 0.0, 0), yaw(-16))
    assert turned and turned.reason == "rotation"
    waited = det.should_insert(5 * S, (0.1, 0.0, 0), yaw(1))
    assert waited and waited.reason == "interval" and waited.elapsed_s == 5.0
    # Inserting moves the reference: the same pose is no longer a move.
    det.mark_inserted(1, 2 * S, (0.6, 0.8, 0), yaw(10))
    assert not det.should_insert(3 * S, (0.6, 0.8, 0), yaw(10))
    # Rotation needs both orientations; position alone still works.
    assert not det.should_insert(3 * S, (0.6, 0.8, 0))
    assert det.should_insert(1 * S, (0.6, 0.8, 0)).reason == "time_jump"


def test_keyframe_insertion_by_novelty_without_odometry() -> None:
    cfg = LoopClosureConfig(novelty_threshold=0.9, novelty_window_keyframes=2,
                            keyframe_max_interval_s=10.0)
    det = LoopClosureDetector(cfg)
    e = np.eye(4, dtype=np.float32)
    det.mark_inserted(0, 0, descriptor=e[0])
    det.mark_inserted(1, S, descriptor=e[1])
    similar = (0.95 * e[1] + 0.05 * e[2]) * 3.0  # unnormalised on purpose
    d = det.should_insert(2 * S, descriptor=similar)
    assert not d and d.max_similarity == pytest.approx(0.95 / math.hypot(0.95, 0.05))
    novel = det.should_insert(2 * S, descriptor=e[2])
    assert novel.reason == "novelty" and novel.max_similarity == pytest.approx(0.0)
    # Memory holds the last two keyframes: e[0] drops out after a third insertion.
    det.mark_inserted(2, 2 * S, descriptor=e[2])
    assert det.should_insert(3 * S, descriptor=e[0]).reason == "novelty"
    assert det.should_insert(12 * S, descriptor=e[2]).reason == "interval"
    with pytest.raises(InputError, match="dimension 3"):
        det.should_insert(3 * S, descriptor=np.ones(3))
    with pytest.raises(InputError, match="all zeros"):
        det.mark_inserted(3, 3 * S, descriptor=np.zeros(4))


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"min_score": 1.5}, "min_score"),
        ({"exclusion_window_s": -1.0}, "exclusion_window_s"),
        ({"exclusion_recent_keyframes": 2.5}, "exclusion_recent_keyframes"),
        ({"consistency_k": True}, "consistency_k"),
        ({"consistency_k": 0}, "consistency_k"),
        ({"consistency_radius_m": float("nan")}, "consistency_radius_m"),
        ({"keyframe_min_rotation_deg": 181.0}, "keyframe_min_rotation_deg"),
        ({"novelty_threshold": "high"}, "novelty_threshold"),
        ({"novelty_window_keyframes": 0}, "novelty_window_keyframes"),
    ],
)
def test_config_errors_name_the_field(values: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"LoopClosureConfig.{field}"):
        LoopClosureConfig(**values)  # type: ignore[arg-type]


def test_config_cross_field_rule_and_mapping_loader() -> None:
    with pytest.raises(ConfigError, match="consistency_n = 2 must be >= consistency_k = 3"):
        LoopClosureConfig(consistency_k=3, consistency_n=2)
    with pytest.raises(ConfigError, match="min_scroe"):
        LoopClosureConfig.from_mapping({"min_scroe": 0.5})
    cfg = LoopClosureConfig.from_mapping({"min_score": 1, "consistency_k": 2})
    assert cfg.min_score == 1.0 and isinstance(cfg.min_score, float)
    from_numpy = LoopClosureConfig(consistency_n=np.int64(6), min_score=np.float32(0.5))
    assert type(from_numpy.consistency_n) is int and type(from_numpy.min_score) is float
    specs = {s.name: s for s in LoopClosureConfig.parameter_specs()}
    assert specs["min_score"].low == -1.0 and specs["min_score"].high == 1.0
    assert specs["consistency_k"].type is int and specs["consistency_k"].default == 2
    assert all(s.description for s in specs.values())
