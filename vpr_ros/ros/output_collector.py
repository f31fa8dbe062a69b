"""Listen to a running ``vpr_node`` from another process and keep what it publishes.

The demo (and anyone checking a deployment) judges the node by what arrives on the wire, not
by its internals: relocalization poses, loop closures, candidate clouds and its diagnostics.
The collector runs its own rclpy context and executor thread, so it can sit inside a program
that also starts the node and the bag player as subprocesses.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Collected:
    relocalizations: list[dict[str, Any]] = field(default_factory=list)
    loop_closures: list[dict[str, float]] = field(default_factory=list)
    candidates: list[tuple[int, np.ndarray]] = field(default_factory=list)
    verifications: list[dict[str, float]] = field(default_factory=list)
    relocalization_status: list[dict[str, float]] = field(default_factory=list)
    diagnostics: dict[str, str] = field(default_factory=dict)
    diagnostics_level: int = -1
    diagnostics_message: str = ""


class OutputCollector:
    """Subscribe to ``/<node>/relocalization``, ``relocalization_status``, ``loop_closure``,
    ``candidates``, ``verification`` and ``/diagnostics`` (only the named node's status is
    kept)."""

    def __init__(self, node_name: str = "vpr_node") -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2
        from std_msgs.msg import Float64MultiArray

        self._rclpy = rclpy
        self.data = Collected()
        self._lock = threading.Lock()
        self._node_name = node_name
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("vpr_output_collector", context=self.context)
        qos = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
        base = f"/{node_name}"
        self.node.create_subscription(PoseWithCovarianceStamped, f"{base}/relocalization",
                                      self._on_reloc, qos)
        self.node.create_subscription(Float64MultiArray, f"{base}/loop_closure",
                                      self._on_loop, qos)
        self.node.create_subscription(PointCloud2, f"{base}/candidates", self._on_cands, qos)
        self.node.create_subscription(Float64MultiArray, f"{base}/verification",
                                      self._on_verification, qos)
        self.node.create_subscription(Float64MultiArray, f"{base}/relocalization_status",
                                      self._on_reloc_status, qos)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, qos)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True,
                                        name="vpr_output_collector")
        self._thread.start()

    # -- callbacks --------------------------------------------------------------------------
    def _on_reloc(self, msg: Any) -> None:
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self._lock:
            self.data.relocalizations.append({
                "stamp_ns": stamp, "x": p.x, "y": p.y, "z": p.z,
                "orientation": (q.x, q.y, q.z, q.w),
                "sigma_xy_m": float(np.sqrt(max(msg.pose.covariance[0], 0.0)))})

    def _on_loop(self, msg: Any) -> None:
        from vpr_ros.ros.messages import parse_loop_closure

        with self._lock:
            self.data.loop_closures.append(parse_loop_closure(msg))

    def _on_verification(self, msg: Any) -> None:
        from vpr_ros.ros.messages import parse_verification

        with self._lock:
            self.data.verifications.extend(parse_verification(msg))

    def _on_reloc_status(self, msg: Any) -> None:
        from vpr_ros.ros.messages import parse_loop_closure

        with self._lock:
            self.data.relocalization_status.append(parse_loop_closure(msg))

    def _on_cands(self, msg: Any) -> None:
        from vpr_ros.ros.messages import cloud_to_array

        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self._lock:
            self.data.candidates.append((stamp, cloud_to_array(msg)))

    def _on_diag(self, msg: Any) -> None:
        from vpr_ros.ros.diagnostics import status_values

        for status in msg.status:
            if status.name.startswith(self._node_name):
                with self._lock:
                    self.data.diagnostics = status_values(status)
                    self.data.diagnostics_level = status.level[0] if isinstance(
                        status.level, bytes) else int(status.level)
                    self.data.diagnostics_message = status.message

    # -- waiting ----------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, str]:
        with self._lock:
            return dict(self.data.diagnostics)

    def wait_for(self, predicate, timeout_s: float, poll_s: float = 0.2) -> bool:
        """Poll ``predicate(self)`` until true or timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(poll_s)
        return bool(predicate(self))

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)
