"""Pose maths and the candidate adapter the decision layer relies on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest

from vpr_ros.errors import InputError
from vpr_ros.localization.geometry import (
    Candidate,
    as_quaternion,
    candidates_from_columns,
    candidates_from_results,
    rotation_angle_rad,
    same_place,
)


def yaw(angle: float) -> tuple[float, float, float, float]:
    return (0.0, 0.0, math.sin(angle / 2), math.cos(angle / 2))


def test_rotation_angle_of_yaw_turns() -> None:
    assert rotation_angle_rad(yaw(0.0), yaw(math.pi / 2)) == pytest.approx(math.pi / 2)
    # Crossing +-pi is the short way round, and q and -q are the same rotation.
    assert rotation_angle_rad(yaw(math.radians(170)), yaw(math.radians(-170))) == pytest.approx(
        math.radians(20))
    q = yaw(0.3)
    assert rotation_angle_rad(q, tuple(-c for c in q)) == pytest.approx(0.0, abs=1e-12)


def test_rotation_angle_keeps_precision_for_tiny_angles() -> None:
    # acos(dot) would return 0 or ~1e-8 here; keyframe selection compares small angles.
    assert rotation_angle_rad(yaw(0.0), yaw(1e-7)) == pytest.approx(1e-7, rel=1e-6)


def test_quaternions_are_normalised_and_zero_is_refused() -> None:
    assert as_quaternion((0, 0, 0, 2)) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(InputError, match="zero quaternion"):
        as_quaternion((0, 0, 0, 0))
    with pytest.raises(InputError, match="4 components"):
        as_quaternion((0, 0, 1))


def test_candidate_rejects_bad_values() -> None:
    with pytest.raises(InputError, match="non-finite score"):
        Candidate(id=1, score=float("nan"), stamp_ns=0)
    with pytest.raises(InputError, match="non-finite"):
        Candidate(id=1, score=0.5, stamp_ns=0, position=(0.0, float("inf"), 0.0))


@dataclass
class FakeKeyframe:
    session: str
    stamp_ns: int
    position: Optional[tuple[float, float, float]]
    orientation: Optional[tuple[float, float, float, float]]


def test_candidates_from_results_drops_padding_and_keeps_metadata() -> None:
    kfs = {
        3: FakeKeyframe("a", 30, (1.0, 2.0, 3.0), (0.0, 0.0, 0.0, 1.0)),
        7: FakeKeyframe("b", 70, None, None),
        8: FakeKeyframe("b", 80, (math.nan,) * 3, (math.nan,) * 4),  # a columnar "no pose"
        9: FakeKeyframe("b", 90, (1.0, math.nan, 0.0), None),
    }
    looked_up: list[int] = []

    def lookup(i: int) -> FakeKeyframe:
        looked_up.append(i)
        return kfs[i]

    out = candidates_from_results(np.array([7, 3, -1]), np.array([0.5, 0.9, -1.0]), lookup)
    assert [c.id for c in out] == [3, 7]  # best first
    assert sorted(looked_up) == [3, 7]  # -1 was never looked up
    assert out[0] == Candidate(3, 0.9, 30, (1.0, 2.0, 3.0), (0.0, 0.0, 0.0, 1.0), "a")
    assert out[1].position is None and out[1].session == "b"
    nan_pose = candidates_from_results([8], [0.4], lookup)[0]
    assert nan_pose.position is None and nan_pose.orientation is None
    with pytest.raises(InputError, match="non-finite"):
        candidates_from_results([9], [0.4], lookup)
    with pytest.raises(InputError, match="differ in length"):
        candidates_from_results([1, 2], [0.5], lookup)


def test_same_place_uses_positions_then_same_session_stamps() -> None:
    a = Candidate(1, 0.9, 0, (0.0, 0.0, 0.0), session="s")
    near = Candidate(2, 0.9, 10**12, (3.0, 4.0, 0.0), session="t")  # 5 m away, other session
    assert same_place(a, near, radius_m=5.0, stamp_window_ns=1)
    assert not same_place(a, near, radius_m=4.9, stamp_window_ns=10**13)
    p = Candidate(3, 0.9, 1_000, session="s")
    q = Candidate(4, 0.9, 3_000, session="s")
    r = Candidate(5, 0.9, 3_000, session="other")
    assert same_place(p, q, radius_m=0.0, stamp_window_ns=2_000)
    assert not same_place(p, q, radius_m=0.0, stamp_window_ns=1_999)
    # Stamps of different sessions are unrelated clocks.
    assert not same_place(p, r, radius_m=0.0, stamp_window_ns=10**9)
    # One side posed, the other not: fall back to stamps.
    assert same_place(a, Candidate(6, 0.9, 5, session="s"), radius_m=0.0, stamp_window_ns=10)


def test_candidates_from_columns_equal_the_per_keyframe_path_on_a_real_map() -> None:
    """The node's column-wise candidates must be the very values the per-keyframe path gives
    (positions, quaternions normalised with the same float operations, sessions, order)."""
    from vpr_ros.mapdb import Keyframe, PlaceMap

    rng = np.random.default_rng(4)
    pm = PlaceMap.create(8, "fp", index="flat")
    kfs = []
    for i in range(40):
        pos = None if i % 5 == 0 else tuple(rng.normal(0, 50, 3).tolist())
        quat = None if i % 7 == 0 else tuple((rng.normal(0, 1, 4) * rng.uniform(0.5, 2)).tolist())
        kfs.append(Keyframe("lap1" if i < 25 else "lap2", 10**9 * i, "map", pos, quat))
    desc = rng.standard_normal((40, 8)).astype(np.float32)
    pm.add(desc / np.linalg.norm(desc, axis=1, keepdims=True), kfs)
    ids, scores = pm.search(desc[:6], 12)
    for row in range(6):
        fast = candidates_from_columns(ids[row], scores[row], pm.keyframe_table.pose_columns)
        slow = candidates_from_results(ids[row], scores[row], pm.keyframe)
        assert fast == slow and len(fast) == 12
        assert [type(c.id) for c in fast] == [int] * 12
    padded = np.array([3, -1, 7]), np.array([0.5, -np.inf, 0.7])
    assert candidates_from_columns(*padded, pm.keyframe_table.pose_columns) == \
        candidates_from_results(*padded, pm.keyframe)
    assert candidates_from_columns([], [], pm.keyframe_table.pose_columns) == []
    with pytest.raises(KeyError, match="not in this map"):
        candidates_from_columns([40], [0.5], pm.keyframe_table.pose_columns)


def test_candidates_from_columns_refuse_what_candidates_refuse() -> None:
    def columns(position, orientation):
        return lambda ids: (["s"] * len(ids), np.zeros(len(ids), np.int64),
                            np.array([position] * len(ids), np.float64),
                            np.array([orientation] * len(ids), np.float64))

    nan3, nan4 = (math.nan,) * 3, (math.nan,) * 4
    with pytest.raises(InputError, match="candidate 2 position has a non-finite"):
        candidates_from_columns([2], [0.5], columns((1.0, math.nan, 0.0), nan4))
    with pytest.raises(InputError, match="candidate 2 orientation is a zero quaternion"):
        candidates_from_columns([2], [0.5], columns(nan3, (0.0, 0.0, 0.0, 0.0)))
    with pytest.raises(InputError, match="candidate 2 has a non-finite score"):
        candidates_from_columns([2], [math.nan], columns(nan3, nan4))
    with pytest.raises(InputError, match="differ in length"):
        candidates_from_columns([1, 2], [0.5], columns(nan3, nan4))
    ok = candidates_from_columns([2], [0.5], columns(nan3, (0.0, 0.0, 0.0, 2.0)))[0]
    assert ok.position is None and ok.orientation == (0.0, 0.0, 0.0, 1.0)
