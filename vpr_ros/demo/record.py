"""Record the demo scenario as real bags (rosbag2, or ROS 1), the way a robot's recorder would.

Three bags are written: ``lap1`` (mapping run), ``lap2`` (the revisit the node relocalises in)
and ``full`` (both laps back to back, for loop closure within one run), plus
``ground_truth.csv`` with every frame's pose, which the report compares against.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from vpr_ros.demo.scenario import Frame, ScenarioConfig, drive
from vpr_ros.mapdb.bag_writer import ODOMETRY, BagWriter

IMAGE_TOPIC = "/camera/image_raw"
ODOM_TOPIC = "/odom"


@dataclass(frozen=True)
class RecordedScenario:
    lap1: Path
    lap2: Path
    full: Path
    ground_truth: Path
    frames_per_lap: tuple[int, int]


def _write(path: Path, frames: Iterable[Frame], storage: str, compressed: bool) -> None:
    with BagWriter(path, storage) as writer:
        writer.add_image_topic(IMAGE_TOPIC, compressed=compressed, frame_id="camera")
        writer.add_pose_topic(ODOM_TOPIC, ODOMETRY, frame_id="map", child_frame_id="base_link")
        for fr in frames:
            writer.write_pose(ODOM_TOPIC, fr.stamp_ns, (fr.x, fr.y, 0.0), fr.quaternion)
            writer.write_image(IMAGE_TOPIC, fr.stamp_ns, fr.image)


def record_scenario(out_dir: str | Path, cfg: ScenarioConfig = ScenarioConfig(),
                    storage: str = "sqlite3", compressed: bool = False) -> RecordedScenario:
    """Render both laps and write the bags and the ground truth into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = list(drive(cfg))
    lap1 = [f for f in frames if f.lap == 1]
    lap2 = [f for f in frames if f.lap == 2]
    suffix = ".bag" if storage == "rosbag1" else "_bag"  # ROS 1: one file; rosbag2: a folder
    paths = {name: out / f"{name}{suffix}" for name in ("lap1", "lap2", "full")}
    for name, subset in (("lap1", lap1), ("lap2", lap2), ("full", frames)):
        if paths[name].is_dir():
            import shutil

            shutil.rmtree(paths[name])
        elif paths[name].exists():
            paths[name].unlink()
        _write(paths[name], subset, storage, compressed)
    gt = out / "ground_truth.csv"
    with open(gt, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lap", "stamp_ns", "x", "y", "yaw"])
        for fr in frames:
            w.writerow([fr.lap, fr.stamp_ns, f"{fr.x:.4f}", f"{fr.y:.4f}", f"{fr.yaw:.5f}"])
    return RecordedScenario(paths["lap1"], paths["lap2"], paths["full"], gt,
                            (len(lap1), len(lap2)))


def read_ground_truth(path: str | Path) -> dict[int, tuple[int, float, float, float]]:
    """stamp_ns -> (lap, x, y, yaw)."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out[int(row["stamp_ns"])] = (int(row["lap"]), float(row["x"]), float(row["y"]),
                                         float(row["yaw"]))
    return out
