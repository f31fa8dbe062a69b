"""``vpr_pose_graph``: the reference SLAM back end for ``vpr_node``'s loop closures (rclpy).

It shows that what ``vpr_node`` publishes is enough for a back end, and what a closure does to a
trajectory: odometry in, closures in, a corrected trajectory out. The graph itself
(:class:`~vpr_ros.slam.pose_graph.PoseGraph`: gtsam factors, iSAM2, a robust kernel) has no ROS
types; this node only converts messages and publishes.

Topics (relative names, remap at launch):

- subscribes ``odometry`` (``nav_msgs/Odometry``, the robot's drifting odometry) and
  ``loop_closure`` (``std_msgs/Float64MultiArray`` as ``vpr_node`` publishes it on
  ``~/loop_closure``; fields read by their layout labels);
- publishes ``~/path`` (``nav_msgs/Path``: every keyframe, optimised, in ``map_frame``;
  transient local, so a late subscriber gets the latest), ``~/map_to_odom``
  (``geometry_msgs/PoseStamped``: the pose of ``odom_frame`` in ``map_frame``, i.e. the
  correction a localisation stack broadcasts as the map -> odom transform), ``~/odometry``
  (``nav_msgs/Odometry``: every odometry message carried into the map frame), ``~/loop_factors``
  (``std_msgs/Float64MultiArray``, one row per loop factor: stamps, Mahalanobis distance at the
  optimum, robust weight, accepted) and ``/diagnostics``;
- broadcasts map -> odom on ``/tf`` where ``tf2_ros`` imports (a ROS installation; the venv
  wheels have no tf2_ros) and ``publish_tf`` is set.

A bad message (non-finite pose, closure without stamps or layout) is counted by kind in
``/diagnostics``, logged throttled, and skipped; the node keeps running.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Odometry, Path
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Float64MultiArray, MultiArrayDimension, MultiArrayLayout

from vpr_ros.errors import VPRError
from vpr_ros.ros import conversions as conv
from vpr_ros.ros.diagnostics import LogThrottle
from vpr_ros.ros.messages import parse_loop_closure, to_time
from vpr_ros.ros.params import declare_specs
from vpr_ros.ros.pose_graph_params import CHOICES, all_parameter_specs, settings_from_values
from vpr_ros.slam import se3
from vpr_ros.slam.closures import closure_from_fields
from vpr_ros.slam.pose_graph import PoseGraph

NODE_NAME = "vpr_pose_graph"
#: Columns of one ``~/loop_factors`` row.
LOOP_FACTOR_FIELDS = ("query_stamp_s", "match_stamp_s", "mahalanobis", "weight", "accepted")


def _fill_pose(target: Any, pose: Any) -> None:
    """geometry_msgs/Pose <- gtsam.Pose3."""
    p, q = se3.position_of(pose), se3.quaternion_of(pose)
    target.position.x, target.position.y, target.position.z = p
    target.orientation.x, target.orientation.y, target.orientation.z, \
        target.orientation.w = q


def _tf_broadcaster(node: Node) -> Optional[Any]:
    try:
        from tf2_ros import TransformBroadcaster  # type: ignore[import-not-found]
    except ImportError:
        return None
    return TransformBroadcaster(node)


class PoseGraphNode(Node):
    """See the module docstring; parameters are listed by :func:`all_parameter_specs`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        specs = all_parameter_specs()
        declare_specs(self, specs, CHOICES)  # ConfigError: a start value that does not fit
        values = {s.name: self.get_parameter(s.name).value for s in specs}
        self.settings, graph_config = settings_from_values(values)  # ConfigError: refuse to run
        self.graph = PoseGraph(graph_config)
        self.errors: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self._throttle = LogThrottle(self.settings.log_throttle_s)
        self._last_odom_stamp_ns: Optional[int] = None
        self._path_dirty = False
        self._path_keyframes = 0
        self._refined_factors = 0

        s = self.settings
        odom_qos = QoSProfile(depth=s.odometry_qos_depth, reliability=(
            ReliabilityPolicy.RELIABLE if s.odometry_qos_reliability == "reliable"
            else ReliabilityPolicy.BEST_EFFORT))
        closure_qos = QoSProfile(depth=s.closure_qos_depth,
                                 reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.create_subscription(Odometry, "odometry", self._on_odometry, odom_qos)
        self.create_subscription(Float64MultiArray, "loop_closure", self._on_closure,
                                 closure_qos)
        self._path_pub = self.create_publisher(Path, "~/path", latched)
        self._factors_pub = self.create_publisher(Float64MultiArray, "~/loop_factors", latched)
        self._correction_pub = self.create_publisher(PoseStamped, "~/map_to_odom", 10)
        self._odom_pub = self.create_publisher(Odometry, "~/odometry", 50)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._tf = _tf_broadcaster(self) if s.publish_tf else None
        self.create_timer(s.path_period_s, self._on_path_timer)
        self.create_timer(s.diagnostics_period_s, self._on_diagnostics_timer)
        self.get_logger().info(
            f"pose graph ready: robust kernel {graph_config.robust_kernel}, closures without a "
            f"transform: {graph_config.closure_without_transform}; tf "
            f"{'broadcast' if self._tf else 'not broadcast (no tf2_ros or publish_tf false)'}")

    # ------------------------------------------------------------------------------ input
    def _fail(self, kind: str, message: str) -> None:
        self.errors[kind] += 1
        held = self._throttle.check(kind)
        if held is not None:
            more = f" ({held} similar suppressed)" if held else ""
            self.get_logger().warning(f"{message}{more}")

    def _on_odometry(self, msg: Any) -> None:
        try:
            sample = conv.odometry_to_pose(msg)
            pose = se3.pose3(sample.position, sample.orientation)
            before = self.graph.stats.closures_added
            added = self.graph.add_odometry(sample.stamp_ns, pose, now_s=time.monotonic())
            self._last_odom_stamp_ns = sample.stamp_ns
            corrected = self.graph.corrected(pose)
            out = Odometry()
            out.header.stamp = msg.header.stamp
            out.header.frame_id = self.settings.map_frame
            out.child_frame_id = msg.child_frame_id or self.settings.base_frame
            _fill_pose(out.pose.pose, corrected)
            out.twist = msg.twist  # body-frame velocities do not change with the map frame
            self._odom_pub.publish(out)
            if added:
                self._publish_correction(sample.stamp_ns)
            if self.graph.stats.closures_added != before:  # a waiting closure went in
                self._path_dirty = True
                self._publish_path()
        except VPRError as exc:
            self._fail(getattr(exc, "kind", "bad_odometry"), f"odometry skipped: {exc}")
        except Exception:  # noqa: BLE001 - a bug must not stop the node; it is counted
            self._fail("internal_error", "odometry callback failed:\n" + traceback.format_exc())

    def _on_closure(self, msg: Any) -> None:
        try:
            closure = closure_from_fields(parse_loop_closure(msg))
            outcome = self.graph.add_closure(closure, now_s=time.monotonic())
            self.outcomes[outcome.split(":")[0]] += 1
            if outcome == "added":
                self._path_dirty = True
                self._publish_correction(self._last_odom_stamp_ns or closure.query_stamp_ns)
                self._publish_path()
        except VPRError as exc:
            self._fail("bad_closure", f"loop closure skipped: {exc}")
        except Exception:  # noqa: BLE001
            self._fail("internal_error", "closure callback failed:\n" + traceback.format_exc())

    # ------------------------------------------------------------------------------ output
    def _publish_correction(self, stamp_ns: int) -> None:
        correction = self.graph.map_to_odom()
        msg = PoseStamped()
        msg.header.stamp = to_time(stamp_ns)
        msg.header.frame_id = self.settings.map_frame
        _fill_pose(msg.pose, correction)
        self._correction_pub.publish(msg)
        if self._tf is not None:
            from geometry_msgs.msg import TransformStamped

            t = TransformStamped()
            t.header = msg.header
            t.child_frame_id = self.settings.odom_frame
            p, q = msg.pose.position, msg.pose.orientation
            t.transform.translation.x, t.transform.translation.y = p.x, p.y
            t.transform.translation.z = p.z
            t.transform.rotation = q
            self._tf.sendTransform(t)

    def _publish_path(self) -> None:
        if not self._path_dirty or not self.graph.keyframes:
            return
        self._path_dirty = False
        path = Path()
        path.header.frame_id = self.settings.map_frame
        traj = self.graph.trajectory()
        self._path_keyframes = len(traj)
        path.header.stamp = to_time(traj[-1][0])
        for stamp_ns, pose in traj:
            ps = PoseStamped()
            ps.header.stamp = to_time(stamp_ns)
            ps.header.frame_id = self.settings.map_frame
            _fill_pose(ps.pose, pose)
            path.poses.append(ps)
        self._path_pub.publish(path)
        loops = self.graph.evaluate_loops()
        data: list[float] = []
        for info in loops:
            data += [info.closure.query_stamp_ns / conv.NS_PER_S,
                     info.closure.match_stamp_ns / conv.NS_PER_S,
                     info.mahalanobis, info.weight, 1.0 if info.accepted else 0.0]
        n = len(LOOP_FACTOR_FIELDS)
        layout = MultiArrayLayout(dim=[
            MultiArrayDimension(label="loop_factors", size=len(loops), stride=len(loops) * n),
            MultiArrayDimension(label=",".join(LOOP_FACTOR_FIELDS), size=n, stride=n)],
            data_offset=0)
        self._factors_pub.publish(Float64MultiArray(layout=layout, data=data))

    def _on_path_timer(self) -> None:
        try:
            factors = self.graph.stats.keyframes + self.graph.stats.closures_added
            if factors != self._refined_factors:
                self._refined_factors = factors
                if self.settings.idle_refine_iterations:
                    self.graph.refine(self.settings.idle_refine_iterations)
                self._path_dirty = True
            if len(self.graph.keyframes) != self._path_keyframes:
                self._path_dirty = True
            self._publish_path()
        except Exception:  # noqa: BLE001
            self._fail("internal_error", "path publishing failed:\n" + traceback.format_exc())

    def _on_diagnostics_timer(self) -> None:
        try:
            self.graph.process_pending(time.monotonic())
            summary = self.graph.summary()
            factors = self.graph.stats.keyframes + self.graph.stats.closures_added
            settled = factors == self._refined_factors and not self._path_dirty
            values = {**summary, **{f"errors_{k}": v for k, v in sorted(self.errors.items())},
                      "errors_total": sum(self.errors.values()),
                      # every factor refined and the path published since: what a recorder
                      # waits for before taking the final trajectory
                      "estimate_settled": int(settled)}
            level = 0 if not self.errors else 1
            message = (f"{summary['keyframes']} keyframes, {summary['closures_added']} of "
                       f"{summary['closures_received']} closures in the graph "
                       f"({summary['closures_accepted']} accepted at the optimum)")
            status = DiagnosticStatus(
                level=bytes([level]), name=f"{self.get_name()}: pose graph", message=message,
                hardware_id="none",
                values=[KeyValue(key=k, value=(f"{v:.3f}" if isinstance(v, float) else str(v)))
                        for k, v in values.items()])
            arr = DiagnosticArray(status=[status])
            arr.header.stamp = self.get_clock().now().to_msg()
            self._diag_pub.publish(arr)
        except Exception:  # noqa: BLE001
            self._fail("internal_error", "diagnostics failed:\n" + traceback.format_exc())
