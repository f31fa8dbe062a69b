"""Listen to running ``vpr_pose_graph`` nodes from another process, and relay closures to one.

The demo and ``vpr eval slam`` judge the back end by what it publishes: the latest optimised
path, the verdict on every loop factor and its diagnostics (:class:`PoseGraphCollector`).
:class:`ClosureRelay` copies ``vpr_node``'s closures onto a second topic and, once, adds a
planted wrong closure there, so a second pose graph can run *the same run* with one wrong
closure more: the robustness check compares the two.

Each object runs its own rclpy context and executor thread (like
:class:`~vpr_ros.ros.output_collector.OutputCollector`), so it can live in a program that starts
the nodes and the bag player as subprocesses.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np

Sample = tuple[int, tuple[float, float, float], tuple[float, float, float, float]]


@dataclass
class PoseGraphOutput:
    path: list[Sample] = field(default_factory=list)
    path_messages: int = 0
    loop_factors: list[dict[str, float]] = field(default_factory=list)
    diagnostics: dict[str, str] = field(default_factory=dict)


class _Spinner:
    """An rclpy context + node + executor thread."""

    def __init__(self, name: str) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.executor.spin, daemon=True,
                                        name=self.node.get_name())
        self._thread.start()

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)


class PoseGraphCollector(_Spinner):
    """Keep the latest ``/<name>/path`` and ``/<name>/loop_factors`` and the node's
    ``/diagnostics`` status."""

    def __init__(self, node_name: str = "vpr_pose_graph") -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from nav_msgs.msg import Path
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import Float64MultiArray

        super().__init__(f"{node_name}_collector")
        self.node_name = node_name
        self.data = PoseGraphOutput()
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        base = f"/{node_name}"
        self.node.create_subscription(Path, f"{base}/path", self._on_path, latched)
        self.node.create_subscription(Float64MultiArray, f"{base}/loop_factors",
                                      self._on_factors, latched)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag,
                                      QoSProfile(depth=50,
                                                 reliability=ReliabilityPolicy.RELIABLE))
        self.start()

    def _on_path(self, msg: Any) -> None:
        path: list[Sample] = []
        for ps in msg.poses:
            p, q = ps.pose.position, ps.pose.orientation
            stamp = ps.header.stamp.sec * 1_000_000_000 + ps.header.stamp.nanosec
            path.append((stamp, (p.x, p.y, p.z), (q.x, q.y, q.z, q.w)))
        with self._lock:
            self.data.path = path
            self.data.path_messages += 1

    def _on_factors(self, msg: Any) -> None:
        rows = loop_factor_rows(msg)
        with self._lock:
            self.data.loop_factors = rows

    def _on_diag(self, msg: Any) -> None:
        from vpr_ros.ros.diagnostics import status_values

        for status in msg.status:
            if status.name.startswith(self.node_name + ":"):
                with self._lock:
                    self.data.diagnostics = status_values(status)

    def diagnostics(self) -> dict[str, str]:
        with self._lock:
            return dict(self.data.diagnostics)

    def snapshot(self) -> PoseGraphOutput:
        with self._lock:
            return PoseGraphOutput(list(self.data.path), self.data.path_messages,
                                   list(self.data.loop_factors), dict(self.data.diagnostics))

    def settled(self, closures_sent: int) -> bool:
        """The node has taken every closure sent and published a path of all its keyframes
        since."""
        d = self.diagnostics()
        if not d:
            return False
        taken = int(d.get("closures_received", -1))
        pending = int(d.get("closures_pending", 0))
        with self._lock:
            path_len = len(self.data.path)
        return taken >= closures_sent and pending == 0 and \
            d.get("estimate_settled", "1") == "1" and path_len == int(d.get("keyframes", -1))


def loop_factor_rows(msg: Any) -> list[dict[str, float]]:
    """``~/loop_factors`` (2-D Float64MultiArray, columns named by the second label)."""
    if len(msg.layout.dim) != 2:
        return []
    names = msg.layout.dim[1].label.split(",")
    n = len(names)
    data = np.asarray(msg.data, dtype=np.float64)[msg.layout.data_offset:]
    rows = data.reshape(-1, n) if n and data.size % n == 0 else np.zeros((0, max(n, 1)))
    return [dict(zip(names, (float(v) for v in row))) for row in rows]


class ClosureRelay(_Spinner):
    """Republish every closure from ``source`` on ``target``; after the ``plant_after``-th,
    publish one more made by ``plant`` (field name -> value of the triggering closure in,
    the planted closure's fields out, or None to try again on the next closure)."""

    def __init__(self, source: str, target: str, plant_after: int,
                 plant: Callable[[Mapping[str, float]], Optional[dict[str, float]]]) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from std_msgs.msg import Float64MultiArray

        super().__init__("vpr_closure_relay")
        qos = QoSProfile(depth=500, reliability=ReliabilityPolicy.RELIABLE)
        self._pub = self.node.create_publisher(Float64MultiArray, target, qos)
        self.node.create_subscription(Float64MultiArray, source, self._on_closure, qos)
        self._plant_after = plant_after
        self._plant = plant
        self.relayed = 0
        self.planted: Optional[dict[str, float]] = None
        self.start()

    @property
    def sent(self) -> int:
        return self.relayed + (1 if self.planted is not None else 0)

    def _on_closure(self, msg: Any) -> None:
        from std_msgs.msg import Float64MultiArray, MultiArrayDimension, MultiArrayLayout

        from vpr_ros.ros.messages import parse_loop_closure

        self._pub.publish(msg)
        self.relayed += 1
        if self.planted is not None or self.relayed < self._plant_after:
            return
        fields = self._plant(parse_loop_closure(msg))
        if fields is None:
            return
        names = list(fields)
        layout = MultiArrayLayout(dim=[MultiArrayDimension(
            label=",".join(names), size=len(names), stride=len(names))], data_offset=0)
        self._pub.publish(Float64MultiArray(layout=layout,
                                            data=[float(fields[n]) for n in names]))
        self.planted = dict(fields)

    def wait_idle(self, timeout_s: float) -> None:
        """Give in-flight closures a moment to pass through."""
        deadline = time.monotonic() + timeout_s
        last = -1
        while time.monotonic() < deadline and last != self.relayed:
            last = self.relayed
            time.sleep(0.5)
