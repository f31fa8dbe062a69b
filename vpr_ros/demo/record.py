"""Record the demo scenario as real bags (rosbag2, or ROS 1), the way a robot's recorder would.

Three bags are written: ``lap1`` (mapping run), ``lap2`` (the revisit the node relocalises in)
and ``full`` (both laps back to back, for loop closure within one run), plus
``ground_truth.csv`` with every frame's pose, which the report compares against. Each bag has
the camera's images, its ``CameraInfo``, a registered ``16UC1`` depth image, odometry of
``base_link`` and the camera's mount on ``/tf_static``: what a robot with an RGB-D camera
records. With ``rear=True`` a second, rear-facing camera is recorded too (its images,
CameraInfo and mount), for the demo's one-camera-versus-both comparison.

Every bag carries two pose topics, as a recording with a reference system would: ``/odom``
(``nav_msgs/Odometry`` in frame ``odom``) is wheel odometry that drifts
(:mod:`vpr_ros.demo.drift`: scale error + heading random walk, integrated over the whole run, so
lap 2's odometry has drifted further than lap 1's), and ``/ground_truth`` (frame ``map``) is the
true pose. The map is built from the mapping run's ground truth (a site map normally comes from
an optimised trajectory); loop closure and the pose graph run on the drifting odometry.
"""

from __future__ import annotations

import csv
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from vpr_ros.demo.drift import OdometryDrift, drift_planar
from vpr_ros.demo.scenario import (Frame, ScenarioConfig, World, camera_matrix, camera_mount,
                                   drive, poses, render)
from vpr_ros.mapdb.bag_writer import ODOMETRY, BagWriter
from vpr_ros.mapdb.camera import CameraModel

IMAGE_TOPIC = "/camera/image_raw"
CAMERA_INFO_TOPIC = "/camera/camera_info"
DEPTH_TOPIC = "/camera/depth/image_raw"
ODOM_TOPIC = "/odom"
GT_TOPIC = "/ground_truth"
CAMERA_FRAME = "camera_optical"
REAR_IMAGE_TOPIC = "/camera_rear/image_raw"
REAR_CAMERA_INFO_TOPIC = "/camera_rear/camera_info"
REAR_CAMERA_FRAME = "camera_rear_optical"
BASE_FRAME = "base_link"


@dataclass(frozen=True)
class RecordedScenario:
    lap1: Path
    lap2: Path
    full: Path
    ground_truth: Path
    frames_per_lap: tuple[int, int]


class _Recorder:
    """One bag as a robot records it: camera (+ CameraInfo and registered 16UC1 depth),
    odometry of base_link, and the camera's mount on /tf_static."""

    def __init__(self, path: Path, cfg: ScenarioConfig, storage: str, compressed: bool,
                 depth: bool, odometry: dict[int, tuple[float, float, float]],
                 rear: bool = False) -> None:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        self.cfg, self.depth, self.rear, self.odometry = cfg, depth, rear, odometry
        self.camera = CameraModel(IMAGE_TOPIC, cfg.image_size[1], cfg.image_size[0],
                                  camera_matrix(cfg), frame_id=CAMERA_FRAME)
        self.writer = BagWriter(path, storage)  # type: ignore[arg-type]
        self.writer.open()
        w = self.writer
        w.add_image_topic(IMAGE_TOPIC, compressed=compressed, frame_id=CAMERA_FRAME)
        w.add_camera_info_topic(CAMERA_INFO_TOPIC, frame_id=CAMERA_FRAME)
        if depth:
            w.add_depth_topic(DEPTH_TOPIC, "16UC1", frame_id=CAMERA_FRAME)
        if rear:
            self.rear_camera = CameraModel(REAR_IMAGE_TOPIC, cfg.image_size[1],
                                           cfg.image_size[0], camera_matrix(cfg),
                                           frame_id=REAR_CAMERA_FRAME)
            w.add_image_topic(REAR_IMAGE_TOPIC, compressed=compressed,
                              frame_id=REAR_CAMERA_FRAME)
            w.add_camera_info_topic(REAR_CAMERA_INFO_TOPIC, frame_id=REAR_CAMERA_FRAME)
        w.add_pose_topic(ODOM_TOPIC, ODOMETRY, frame_id="odom", child_frame_id=BASE_FRAME)
        w.add_pose_topic(GT_TOPIC, ODOMETRY, frame_id="map", child_frame_id=BASE_FRAME)
        self.first = True

    def write(self, fr: Frame, rear_image=None) -> None:
        w = self.writer
        if self.first:
            mounts = [(BASE_FRAME, CAMERA_FRAME, camera_mount(self.cfg))]
            if self.rear:
                mounts.append((BASE_FRAME, REAR_CAMERA_FRAME, rear_mount(self.cfg)))
            w.write_static_transforms(fr.stamp_ns, mounts)
            self.first = False
        ox, oy, oyaw = self.odometry[fr.stamp_ns]
        w.write_pose(ODOM_TOPIC, fr.stamp_ns, (ox, oy, 0.0),
                     (0.0, 0.0, math.sin(oyaw / 2), math.cos(oyaw / 2)))
        w.write_pose(GT_TOPIC, fr.stamp_ns, (fr.x, fr.y, 0.0), fr.quaternion)
        w.write_camera_info(CAMERA_INFO_TOPIC, fr.stamp_ns, self.camera)
        w.write_image(IMAGE_TOPIC, fr.stamp_ns, fr.image)
        if self.depth and fr.depth is not None:
            w.write_depth(DEPTH_TOPIC, fr.stamp_ns, fr.depth)
        if self.rear and rear_image is not None:
            w.write_camera_info(REAR_CAMERA_INFO_TOPIC, fr.stamp_ns, self.rear_camera)
            w.write_image(REAR_IMAGE_TOPIC, fr.stamp_ns, rear_image)

    def close(self) -> None:
        self.writer.close()


def rear_mount(cfg: ScenarioConfig) -> tuple[float, ...]:
    """The rear camera: the front mount turned half round the base's vertical axis."""
    from scipy.spatial.transform import Rotation

    tx, ty, tz, *q = camera_mount(cfg)
    turned = (Rotation.from_euler("z", math.pi) * Rotation.from_quat(q)).as_quat()
    return (-tx, -ty, tz, *(float(v) for v in turned))


def record_scenario(out_dir: str | Path, cfg: ScenarioConfig = ScenarioConfig(),
                    storage: str = "sqlite3", compressed: bool = False,
                    depth: bool = True, rear: bool = False,
                    drift: OdometryDrift = OdometryDrift()) -> RecordedScenario:
    """Render both laps and write the bags and the ground truth into ``out_dir``, one frame at
    a time (a 640x480 route with depth is gigabytes if held in memory)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".bag" if storage == "rosbag1" else "_bag"  # ROS 1: one file; rosbag2: a folder
    paths = {name: out / f"{name}{suffix}" for name in ("lap1", "lap2", "full")}
    truth = list(poses(cfg))
    ox, oy, oyaw = drift_planar([r[2] for r in truth], [r[3] for r in truth],
                                [r[4] for r in truth], drift)
    odometry = {r[1]: (float(a), float(b), float(c)) for r, a, b, c in zip(truth, ox, oy, oyaw)}
    bags = {name: _Recorder(p, cfg, storage, compressed, depth, odometry, rear)
            for name, p in paths.items()}
    world = World(cfg) if rear else None
    counts = {1: 0, 2: 0}
    gt = out / "ground_truth.csv"
    try:
        with open(gt, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["lap", "stamp_ns", "x", "y", "yaw"])
            for fr in drive(cfg):
                back = render(world, cfg, fr.x, fr.y, fr.yaw + math.pi, fr.lap) \
                    if world is not None else None
                bags["full"].write(fr, back)
                bags[f"lap{fr.lap}"].write(fr, back)
                counts[fr.lap] += 1
                w.writerow([fr.lap, fr.stamp_ns, f"{fr.x:.4f}", f"{fr.y:.4f}", f"{fr.yaw:.5f}"])
    finally:
        for bag in bags.values():
            bag.close()
    return RecordedScenario(paths["lap1"], paths["lap2"], paths["full"], gt,
                            (counts[1], counts[2]))


def read_ground_truth(path: str | Path) -> dict[int, tuple[int, float, float, float]]:
    """stamp_ns -> (lap, x, y, yaw)."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out[int(row["stamp_ns"])] = (int(row["lap"]), float(row["x"]), float(row["y"]),
                                         float(row["yaw"]))
    return out
