"""Shared helpers of the node tests (no tests here): a small real model, a synthetic textured
world seen from a camera driven along a closed route, bags of that route, and a ROS test
harness that drives a ``vpr_node`` through its lifecycle services and records its outputs.

The world is a top-down textured plane (smooth colour noise plus a few hundred random shapes),
so different places look different to a pretrained CNN and neighbouring frames overlap, which
is what a real route looks like to place recognition; lap 2 changes brightness and offsets the
path sideways, so the node never sees the map's exact images.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
NS = 1_000_000_000
WORLD_PX_PER_M = 10.0


# ----------------------------------------------------------------------------------- the model

def small_model_dir(base_model: Path, root: Path, size: int = 96) -> Path:
    """A copy of a real model directory whose recorded input size is ``size`` x ``size``.

    GeM over EfficientNet has no size-dependent weights, so only model.json changes (and with
    it the fingerprint). Created once per test session under ``root``.
    """
    out = root / f"vpr_node_model{size}"
    if (out / "model.json").is_file():
        return out
    tmp = root / f".vpr_node_model{size}.{os.getpid()}"
    shutil.copytree(base_model, tmp)
    doc = json.loads((tmp / "model.json").read_text())
    doc["input"]["size"] = [size, size]
    (tmp / "model.json").write_text(json.dumps(doc, indent=2))
    try:
        tmp.rename(out)
    except OSError:  # another module of this session made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------- the world

def make_world(size_px: int = 1200, seed: int = 7) -> np.ndarray:
    """A (size, size, 3) uint8 RGB texture: smooth colour noise plus random shapes."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 215, size=(size_px // 60, size_px // 60, 3)).astype(np.uint8)
    world = cv2.resize(coarse, (size_px, size_px), interpolation=cv2.INTER_CUBIC)
    for _ in range(size_px * size_px // 3000):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(0, size_px, 2))
        kind = rng.integers(0, 3)
        if kind == 0:
            cv2.circle(world, (x, y), int(rng.integers(4, 25)), colour, -1)
        elif kind == 1:
            w, h = (int(v) for v in rng.integers(5, 40, 2))
            cv2.rectangle(world, (x, y), (x + w, y + h), colour, -1)
        else:
            x2, y2 = (int(v) for v in rng.integers(-40, 40, 2))
            cv2.line(world, (x, y), (x + x2, y + y2), colour, int(rng.integers(2, 6)))
    return world


def render_view(world: np.ndarray, x_m: float, y_m: float, yaw: float, out_px: int = 96,
                view_m: float = 16.0, gain: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """Top-down camera at (x, y) metres heading ``yaw``: a rotated square crop of the world."""
    scale = out_px / (view_m * WORLD_PX_PER_M)
    cx, cy = x_m * WORLD_PX_PER_M, y_m * WORLD_PX_PER_M
    rot = cv2.getRotationMatrix2D((cx, cy), math.degrees(yaw), scale)
    rot[0, 2] += out_px / 2 - cx
    rot[1, 2] += out_px / 2 - cy
    view = cv2.warpAffine(world, rot, (out_px, out_px), flags=cv2.INTER_AREA,
                          borderMode=cv2.BORDER_REFLECT)
    return np.clip(view.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)


@dataclass
class Route:
    """Two laps of a circle: per-frame stamps, ground-truth positions, yaw and images."""

    stamps_ns: list[int]
    positions: list[tuple[float, float, float]]
    yaws: list[float]
    images: list[np.ndarray]
    lap: list[int]
    pose_stamps_ns: list[int] = field(default_factory=list)
    pose_positions: list[tuple[float, float, float]] = field(default_factory=list)
    pose_yaws: list[float] = field(default_factory=list)

    def frames(self, lap: Optional[int] = None) -> list[int]:
        return [i for i, l in enumerate(self.lap) if lap is None or l == lap]

    def frame_at(self, stamp_ns: int) -> int:
        """Index of the frame with this stamp (to 1 ms: stamps may come back as float
        seconds)."""
        i = int(np.argmin(np.abs(np.asarray(self.stamps_ns) - int(stamp_ns))))
        assert abs(self.stamps_ns[i] - int(stamp_ns)) < 1_000_000, stamp_ns
        return i

    def position_at(self, stamp_ns: int) -> tuple[float, float, float]:
        """Ground truth at a frame stamp."""
        return self.positions[self.frame_at(stamp_ns)]


def yaw_quaternion(yaw: float) -> tuple[float, float, float, float]:
    return (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))


def make_route(frames_per_lap: int = 60, radius_m: float = 15.0, frame_period_s: float = 1.0,
               start_s: float = 1000.0, out_px: int = 96, lap2_offset_m: float = 0.5,
               lap2_gain: float = 0.7, lap2_bias: float = 12.0, view_m: float = 10.0,
               seed: int = 7) -> Route:
    """Drive twice round a circle in a textured world; odometry at twice the frame rate."""
    world = make_world(seed=seed)
    centre = world.shape[0] / WORLD_PX_PER_M / 2
    route = Route([], [], [], [], [])
    n = 2 * frames_per_lap
    start_ns = int(start_s * NS)
    period_ns = int(frame_period_s * NS)

    def pose(t: float, lap: int) -> tuple[float, float, float, float]:
        angle = 2 * math.pi * t
        r = radius_m + (lap2_offset_m if lap == 1 else 0.0)
        return (centre + r * math.cos(angle), centre + r * math.sin(angle), 0.0,
                angle + math.pi / 2)

    for i in range(n):
        lap = i // frames_per_lap
        x, y, z, yaw = pose(i / frames_per_lap, lap)
        gain, bias = (lap2_gain, lap2_bias) if lap == 1 else (1.0, 0.0)
        route.stamps_ns.append(start_ns + i * period_ns)
        route.positions.append((x, y, z))
        route.yaws.append(yaw)
        route.lap.append(lap)
        route.images.append(render_view(world, x, y, yaw, out_px, view_m=view_m, gain=gain,
                                        offset=bias))
    for j in range(2 * n):
        t = j / 2 / frames_per_lap
        lap = min(1, int(t))
        x, y, z, yaw = pose(t, lap)
        route.pose_stamps_ns.append(start_ns + j * period_ns // 2)
        route.pose_positions.append((x, y, z))
        route.pose_yaws.append(yaw)
    return route


def write_bag(route: Route, path: Path, storage: str, frames: Iterable[int],
              compressed: bool = False, image_topic: str = "/camera/image_raw",
              pose_topic: str = "/odom") -> Path:
    """A rosbag2 bag (colleague's writer) with the chosen frames and the odometry that covers
    them."""
    from vpr_ros.mapdb.bag_writer import write_route_bag

    idx = list(frames)
    lo, hi = route.stamps_ns[idx[0]], route.stamps_ns[idx[-1]]
    poses = [(s, p, yaw_quaternion(yaw)) for s, p, yaw in
             zip(route.pose_stamps_ns, route.pose_positions, route.pose_yaws)
             if lo - NS <= s <= hi + NS]
    return write_route_bag(path, [(route.stamps_ns[i], route.images[i]) for i in idx], poses,
                           storage=storage, image_topic=image_topic, pose_topic=pose_topic,
                           compressed=compressed)


def flatten_params(d: dict, prefix: str = "") -> dict:
    """A params file's nested ``ros__parameters`` as the flat, dotted names the nodes declare
    (``{"sequence": {"length": 5}}`` -> ``{"sequence.length": 5}``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def assert_declared(specs: list, choices: Optional[dict] = None) -> None:
    """Every spec has a unique name and, as the node declares it (``descriptor_for`` with
    ``choices``, default vpr_node's), a description and a range holding its default."""
    from rcl_interfaces.msg import ParameterType

    from vpr_ros.ros.params import descriptor_for

    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for spec in specs:
        d = descriptor_for(spec, choices)
        assert d.description, spec.name
        if d.type == ParameterType.PARAMETER_DOUBLE:
            r = d.floating_point_range[0]
            assert r.from_value <= spec.default <= r.to_value, spec.name
        elif d.type == ParameterType.PARAMETER_INTEGER:
            r = d.integer_range[0]
            assert r.from_value <= spec.default <= r.to_value, spec.name


# ---------------------------------------------------------------------------------- processes

def ros_env() -> dict[str, str]:
    from vpr_ros._bootstrap import env_with_ros_libs

    env = env_with_ros_libs()
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("RCUTILS_COLORIZED_OUTPUT", "0")
    return env


def start_node(args: list[str], log_path: Path) -> subprocess.Popen:
    """``vpr_node ARGS`` as a subprocess (the console script's code path), output to a file."""
    cmd = [sys.executable, "-c", "import sys; from vpr_ros.ros.node_main import main; "
           "sys.exit(main())", *args]
    log = open(log_path, "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ros_env(),
                            cwd=str(REPO))


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGINT (what Ctrl-C and ros2 launch send), then SIGKILL if it hangs."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def vpr_command() -> list[str]:
    """The ``vpr`` console script of this interpreter's environment (what a user runs), or the
    same entry point through ``-c`` where the script is not installed."""
    script = Path(sys.executable).with_name("vpr")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from vpr_ros.cli import main; sys.exit(main())"]


# ------------------------------------------------------------------------------ ROS test side

class RosProbe:
    """A plain rclpy node in the test process: lifecycle client, service client, recorder of
    the node's outputs. Spun by the caller through :meth:`spin_until`."""

    def __init__(self, node_name: str = "/vpr_node") -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.target = node_name
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"vpr_probe_{os.getpid()}_{time.monotonic_ns() % 10**6}",
                                      context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.received: dict[str, list[Any]] = {}
        self._subs: list[Any] = []

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def record(self, topic: str, msg_type: Any, reliable: bool = True, depth: int = 1000) -> list:
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        store: list[Any] = self.received.setdefault(topic, [])
        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)
        self._subs.append(self.node.create_subscription(msg_type, topic, store.append, qos))
        return store

    def publisher(self, topic: str, msg_type: Any, reliable: bool = True, depth: int = 100) -> Any:
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE if reliable
                         else ReliabilityPolicy.BEST_EFFORT)
        return self.node.create_publisher(msg_type, topic, qos)

    def spin_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            self.executor.spin_once(timeout_sec=0.05)
        return predicate()

    def spin_for(self, seconds: float) -> None:
        self.spin_until(lambda: False, seconds)

    def call(self, srv_type: Any, name: str, request: Any, timeout: float = 60.0,
             attempt_s: float = 8.0, retry: bool = True) -> Any:
        """Call a service and wait for the answer.

        DDS matches a client's request and reply paths separately, so right after a server
        appears a reply can be lost although the service looked ready. Each attempt uses a
        fresh client and waits ``attempt_s``; with ``retry`` (idempotent calls) the request is
        sent again, otherwise :class:`TimeoutError` lets the caller check what happened.
        """
        deadline = time.monotonic() + timeout
        while True:
            client = self.node.create_client(srv_type, name)
            try:
                if not self.spin_until(client.service_is_ready, deadline - time.monotonic()):
                    raise TimeoutError(f"service {name} not available within {timeout} s")
                future = client.call_async(request)
                if self.spin_until(future.done, max(0.1, min(attempt_s,
                                                             deadline - time.monotonic()))):
                    return future.result()
                client.remove_pending_request(future)
            finally:
                self.node.destroy_client(client)
            if not retry or time.monotonic() >= deadline:
                raise TimeoutError(f"service {name} did not answer within {timeout} s")

    _GOALS = {"configure": "inactive", "activate": "active", "deactivate": "inactive",
              "cleanup": "unconfigured", "shutdown": "finalized"}

    def transition(self, label: str, timeout: float = 120.0) -> bool:
        """ChangeState by label (configure, activate, deactivate, cleanup, shutdown).

        Not idempotent, so a lost reply is not answered by sending it again blindly: the node's
        state says whether the transition happened (goal state) or must be asked again."""
        from lifecycle_msgs.srv import ChangeState

        req = ChangeState.Request()
        req.transition.label = label
        deadline = time.monotonic() + timeout
        while True:
            try:
                return bool(self.call(ChangeState, f"{self.target}/change_state", req,
                                      max(1.0, deadline - time.monotonic()), attempt_s=15.0,
                                      retry=False).success)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
            # GetState is served after the transition ends (one executor thread): it says
            # whether the lost reply was a success.
            if self.state(timeout=max(1.0, deadline - time.monotonic())) == self._GOALS[label]:
                return True

    def state(self, timeout: float = 30.0) -> str:
        from lifecycle_msgs.srv import GetState

        return str(self.call(GetState, f"{self.target}/get_state", GetState.Request(),
                             timeout).current_state.label)

    def trigger(self, service: str, timeout: float = 60.0) -> Any:
        from std_srvs.srv import Trigger

        return self.call(Trigger, f"{self.target}/{service}", Trigger.Request(), timeout)

    def latest_status(self) -> Optional[dict[str, str]]:
        """Key/values of the newest /diagnostics status of the node."""
        from vpr_ros.ros.diagnostics import status_values

        for arr in reversed(self.received.get("/diagnostics", [])):
            for status in arr.status:
                if status.name.startswith("vpr_node"):
                    return status_values(status)
        return None


# ------------------------------------------------------------------- maps and in-process nodes

def build_lap_map(model: Path, route: Route, lap: int, out: Path, session: str = "lap1") -> Path:
    """A posed map of one lap, encoded with ``model`` (PlaceMap directly: small and fast)."""
    from vpr_ros.mapdb import Keyframe, PlaceMap
    from vpr_ros.runtime.encoder import load_encoder

    enc = load_encoder(model, threads=1)
    idx = route.frames(lap=lap)
    pm = PlaceMap.create(enc.dim, enc.fingerprint)
    pm.add(enc.encode([route.images[i] for i in idx]),
           [Keyframe(session, route.stamps_ns[i], "map", route.positions[i],
                     yaw_quaternion(route.yaws[i])) for i in idx])
    pm.save(out)
    return out


#: The node tests' maps are encodings of a top-down synthetic texture (no keypoints, no
#: camera calibration), so they run with geometric verification off; it is tested on
#: calibrated RGB-D views in test_node_verification.py.
UNVERIFIED: dict[str, Any] = {"verification.enabled": False}
UNVERIFIED_ARGS = ["-p", "verification.enabled:=false"]


class InProcessNode:
    """A VprNode spun by its own executor thread in the test process, plus a :class:`RosProbe`
    in a separate rclpy context (its own DDS participant, so traffic really crosses DDS).
    Verification is off unless ``overrides`` turn it on (see :data:`UNVERIFIED`)."""

    def __init__(self, overrides: dict[str, Any], remaps: dict[str, str]) -> None:
        overrides = {**UNVERIFIED, **overrides}
        import threading

        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter import Parameter

        from vpr_ros.ros.node import VprNode

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        args = ["--ros-args"] + [a for k, v in remaps.items() for a in ("-r", f"{k}:={v}")]
        self.node = VprNode(context=self.context, cli_args=args,
                            parameter_overrides=[Parameter(k, value=v)
                                                 for k, v in overrides.items()])
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self._spinner.start()
        self.probe = RosProbe()
        self.probe.record("/diagnostics", DiagnosticArray)

    def set(self, **values: Any) -> None:
        from rclpy.parameter import Parameter

        results = self.node.set_parameters([Parameter(k, value=v) for k, v in values.items()])
        assert all(r.successful for r in results), [r.reason for r in results]

    def close(self) -> None:
        import rclpy

        self.probe.close()
        self.node.shutdown_worker()
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._spinner.join(5)


def image_msg(rgb: np.ndarray, stamp_ns: int, encoding: str = "rgb8") -> Any:
    """A sensor_msgs/Image of ``rgb`` stamped ``stamp_ns``."""
    from sensor_msgs.msg import Image

    from vpr_ros.runtime.image_codec import encode_image

    raw = encode_image(rgb, encoding)
    msg = Image(height=raw.height, width=raw.width, encoding=raw.encoding, step=raw.step,
                data=raw.data)
    set_stamp(msg, stamp_ns)
    return msg


def compressed_msg(rgb: np.ndarray, stamp_ns: int, fmt: str = "jpeg") -> Any:
    from sensor_msgs.msg import CompressedImage

    from vpr_ros.runtime.image_codec import encode_compressed

    name, data = encode_compressed(rgb, fmt)
    msg = CompressedImage(format=name, data=data)
    set_stamp(msg, stamp_ns)
    return msg


def set_stamp(msg: Any, stamp_ns: int, frame_id: str = "camera") -> Any:
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), NS)
    msg.header.frame_id = frame_id
    return msg


def set_remote_parameters(probe: RosProbe, values: dict[str, Any], timeout: float = 30.0) -> None:
    """``ros2 param set`` for several parameters at once, through the node's parameter
    service."""
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    req = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg()
                                            for k, v in values.items()])
    res = probe.call(SetParameters, f"{probe.target}/set_parameters", req, timeout)
    bad = [r.reason for r in res.results if not r.successful]
    assert not bad, bad
