"""Pose tracks, their interpolation at image stamps, and GNSS fixes in a local metric frame.

Cameras and odometry run on different clocks and rates, so a keyframe's pose is interpolated
at the image stamp from the two pose samples around it: position linearly, orientation by
quaternion slerp. Interpolation never reaches across a gap longer than ``max_gap_s`` and never
extrapolates past the first or last sample: a frame there gets no pose rather than a made-up
one, because a wrong pose in a map is worse than a missing one.

GNSS fixes (sensor_msgs/NavSatFix) become metres in a local East-North-Up frame centred on the
first fix (WGS-84 ellipsoid, exact geodetic -> ECEF -> ENU), so distance-based keyframe
selection and map plots work the same for odometry and GNSS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vpr_ros.errors import InputError

# WGS-84 ellipsoid.
WGS84_A = 6378137.0
WGS84_F = 1.0 / 298.257223563
WGS84_E2 = WGS84_F * (2.0 - WGS84_F)

Vec3 = tuple[float, float, float]
Quat = tuple[float, float, float, float]


@dataclass(frozen=True)
class Pose:
    """A pose at one instant: position (m), orientation (x, y, z, w) or None, optional GNSS."""

    position: Vec3
    orientation: Quat | None = None
    gnss: Vec3 | None = None  # (latitude deg, longitude deg, altitude m) of the raw fix


@dataclass
class PoseTrack:
    """Time-sorted pose samples of one topic, as arrays for fast lookup.

    ``orientations`` is None for sources without orientation (GNSS); ``gnss`` holds the raw
    fixes when the track came from NavSatFix. ``frame_id`` is the frame the positions are in.
    """

    stamps_ns: np.ndarray  # (N,) int64, strictly increasing
    positions: np.ndarray  # (N, 3) float64
    orientations: np.ndarray | None = None  # (N, 4) float64, unit quaternions (x, y, z, w)
    gnss: np.ndarray | None = None  # (N, 3) float64 (lat, lon, alt)
    frame_id: str = ""

    def __len__(self) -> int:
        return int(self.stamps_ns.shape[0])

    @classmethod
    def from_samples(cls, stamps_ns: Sequence[int], positions: Sequence[Sequence[float]],
                     orientations: Sequence[Sequence[float]] | None = None,
                     gnss: Sequence[Sequence[float]] | None = None,
                     frame_id: str = "") -> "PoseTrack":
        """Sort samples by stamp, drop duplicate stamps (first kept) and normalise quaternions.

        Bags are ordered by receive time, not header stamp, and drivers repeat stamps; both
        would break the bracketing search in :func:`interpolate`.
        """
        stamps = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        if pos.shape[0] != stamps.shape[0]:
            raise InputError(f"pose track has {stamps.shape[0]} stamps but {pos.shape[0]} "
                             "positions; they must pair up one to one")
        quat = None if orientations is None else \
            np.asarray(orientations, dtype=np.float64).reshape(-1, 4)
        fixes = None if gnss is None else np.asarray(gnss, dtype=np.float64).reshape(-1, 3)
        order = np.argsort(stamps, kind="stable")
        stamps = stamps[order]
        keep = np.ones(stamps.shape[0], dtype=bool)
        keep[1:] = stamps[1:] != stamps[:-1]
        idx = order[keep]
        quat_out = None
        if quat is not None:
            quat_out = quat[idx]
            norms = np.linalg.norm(quat_out, axis=1, keepdims=True)
            if (norms < 1e-9).any() or not np.isfinite(norms).all():
                raise InputError("pose track has zero-length or non-finite quaternions; "
                                 "expected unit quaternions (x, y, z, w)")
            quat_out = quat_out / norms
        return cls(stamps[keep], pos[idx], quat_out, None if fixes is None else fixes[idx],
                   frame_id)


def slerp(q0: np.ndarray, q1: np.ndarray, t: float) -> np.ndarray:
    """Spherical linear interpolation between unit quaternions (x, y, z, w), shortest arc."""
    q0 = np.asarray(q0, dtype=np.float64)
    q1 = np.asarray(q1, dtype=np.float64)
    dot = float(np.dot(q0, q1))
    if dot < 0.0:  # q and -q are the same rotation: take the short way round
        q1, dot = -q1, -dot
    if dot > 0.9995:  # nearly identical: normalised lerp is exact enough and stable
        out = q0 + t * (q1 - q0)
        return out / np.linalg.norm(out)
    theta = math.acos(min(1.0, dot))
    sin_theta = math.sin(theta)
    return (math.sin((1.0 - t) * theta) * q0 + math.sin(t * theta) * q1) / sin_theta


def rotation_angle_deg(q0: Sequence[float], q1: Sequence[float]) -> float:
    """The angle (degrees, 0..180) of the rotation taking orientation q0 to q1."""
    dot = abs(float(np.dot(np.asarray(q0, np.float64), np.asarray(q1, np.float64))))
    return math.degrees(2.0 * math.acos(min(1.0, dot)))


def interpolate(track: PoseTrack, stamp_ns: int, max_gap_s: float) -> Pose | None:
    """The pose at ``stamp_ns``, or None outside the track or inside a gap over ``max_gap_s``."""
    n = len(track)
    if n == 0:
        return None
    stamps = track.stamps_ns
    stamp_ns = int(stamp_ns)
    i = int(np.searchsorted(stamps, stamp_ns, side="left"))
    if i < n and stamps[i] == stamp_ns:
        return _sample(track, i)
    if i == 0 or i == n:
        return None
    t0, t1 = int(stamps[i - 1]), int(stamps[i])
    if (t1 - t0) > max_gap_s * 1e9:
        return None
    t = (stamp_ns - t0) / (t1 - t0)
    pos = (1.0 - t) * track.positions[i - 1] + t * track.positions[i]
    quat = None
    if track.orientations is not None:
        quat = slerp(track.orientations[i - 1], track.orientations[i], t)
    fix = None
    if track.gnss is not None:
        fix = (1.0 - t) * track.gnss[i - 1] + t * track.gnss[i]
    return _make_pose(pos, quat, fix)


def _sample(track: PoseTrack, i: int) -> Pose:
    return _make_pose(track.positions[i],
                      None if track.orientations is None else track.orientations[i],
                      None if track.gnss is None else track.gnss[i])


def _make_pose(pos: np.ndarray, quat: np.ndarray | None, fix: np.ndarray | None) -> Pose:
    return Pose(position=(float(pos[0]), float(pos[1]), float(pos[2])),
                orientation=None if quat is None else
                (float(quat[0]), float(quat[1]), float(quat[2]), float(quat[3])),
                gnss=None if fix is None else (float(fix[0]), float(fix[1]), float(fix[2])))


# ------------------------------------------------------------------------------------ GNSS

def geodetic_to_ecef(lat_deg: np.ndarray | float, lon_deg: np.ndarray | float,
                     alt_m: np.ndarray | float) -> np.ndarray:
    """WGS-84 geodetic (deg, deg, m) -> Earth-centred Earth-fixed (m), shape (..., 3)."""
    lat = np.radians(np.asarray(lat_deg, dtype=np.float64))
    lon = np.radians(np.asarray(lon_deg, dtype=np.float64))
    alt = np.asarray(alt_m, dtype=np.float64)
    sin_lat = np.sin(lat)
    n = WGS84_A / np.sqrt(1.0 - WGS84_E2 * sin_lat * sin_lat)
    x = (n + alt) * np.cos(lat) * np.cos(lon)
    y = (n + alt) * np.cos(lat) * np.sin(lon)
    z = (n * (1.0 - WGS84_E2) + alt) * sin_lat
    return np.stack([x, y, z], axis=-1)


def geodetic_to_enu(lat_deg: np.ndarray | float, lon_deg: np.ndarray | float,
                    alt_m: np.ndarray | float, origin: Vec3) -> np.ndarray:
    """WGS-84 geodetic -> local East-North-Up metres around ``origin`` (lat, lon, alt)."""
    lat0, lon0, alt0 = (float(v) for v in origin)
    delta = geodetic_to_ecef(lat_deg, lon_deg, alt_m) - geodetic_to_ecef(lat0, lon0, alt0)
    phi, lam = math.radians(lat0), math.radians(lon0)
    rot = np.array([
        [-math.sin(lam), math.cos(lam), 0.0],
        [-math.sin(phi) * math.cos(lam), -math.sin(phi) * math.sin(lam), math.cos(phi)],
        [math.cos(phi) * math.cos(lam), math.cos(phi) * math.sin(lam), math.sin(phi)],
    ])
    return delta @ rot.T


def navsat_track(stamps_ns: Sequence[int], fixes: Sequence[Sequence[float]],
                 frame_id: str = "") -> PoseTrack:
    """A PoseTrack in local ENU around the first fix (which becomes the origin), raw fixes kept.

    Fixes with non-finite latitude/longitude are dropped (drivers publish NaN without a fix);
    a missing altitude (NaN) counts as 0 m so a 2-D receiver still yields a track.
    """
    arr = np.asarray(fixes, dtype=np.float64).reshape(-1, 3)
    stamps = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
    ok = np.isfinite(arr[:, 0]) & np.isfinite(arr[:, 1])
    arr, stamps = arr[ok].copy(), stamps[ok]
    arr[~np.isfinite(arr[:, 2]), 2] = 0.0
    if arr.shape[0] == 0:
        return PoseTrack(np.zeros(0, np.int64), np.zeros((0, 3)), None, np.zeros((0, 3)),
                         frame_id)
    order = np.argsort(stamps, kind="stable")
    origin = tuple(arr[order[0]])
    enu = geodetic_to_enu(arr[:, 0], arr[:, 1], arr[:, 2], origin)  # type: ignore[arg-type]
    return PoseTrack.from_samples(stamps, enu, None, arr, frame_id)
