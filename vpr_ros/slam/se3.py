"""Rigid transforms between the ROS conventions and gtsam's, in one place.

Three conventions meet in a pose graph fed by ROS messages, and mixing them up silently bends
the graph instead of failing:

- quaternions: ROS orders them (x, y, z, w); gtsam's ``Rot3.Quaternion`` takes (w, x, y, z);
- 6x6 covariances: ROS orders the tangent space (x, y, z, rx, ry, rz); gtsam's ``Pose3`` orders
  it (rx, ry, rz, x, y, z);
- frames: a camera-frame relative pose becomes a robot-frame one by conjugation with the
  camera's extrinsic pose, and its covariance follows through gtsam's adjoint map.

- perturbations: ``vpr_node`` publishes a closure's covariance over a translation offset and a
  rotation vector both expressed in the *match* camera's frame (rotation on the left:
  R' = exp(dtheta) R, t' = t + dt); gtsam's ``Pose3`` perturbs on the right, in the pose's own
  frame (T' = T exp(xi), so R' = R exp(w), t' = t + R v). To first order w = R^T dtheta and
  v = R^T dt (:func:`match_frame_to_right_covariance`).
"""

from __future__ import annotations

import math
from typing import Sequence

import gtsam
import numpy as np

from vpr_ros.errors import InputError

Vec3 = tuple[float, float, float]
Quat = tuple[float, float, float, float]  # (x, y, z, w)

#: Index permutation between ROS (x, y, z, rx, ry, rz) and gtsam (rx, ry, rz, x, y, z) order.
_ROS_TO_GTSAM = np.array([3, 4, 5, 0, 1, 2])


def pose3(position: Sequence[float], quaternion_xyzw: Sequence[float]) -> gtsam.Pose3:
    """A gtsam pose from a ROS position and (x, y, z, w) quaternion (normalised here)."""
    p = np.asarray(position, dtype=np.float64).reshape(3)
    q = np.asarray(quaternion_xyzw, dtype=np.float64).reshape(4)
    norm = float(np.linalg.norm(q))
    if not (np.isfinite(p).all() and np.isfinite(q).all()) or norm < 1e-6:
        raise InputError(f"pose with position {p.tolist()} and quaternion {q.tolist()} is not "
                         "finite or has a zero-length quaternion; expected a unit (x, y, z, w)")
    q = q / norm
    return gtsam.Pose3(gtsam.Rot3.Quaternion(q[3], q[0], q[1], q[2]), p)


def position_of(pose: gtsam.Pose3) -> Vec3:
    t = pose.translation()
    return (float(t[0]), float(t[1]), float(t[2]))


def quaternion_of(pose: gtsam.Pose3) -> Quat:
    """The (x, y, z, w) quaternion of a pose, w >= 0 (one of the two equal signs, always the
    same, so published orientations do not flip sign between messages)."""
    q = pose.rotation().toQuaternion()
    xyzw = (q.x(), q.y(), q.z(), q.w())
    if xyzw[3] < 0:
        xyzw = tuple(-v for v in xyzw)
    return tuple(float(v) for v in xyzw)  # type: ignore[return-value]


def yaw_of(pose: gtsam.Pose3) -> float:
    return float(pose.rotation().yaw())


def ros_to_gtsam_covariance(cov_ros: np.ndarray) -> np.ndarray:
    """A 6x6 covariance in ROS order (x, y, z, rx, ry, rz) -> gtsam order (rx, ry, rz, x, y, z)."""
    c = np.asarray(cov_ros, dtype=np.float64).reshape(6, 6)
    return c[np.ix_(_ROS_TO_GTSAM, _ROS_TO_GTSAM)]


def gtsam_to_ros_covariance(cov_gtsam: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ros_to_gtsam_covariance`."""
    c = np.asarray(cov_gtsam, dtype=np.float64).reshape(6, 6)
    back = np.argsort(_ROS_TO_GTSAM)
    return c[np.ix_(back, back)]


def is_covariance(cov: np.ndarray) -> bool:
    """Finite, symmetric (to rounding) and positive definite: usable as a noise model."""
    c = np.asarray(cov, dtype=np.float64)
    if c.shape != (6, 6) or not np.isfinite(c).all():
        return False
    if not np.allclose(c, c.T, rtol=1e-6, atol=1e-12 * max(1.0, float(np.abs(c).max()))):
        return False
    try:
        np.linalg.cholesky(0.5 * (c + c.T))
    except np.linalg.LinAlgError:
        return False
    return True


def match_frame_to_right_covariance(cov_gtsam: np.ndarray, relative: gtsam.Pose3
                                    ) -> np.ndarray:
    """A covariance (gtsam order) of (dtheta, dt) in the match frame -> the same uncertainty
    as gtsam's right perturbation of ``relative`` (see the module doc)."""
    rt = np.asarray(relative.rotation().matrix()).T
    jac = np.zeros((6, 6))
    jac[:3, :3] = rt
    jac[3:, 3:] = rt
    return jac @ np.asarray(cov_gtsam, dtype=np.float64) @ jac.T


def conjugate(relative: gtsam.Pose3, extrinsic: gtsam.Pose3) -> gtsam.Pose3:
    """A relative pose between two sensor frames expressed between the two robot frames.

    With ``extrinsic`` = the sensor's pose in the robot frame (T_base_sensor) and ``relative``
    = T_sensorA_sensorB, the robot-frame relative pose is T_baseA_baseB = E * R * E^-1.
    """
    return extrinsic.compose(relative).compose(extrinsic.inverse())


def conjugate_covariance(cov_gtsam: np.ndarray, extrinsic: gtsam.Pose3) -> np.ndarray:
    """The covariance (gtsam order, right perturbation) of ``relative`` carried to the robot
    frame with :func:`conjugate`: E R exp(xi) E^-1 = (E R E^-1) exp(Ad_E xi)."""
    ad = extrinsic.AdjointMap()
    return ad @ np.asarray(cov_gtsam, dtype=np.float64) @ ad.T


def diagonal_covariance(translation_sigma_m: float, rotation_sigma_rad: float) -> np.ndarray:
    """An isotropic 6x6 covariance in gtsam order."""
    return np.diag([rotation_sigma_rad ** 2] * 3 + [translation_sigma_m ** 2] * 3)


def interpolate(a: gtsam.Pose3, b: gtsam.Pose3, t: float) -> gtsam.Pose3:
    """Pose at fraction ``t`` between ``a`` and ``b``: position linearly, rotation by the
    geodesic (what odometry between two close samples does)."""
    delta = gtsam.Pose3.Logmap(a.between(b))
    rot = a.rotation().compose(gtsam.Rot3.Expmap(t * delta[:3]))
    pos = (1.0 - t) * np.asarray(a.translation()) + t * np.asarray(b.translation())
    return gtsam.Pose3(rot, pos)


def rotation_angle(pose: gtsam.Pose3) -> float:
    """Angle (rad) of a pose's rotation."""
    return float(np.linalg.norm(gtsam.Rot3.Logmap(pose.rotation())))


def translation_norm(pose: gtsam.Pose3) -> float:
    return float(np.linalg.norm(pose.translation()))


def yaw_quaternion(yaw: float) -> Quat:
    return (0.0, 0.0, math.sin(yaw / 2.0), math.cos(yaw / 2.0))
