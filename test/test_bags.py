"""Real rosbag2 bags (sqlite3 and MCAP) written with rosbags and read back: images, every pose
message type, missing things, and damaged recordings."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.errors import BagError
from vpr_ros.mapdb.bag_reader import BagReader
from vpr_ros.mapdb.bag_writer import (NAVSAT_FIX, POSE_STAMPED, POSE_WITH_COVARIANCE_STAMPED,
                                      BagWriter, write_route_bag)

S = 1_000_000_000
T0 = 1_700_000_000 * S
N_FRAMES = 20
STORAGES = ["sqlite3", "mcap"]


def frame(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    """A distinct, smooth test image per index (so JPEG stays close and frames differ)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 4 + i * 10) % 256, (y * 5 + i * 3) % 256,
                     (x + y + i * 7) % 256], axis=-1).astype(np.uint8)


def yaw(deg: float) -> tuple[float, float, float, float]:
    return (0.0, 0.0, math.sin(math.radians(deg) / 2), math.cos(math.radians(deg) / 2))


def route_bag(path: Path, storage: str, **kw) -> Path:
    """10 Hz camera, 20 Hz odometry moving 1 m/s along x."""
    frames = [(T0 + i * S // 10, frame(i)) for i in range(N_FRAMES)]
    poses = [(T0 + i * S // 20, (0.05 * i, 0.0, 0.0), yaw(i)) for i in range(2 * N_FRAMES)]
    return write_route_bag(path, frames, poses, storage=storage, **kw)


@pytest.fixture(scope="module", params=STORAGES)
def bag(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return route_bag(tmp_path_factory.mktemp("bags") / f"route_{request.param}", request.param)


def test_both_storage_formats_are_real_rosbag2_and_detected(bag: Path) -> None:
    storage = bag.name.split("_")[1]
    assert (bag / "metadata.yaml").is_file()
    suffix = ".mcap" if storage == "mcap" else ".db3"
    assert [p.suffix for p in bag.iterdir() if p.name != "metadata.yaml"] == [suffix]
    with BagReader(bag) as reader:
        assert reader.storage == storage
        assert reader.topics == {"/camera/image_raw": "sensor_msgs/msg/Image",
                                 "/odom": "nav_msgs/msg/Odometry"}
        assert reader.message_counts == {"/camera/image_raw": N_FRAMES, "/odom": 2 * N_FRAMES}
        assert not reader.stats.damaged


def test_images_come_back_exactly_with_header_stamps(bag: Path) -> None:
    with BagReader(bag) as reader:
        frames = list(reader.images("/camera/image_raw"))
    assert [f.stamp_ns for f in frames] == [T0 + i * S // 10 for i in range(N_FRAMES)]
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.rgb, frame(i))
        assert f.frame_id == "camera" and f.index == i
    assert reader.stats.images_read == N_FRAMES and reader.stats.images_corrupt == 0


def test_odometry_comes_back_as_a_track(bag: Path) -> None:
    with BagReader(bag) as reader:
        track = reader.poses("/odom")
    assert len(track) == 2 * N_FRAMES
    assert track.stamps_ns[3] == T0 + 3 * S // 20
    assert track.positions[3] == pytest.approx((0.15, 0.0, 0.0))
    assert track.orientations[3] == pytest.approx(yaw(3))
    assert track.frame_id == "map" and track.gnss is None


def test_single_storage_file_path_is_accepted(bag: Path) -> None:
    storage_file = next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3"))
    with BagReader(storage_file) as reader:
        assert len(list(reader.images("/camera/image_raw"))) == N_FRAMES


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("msgtype", [POSE_STAMPED, POSE_WITH_COVARIANCE_STAMPED])
def test_pose_message_types(tmp_path: Path, storage: str, msgtype: str) -> None:
    with BagWriter(tmp_path / "b", storage) as w:
        w.add_pose_topic("/pose", msgtype, frame_id="odom")
        for i in range(5):
            w.write_pose("/pose", T0 + i * S, (i, 2.0 * i, 0.5), yaw(10 * i))
    with BagReader(tmp_path / "b") as reader:
        track = reader.poses("/pose")
    assert track.positions[4] == pytest.approx((4.0, 8.0, 0.5))
    assert track.orientations[2] == pytest.approx(yaw(20))
    assert track.frame_id == "odom"


@pytest.mark.parametrize("storage", STORAGES)
def test_navsatfix_becomes_local_enu_with_raw_fixes_kept(tmp_path: Path, storage: str) -> None:
    with BagWriter(tmp_path / "b", storage) as w:
        w.add_pose_topic("/fix", NAVSAT_FIX, frame_id="gps")
        w.write_navsat("/fix", T0, 0.0, 0.0, 0.0, status=-1)  # no fix yet: dropped
        w.write_navsat("/fix", T0 + S, 0.0, 0.0, 0.0)
        w.write_navsat("/fix", T0 + 2 * S, 0.0, 0.001, 0.0)
        w.write_navsat("/fix", T0 + 3 * S, 0.001, 0.001, 10.0)
    with BagReader(tmp_path / "b") as reader:
        track = reader.poses("/fix")
        assert reader.stats.poses_dropped == 1
    assert track.stamps_ns.tolist() == [T0 + S, T0 + 2 * S, T0 + 3 * S]
    assert track.positions[0] == pytest.approx((0, 0, 0))
    assert track.positions[1] == pytest.approx((111.3195, 0.0, 0.0), abs=2e-3)
    assert track.positions[2] == pytest.approx((111.3195, 110.5743, 10.0), abs=3e-3)
    assert track.gnss[2].tolist() == [0.001, 0.001, 10.0]
    assert track.orientations is None


@pytest.mark.parametrize("storage", STORAGES)
def test_compressed_images(tmp_path: Path, storage: str) -> None:
    frames = [(T0 + i * S, frame(i)) for i in range(4)]
    path = write_route_bag(tmp_path / "b", frames, storage=storage, pose_topic=None,
                           image_topic="/cam/compressed", compressed=True)
    with BagReader(path) as reader:
        assert reader.topics["/cam/compressed"] == "sensor_msgs/msg/CompressedImage"
        out = list(reader.images("/cam/compressed"))
    assert len(out) == 4
    for i, f in enumerate(out):
        assert np.abs(f.rgb.astype(int) - frame(i).astype(int)).mean() < 3.0


@pytest.mark.parametrize("encoding", ["bgr8", "mono16", "bayer_grbg8", "yuv422", "32FC1"])
def test_camera_encodings_inside_a_bag(tmp_path: Path, encoding: str) -> None:
    path = write_route_bag(tmp_path / "b", [(T0, frame(0))], pose_topic=None, encoding=encoding)
    with BagReader(path) as reader:
        (out,) = list(reader.images("/camera/image_raw"))
    assert out.rgb.shape == (48, 64, 3) and out.rgb.dtype == np.uint8
    if encoding == "bgr8":
        np.testing.assert_array_equal(out.rgb, frame(0))


def test_missing_bag_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BagError, match="does not exist.*rosbag2 directory"):
        BagReader(tmp_path / "nope")


def test_missing_topic_lists_the_available_ones(bag: Path) -> None:
    with BagReader(bag) as reader:
        with pytest.raises(BagError) as err:
            list(reader.images("/camera/rgb"))
    text = str(err.value)
    assert "/camera/rgb is not in bag" in text
    assert "/camera/image_raw (sensor_msgs/msg/Image)" in text
    assert "/odom (nav_msgs/msg/Odometry)" in text


def test_wrong_message_type_is_a_clear_error(bag: Path) -> None:
    with BagReader(bag) as reader:
        with pytest.raises(BagError, match="/odom .* has type nav_msgs/msg/Odometry; expected one"
                                           " of sensor_msgs/msg/Image"):
            list(reader.images("/odom"))
        with pytest.raises(BagError, match="expected one of nav_msgs/msg/Odometry"):
            reader.poses("/camera/image_raw")


def test_a_directory_that_is_not_a_bag(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BagError, match="no .db3 or .mcap storage file"):
        BagReader(tmp_path)
    (tmp_path / "x.mcap").write_bytes(b"garbage, not an mcap file" * 10)
    with pytest.raises(BagError, match="no topic could be recovered"):
        BagReader(tmp_path)


def test_writer_refuses_to_overwrite(bag: Path) -> None:
    with pytest.raises(BagError, match="already exists"):
        BagWriter(bag)


# --------------------------------------------------------------------------- damaged bags

@pytest.mark.parametrize("storage", STORAGES)
def test_corrupt_single_frames_are_skipped_and_counted(tmp_path: Path, storage: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(1)
    with BagWriter(tmp_path / "b", storage) as w:
        w.add_image_topic("/cam")
        w.write_image("/cam", T0, frame(0))
        w.write_raw("/cam", T0 + S, rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
        w.write_image("/cam", T0 + 2 * S, frame(2))
        # A well-formed message whose pixel data is shorter than step * height.
        types = w.typestore.types
        bad = types["sensor_msgs/msg/Image"](
            header=w._header(T0 + 3 * S, "camera"), height=48, width=64, encoding="rgb8",
            is_bigendian=0, step=192, data=np.zeros(100, np.uint8))
        w.write_message("/cam", bad, T0 + 3 * S)
        w.write_image("/cam", T0 + 4 * S, frame(4))
    with caplog.at_level(logging.WARNING), BagReader(tmp_path / "b") as reader:
        out = list(reader.images("/cam"))
    assert [f.index for f in out] == [0, 2, 4]
    np.testing.assert_array_equal(out[1].rgb, frame(2))
    assert reader.stats.images_corrupt == 2 and reader.stats.images_read == 3
    assert "skipping corrupt frame #1" in caplog.text
    assert "skipping corrupt frame #3" in caplog.text and "truncated" in caplog.text


def _copy(bag: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(bag, dest)
    storage_file = next(p for p in dest.iterdir() if p.suffix in (".mcap", ".db3"))
    return dest, storage_file


@pytest.mark.parametrize("fraction", [0.35, 0.8])
def test_truncated_bag_keeps_everything_before_the_cut(bag: Path, tmp_path: Path,
                                                       fraction: float,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    cut, storage_file = _copy(bag, tmp_path / "cut")
    os.truncate(storage_file, int(storage_file.stat().st_size * fraction))
    with caplog.at_level(logging.WARNING), BagReader(cut) as reader:
        frames = list(reader.images("/camera/image_raw"))
        track = reader.poses("/odom")
    assert reader.stats.damaged
    assert "damaged or incomplete" in caplog.text
    # A prefix of the recording, never nothing and never everything.
    assert 2 <= len(frames) < N_FRAMES
    assert [f.index for f in frames] == list(range(len(frames)))
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.rgb, frame(i))
    assert 4 <= len(track) < 2 * N_FRAMES
    assert track.positions[:, 0] == pytest.approx(0.05 * np.arange(len(track)))
    if fraction > 0.5:
        assert len(frames) >= N_FRAMES // 2


def test_garbage_in_the_middle_of_a_bag_loses_only_the_damaged_part(
        bag: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken, storage_file = _copy(bag, tmp_path / "garbage")
    size = storage_file.stat().st_size
    with storage_file.open("r+b") as fh:
        fh.seek(int(size * 0.25))
        fh.write(np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with caplog.at_level(logging.WARNING), BagReader(broken) as reader:
        frames = list(reader.images("/camera/image_raw"))
        track = reader.poses("/odom")
    assert reader.stats.damaged
    assert "salvag" in caplog.text.lower()
    # Frames after the damage are recovered too, in order, and intact ones are exact.
    assert len(frames) >= N_FRAMES - 3
    assert frames[-1].stamp_ns == T0 + (N_FRAMES - 1) * S // 10
    stamps = [f.stamp_ns for f in frames]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    np.testing.assert_array_equal(frames[-1].rgb, frame(N_FRAMES - 1))
    assert len(track) >= 2 * N_FRAMES - 6


def test_missing_metadata_yaml_is_salvaged_completely(bag: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    broken, _ = _copy(bag, tmp_path / "nometa")
    (broken / "metadata.yaml").unlink()
    with caplog.at_level(logging.WARNING), BagReader(broken) as reader:
        frames = list(reader.images("/camera/image_raw"))
        assert len(reader.poses("/odom")) == 2 * N_FRAMES
    assert len(frames) == N_FRAMES
    assert "metadata.yaml" in caplog.text or "damaged or incomplete" in caplog.text


def test_truncated_zstd_mcap_chunks_are_partly_recovered(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(12)]
    with BagWriter(tmp_path / "z", "mcap", compress_chunks=True) as w:
        w.add_image_topic("/cam")
        for i, img in enumerate(images):
            w.write_image("/cam", T0 + i * S, img)
    storage_file = tmp_path / "z" / "z.mcap"
    os.truncate(storage_file, storage_file.stat().st_size // 2)
    with BagReader(tmp_path / "z") as reader:
        frames = list(reader.images("/cam"))
    assert 3 <= len(frames) < 12
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.rgb, images[i])


def test_header_stamp_zero_falls_back_to_bag_time(tmp_path: Path) -> None:
    with BagWriter(tmp_path / "b") as w:
        w.add_image_topic("/cam")
        w.write_image("/cam", 0, frame(0), log_time_ns=T0 + 5)
    with BagReader(tmp_path / "b") as reader:
        (f,) = list(reader.images("/cam"))
    assert f.stamp_ns == T0 + 5


def test_split_recording_without_metadata_is_read_in_file_order(tmp_path: Path) -> None:
    # A crashed split recording: no metadata.yaml, parts _0 .. _10, the last one cut short.
    parts = tmp_path / "crashed"
    parts.mkdir()
    for k in range(11):
        part = write_route_bag(tmp_path / f"p{k}", [(T0 + k * S, frame(k))], pose_topic=None,
                               storage="mcap")
        (part / f"p{k}.mcap").rename(parts / f"crashed_{k}.mcap")
    last = parts / "crashed_10.mcap"
    os.truncate(last, last.stat().st_size // 3)
    with BagReader(parts) as reader:
        frames = list(reader.images("/camera/image_raw"))
    assert [f.stamp_ns for f in frames] == [T0 + k * S for k in range(10)]
    assert reader.stats.damaged


def test_vpr_bag_info(bag: Path, capsys: pytest.CaptureFixture) -> None:
    from vpr_ros.cli import main

    assert main(["bag", "info", str(bag), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["storage"] in ("sqlite3", "mcap") and not data["damaged"]
    assert data["topics"]["/odom"] == {"type": "nav_msgs/msg/Odometry", "messages": 2 * N_FRAMES}
    assert main(["bag", "info", str(bag)]) == 0
    assert "/camera/image_raw  sensor_msgs/msg/Image  (20 messages)" in capsys.readouterr().out
