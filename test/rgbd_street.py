"""Shared helper of tests (no tests here): rendered RGB-D views of the demo's street as a robot
would record or stream them (image, CameraInfo, registered depth, odometry of base_link, the
camera's mount on /tf_static)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Optional

import numpy as np

from vpr_ros.demo.scenario import (Route, ScenarioConfig, World, camera_matrix, camera_mount,
                                   render_with_depth)
from vpr_ros.mapdb.bag_writer import ODOMETRY, BagWriter

S = 1_000_000_000
T0 = 1_700_000_000 * S


class Street:
    """The demo world at ``size`` (H, W); views by arc length, lap (lighting) and lane."""

    def __init__(self, size: tuple[int, int] = (480, 640)) -> None:
        self.cfg = ScenarioConfig(image_size=size)
        self.world, self.route = World(self.cfg), Route(self.cfg)

    @property
    def k(self) -> tuple[float, ...]:
        return camera_matrix(self.cfg)

    @property
    def mount(self) -> tuple[float, ...]:
        return camera_mount(self.cfg)

    def pose(self, s: float, lateral: float = 0.0) -> tuple[float, float, float]:
        return self.route.pose(s, lateral)

    def view(self, s: float, lap: int = 1, lateral: float = 0.0
             ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        x, y, yaw = self.route.pose(s, lateral)
        rgb, depth = render_with_depth(self.world, self.cfg, x, y, yaw, lap)
        return rgb, depth, (x, y, yaw)


def yaw_quat(yaw: float) -> tuple[float, float, float, float]:
    return (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))


def street_bag(path: Path, street: Street, arc: Iterable[float], lap: int = 1,
               lateral: float = 0.0, depth: Optional[str] = "16UC1", period_s: float = 0.5
               ) -> Path:
    """A bag driving the street: frames at arc lengths ``arc``, ``period_s`` apart."""
    h, w = street.cfg.image_size
    info = SimpleNamespace(width=w, height=h, k=street.k, d=(), distortion_model="none")
    with BagWriter(path) as bag:
        bag.add_image_topic("/camera/image_raw", frame_id="camera_optical")
        bag.add_camera_info_topic("/camera/camera_info", frame_id="camera_optical")
        if depth:
            bag.add_depth_topic("/camera/depth", depth, frame_id="camera_optical")
        bag.add_pose_topic("/odom", ODOMETRY, frame_id="map", child_frame_id="base_link")
        bag.write_static_transforms(T0, [("base_link", "camera_optical", street.mount)])
        for i, s in enumerate(arc):
            stamp = T0 + int(i * period_s * S)
            rgb, d, (x, y, yaw) = street.view(s, lap, lateral)
            bag.write_pose("/odom", stamp, (x, y, 0.0), yaw_quat(yaw))
            bag.write_camera_info("/camera/camera_info", stamp, info)
            bag.write_image("/camera/image_raw", stamp, rgb)
            if depth:
                bag.write_depth("/camera/depth", stamp, d)
    return path


def camera_info_msg(street: Street, stamp_ns: int, k: Optional[Iterable[float]] = None,
                    size: Optional[tuple[int, int]] = None) -> object:
    """A sensor_msgs/CameraInfo (rclpy) of the street camera (or of ``k`` / ``size``)."""
    from sensor_msgs.msg import CameraInfo

    h, w = size or street.cfg.image_size
    msg = CameraInfo(width=w, height=h, distortion_model="plumb_bob", d=[0.0] * 5,
                     k=[float(v) for v in (k if k is not None else street.k)])
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), S)
    msg.header.frame_id = "camera_optical"
    return msg
