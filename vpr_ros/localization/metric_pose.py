"""From a verified relative camera pose to a robot pose in the map, with its covariance.

Verification gives the query *camera* in the match keyframe's *camera* frame. A localizer
(Nav2/AMCL ``initialpose``) wants the *robot base* in the *map* frame, so the chain is

    T_map_base(query) = T_map_base(keyframe) . T_base_cam(keyframe camera mount)
                        . T_camM_camQ (verified) . T_base_cam(query camera mount)^-1

with each mount the camera's optical frame in the robot base frame (the map stores the
keyframe camera's; the node has the live camera's as parameters). A missing mount is the
identity (the camera sits at the robot's origin, axes aligned), which is what a map built
without ``/tf_static`` implies. The covariance of the verified pose (6x6 over x, y, z, rx, ry,
rz in the match camera frame) is carried through the chain to first order, giving the
covariance ROS's ``PoseWithCovariance`` expects: over (x, y, z, rotation about X, Y, Z) of the
robot pose, perturbations expressed in the map frame. No ROS types here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from vpr_ros.localization.verification import RelativePose, propagate
from vpr_ros.mapdb.transforms import (matrix_to_quat, matrix_to_rotvec, pose7_to_matrix,
                                      quat_to_matrix, rotvec_to_matrix)


@dataclass(frozen=True)
class MetricPose:
    """A robot pose in the map frame with its 6x6 row-major covariance."""

    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float]
    covariance: tuple[float, ...]


def _pose_matrix(position: Sequence[float], orientation: Sequence[float]) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = quat_to_matrix(orientation)
    t[:3, 3] = [float(v) for v in position]
    return t


def _mount(mount: Optional[Sequence[float]]) -> np.ndarray:
    return np.eye(4) if mount is None else pose7_to_matrix(mount)


def query_robot_pose(keyframe_position: Sequence[float],
                     keyframe_orientation: Optional[Sequence[float]],
                     relative: RelativePose, keyframe_mount: Optional[Sequence[float]],
                     query_mount: Optional[Sequence[float]]) -> Optional[MetricPose]:
    """The query robot's map pose from a *metric* verified pose; None when the translation is
    only a direction or the keyframe has no orientation (a position alone cannot place a
    camera)."""
    if not relative.metric or keyframe_orientation is None:
        return None
    t_map_base_m = _pose_matrix(keyframe_position, keyframe_orientation)
    left = t_map_base_m @ _mount(keyframe_mount)
    right = np.linalg.inv(_mount(query_mount))
    t_mq = np.eye(4)
    t_mq[:3, :3] = relative.rotation_matrix
    t_mq[:3, 3] = relative.translation
    out = left @ t_mq @ right
    r0 = out[:3, :3]

    def chain(delta: np.ndarray) -> np.ndarray:
        # delta: (dt, dtheta) of the relative pose, in the match camera frame, as its
        # covariance is defined (rotation perturbed on the left)
        t = t_mq.copy()
        t[:3, :3] = rotvec_to_matrix(delta[3:]) @ t_mq[:3, :3]
        t[:3, 3] = t_mq[:3, 3] + delta[:3]
        o = left @ t @ right
        return np.concatenate([o[:3, 3], matrix_to_rotvec(o[:3, :3] @ r0.T)])

    cov = propagate(np.asarray(relative.covariance, dtype=np.float64).reshape(6, 6), chain, 6)
    cov = 0.5 * (cov + cov.T)
    return MetricPose(tuple(float(v) for v in out[:3, 3]),  # type: ignore[arg-type]
                      matrix_to_quat(r0), tuple(float(v) for v in cov.reshape(-1)))
