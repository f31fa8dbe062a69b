"""Rigid transforms as a robot's ``/tf_static`` gives them, and the lookup a map build needs.

Why: a keyframe's pose comes from odometry (the robot base in the map frame) but its keypoints
come from a camera mounted somewhere on that base. Turning a camera pose into a robot pose (a
PnP relocalization) needs the camera's mount, which a recording carries on ``/tf_static``
(``base_link -> camera_link -> camera_optical_frame``). :class:`TransformTree` chains those
static edges in either direction; no tf2 wheel exists, and static transforms need none of its
time handling.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional, Sequence

import numpy as np

from vpr_ros.errors import InputError


def quat_to_matrix(q: Sequence[float]) -> np.ndarray:
    x, y, z, w = (float(v) for v in q)
    n = math.sqrt(x * x + y * y + z * z + w * w)
    x, y, z, w = x / n, y / n, z / n, w / n
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def matrix_to_quat(r: np.ndarray) -> tuple[float, float, float, float]:
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(np.asarray(r, dtype=np.float64)).as_quat()
    if w < 0:
        x, y, z, w = -x, -y, -z, -w
    return (float(x), float(y), float(z), float(w))


def rotvec_to_matrix(v: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.Rodrigues(np.asarray(v, dtype=np.float64).reshape(3, 1))[0]


def matrix_to_rotvec(r: np.ndarray) -> np.ndarray:
    """Rotation vector (axis * angle, radians) of a rotation matrix. Not ``cv2.Rodrigues``:
    it returns exactly zero below about 1e-5 rad, which breaks the numerical derivatives that
    carry covariances through a pose chain."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(np.asarray(r, dtype=np.float64)).as_rotvec()


def rotation_angle_deg(r: np.ndarray) -> float:
    return math.degrees(float(np.linalg.norm(matrix_to_rotvec(r))))


def sampson(e: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """Sampson distances of correspondences x1 -> x2 (n, 2) under x2^T E x1 = 0 (same units as
    the coordinates)."""
    h1 = np.column_stack([x1, np.ones(len(x1))])
    h2 = np.column_stack([x2, np.ones(len(x2))])
    ex1 = h1 @ e.T
    etx2 = h2 @ e
    num = np.sum(h2 * ex1, axis=1)
    den = ex1[:, 0] ** 2 + ex1[:, 1] ** 2 + etx2[:, 0] ** 2 + etx2[:, 1] ** 2
    return np.abs(num) / np.sqrt(np.maximum(den, 1e-300))


def skew(t: np.ndarray) -> np.ndarray:
    return np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]], dtype=np.float64)


def pose7_to_matrix(p: Sequence[float]) -> np.ndarray:
    """(tx, ty, tz, qx, qy, qz, qw) -> 4x4."""
    v = [float(x) for x in p]
    if len(v) != 7 or not np.isfinite(v).all():
        raise InputError(f"a transform needs 7 finite numbers (tx ty tz qx qy qz qw), got {p!r}")
    t = np.eye(4)
    t[:3, :3] = quat_to_matrix(v[3:])
    t[:3, 3] = v[:3]
    return t


def matrix_to_pose7(t: np.ndarray) -> tuple[float, float, float, float, float, float, float]:
    q = matrix_to_quat(np.asarray(t)[:3, :3])
    return (float(t[0, 3]), float(t[1, 3]), float(t[2, 3]), *q)


class TransformTree:
    """Static transforms: ``add(parent, child, pose of child in parent)``, then
    ``lookup(target, source)`` = the 4x4 taking points in ``source`` to ``target``."""

    def __init__(self) -> None:
        self._edges: dict[str, list[tuple[str, np.ndarray]]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._edges.values()) // 2

    def frames(self) -> list[str]:
        return sorted(self._edges)

    def add(self, parent: str, child: str, pose: Sequence[float]) -> None:
        parent, child = parent.lstrip("/"), child.lstrip("/")
        t = pose7_to_matrix(pose)
        self._edges.setdefault(parent, []).append((child, t))
        self._edges.setdefault(child, []).append((parent, np.linalg.inv(t)))

    def lookup(self, target: str, source: str) -> Optional[np.ndarray]:
        """X_target = T X_source, or None when the frames are not connected."""
        target, source = target.lstrip("/"), source.lstrip("/")
        if target == source:
            return np.eye(4)
        # breadth-first from target; the transform accumulated maps each frame into target
        seen = {target: np.eye(4)}
        queue = deque([target])
        while queue:
            frame = queue.popleft()
            for nxt, t_frame_nxt in self._edges.get(frame, []):
                if nxt in seen:
                    continue
                seen[nxt] = seen[frame] @ t_frame_nxt
                if nxt == source:
                    return seen[nxt]
                queue.append(nxt)
        return None
