"""Pose interpolation at image stamps and NavSatFix -> local ENU, checked against hand numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vpr_ros.errors import InputError
from vpr_ros.mapdb import poses as P

S = 1_000_000_000


def _yaw(deg: float) -> tuple[float, float, float, float]:
    half = math.radians(deg) / 2
    return (0.0, 0.0, math.sin(half), math.cos(half))


def _track() -> P.PoseTrack:
    return P.PoseTrack.from_samples([0, S, 2 * S], [(0, 0, 0), (10, 0, 0), (10, 4, 2)],
                                    [_yaw(0), _yaw(90), _yaw(90)])


def test_linear_position_and_slerp_orientation() -> None:
    pose = P.interpolate(_track(), S // 4, max_gap_s=2.0)
    assert pose is not None
    assert pose.position == pytest.approx((2.5, 0.0, 0.0))
    mid = P.interpolate(_track(), S // 2, max_gap_s=2.0)
    assert mid.orientation == pytest.approx((0, 0, math.sin(math.radians(22.5)),
                                             math.cos(math.radians(22.5))))
    later = P.interpolate(_track(), 1_500_000_000, max_gap_s=2.0)
    assert later.position == pytest.approx((10.0, 2.0, 1.0))


def test_slerp_is_constant_speed_not_lerp() -> None:
    q = P.slerp(np.array(_yaw(0)), np.array(_yaw(120)), 0.25)
    assert q == pytest.approx(_yaw(30))
    assert P.rotation_angle_deg(_yaw(0), q) == pytest.approx(30.0)


def test_slerp_takes_the_short_way_for_sign_flipped_quaternions() -> None:
    flipped = tuple(-v for v in _yaw(90))
    track = P.PoseTrack.from_samples([0, S], [(0, 0, 0), (0, 0, 0)], [_yaw(0), flipped])
    q = P.interpolate(track, S // 2, max_gap_s=2.0).orientation
    assert P.rotation_angle_deg(_yaw(0), q) == pytest.approx(45.0)


def test_exact_stamps_return_the_sample() -> None:
    pose = P.interpolate(_track(), 2 * S, max_gap_s=0.1)
    assert pose.position == (10.0, 4.0, 2.0)


def test_no_extrapolation_outside_the_track() -> None:
    assert P.interpolate(_track(), -1, max_gap_s=10.0) is None
    assert P.interpolate(_track(), 2 * S + 1, max_gap_s=10.0) is None
    empty = P.PoseTrack.from_samples([], np.zeros((0, 3)), np.zeros((0, 4)))
    assert P.interpolate(empty, 0, max_gap_s=10.0) is None


def test_no_interpolation_across_a_long_gap() -> None:
    assert P.interpolate(_track(), S // 2, max_gap_s=0.5) is None
    assert P.interpolate(_track(), S // 2, max_gap_s=1.0) is not None


def test_samples_are_sorted_and_duplicate_stamps_dropped() -> None:
    track = P.PoseTrack.from_samples([2 * S, 0, S, S], [(2, 0, 0), (0, 0, 0), (1, 0, 0),
                                                         (9, 9, 9)],
                                     [_yaw(0)] * 4)
    assert track.stamps_ns.tolist() == [0, S, 2 * S]
    assert track.positions[:, 0].tolist() == [0.0, 1.0, 2.0]


def test_bad_quaternions_and_mismatched_lengths_are_refused() -> None:
    with pytest.raises(InputError, match="quaternions"):
        P.PoseTrack.from_samples([0], [(0, 0, 0)], [(0, 0, 0, 0)])
    with pytest.raises(InputError, match="pair up"):
        P.PoseTrack.from_samples([0, 1], [(0, 0, 0)])


def test_gnss_is_interpolated_alongside() -> None:
    track = P.navsat_track([0, S], [(10.0, 20.0, 5.0), (10.002, 20.0, 7.0)])
    pose = P.interpolate(track, S // 2, max_gap_s=2.0)
    assert pose.gnss == pytest.approx((10.001, 20.0, 6.0))
    assert pose.orientation is None


def test_ecef_reference_points() -> None:
    assert P.geodetic_to_ecef(0.0, 0.0, 0.0) == pytest.approx((6378137.0, 0.0, 0.0))
    assert P.geodetic_to_ecef(0.0, 90.0, 10.0) == pytest.approx((0.0, 6378147.0, 0.0), abs=1e-6)
    # Pole: the semi-minor axis b = a (1 - f).
    assert P.geodetic_to_ecef(90.0, 0.0, 0.0) == pytest.approx((0.0, 0.0, 6356752.314245),
                                                               abs=1e-5)


def test_enu_distances_at_the_equator() -> None:
    # 0.001 deg of longitude at the equator: a * 1.745329e-5 rad = 111.3195 m east.
    east = P.geodetic_to_enu(0.0, 0.001, 0.0, (0.0, 0.0, 0.0))
    assert east == pytest.approx((111.3195, 0.0, -0.00097), abs=2e-4)
    # 0.001 deg of latitude: meridian radius a (1 - e^2) = 6335439.3 m -> 110.5743 m north.
    north = P.geodetic_to_enu(0.001, 0.0, 0.0, (0.0, 0.0, 0.0))
    assert north == pytest.approx((0.0, 110.5743, -0.00096), abs=2e-4)
    up = P.geodetic_to_enu(0.0, 0.0, 100.0, (0.0, 0.0, 0.0))
    assert up == pytest.approx((0.0, 0.0, 100.0), abs=1e-6)


def test_enu_east_shrinks_with_latitude() -> None:
    # At 60 deg N, 0.001 deg of longitude = N(60) cos(60) * 1.745329e-5 = 55.8 m.
    n60 = 6378137.0 / math.sqrt(1 - P.WGS84_E2 * math.sin(math.radians(60)) ** 2)
    expected = n60 * 0.5 * math.radians(0.001)
    east = P.geodetic_to_enu(60.0, 10.001, 0.0, (60.0, 10.0, 0.0))
    assert east[0] == pytest.approx(expected, abs=1e-3)
    assert east[0] == pytest.approx(55.8, abs=0.05)


def test_navsat_track_origin_is_first_fix_and_no_fix_samples_dropped() -> None:
    track = P.navsat_track([3 * S, S, 2 * S], [(48.0, 11.0, 500.0), (48.0, 11.0, 500.0),
                                               (float("nan"), 11.0, 500.0)])
    assert track.stamps_ns.tolist() == [S, 3 * S]
    assert track.positions[0] == pytest.approx((0, 0, 0))
    assert track.gnss[0].tolist() == [48.0, 11.0, 500.0]
    assert track.orientations is None
