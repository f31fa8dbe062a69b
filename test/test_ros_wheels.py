"""The ROS 2 wheels work in the venv: a real rclpy publisher and subscriber exchange a
sensor_msgs/Image over DDS (loopback), and our entry points set LD_LIBRARY_PATH themselves."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")


def test_image_round_trip_over_dds() -> None:
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        node = rclpy.create_node("vpr_wheel_check", context=ctx)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        received: list[Image] = []
        node.create_subscription(Image, "/vpr_test/image", received.append, qos)
        pub = node.create_publisher(Image, "/vpr_test/image", qos)
        executor = rclpy.executors.SingleThreadedExecutor(context=ctx)
        executor.add_node(node)
        msg = Image(height=2, width=3, encoding="rgb8", step=9, data=bytes(range(18)))
        msg.header.frame_id = "camera"
        deadline = time.monotonic() + 20.0
        while not received and time.monotonic() < deadline:
            pub.publish(msg)
            executor.spin_once(timeout_sec=0.1)
        assert received, "no Image received over DDS within 20 s"
        got = received[0]
        assert (got.height, got.width, got.encoding, got.step) == (2, 3, "rgb8", 9)
        assert bytes(got.data) == bytes(range(18)) and got.header.frame_id == "camera"
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


def test_entry_point_bootstrap_sets_ld_library_path() -> None:
    from vpr_ros._bootstrap import ros_lib_dir

    lib = ros_lib_dir()
    if lib is None:
        pytest.skip("ROS comes from a system install here (no librcl in the venv)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_LIBRARY_PATH", "VPR_ROS_LD_BOOTSTRAPPED")}
    code = ("from vpr_ros._bootstrap import ensure_ros_libs; ensure_ros_libs(); import os; "
            "print(os.environ['LD_LIBRARY_PATH'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip().split(os.pathsep)[0] == lib
