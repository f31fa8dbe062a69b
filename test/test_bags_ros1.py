"""ROS 1 bags (``.bag``, format 2.0) written by the tests with rosbags' ROS 1 writer and Noetic
definitions, read without any conversion step: raw and compressed images, Odometry,
PoseStamped and NavSatFix; LZ4 chunks; recordings killed mid-write, cut short or overwritten
in the middle; connections whose message definitions are unusable; split recordings; and the
``vpr bag info`` / ``vpr map build`` commands on them."""

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
from vpr_ros.mapdb.bag_writer import (COMPRESSED_IMAGE, NAVSAT_FIX, POSE_STAMPED, BagWriter,
                                      write_route_bag)

S = 1_000_000_000
T0 = 1_700_000_000 * S
N = 20


def frame(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 4 + i * 10) % 256, (y * 5 + i * 3) % 256,
                     (x + y + i * 7) % 256], axis=-1).astype(np.uint8)


def noise(i: int) -> np.ndarray:
    """Incompressible frames, so a bag spans several chunks and a cut lands inside data."""
    return np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def yaw(deg: float) -> tuple[float, float, float, float]:
    return (0.0, 0.0, math.sin(math.radians(deg) / 2), math.cos(math.radians(deg) / 2))


def route_bag(path: Path, **kw) -> Path:
    """10 Hz camera, 20 Hz odometry moving 1 m/s along x (the rosbag2 tests' route)."""
    frames = [(T0 + i * S // 10, frame(i)) for i in range(N)]
    poses = [(T0 + i * S // 20, (0.05 * i, 0.0, 0.0), yaw(i)) for i in range(2 * N)]
    return write_route_bag(path, frames, poses, storage="rosbag1", **kw)


def chunked_bag(path: Path, count: int = 40, compress: bool = False,
                close: bool = True) -> Path:
    """Noise frames at 1 Hz in 64 KiB chunks (``rosbag record`` uses 768 KiB); with
    ``close=False`` the file is copied while the writer is still open, as a recorder killed
    mid-write leaves it (no index, ``index_pos`` 0)."""
    with BagWriter(path.with_name("writing.bag") if not close else path, "rosbag1",
                   compress_chunks=compress) as w:
        w._writer.chunk_threshold = 64 * 1024
        w.add_image_topic("/cam")
        for i in range(count):
            w.write_image("/cam", T0 + i * S, noise(i))
        if not close:
            w._writer.bio.flush()
            shutil.copyfile(w.path, path)
    return path


@pytest.fixture(scope="module")
def bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return route_bag(tmp_path_factory.mktemp("ros1") / "route.bag")


def test_the_file_is_a_real_ros1_bag_with_noetic_definitions(bag: Path) -> None:
    from rosbags.rosbag1 import Reader
    from rosbags.typesys import Stores, get_typestore

    assert bag.read_bytes().startswith(b"#ROSBAG V2.0\n")
    noetic = get_typestore(Stores.ROS1_NOETIC)
    with Reader(bag) as raw:
        conns = {c.topic: c for c in raw.connections}
        assert conns["/camera/image_raw"].digest == \
            noetic.generate_msgdef("sensor_msgs/msg/Image")[1]
        _, _, data = next(raw.messages(connections=[conns["/camera/image_raw"]]))
    msg = noetic.deserialize_ros1(data, "sensor_msgs/msg/Image")
    assert msg.header.seq == 0 and msg.height == 48  # the ROS 1 wire format, seq included


def test_storage_topics_and_counts(bag: Path) -> None:
    with BagReader(bag) as reader:
        assert reader.storage == "rosbag1"
        assert reader.topics == {"/camera/image_raw": "sensor_msgs/msg/Image",
                                 "/odom": "nav_msgs/msg/Odometry"}
        assert reader.message_counts == {"/camera/image_raw": N, "/odom": 2 * N}
        assert not reader.stats.damaged and reader.unreadable == {}


def test_images_and_odometry_come_back_exactly(bag: Path) -> None:
    with BagReader(bag) as reader:
        frames = list(reader.images("/camera/image_raw"))
        track = reader.poses("/odom")
    assert [f.stamp_ns for f in frames] == [T0 + i * S // 10 for i in range(N)]
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.rgb, frame(i))
        assert f.frame_id == "camera" and f.index == i
    assert len(track) == 2 * N and track.frame_id == "map"
    assert track.positions[3] == pytest.approx((0.15, 0.0, 0.0))
    assert track.orientations[3] == pytest.approx(yaw(3))


def test_messages_are_handed_on_as_ros2_cdr(bag: Path) -> None:
    """What `vpr bag play` publishes: CDR of the ROS 2 type (no seq), readable by the ROS 2
    typestore like any rosbag2 message."""
    from rosbags.typesys import Stores, get_typestore

    kilted = get_typestore(Stores.ROS2_KILTED)
    with BagReader(bag) as reader:
        first = next(reader.messages(["/odom"]))
    msg = kilted.deserialize_cdr(bytes(first.data), "nav_msgs/msg/Odometry")
    assert msg.header.frame_id == "map" and msg.child_frame_id == "base_link"
    assert msg.pose.pose.orientation.w == pytest.approx(1.0)


def test_compressed_images_pose_stamped_and_navsatfix(tmp_path: Path) -> None:
    with BagWriter(tmp_path / "mixed.bag", "rosbag1") as w:
        w.add_image_topic("/cam/compressed", compressed=True)
        w.add_pose_topic("/pose", POSE_STAMPED)
        w.add_pose_topic("/fix", NAVSAT_FIX, frame_id="gps")
        for i in range(6):
            w.write_image("/cam/compressed", T0 + i * S, frame(i))
            w.write_pose("/pose", T0 + i * S, (float(i), 2.0, 0.0), yaw(10 * i))
            w.write_navsat("/fix", T0 + i * S, 59.0 + i * 1e-5, 10.0, 5.0,
                           status=-1 if i == 2 else 0)
    with BagReader(tmp_path / "mixed.bag") as reader:
        assert reader.topics["/cam/compressed"] == COMPRESSED_IMAGE
        frames = list(reader.images("/cam/compressed"))
        pose = reader.poses("/pose")
        fix = reader.poses("/fix")
    assert len(frames) == 6
    assert np.abs(frames[3].rgb.astype(int) - frame(3)).mean() < 4  # JPEG
    assert pose.positions[:, 0] == pytest.approx(np.arange(6.0))
    assert pose.orientations[5] == pytest.approx(yaw(50))
    assert len(fix) == 5 and fix.gnss is not None            # the no-fix sample dropped
    assert fix.positions[1, 1] == pytest.approx(1.11, abs=0.01)  # 1e-5 deg north ~ 1.11 m


def test_lz4_chunks(tmp_path: Path) -> None:
    bag = chunked_bag(tmp_path / "lz4.bag", compress=True)
    with BagReader(bag) as reader:
        frames = list(reader.images("/cam"))
    assert len(frames) == 40 and not reader.stats.damaged
    np.testing.assert_array_equal(frames[-1].rgb, noise(39))


def test_one_corrupt_message_is_skipped_and_counted(tmp_path: Path) -> None:
    with BagWriter(tmp_path / "c.bag", "rosbag1") as w:
        w.add_image_topic("/cam")
        w.write_image("/cam", T0, frame(0))
        w.write_raw("/cam", T0 + S, b"\x01\x02\x03")
        w.write_image("/cam", T0 + 2 * S, frame(2))
    with BagReader(tmp_path / "c.bag") as reader:
        frames = list(reader.images("/cam"))
    assert [f.index for f in frames] == [0, 2]
    assert reader.stats.images_corrupt == 1


# ------------------------------------------------------------------------------- damaged bags

@pytest.mark.parametrize("compress", [False, True], ids=["plain", "lz4"])
@pytest.mark.parametrize("fraction", [0.3, 0.75])
def test_cut_off_bag_keeps_everything_before_the_cut(tmp_path: Path, compress: bool,
                                                     fraction: float,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    bag = chunked_bag(tmp_path / "whole.bag", compress=compress)
    cut = tmp_path / "cut.bag"
    shutil.copyfile(bag, cut)
    os.truncate(cut, int(cut.stat().st_size * fraction))
    with caplog.at_level(logging.WARNING), BagReader(cut) as reader:
        frames = list(reader.images("/cam"))
    assert reader.storage == "rosbag1" and reader.stats.damaged
    assert "damaged or incomplete" in caplog.text
    assert int(40 * fraction) - 8 <= len(frames) < 40
    for i, f in enumerate(frames):  # a prefix, every frame exact
        assert f.stamp_ns == T0 + i * S
        np.testing.assert_array_equal(f.rgb, noise(i))


def test_recording_killed_mid_write_has_no_index_and_is_salvaged(tmp_path: Path) -> None:
    bag = chunked_bag(tmp_path / "killed.bag", close=False)
    assert b"index_pos=" + b"\x00" * 8 in bag.read_bytes()[:4096]  # never indexed
    with BagReader(bag) as reader:
        assert reader.topics == {"/cam": "sensor_msgs/msg/Image"}
        assert reader.message_counts == {"/cam": -1}          # unknown until read
        frames = list(reader.images("/cam"))
    assert reader.stats.damaged
    # Everything in the chunks flushed before the kill (64 KiB of ~9 KiB frames each).
    assert 30 <= len(frames) < 40
    np.testing.assert_array_equal(frames[-1].rgb, noise(len(frames) - 1))


def test_garbage_in_the_middle_loses_only_the_damaged_part(tmp_path: Path) -> None:
    bag = chunked_bag(tmp_path / "g.bag")
    size = bag.stat().st_size
    with bag.open("r+b") as fh:
        fh.seek(int(size * 0.5))
        fh.write(np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with BagReader(bag) as reader:
        frames = list(reader.images("/cam"))
    stamps = [f.stamp_ns for f in frames]
    assert stamps == sorted(stamps) and len(frames) >= 36
    assert frames[-1].stamp_ns == T0 + 39 * S
    # ROS 1 bags carry no checksum: the one frame the garbage landed in cannot be told apart.
    wrong = [f for f in frames if not np.array_equal(f.rgb, noise((f.stamp_ns - T0) // S))]
    assert len(wrong) <= 1


def test_split_recording_in_a_directory(tmp_path: Path) -> None:
    parts = tmp_path / "split"
    parts.mkdir()
    for k in range(11):  # _10 after _9: numeric order
        write_route_bag(parts / f"run_{k}.bag", [(T0 + k * S, frame(k))], pose_topic=None,
                        storage="rosbag1")
    with BagReader(parts) as reader:
        assert reader.storage == "rosbag1"
        assert reader.message_counts == {"/camera/image_raw": 11}
        frames = list(reader.images("/camera/image_raw"))
    assert [f.stamp_ns for f in frames] == [T0 + k * S for k in range(11)]


def test_an_empty_or_foreign_file_named_bag_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty.bag").write_bytes(b"")
    (tmp_path / "text.bag").write_text("not a bag at all\n" * 100)
    for name in ("empty.bag", "text.bag"):
        with pytest.raises(BagError, match="no topic could be recovered"):
            BagReader(tmp_path / name)


# ---------------------------------------------------------------------- message definitions

def _bag_with_unusable_definitions(path: Path) -> Path:
    """An image topic plus three connections whose definitions the bag does not carry
    usably: garbage text, a reference to an undefined type, and an empty definition of a
    standard type (with its true md5sum, as some ROS 1 tools record it)."""
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    noetic = get_typestore(Stores.ROS1_NOETIC)
    with BagWriter(path, "rosbag1") as w:
        w.add_image_topic("/cam")
        raw: Writer = w._writer
        garbage = raw.add_connection("/garbage", "acme_msgs/msg/Blob", msgdef="%% not a msg %%",
                                     md5sum="0" * 32)
        dangling = raw.add_connection("/dangling", "acme_msgs/msg/Track",
                                      msgdef="acme_msgs/Segment[] segments\nuint32 id\n",
                                      md5sum="1" * 32)
        md5 = noetic.generate_msgdef("geometry_msgs/msg/PoseStamped")[1]
        empty = raw.add_connection("/pose", "geometry_msgs/msg/PoseStamped", msgdef="",
                                   md5sum=md5)
        for i in range(3):
            w.write_image("/cam", T0 + i * S, frame(i))
            raw.write(garbage, T0 + i * S, b"\x00" * 8)
            raw.write(dangling, T0 + i * S, b"\x00" * 8)
        types = noetic.types
        pose = types["geometry_msgs/msg/PoseStamped"](
            header=types["std_msgs/msg/Header"](
                seq=0, stamp=types["builtin_interfaces/msg/Time"](sec=T0 // S, nanosec=0),
                frame_id="map"),
            pose=types["geometry_msgs/msg/Pose"](
                position=types["geometry_msgs/msg/Point"](x=1.0, y=2.0, z=3.0),
                orientation=types["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0)))
        raw.write(empty, T0, noetic.serialize_ros1(pose, "geometry_msgs/msg/PoseStamped"))
    return path


def test_unusable_definitions_cost_only_their_topics(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    bag = _bag_with_unusable_definitions(tmp_path / "defs.bag")
    with caplog.at_level(logging.WARNING), BagReader(bag) as reader:
        assert set(reader.topics) == {"/cam", "/garbage", "/dangling", "/pose"}
        assert set(reader.unreadable) == {"/garbage", "/dangling"}
        assert "cannot be parsed" in reader.unreadable["/garbage"]
        assert "acme_msgs/msg/Segment" in reader.unreadable["/dangling"]
        assert len(list(reader.images("/cam"))) == 3
        # The empty definition of a standard type falls back to the standard one (same md5).
        assert reader.poses("/pose").positions[0] == pytest.approx((1.0, 2.0, 3.0))
        with pytest.raises(BagError, match=r"/garbage .*cannot be decoded"):
            reader.check_topic("/garbage", ("acme_msgs/msg/Blob",))
        assert [m.topic for m in reader.messages()].count("/cam") == 3
    assert "standard definition is used" in caplog.text


def test_vpr_bag_info_names_the_storage_and_unreadable_topics(
        bag: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vpr_ros.cli import main

    assert main(["bag", "info", str(bag), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["storage"] == "rosbag1" and data["damaged"] is False
    assert data["topics"]["/odom"] == {"type": "nav_msgs/msg/Odometry", "messages": 2 * N}
    assert main(["bag", "info", str(bag)]) == 0
    out = capsys.readouterr().out
    assert "(rosbag1)" in out and "/camera/image_raw  sensor_msgs/msg/Image  (20 messages)" in out
    defs = _bag_with_unusable_definitions(tmp_path / "defs.bag")
    assert main(["bag", "info", str(defs)]) == 0
    out = capsys.readouterr().out
    assert "/garbage" in out and "UNREADABLE" in out


def test_vpr_map_build_on_an_unreadable_topic_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vpr_ros.cli import main

    defs = _bag_with_unusable_definitions(tmp_path / "defs.bag")
    code = main(["map", "build", str(defs), "--image-topic", "/cam", "--pose-topic", "/garbage",
                 "--model", str(tmp_path / "no_model"), "-o", str(tmp_path / "map")])
    err = capsys.readouterr().err
    assert code == 2 and "/garbage" in err and "cannot be decoded" in err
    assert "Traceback" not in err and not (tmp_path / "map").exists()


# ------------------------------------------------------------------------------- map building

def test_map_from_a_ros1_bag_equals_the_map_from_the_same_rosbag2_recording(
        tmp_path: Path) -> None:
    from test_map_build import ThumbnailEncoder

    from vpr_ros.mapdb.build import build_map

    ros1 = route_bag(tmp_path / "route.bag")
    frames = [(T0 + i * S // 10, frame(i)) for i in range(N)]
    poses = [(T0 + i * S // 20, (0.05 * i, 0.0, 0.0), yaw(i)) for i in range(2 * N)]
    ros2 = write_route_bag(tmp_path / "route_sqlite", frames, poses)
    maps = {}
    for name, path in (("ros1", ros1), ("ros2", ros2)):
        pm, summary = build_map(path, "/camera/image_raw", ThumbnailEncoder(),
                                tmp_path / f"map_{name}", pose_topic="/odom", session="s")
        assert summary.frames_read == N and summary.keyframes_with_pose == summary.keyframes
        maps[name] = pm
    a, b = maps["ros1"], maps["ros2"]
    assert len(a) == len(b) > 1
    ka, kb = a.keyframes(range(len(a))), b.keyframes(range(len(b)))
    assert [k.stamp_ns for k in ka] == [k.stamp_ns for k in kb]
    assert [k.position for k in ka] == [k.position for k in kb]
    np.testing.assert_array_equal(a.descriptors(), b.descriptors())
    assert ka[0].source_bag.endswith("route.bag")


def test_the_demo_records_its_scenario_as_ros1_bags(tmp_path: Path) -> None:
    """`vpr demo --storage rosbag1`: camera, CameraInfo (ROS 1's K, D, R, P), registered depth,
    odometry and /tf_static all written as ROS 1 and read back as ROS 2 messages."""
    from vpr_ros.demo.record import record_scenario
    from vpr_ros.demo.scenario import ScenarioConfig

    cfg = ScenarioConfig(block_length_m=8.0, block_width_m=6.0, image_size=(60, 80))
    rec = record_scenario(tmp_path, cfg, storage="rosbag1")
    assert rec.lap1.suffix == ".bag" and rec.lap1.read_bytes().startswith(b"#ROSBAG V2.0")
    with BagReader(rec.full) as reader:
        assert reader.storage == "rosbag1" and reader.unreadable == {}
        n = sum(rec.frames_per_lap)
        assert reader.message_counts["/camera/image_raw"] == n
        camera = reader.camera_info("/camera/camera_info", "/camera/image_raw")
        assert (camera.width, camera.height) == (80, 60) and camera.k[0] > 0
        assert set(reader.static_transforms().frames()) == {"base_link", "camera_optical"}
        depth = next(reader.images("/camera/depth/image_raw"))
        assert depth.rgb.shape[:2] == (60, 80)
        assert len(reader.poses("/odom")) == n
