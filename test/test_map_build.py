"""Maps built from real rosbags: poses interpolated, keyframes selected, encoded, saved, reloaded,
appended, merged and plotted; plus the `vpr map` commands with a real model directory."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.errors import BagError, ConfigError, MapError, MapMismatchError
from vpr_ros.mapdb.bag_writer import NAVSAT_FIX, BagWriter, write_route_bag
from vpr_ros.mapdb.build import (BuildConfig, build_config_from_mapping, build_map,
                                 load_build_config)
from vpr_ros.mapdb.keyframe_selection import KeyframePolicy
from vpr_ros.mapdb.place_map import PlaceMap

REPO = Path(__file__).resolve().parents[1]
S = 1_000_000_000
T0 = 1_700_000_000 * S


def frame(i: int) -> np.ndarray:
    y, x = np.mgrid[0:48, 0:64]
    return np.stack([(x * 4 + i * 10) % 256, (y * 5 + i * 3) % 256,
                     (x + y + i * 7) % 256], axis=-1).astype(np.uint8)


def yaw(deg: float) -> tuple[float, float, float, float]:
    return (0.0, 0.0, math.sin(math.radians(deg) / 2), math.cos(math.radians(deg) / 2))


class ThumbnailEncoder:
    """A deterministic stand-in for the CNN: the L2-normalised 4x4 colour thumbnail. It keeps
    these pipeline tests fast; the `vpr map` tests below use a real model directory."""

    dim = 48
    fingerprint = "thumbnail-test-encoder"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        self.batches.append(len(images))
        rows = []
        for img in images:
            h, w = img.shape[:2]
            thumb = img[: h - h % 4, : w - w % 4].reshape(4, h // 4, 4, w // 4, 3).mean((1, 3))
            v = thumb.reshape(-1).astype(np.float64) + 1.0
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, dtype=np.float32)


def straight_route(path: Path, storage: str = "sqlite3", n: int = 40, odom_start_s: float = 0.0,
                   pose_topic: str | None = "/odom") -> Path:
    """10 Hz camera; 20 Hz odometry driving 1 m/s along x while turning 2 deg/s."""
    frames = [(T0 + i * S // 10, frame(i)) for i in range(n)]
    poses = [(T0 + i * S // 20, (0.05 * i, 0.0, 0.0), yaw(0.1 * i)) for i in range(2 * n)
             if i * 0.05 >= odom_start_s]
    return write_route_bag(path, frames, poses if pose_topic else [], storage=storage,
                           pose_topic=pose_topic)


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_build_with_odometry_selects_by_distance_and_saves(tmp_path: Path, storage: str) -> None:
    bag = straight_route(tmp_path / f"run_{storage}", storage)
    enc = ThumbnailEncoder()
    pm, summary = build_map(bag, "/camera/image_raw", enc, tmp_path / "map",
                            pose_topic="/odom", config=BuildConfig(batch_size=3))
    # 4 s at 1 m/s with a keyframe per metre: frames 0, 10, 20, 30.
    assert summary.frames_read == 40 and summary.frames_corrupt == 0
    assert summary.keyframes == 4 and summary.keyframes_with_pose == 4
    assert summary.pose_samples == 80 and summary.map_size == 4
    assert enc.batches == [3, 1]
    loaded = PlaceMap.load(tmp_path / "map", expected_fingerprint=enc.fingerprint)
    kfs = loaded.keyframes(range(4))
    assert [k.stamp_ns for k in kfs] == [T0 + i * S for i in range(4)]
    assert [k.position[0] for k in kfs] == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert kfs[2].orientation == pytest.approx(yaw(4.0))
    assert {k.session for k in kfs} == {f"run_{storage}"}
    assert kfs[0].frame_id == "map" and kfs[0].source_topic == "/camera/image_raw"
    assert kfs[0].source_bag == str(bag.resolve())
    # The stored descriptor of keyframe 2 is the encoding of frame 20.
    ids, scores = loaded.search(enc.encode([frame(20)]), k=1)
    assert int(ids[0, 0]) == 2 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_stamps_only_map_without_pose_topic(tmp_path: Path) -> None:
    bag = straight_route(tmp_path / "run", pose_topic=None, n=25)
    pm, summary = build_map(bag, "/camera/image_raw", ThumbnailEncoder(), tmp_path / "map",
                            config=BuildConfig(keyframes=KeyframePolicy(interval_s=1.0)))
    assert summary.keyframes == 3 and summary.keyframes_without_pose == 3
    info = PlaceMap.load(tmp_path / "map").info()
    assert info["has_poses"] is False and info["count"] == 3
    assert pm.keyframe(1).position is None and pm.keyframe(1).frame_id == "camera"


def test_frames_outside_the_odometry_get_no_pose(tmp_path: Path) -> None:
    # Odometry starts 1.5 s after the camera: earlier frames are keyframed by time, unposed.
    bag = straight_route(tmp_path / "run", odom_start_s=1.5)
    pm, summary = build_map(bag, "/camera/image_raw", ThumbnailEncoder(), None,
                            pose_topic="/odom")
    kfs = pm.keyframes(range(len(pm)))
    assert [k.position is None for k in kfs][:3] == [True, True, False]
    assert kfs[2].stamp_ns == T0 + 15 * S // 10  # first frame with a pose anchors a keyframe
    assert summary.keyframes_without_pose == 2
    assert summary.keyframes_with_pose == len(pm) - 2


def test_navsatfix_poses_keep_the_raw_fix(tmp_path: Path) -> None:
    with BagWriter(tmp_path / "gps", "mcap") as w:
        w.add_image_topic("/cam")
        w.add_pose_topic("/fix", NAVSAT_FIX)
        for i in range(31):
            w.write_navsat("/fix", T0 + i * S // 10, 45.0, 7.0 + i * 1e-5, 300.0)
        for i in range(0, 31, 2):
            w.write_image("/cam", T0 + i * S // 10, frame(i))
    pm, summary = build_map(tmp_path / "gps", "/cam", ThumbnailEncoder(), None,
                            pose_topic="/fix")
    # 1e-5 deg of longitude at 45 deg N is 0.788 m: a keyframe every 2 fixes ~ every 1.58 m.
    kf = pm.keyframe(1)
    assert kf.frame_id == "local_enu" and kf.orientation is None
    assert kf.gnss == pytest.approx((45.0, 7.0 + 2e-5, 300.0))
    assert kf.position[0] == pytest.approx(2 * 0.7885, abs=0.01)
    assert summary.keyframes == 16


def test_corrupt_frames_are_counted_in_the_summary(tmp_path: Path) -> None:
    with BagWriter(tmp_path / "b") as w:
        w.add_image_topic("/cam")
        for i in range(6):
            if i == 3:
                w.write_raw("/cam", T0 + i * S, b"\x00\x01\x00\x00garbage")
            else:
                w.write_image("/cam", T0 + i * S, frame(i))
    _, summary = build_map(tmp_path / "b", "/cam", ThumbnailEncoder(), None)
    assert summary.frames_read == 5 and summary.frames_corrupt == 1 and summary.keyframes == 5
    assert "1 corrupt" in summary.format()
    assert any("corrupt frame #3" in w for w in summary.warnings)


def test_truncated_bag_still_builds_a_map(tmp_path: Path) -> None:
    bag = straight_route(tmp_path / "run", "mcap")
    storage_file = bag / "run.mcap"
    os.truncate(storage_file, storage_file.stat().st_size // 2)
    _, summary = build_map(bag, "/camera/image_raw", ThumbnailEncoder(), tmp_path / "map",
                           pose_topic="/odom")
    assert summary.bag_damaged and 0 < summary.frames_read < 40
    assert "DAMAGED" in summary.format()
    assert len(PlaceMap.load(tmp_path / "map")) == summary.keyframes > 0


def test_a_bag_with_no_decodable_frame_is_an_error(tmp_path: Path) -> None:
    with BagWriter(tmp_path / "b") as w:
        w.add_image_topic("/cam")
        w.write_raw("/cam", T0, b"junk")
    with pytest.raises(BagError, match="no decodable frame on /cam .*1 corrupt"):
        build_map(tmp_path / "b", "/cam", ThumbnailEncoder(), tmp_path / "map")
    assert not (tmp_path / "map").exists()


def test_wrong_topics_fail_before_any_encoding(tmp_path: Path) -> None:
    bag = straight_route(tmp_path / "run", n=5)
    enc = ThumbnailEncoder()
    with pytest.raises(BagError, match="/odometry is not in bag.*available topics"):
        build_map(bag, "/camera/image_raw", enc, None, pose_topic="/odometry")
    with pytest.raises(BagError, match="has type sensor_msgs/msg/Image; expected one of nav_msgs"):
        build_map(bag, "/camera/image_raw", enc, None, pose_topic="/camera/image_raw")
    assert enc.batches == []


def test_existing_output_is_refused_unless_appending(tmp_path: Path) -> None:
    enc = ThumbnailEncoder()
    run1 = straight_route(tmp_path / "run1", n=12)
    run2 = straight_route(tmp_path / "run2", "mcap", n=12)
    build_map(run1, "/camera/image_raw", enc, tmp_path / "map", pose_topic="/odom")
    with pytest.raises(MapError, match="already exists.*--append"):
        build_map(run2, "/camera/image_raw", enc, tmp_path / "map", pose_topic="/odom")
    with pytest.raises(MapError, match="session 'run1' is already in the map"):
        build_map(run1, "/camera/image_raw", enc, tmp_path / "map", append=True)
    _, summary = build_map(run2, "/camera/image_raw", enc, tmp_path / "map",
                           pose_topic="/odom", append=True)
    assert summary.map_size == 4
    assert PlaceMap.load(tmp_path / "map").info()["sessions"] == {"run1": 2, "run2": 2}


def test_appending_with_another_model_is_refused(tmp_path: Path) -> None:
    build_map(straight_route(tmp_path / "run1", n=5), "/camera/image_raw", ThumbnailEncoder(),
              tmp_path / "map")

    class OtherModel(ThumbnailEncoder):
        fingerprint = "some-other-model"

    with pytest.raises(MapMismatchError, match="fingerprint"):
        build_map(straight_route(tmp_path / "run2", n=5), "/camera/image_raw", OtherModel(),
                  tmp_path / "map", append=True)
    assert PlaceMap.load(tmp_path / "map").sessions() == ["run1"]


def test_batch_size_does_not_change_the_map(tmp_path: Path) -> None:
    bag = straight_route(tmp_path / "run", n=30)
    a, _ = build_map(bag, "/camera/image_raw", ThumbnailEncoder(), None, pose_topic="/odom",
                     config=BuildConfig(batch_size=1))
    b, _ = build_map(bag, "/camera/image_raw", ThumbnailEncoder(), None, pose_topic="/odom",
                     config=BuildConfig(batch_size=64))
    assert len(a) == len(b) == 3
    np.testing.assert_array_equal(np.asarray(a.descriptors()), np.asarray(b.descriptors()))


def test_shipped_config_equals_the_built_in_defaults() -> None:
    assert load_build_config(REPO / "config" / "map_build.yaml") == BuildConfig()
    assert load_build_config(None) == BuildConfig()


@pytest.mark.parametrize("data,match", [
    ({"keyframes": {"distance_m": -1}}, "distance_m must be a positive"),
    ({"poses": {"max_gap": 1}}, "unknown poses option"),
    ({"mapping": {}}, "unknown section"),
    ({"map": {"index": "annoy"}}, "map.index 'annoy' is not one of"),
    ({"encoding": {"batch_size": 0}}, "batch size must be a positive"),
])
def test_bad_configs_are_refused(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_config_from_mapping(data)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_build_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------ `vpr map` with a real model

@pytest.fixture(scope="module")
def small_model(effnet_qaa_model_dir: Path) -> Path:
    """A real model directory (packaged ImageNet EfficientNet-Lite0 + QAA head, 1024-D), shared
    with the rest of the suite through conftest."""
    return effnet_qaa_model_dir


def _vpr(*argv: str) -> int:
    from vpr_ros.cli import main

    return main(list(argv))


def test_vpr_map_build_info_merge_plot(tmp_path: Path, small_model: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    run1 = straight_route(tmp_path / "run1", "sqlite3", n=20)
    run2 = straight_route(tmp_path / "run2", "mcap", n=20)
    m1, m2, merged = tmp_path / "m1", tmp_path / "m2", tmp_path / "merged"
    assert _vpr("map", "build", str(run1), "--image-topic", "/camera/image_raw",
                "--pose-topic", "/odom", "--model", str(small_model), "-o", str(m1),
                "--no-progress") == 0
    text = capsys.readouterr().out
    assert "keyframes:     2 added to session 'run1' (2 with pose, 0 without)" in text
    assert _vpr("map", "build", str(run2), "--image-topic", "/camera/image_raw",
                "--model", str(small_model), "-o", str(m2), "--index", "hnsw",
                "--batch-size", "1", "--session", "second", "--json", "--no-progress") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["keyframes"] == 2 and summary["keyframes_without_pose"] == 2
    assert summary["session"] == "second"

    assert _vpr("map", "info", str(m1), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 2 and info["has_poses"] and info["dim"] == 1024
    assert _vpr("map", "info", str(m2)) == 0
    text = capsys.readouterr().out
    assert "index hnsw" in text and "no (stamps only)" in text

    assert _vpr("map", "merge", str(m1), str(m2), "-o", str(merged)) == 0
    capsys.readouterr()
    loaded = PlaceMap.load(merged)
    assert len(loaded) == 4 and loaded.sessions() == ["run1", "second"]
    # A frame of run 1 finds its own keyframe in the merged map.
    from vpr_ros.runtime.encoder import load_encoder

    query = load_encoder(small_model).encode([frame(10)])
    ids, _ = loaded.search(query, k=1)
    assert loaded.keyframe(int(ids[0, 0])).stamp_ns == T0 + S

    png = tmp_path / "merged.png"
    assert _vpr("map", "plot", str(merged), "-o", str(png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    stamps_png = tmp_path / "m2.png"
    assert _vpr("map", "plot", str(m2), "-o", str(stamps_png)) == 0
    assert stamps_png.stat().st_size > 10_000


def test_vpr_map_merge_refuses_maps_of_different_models(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    enc = ThumbnailEncoder()
    build_map(straight_route(tmp_path / "a", n=5), "/camera/image_raw", enc, tmp_path / "ma")
    other = PlaceMap.create(enc.dim, "another-model")
    v = np.ones((1, enc.dim), np.float32) / math.sqrt(enc.dim)
    from vpr_ros.mapdb.keyframe import Keyframe

    other.add(v, [Keyframe(session="x", stamp_ns=1)])
    other.save(tmp_path / "mb")
    assert _vpr("map", "merge", str(tmp_path / "ma"), str(tmp_path / "mb"), "-o",
                str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "different models" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_vpr_map_build_reports_a_missing_topic_before_loading_the_model(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bag = straight_route(tmp_path / "run", n=3)
    assert _vpr("map", "build", str(bag), "--image-topic", "/cam", "--model",
                str(tmp_path / "no-such-model"), "-o", str(tmp_path / "m"), "--no-progress") == 2
    err = capsys.readouterr().err
    assert "topic /cam is not in bag" in err and "/camera/image_raw (sensor_msgs/msg/Image)" in err
