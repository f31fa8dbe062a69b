"""Every tunable of ``vpr_pose_graph``, declared once (same machinery as ``vpr_node``'s).

The graph's own tunables are :class:`~vpr_ros.slam.config.PoseGraphConfig`'s fields; the node
adds frames, publishing and QoS (:class:`PoseGraphNodeConfig`). Both are flat parameter names,
so ``-p robust_kernel:=cauchy`` works without a prefix, except the camera mount, which has
``vpr_node``'s names (``camera.mount_x`` ... ``camera.mount_qw``); one declaration gives
validation, the ROS ``ParameterDescriptor`` (description + range) and the defaults in
``config/vpr_pose_graph.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from vpr_ros.localization.params import (ParamSpec, Tunables, param, renamed_specs, require_choices,
                                         validate)
from vpr_ros.slam.config import CHOICES as GRAPH_CHOICES
from vpr_ros.slam.config import PoseGraphConfig

RELIABILITIES = ("best_effort", "reliable")
NODE_CHOICES: dict[str, tuple[str, ...]] = {"odometry_qos_reliability": RELIABILITIES}
#: Allowed values of every string parameter of the node.
CHOICES: dict[str, tuple[str, ...]] = {**GRAPH_CHOICES, **NODE_CHOICES}


@dataclass(frozen=True)
class PoseGraphNodeConfig(Tunables):
    """Frames, publishing and QoS of the ``vpr_pose_graph`` node."""

    map_frame: str = param("map", "frame of the optimised path, ~/map_to_odom and ~/odometry")
    odom_frame: str = param(
        "odom", "the odometry's frame: the child of the published map -> odom correction")
    base_frame: str = param(
        "base_link", "child_frame_id of ~/odometry (the robot's base frame)")
    publish_tf: bool = param(
        True, "also broadcast map -> odom on /tf where the tf2_ros Python package is installed "
        "(a ROS installation; the venv wheels have none)")
    path_period_s: float = param(
        1.0, "how often ~/path (every keyframe, optimised) is republished; it is also "
        "published after every closure (s)", 0.05, 3600.0)
    idle_refine_iterations: int = param(
        5, "extra iSAM2 iterations on each path period after new factors came in, so the "
        "estimate keeps converging between closures (0: only the per-update iterations)",
        0, 1000)
    diagnostics_period_s: float = param(
        1.0, "period of the /diagnostics status (s)", 0.05, 60.0)
    odometry_qos_reliability: str = param(
        "best_effort", "odometry subscription reliability: best_effort (matches every "
        "publisher) or reliable")
    odometry_qos_depth: int = param(
        50, "odometry subscription queue depth (every message is used)", 1, 10000)
    closure_qos_depth: int = param(
        200, "loop-closure subscription queue depth (reliable: none may be lost)", 1, 100000)
    log_throttle_s: float = param(
        5.0, "each kind of input error is logged at most once per this period (s)", 0.0, 3600.0)

    def __post_init__(self) -> None:
        validate(self)
        require_choices(self, NODE_CHOICES)


#: The camera mount is declared under vpr_node's names (``camera.mount_x`` ...), so one
#: params-file section describes the camera for both nodes.
_FIELD_PREFIX, _ROS_PREFIX = "camera_mount_", "camera.mount_"


def ros_name(field_name: str) -> str:
    return _ROS_PREFIX + field_name[len(_FIELD_PREFIX):] \
        if field_name.startswith(_FIELD_PREFIX) else field_name


def field_name(ros: str) -> str:
    return _FIELD_PREFIX + ros[len(_ROS_PREFIX):] if ros.startswith(_ROS_PREFIX) else ros


def all_parameter_specs() -> list[ParamSpec]:
    """The node's and the graph's tunables, by their ROS parameter names."""
    return [*PoseGraphNodeConfig.parameter_specs(), *renamed_specs(PoseGraphConfig, ros_name)]


def settings_from_values(values: Mapping[str, Any]
                         ) -> tuple[PoseGraphNodeConfig, PoseGraphConfig]:
    """Split parameter values (ROS names) into the two validated configs (ConfigError on bad
    or unknown ones)."""
    node_names = {f.name for f in fields(PoseGraphNodeConfig)}
    node = {k: v for k, v in values.items() if k in node_names}
    graph = {field_name(k): v for k, v in values.items() if k not in node_names}
    return PoseGraphNodeConfig.from_mapping(node), PoseGraphConfig.from_mapping(graph)
