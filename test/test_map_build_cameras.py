"""`vpr map build` with several cameras: every image topic is read with its own keyframe
selection, each keyframe records its camera, each camera's CameraInfo (its sibling topic)
becomes that camera's calibration in the map; a listed topic the bag lacks fails before any
encoding; options that name one camera's topics are refused with several."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from test_map_build import ThumbnailEncoder, frame, yaw
from vpr_ros.errors import BagError, ConfigError
from vpr_ros.mapdb.bag_writer import BagWriter
from vpr_ros.mapdb.build import build_map
from vpr_ros.mapdb.camera_rig import SensorOptions

S = 1_000_000_000
T0 = 1_700_000_000 * S
FRONT, REAR = "/front/image_raw", "/rear/image_raw"


def two_camera_bag(path: Path, n: int = 40, rear_info: bool = True) -> Path:
    """10 Hz front and rear cameras (the rear one at 5 Hz), odometry at 1 m/s along x, a
    CameraInfo beside each camera (the rear one optional)."""
    with BagWriter(path) as w:
        w.add_image_topic(FRONT, frame_id="front_optical")
        w.add_image_topic(REAR, frame_id="rear_optical")
        w.add_camera_info_topic("/front/camera_info", frame_id="front_optical")
        if rear_info:
            w.add_camera_info_topic("/rear/camera_info", frame_id="rear_optical")
        w.add_pose_topic("/odom")
        for i in range(n):
            t = T0 + i * S // 10
            w.write_pose("/odom", t, (0.1 * i, 0.0, 0.0), yaw(0.0))
            w.write_image(FRONT, t, frame(i))
            w.write_camera_info("/front/camera_info", t, SimpleNamespace(
                width=64, height=48, k=(50.0, 0, 32, 0, 50.0, 24, 0, 0, 1), d=(),
                distortion_model="none"))
            if i % 2 == 0:
                w.write_image(REAR, t, frame(i + 100))
                if rear_info:
                    w.write_camera_info("/rear/camera_info", t, SimpleNamespace(
                        width=64, height=48, k=(60.0, 0, 32, 0, 60.0, 24, 0, 0, 1), d=(),
                        distortion_model="none"))
    return path


def test_each_camera_selects_and_names_its_keyframes(tmp_path: Path) -> None:
    bag = two_camera_bag(tmp_path / "rig")
    pm, summary = build_map(bag, [FRONT, REAR], ThumbnailEncoder(), tmp_path / "map",
                            pose_topic="/odom", session="run")
    kfs = pm.keyframes(range(len(pm)))
    by_camera = {c: [k for k in kfs if k.camera == c] for c in (FRONT, REAR)}
    # 4 m driven, a keyframe per metre (the default policy) for each camera on its own
    assert len(by_camera[FRONT]) == len(by_camera[REAR]) >= 4
    assert summary.keyframes_per_camera == {c: len(v) for c, v in by_camera.items()}
    for c, ks in by_camera.items():
        xs = [k.position[0] for k in ks]
        assert xs == sorted(xs) and np.min(np.diff(xs)) >= 0.95   # per-camera spacing
        assert all(k.source_topic == c and k.session == "run" for k in ks)
    assert pm.camera("run", FRONT).k[0] == 50.0 and pm.camera("run", REAR).k[0] == 60.0
    assert summary.frames_read == 40 + 20 and summary.calibrated
    assert "per camera" in summary.format()


def test_a_camera_without_camera_info_is_kept_uncalibrated_with_a_note(tmp_path: Path) -> None:
    bag = two_camera_bag(tmp_path / "rig", n=12, rear_info=False)
    pm, summary = build_map(bag, [FRONT, REAR], ThumbnailEncoder(), None, pose_topic="/odom")
    assert pm.camera(summary.session, FRONT) is not None
    assert pm.camera(summary.session, REAR) is None and not summary.calibrated
    assert any(w.startswith(f"{REAR}: no CameraInfo") for w in summary.warnings)


def test_a_listed_topic_the_bag_lacks_fails_before_encoding(tmp_path: Path) -> None:
    bag = two_camera_bag(tmp_path / "rig", n=4)
    loaded = []

    def factory():
        loaded.append(1)
        return ThumbnailEncoder()

    with pytest.raises(BagError, match=r"/left/image_raw is not in bag .*available topics"):
        build_map(bag, [FRONT, "/left/image_raw"], factory, None)
    assert not loaded
    with pytest.raises(ConfigError, match="each once"):
        build_map(bag, [FRONT, FRONT], factory, None)
    with pytest.raises(ConfigError, match="describe one camera"):
        build_map(bag, [FRONT, REAR], factory, None,
                  sensors=SensorOptions(camera_info_topic="/front/camera_info"))


def test_vpr_map_build_takes_several_image_topics(tmp_path: Path) -> None:
    from vpr_ros.cli import build_parser

    args = build_parser().parse_args(["map", "build", "bag", "--image-topic", FRONT, REAR,
                                      "--model", "m", "-o", "maps/x"])
    assert args.image_topic == [FRONT, REAR]
    again = build_parser().parse_args(["map", "build", "bag", "--image-topic", FRONT,
                                       "--image-topic", REAR, "--model", "m", "-o", "maps/x"])
    assert again.image_topic == [FRONT, REAR]
