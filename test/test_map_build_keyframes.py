"""Keyframe selection by travelled distance, rotation and time, checked on hand-made motion."""

from __future__ import annotations

import math

import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.mapdb.keyframe_selection import KeyframePolicy, KeyframeSelector, select_keyframes

S = 1_000_000_000
TENTH = S // 10


def _yaw(deg: float) -> tuple[float, float, float, float]:
    half = math.radians(deg) / 2
    return (0.0, 0.0, math.sin(half), math.cos(half))


def test_distance_on_a_straight_line() -> None:
    # 10 Hz, 0.1 m per frame, no turning: a keyframe every metre = every 10th frame.
    n = 35
    stamps = [i * TENTH for i in range(n)]
    positions = [(0.1 * i, 0.0, 0.0) for i in range(n)]
    chosen = select_keyframes(stamps, positions, [_yaw(0)] * n,
                              KeyframePolicy(distance_m=1.0, rotation_deg=15, interval_s=1.0))
    assert chosen == [0, 10, 20, 30]


def test_distance_is_path_length_not_displacement() -> None:
    # Back and forth over 0.6 m: never 1 m from the start, yet 1.2 m travelled after 2 legs.
    positions = [(0.0, 0, 0), (0.6, 0, 0), (0.0, 0, 0), (0.6, 0, 0), (0.0, 0, 0)]
    chosen = select_keyframes([i * S for i in range(5)], positions, None,
                              KeyframePolicy(distance_m=1.0))
    assert chosen == [0, 2, 4]


def test_rotation_in_place() -> None:
    # Standing still, turning 5 deg per frame: a keyframe every 15 deg = every 3rd frame.
    n = 10
    chosen = select_keyframes([i * TENTH for i in range(n)], [(0.0, 0.0, 0.0)] * n,
                              [_yaw(5 * i) for i in range(n)],
                              KeyframePolicy(distance_m=1.0, rotation_deg=15.0))
    assert chosen == [0, 3, 6, 9]


def test_standing_still_gives_one_keyframe_unless_max_interval() -> None:
    n = 50
    stamps = [i * TENTH for i in range(n)]
    still = [(1.0, 2.0, 0.0)] * n
    assert select_keyframes(stamps, still, [_yaw(0)] * n, KeyframePolicy()) == [0]
    chosen = select_keyframes(stamps, still, [_yaw(0)] * n, KeyframePolicy(max_interval_s=2.0))
    assert chosen == [0, 20, 40]


def test_time_only_without_poses() -> None:
    # No poses at all: one keyframe per interval_s of bag time (10 Hz -> every 10th frame).
    stamps = [i * TENTH for i in range(25)]
    assert select_keyframes(stamps, None, None, KeyframePolicy(interval_s=1.0)) == [0, 10, 20]
    assert select_keyframes(stamps, None, None, KeyframePolicy(interval_s=0.5)) == \
        [0, 5, 10, 15, 20]


def test_min_interval_caps_the_rate_when_moving_fast() -> None:
    # 5 m per frame at 10 Hz would make every frame a keyframe; min_interval_s=0.5 caps it.
    n = 12
    chosen = select_keyframes([i * TENTH for i in range(n)], [(5.0 * i, 0, 0) for i in range(n)],
                              None, KeyframePolicy(min_interval_s=0.5))
    assert chosen == [0, 5, 10]


def test_frames_without_pose_inside_a_posed_stream_fall_back_to_time() -> None:
    sel = KeyframeSelector(KeyframePolicy(distance_m=1.0, interval_s=1.0))
    assert sel.accept(0, (0.0, 0, 0), _yaw(0))
    assert not sel.accept(TENTH * 5, None, None)  # 0.5 s, no pose: not yet
    assert sel.accept(TENTH * 12, None, None)  # 1.2 s since the last keyframe
    assert not sel.accept(TENTH * 13, (0.3, 0, 0), _yaw(0))  # 0.3 m since frame 0
    assert sel.accept(TENTH * 14, (1.0, 0, 0), _yaw(0))  # 1.0 m of path since the keyframe


def test_first_pose_after_unposed_frames_anchors_a_keyframe() -> None:
    sel = KeyframeSelector(KeyframePolicy(interval_s=10.0))
    assert sel.accept(0)
    assert not sel.accept(TENTH)
    assert sel.accept(2 * TENTH, (5.0, 5.0, 0.0), _yaw(0))
    assert not sel.accept(3 * TENTH, (5.1, 5.0, 0.0), _yaw(0))


@pytest.mark.parametrize("values,match", [
    ({"distance_m": 0}, "distance_m must be a positive"),
    ({"rotation_deg": -1}, "rotation_deg must be a positive"),
    ({"interval_s": float("nan")}, "interval_s must be a positive"),
    ({"min_interval_s": -0.1}, "min_interval_s must be >= 0"),
    ({"max_interval_s": 0}, "max_interval_s must be a positive number or null"),
    ({"distance": 1.0}, "unknown keyframes option"),
])
def test_bad_policies_are_refused(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        KeyframePolicy.from_mapping(values)
