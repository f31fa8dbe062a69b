"""Tunables of the reference pose graph (:class:`~vpr_ros.slam.pose_graph.PoseGraph`).

Declared once with :func:`~vpr_ros.localization.params.param`, like the detectors' configs, so
the same declaration validates values, loads YAML and becomes the ``vpr_pose_graph`` node's ROS
parameters (with description and range).

The defaults are those of a wheeled robot with ordinary wheel odometry (a few per cent of the
distance travelled) and a forward camera; they are what the demo runs with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vpr_ros.localization.params import Tunables, param, require, require_choices, validate

ROBUST_KERNELS = ("none", "huber", "cauchy", "geman_mcclure", "dcs")
WITHOUT_TRANSFORM = ("same_place", "skip")
CHOICES: dict[str, tuple[str, ...]] = {
    "robust_kernel": ROBUST_KERNELS, "closure_without_transform": WITHOUT_TRANSFORM,
}

#: sqrt of the 99 % quantile of a chi-square with 6 degrees of freedom (16.81), rounded: the
#: Mahalanobis distance a correct 6-DoF measurement stays under 99 % of the time.
CHI2_6DOF_99 = 4.1


@dataclass(frozen=True)
class PoseGraphConfig(Tunables):
    """How odometry becomes keyframes and factors, how closures become loop factors, and how
    iSAM2 optimises them."""

    keyframe_distance_m: float = param(
        1.0, "a new pose-graph keyframe after the odometry travelled this far (m)", 0.0, 1.0e4)
    keyframe_rotation_deg: float = param(
        15.0, "a new pose-graph keyframe after the odometry turned this much (deg)", 0.0, 180.0)
    keyframe_interval_s: float = param(
        10.0, "a new pose-graph keyframe at least this often while odometry arrives, moving or "
        "not (s; 0: only by distance and rotation)", 0.0, 1.0e6)
    odom_translation_noise: float = param(
        0.05, "odometry translation noise density: standard deviation per square-root metre "
        "travelled (m/sqrt(m)); 0.05 is 5 % over one metre", 1.0e-6, 10.0)
    odom_rotation_noise: float = param(
        0.02, "odometry rotation noise density: standard deviation per square-root metre "
        "travelled (rad/sqrt(m)); 0.02 is wheel odometry without a gyro", 1.0e-7, 10.0)
    odom_translation_sigma_min_m: float = param(
        0.01, "lower bound of an odometry factor's translation standard deviation (m)",
        1.0e-6, 100.0)
    odom_rotation_sigma_min_rad: float = param(
        0.002, "lower bound of an odometry factor's rotation standard deviation (rad)",
        1.0e-7, 10.0)
    closure_without_transform: str = param(
        "same_place", "a closure without a relative transform: same_place (a weak constraint "
        "that the two robot poses coincide, with the same_place_* deviations) or skip")
    same_place_translation_sigma_m: float = param(
        1.2, "translation standard deviation of a same-place constraint (m): with 1.2, a match "
        "more than 5 m off (the usual 'same place' radius) lies beyond the 99 % gate "
        "inlier_distance", 1.0e-3, 1000.0)
    same_place_rotation_sigma_rad: float = param(
        0.35, "rotation standard deviation of a same-place constraint (rad)", 1.0e-4, 10.0)
    transform_translation_sigma_m: float = param(
        0.3, "translation standard deviation of a metric relative transform published without "
        "a usable covariance (m)", 1.0e-4, 1000.0)
    transform_rotation_sigma_rad: float = param(
        0.05, "rotation standard deviation of a relative transform published without a usable "
        "covariance (rad)", 1.0e-5, 10.0)
    require_verified: bool = param(
        True, "skip closures whose 'verified' field is 0 (messages without the field are "
        "taken as they are)")
    robust_kernel: str = param(
        "dcs", "M-estimator on loop factors so a wrong closure cannot bend the graph: none, "
        "huber, cauchy, geman_mcclure or dcs (dynamic covariance scaling)")
    robust_kernel_width: float = param(
        2.5, "width of the robust kernel in Mahalanobis distance (standard deviations): "
        "closures with larger residuals lose weight", 0.01, 100.0)
    inlier_distance: float = param(
        CHI2_6DOF_99, "a loop factor whose Mahalanobis distance at the optimum is below this "
        "counts as accepted (reports and diagnostics; 4.1 = the 99 % chi-square quantile, "
        "6 DoF)", 0.1, 1000.0)
    relinearize_threshold: float = param(
        0.01, "iSAM2 relinearises a variable whose update exceeds this (tangent-space norm)",
        1.0e-6, 10.0)
    relinearize_skip: int = param(
        1, "iSAM2 checks for relinearisation every N updates", 1, 1000)
    closure_extra_updates: int = param(
        4, "extra iSAM2 iterations after adding loop factors (a closure moves many poses at "
        "once; one Gauss-Newton step leaves it short)", 0, 100)
    closure_wait_s: float = param(
        10.0, "a closure whose query stamp is newer than the odometry waits this long for it "
        "(s), then is dropped", 0.0, 3600.0)
    odometry_history_s: float = param(
        3600.0, "raw odometry kept for looking up the pose at a closure's stamps (s; 64 bytes "
        "a message); older stamps are interpolated between keyframes", 1.0, 1.0e6)
    time_jump_s: float = param(
        1.0, "odometry this far behind the previous message is a clock reset (bag restart): "
        "the graph starts over; a smaller step back is dropped (s)", 0.0, 1.0e6)
    camera_mount_x: float = param(
        0.0, "camera mount: x of the camera's optical frame in the robot base frame (m); "
        "relative transforms of closures are carried from camera to robot frame with it",
        -1000.0, 1000.0)
    camera_mount_y: float = param(0.0, "camera mount: y (m)", -1000.0, 1000.0)
    camera_mount_z: float = param(0.0, "camera mount: z (m)", -1000.0, 1000.0)
    camera_mount_qx: float = param(
        -0.5, "camera mount: rotation quaternion x (optical frame: z forward, x right, y down; "
        "the default is a camera looking along the base's x axis)", -1.0, 1.0)
    camera_mount_qy: float = param(0.5, "camera mount: rotation quaternion y", -1.0, 1.0)
    camera_mount_qz: float = param(-0.5, "camera mount: rotation quaternion z", -1.0, 1.0)
    camera_mount_qw: float = param(0.5, "camera mount: rotation quaternion w", -1.0, 1.0)

    def __post_init__(self) -> None:
        validate(self)
        require_choices(self, CHOICES)
        q = self.camera_orientation
        require(abs(math.sqrt(sum(v * v for v in q)) - 1.0) < 1e-3,
                f"camera mount quaternion {q} is not a unit quaternion; give the camera's "
                "orientation in the base frame as (x, y, z, w) with norm 1")

    @property
    def camera_position(self) -> tuple[float, float, float]:
        return (self.camera_mount_x, self.camera_mount_y, self.camera_mount_z)

    @property
    def camera_orientation(self) -> tuple[float, float, float, float]:
        return (self.camera_mount_qx, self.camera_mount_qy, self.camera_mount_qz,
                self.camera_mount_qw)
