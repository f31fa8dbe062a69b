"""Run ``vpr_node`` inside a Python program, and feed it camera frames from another process.

The node benchmark (``vpr bench node``) needs the node's per-frame stage timings, which live
in the node object, and frames that really cross DDS from another process, as a camera
driver's would. :class:`NodeHarness` hosts the node (own rclpy context and executor thread);
:func:`publish_images` is the camera: a separate process (``python -m
vpr_ros.ros.node_harness publish ...``) that publishes ``sensor_msgs/Image`` at a fixed rate,
stamped with the wall clock at publication so the receiving side can measure transport time.
Both live here because only ``vpr_ros/ros`` imports rclpy.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vpr_ros.errors import ConfigError


class NodeHarness:
    """A configured and active :class:`~vpr_ros.ros.node.VprNode` spinning in this process."""

    def __init__(self, parameters: Mapping[str, Any], remaps: Mapping[str, str]) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.lifecycle import TransitionCallbackReturn
        from rclpy.parameter import Parameter

        from vpr_ros.ros.node import VprNode

        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        args = ["--ros-args"] + [a for k, v in remaps.items() for a in ("-r", f"{k}:={v}")]
        self.node = VprNode(context=self.context, cli_args=args,
                            parameter_overrides=[Parameter(k, value=v)
                                                 for k, v in parameters.items()])
        # Transitions before spinning: nothing else touches the node yet.
        if self.node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            problem = self.node.identity.problem
            self.close()
            raise ConfigError(f"vpr_node did not configure: {problem}")
        self.node.trigger_activate()
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spinner = threading.Thread(target=self.executor.spin, name="vpr_node_executor",
                                         daemon=True)
        self._spinner.start()

    @property
    def executor_thread_id(self) -> Optional[int]:
        """The kernel's id of the thread that spins the executor (it runs every callback)."""
        return self._spinner.native_id

    @property
    def stats(self) -> Any:
        return self.node.stats

    def idle(self) -> bool:
        """Nothing waiting in the mailbox and every received frame accounted for."""
        s = self.node.stats
        return (self.node.pending_frames == 0
                and s.processed + s.dropped + sum(s.errors.values()) >= s.received)

    def close(self) -> None:
        self.node.shutdown_worker()
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown()
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)


def synthetic_frames(count: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct textured RGB frames (smooth colour fields plus noise), like camera images in
    cost: decoding and resizing flat or random images would be unrealistically fast or slow."""
    import cv2

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(max(2, height // 40), max(2, width // 40), 3),
                              dtype=np.uint8)
        img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        noise = rng.integers(-12, 13, size=img.shape, dtype=np.int16)
        frames.append(np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8))
    return frames


def publish_images(topic: str, rate_hz: float, seconds: float, width: int, height: int,
                   compressed: bool = False, qos: str = "reliable",
                   wait_s: float = 20.0, frames_file: str = "", camera_info: str = "",
                   camera_k: Optional[Sequence[float]] = None) -> dict[str, Any]:
    """Publish frames on ``topic`` at ``rate_hz`` for ``seconds``; header stamps are the wall
    clock at publication. ``qos`` ``best_effort`` is the sensor-data profile of camera drivers.
    Returns counts."""
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, Image

    from vpr_ros.runtime.image_codec import encode_compressed, encode_image

    rclpy.init()
    node = rclpy.create_node("vpr_bench_camera")
    msg_type = CompressedImage if compressed else Image
    profile = qos_profile_sensor_data if qos == "best_effort" else \
        QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    pub = node.create_publisher(msg_type, topic, profile)
    messages = []
    # frames from a file (N, H, W, 3) uint8: the benchmark's rendered scenes; else synthetic
    frames = list(np.load(frames_file)) if frames_file else \
        synthetic_frames(8, width, height)
    info_pub = info_msg = None
    if camera_info:
        from sensor_msgs.msg import CameraInfo

        info_pub = node.create_publisher(CameraInfo, camera_info, profile)
        info_msg = CameraInfo(width=width, height=height, distortion_model="plumb_bob",
                              d=[0.0] * 5, k=[float(v) for v in (camera_k or ())])
    for rgb in frames:
        if compressed:
            fmt, data = encode_compressed(rgb, "jpeg")
            messages.append(CompressedImage(format=fmt, data=data))
        else:
            raw = encode_image(rgb, "rgb8")
            messages.append(Image(height=raw.height, width=raw.width, encoding="rgb8",
                                  step=raw.step, data=raw.data))
    deadline = time.monotonic() + wait_s
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    subscribed = pub.get_subscription_count() > 0
    period = 1.0 / rate_hz
    start = time.perf_counter()
    sent = 0
    while subscribed:
        due = start + sent * period
        if due - start >= seconds:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        msg = messages[sent % len(messages)]
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(time.time_ns(), 1_000_000_000)
        msg.header.frame_id = "camera"
        if info_pub is not None:
            info_msg.header = msg.header
            info_pub.publish(info_msg)
        pub.publish(msg)
        sent += 1
    elapsed = time.perf_counter() - start
    node.destroy_node()
    rclpy.try_shutdown()
    return {"sent": sent, "seconds": elapsed, "subscribed": subscribed,
            "achieved_hz": sent / elapsed if elapsed > 0 else 0.0}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m vpr_ros.ros.node_harness publish TOPIC --rate R --seconds S ...``: the
    benchmark's camera process; prints its counts as one JSON line."""
    from vpr_ros._bootstrap import ensure_ros_libs

    ensure_ros_libs()
    parser = argparse.ArgumentParser(prog="python -m vpr_ros.ros.node_harness")
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="publish synthetic camera frames at a fixed rate")
    pub.add_argument("topic")
    pub.add_argument("--rate", type=float, required=True)
    pub.add_argument("--seconds", type=float, required=True)
    pub.add_argument("--width", type=int, default=640)
    pub.add_argument("--height", type=int, default=480)
    pub.add_argument("--compressed", action="store_true")
    pub.add_argument("--qos", choices=["reliable", "best_effort"], default="reliable")
    pub.add_argument("--frames", default="", help="publish these frames (.npy, N x H x W x 3 "
                     "uint8) instead of synthetic ones")
    pub.add_argument("--camera-info", default="", help="also publish a CameraInfo (K from "
                     "--camera-k) on this topic with every frame")
    pub.add_argument("--camera-k", default="", help="K of that CameraInfo, 9 comma-separated "
                     "numbers")
    args = parser.parse_args(argv)
    k = [float(v) for v in args.camera_k.split(",")] if args.camera_k else None
    out = publish_images(args.topic, args.rate, args.seconds, args.width, args.height,
                         args.compressed, args.qos, frames_file=args.frames,
                         camera_info=args.camera_info, camera_k=k)
    print(json.dumps(out), flush=True)
    return 0 if out["subscribed"] else 1


if __name__ == "__main__":
    sys.exit(main())
