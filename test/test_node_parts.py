"""The node's parts without a running node: mailbox, pose buffer, frame conversion and error
kinds, output message layouts, parameter declarations, config files and launch files."""

from __future__ import annotations

import ast
import dataclasses
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")

from vpr_ros.errors import ConfigError  # noqa: E402
from vpr_ros.localization import (Candidate, LoopClosure, LoopClosureConfig,  # noqa: E402
                                  Relocalization, RelocalizerConfig)
from vpr_ros.ros import conversions as conv  # noqa: E402
from vpr_ros.ros.conversions import PoseSample  # noqa: E402
from vpr_ros.ros.diagnostics import (FrameTiming, LogThrottle, NodeIdentity,  # noqa: E402
                                     NodeStats, status_fields)
from vpr_ros.ros.mailbox import Mailbox  # noqa: E402
from vpr_ros.ros.params import (NodeConfig, all_parameter_specs, descriptor_for,  # noqa: E402
                                settings_from_values)
from vpr_ros.ros.pose_buffer import PoseBuffer  # noqa: E402
from vpr_ros.runtime.image_codec import encode_compressed, encode_image  # noqa: E402
from test_node_common import assert_declared, flatten_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NS = 1_000_000_000


# ----------------------------------------------------------------------------------- mailbox

def test_mailbox_newest_wins_and_counts_drops() -> None:
    box: Mailbox[int] = Mailbox()
    assert box.put(1) is None
    assert box.put(2) == 1 and box.put(3) == 2
    assert box.pending == 1 and box.dropped == 2
    assert box.get(timeout=0.01) == 3
    assert box.get(timeout=0.01) is None and box.pending == 0


def test_mailbox_wakes_a_waiting_consumer_and_close_releases_it() -> None:
    box: Mailbox[str] = Mailbox()
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(box.get(timeout=5.0)))
    t.start()
    time.sleep(0.05)
    box.put("frame")
    t.join(2.0)
    assert got == ["frame"]
    t2 = threading.Thread(target=lambda: got.append(box.get(timeout=30.0)))
    start = time.monotonic()
    t2.start()
    box.close()
    t2.join(5.0)
    assert not t2.is_alive() and got[-1] is None and time.monotonic() - start < 5.0


# ------------------------------------------------------------------------------- pose buffer

def _sample(t_s: float, x: float, yaw: float = 0.0, frame: str = "odom") -> PoseSample:
    return PoseSample(int(t_s * NS), (x, 0.0, 0.0),
                      (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)), frame)


def test_pose_buffer_interpolates_between_close_samples() -> None:
    buf = PoseBuffer(horizon_s=10, max_gap_s=0.5, tolerance_s=0.05)
    buf.add(_sample(10.0, 0.0, 0.0))
    buf.add(_sample(10.2, 2.0, math.pi / 2))
    pose, frame = buf.at(int(10.05 * NS))
    assert pose.position[0] == pytest.approx(0.5) and frame == "odom"
    yaw = 2 * math.atan2(pose.orientation[2], pose.orientation[3])
    assert yaw == pytest.approx(math.pi / 8, abs=1e-6)


def test_pose_buffer_nearest_only_within_tolerance_and_never_extrapolates() -> None:
    buf = PoseBuffer(horizon_s=10, max_gap_s=0.5, tolerance_s=0.05)
    buf.add(_sample(10.0, 0.0))
    buf.add(_sample(11.0, 5.0))  # 1 s gap: too far apart to interpolate
    assert buf.at(int(10.5 * NS)) is None
    assert buf.at(int(10.96 * NS))[0].position[0] == 5.0       # nearest, 40 ms away
    assert buf.at(int(11.04 * NS))[0].position[0] == 5.0       # after the last, within tolerance
    assert buf.at(int(11.2 * NS)) is None                      # beyond: no extrapolation
    assert buf.at(int(9.0 * NS)) is None


def test_pose_buffer_keeps_order_horizon_and_clears_on_clock_reset() -> None:
    buf = PoseBuffer(horizon_s=1.0, max_gap_s=0.5, tolerance_s=0.0, time_jump_s=1.0)
    for t in (10.0, 10.4, 10.2, 10.8, 11.2):  # one late sample, inserted in order
        assert buf.add(_sample(t, t))
    assert len(buf) == 4  # 10.0 fell out of the 1 s horizon
    assert buf.at(int(10.3 * NS))[0].position[0] == pytest.approx(10.3)
    assert not buf.add(_sample(3.0, 0.0))  # clock went back 8 s: a reset, old timeline dropped
    assert len(buf) == 1 and buf.time_jumps == 1


# ------------------------------------------------------------------- frames and their errors

class _Msg:
    """Duck-typed message fields (the conversions only read attributes)."""

    def __init__(self, **fields: object) -> None:
        self.__dict__.update(fields)


def _raw(rgb: np.ndarray, encoding: str = "rgb8") -> _Msg:
    r = encode_image(rgb, encoding)
    return _Msg(height=r.height, width=r.width, encoding=r.encoding, step=r.step, data=r.data,
                is_bigendian=r.is_bigendian)


def _rgb(h: int = 24, w: int = 32) -> np.ndarray:
    return (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)


def test_frames_decode_to_rgb() -> None:
    rgb = _rgb()
    assert np.array_equal(conv.frame_to_rgb(_raw(rgb, "bgr8"), False, 10_000), rgb)
    fmt, data = encode_compressed(rgb, "png")
    assert np.array_equal(conv.frame_to_rgb(_Msg(format=fmt, data=data), True, 10_000), rgb)


@pytest.mark.parametrize("make, kind", [
    (lambda: _Msg(height=4, width=4, encoding="fancy16", step=64, data=b"\0" * 64,
                  is_bigendian=0), conv.UNSUPPORTED_ENCODING),
    (lambda: _Msg(height=0, width=0, encoding="rgb8", step=0, data=b"", is_bigendian=0),
     conv.EMPTY_IMAGE),
    (lambda: _Msg(height=20000, width=20000, encoding="mono8", step=20000, data=b"\0" * 10,
                  is_bigendian=0), conv.OVERSIZED_IMAGE),
    (lambda: _Msg(height=24, width=32, encoding="rgb8", step=96, data=b"\0" * 100,
                  is_bigendian=0), conv.CORRUPT_IMAGE),
])
def test_raw_frame_errors_have_kinds(make, kind) -> None:
    with pytest.raises(conv.FrameError) as info:
        conv.frame_to_rgb(make(), False, 1_000_000)
    assert info.value.kind == kind and str(info.value)


def test_compressed_frame_errors_have_kinds() -> None:
    fmt, data = encode_compressed(_rgb(240, 320), "jpeg")
    with pytest.raises(conv.FrameError) as info:
        conv.frame_to_rgb(_Msg(format=fmt, data=data[: len(data) // 2]), True, 1_000_000)
    assert info.value.kind == conv.CORRUPT_IMAGE
    with pytest.raises(conv.FrameError) as info:
        conv.frame_to_rgb(_Msg(format=fmt, data=b""), True, 1_000_000)
    assert info.value.kind == conv.EMPTY_IMAGE
    # A valid JPEG over the pixel limit is refused from its header, before decoding.
    with pytest.raises(conv.FrameError) as info:
        conv.frame_to_rgb(_Msg(format=fmt, data=data), True, 320 * 240 - 1)
    assert info.value.kind == conv.OVERSIZED_IMAGE and "max_pixels" in str(info.value)


def test_stamp_classification() -> None:
    jump = 1 * NS
    assert conv.classify_stamp(5 * NS, None, jump) is None
    assert conv.classify_stamp(5 * NS, 4 * NS, jump) is None
    assert conv.classify_stamp(5 * NS, 5 * NS, jump) == conv.STAMP_BACKWARDS
    assert conv.classify_stamp(4 * NS, 4 * NS + NS // 2, jump) == conv.STAMP_BACKWARDS
    assert conv.classify_stamp(1 * NS, 9 * NS, jump) == conv.TIME_JUMP


def test_pose_messages_are_validated() -> None:
    from geometry_msgs.msg import PoseStamped
    from nav_msgs.msg import Odometry

    odom = Odometry()
    odom.header.stamp.sec, odom.header.stamp.nanosec, odom.header.frame_id = 12, 5, "odom"
    odom.pose.pose.position.x, odom.pose.pose.orientation.w = 3.0, 2.0
    s = conv.odometry_to_pose(odom)
    assert s.stamp_ns == 12 * NS + 5 and s.position == (3.0, 0.0, 0.0)
    assert s.orientation == (0.0, 0.0, 0.0, 1.0) and s.frame_id == "odom"
    bad = PoseStamped()
    bad.pose.orientation.w = 0.0  # an all-zero quaternion
    with pytest.raises(conv.FrameError) as info:
        conv.pose_stamped_to_pose(bad)
    assert info.value.kind == conv.BAD_POSE


# ---------------------------------------------------------------------------------- messages

def test_candidates_cloud_round_trip_and_typed_fields() -> None:
    from sensor_msgs.msg import PointField

    from vpr_ros.ros.messages import candidates_cloud, cloud_to_array

    cands = [Candidate(7, 0.91, 1_500_000_000_123, (1.0, 2.0, 0.5), (0.0, 0.0, 0.0, 1.0)),
             Candidate(3, 0.80, 1_400_000_000_000)]
    msg = candidates_cloud(cands, 2_000_000_000_000, "map")
    assert (msg.header.frame_id, msg.header.stamp.sec) == ("map", 2000)
    types = {f.name: f.datatype for f in msg.fields}
    assert list(types) == ["x", "y", "z", "qx", "qy", "qz", "qw", "score", "keyframe_id",
                           "stamp", "rank", "camera"]
    assert types["camera"] == PointField.INT16
    assert types["x"] == PointField.FLOAT32 and types["stamp"] == PointField.FLOAT64
    assert types["keyframe_id"] == PointField.UINT32 and types["rank"] == PointField.UINT32
    assert msg.width == 2 and msg.row_step == msg.point_step * 2 and not msg.is_dense
    arr = cloud_to_array(msg)
    assert arr["keyframe_id"].tolist() == [7, 3] and arr["rank"].tolist() == [0, 1]
    assert arr["stamp"][0] == pytest.approx(1500.000000123, abs=1e-9)
    assert arr["x"][0] == 1.0 and math.isnan(arr["x"][1])
    assert arr["score"][0] == pytest.approx(0.91)
    assert arr["camera"].tolist() == [0, 0]  # one camera
    two = cloud_to_array(candidates_cloud(cands, 1, "map", cameras=[1, -1]))
    assert two["camera"].tolist() == [1, -1]
    empty = candidates_cloud([], 1, "map")
    assert empty.width == 0 and len(cloud_to_array(empty)) == 0


def test_loop_closure_message_labels_every_field_stamps_first() -> None:
    from vpr_ros.ros.messages import LOOP_CLOSURE_FIELDS, loop_closure_msg, parse_loop_closure

    closure = LoopClosure(query_stamp_ns=2_000_500_000_000, match_id=42,
                          match_stamp_ns=1_000_000_000_000, score=0.93, consistent_count=3,
                          match_position=(1.0, 2.0, 3.0), match_orientation=(0, 0, 0, 1))
    msg = loop_closure_msg(closure, query_keyframe_id=99)
    assert msg.layout.dim[0].label.split(",") == list(LOOP_CLOSURE_FIELDS)
    assert msg.layout.dim[0].size == len(msg.data) == msg.layout.dim[0].stride
    assert LOOP_CLOSURE_FIELDS[:2] == ("query_stamp_s", "match_stamp_s")
    fields = parse_loop_closure(msg)
    assert fields["query_stamp_s"] == pytest.approx(2000.5)
    assert fields["match_stamp_s"] == 1000.0 and fields["match_keyframe_id"] == 42
    assert fields["query_keyframe_id"] == 99 and fields["match_z"] == 3.0
    assert fields["consistent_count"] == 3 and fields["score"] == pytest.approx(0.93)
    unposed = parse_loop_closure(loop_closure_msg(
        LoopClosure(1, 2, 3, 0.9, 3), query_keyframe_id=None))
    assert unposed["query_keyframe_id"] == -1 and math.isnan(unposed["match_x"])
    assert fields["camera"] == 0 and "camera" in LOOP_CLOSURE_FIELDS
    assert parse_loop_closure(loop_closure_msg(closure, 99, camera=1))["camera"] == 1
    # geometric verification: unverified -> verified 0 and NaN pose; verified -> the pose
    assert fields["verified"] == 0 and math.isnan(fields["rel_tx"]) and \
        math.isnan(fields["cov_55"])
    from vpr_ros.localization.verification import RelativePose, Verification

    cov = tuple(float(i) for i in range(36))
    v = Verification(42, True, "", "pnp", 80, 60, 0.75, 0.4,
                     RelativePose((0.0, 0.0, 0.1, 0.995), (0.5, -0.1, 2.0), True, cov))
    got = parse_loop_closure(loop_closure_msg(
        dataclasses.replace(closure, verification=v), 99))
    assert got["verified"] == 1 and got["inliers"] == 60 and got["rel_metric"] == 1
    assert (got["rel_tx"], got["rel_ty"], got["rel_tz"]) == (0.5, -0.1, 2.0)
    assert got["rel_qw"] == 0.995 and got["cov_00"] == 0 and got["cov_12"] == 8.0 and \
        got["cov_55"] == 35.0
    assert len(LOOP_CLOSURE_FIELDS) == 17 + 10 + 36


def test_relocalization_message_carries_pose_and_covariance() -> None:
    from vpr_ros.ros.messages import relocalization_msg

    cov = tuple(float(i) for i in range(36))
    reloc = Relocalization(stamp_ns=5 * NS + 7, keyframe_id=1, score=0.9, consistent_count=3,
                           margin=0.1, spread_m=0.2, position=(1.0, 2.0, 0.0),
                           orientation=(0.0, 0.0, 0.0, 1.0), has_orientation=True,
                           covariance=cov, supporting_ids=(1, 2, 3))
    msg = relocalization_msg(reloc, "map")
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == (5, 7, "map")
    assert msg.pose.pose.position.y == 2.0 and list(msg.pose.covariance) == list(cov)


def test_markers_for_a_frame() -> None:
    from visualization_msgs.msg import Marker

    from vpr_ros.ros.messages import frame_markers, keyframes_marker

    cands = [Candidate(1, 0.9, 1, (1.0, 0.0, 0.0)), Candidate(2, 0.5, 2)]
    arr = frame_markers(cands, (0.0, 0.0, 0.0), 10, "map", 0.6)
    spheres, lines = arr.markers
    assert spheres.type == Marker.SPHERE_LIST and len(spheres.points) == 1
    assert lines.type == Marker.LINE_LIST and len(lines.points) == 2
    assert frame_markers(cands, None, 10, "map", 0.6).markers[1].action == Marker.DELETE
    pos = np.array([[0, 0, 0], [np.nan] * 3, [1, 1, 0], [2, 2, 0]], dtype=float)
    assert len(keyframes_marker(pos, 1, "map", 2).points) == 2


# ---------------------------------------------------------------------------- diagnostics

def test_log_throttle_per_kind_with_suppressed_count() -> None:
    now = [0.0]
    throttle = LogThrottle(5.0, clock=lambda: now[0])
    assert throttle.check("corrupt_image") == 0
    assert throttle.check("corrupt_image") is None and throttle.check("corrupt_image") is None
    assert throttle.check("empty_image") == 0      # kinds are throttled independently
    now[0] = 5.1
    assert throttle.check("corrupt_image") == 2    # says how many were held back
    assert throttle.emitted["corrupt_image"] == 2


def test_status_reports_rates_latencies_errors_and_state() -> None:
    stats = NodeStats(window=3)
    for i in range(5):
        stats.frame(FrameTiming(i, encode=0.010 * (i + 1), total=0.020 * (i + 1)))
    stats.error("corrupt_image")
    stats.count("dropped", 4)
    snap = stats.snapshot()
    assert snap.window == 3 and snap.processed == 5
    ident = NodeIdentity(lifecycle_state="active", mode="localization",
                         backend="openvino-cpu-bf16", backend_choice="openvino:bf16",
                         backend_note="auto: openvino:bf16 17.5 ms/frame", fingerprint="abc",
                         map_size=10,
                         map_search="cpu (GPU search off after an error: out of memory)")
    level, message, values = status_fields(snap, ident, 10.0, 5.0)
    kv = dict(values)
    assert kv["backend_choice"] == "openvino:bf16" and kv["backend_auto"].startswith("auto: ")
    assert level == 0 and "5.0 of 10.0" in message
    assert float(kv["latency_encode_p50_ms"]) == pytest.approx(40.0)  # window: frames 3..5
    assert kv["frames_dropped"] == "4" and kv["errors.corrupt_image"] == "1"
    for key in ("input_rate_hz", "processed_rate_hz", "latency_total_p95_ms", "map_size",
                "backend", "model_fingerprint", "lifecycle_state", "errors_total"):
        assert key in kv
    assert kv["map_search"] == "cpu (GPU search off after an error: out of memory)"
    assert status_fields(snap, NodeIdentity(lifecycle_state="inactive"), 0, 0)[0] == 1
    assert status_fields(snap, NodeIdentity(problem="configure failed: x"), 0, 0)[0] == 2


# ---------------------------------------------------------------------------- parameters

def test_every_parameter_has_a_description_and_numbers_have_ranges() -> None:
    specs = all_parameter_specs()
    names = [s.name for s in specs]
    for f in RelocalizerConfig.parameter_specs():
        assert f"relocalization.{f.name}" in names
    for f in LoopClosureConfig.parameter_specs():
        assert f"loop_closure.{f.name}" in names
    assert_declared(specs)
    mode = descriptor_for(next(s for s in specs if s.name == "mode"))
    assert "loop_closure" in mode.additional_constraints


def test_node_config_refuses_bad_values_with_the_field_named() -> None:
    with pytest.raises(ConfigError, match="mode"):
        NodeConfig(mode="slam")
    with pytest.raises(ConfigError, match="top_k"):
        NodeConfig(top_k=0)
    with pytest.raises(ConfigError, match="no parameter"):
        settings_from_values({"loop_closure.min_scor": 0.5})


def _params_file(name: str) -> dict:
    doc = yaml.safe_load((REPO / "config" / name).read_text())
    assert list(doc) == ["vpr_node"] and list(doc["vpr_node"]) == ["ros__parameters"]
    return doc["vpr_node"]["ros__parameters"]


@pytest.mark.parametrize("name, mode, section, cls", [
    ("vpr_localization.yaml", "localization", "relocalization", RelocalizerConfig),
    ("vpr_loop_closure.yaml", "loop_closure", "loop_closure", LoopClosureConfig),
])
def test_config_files_hold_valid_defaults_for_declared_parameters(name, mode, section, cls) -> None:
    values = flatten_params(_params_file(name))
    specs = {s.name: s for s in all_parameter_specs()}
    for key, value in values.items():
        assert key in specs, f"{name}: {key} is not a parameter of vpr_node"
        spec = specs[key]
        # ROS refuses an int for a double parameter: the files must write 1.0, not 1.
        assert type(value) is spec.type, f"{name}: {key} = {value!r} is not {spec.type.__name__}"
    for f in cls.parameter_specs():  # the mode's decision tunables are all visible in the file
        assert f"{section}.{f.name}" in values, f"{name} lacks {section}.{f.name}"
    assert values["mode"] == mode
    settings = settings_from_values(values)  # validates every range
    assert settings.node.mode == mode


# ------------------------------------------------------------------------------ launch files

@pytest.mark.parametrize("name, config", [
    ("vpr_localization.launch.py", "vpr_localization.yaml"),
    ("vpr_loop_closure.launch.py", "vpr_loop_closure.yaml"),
])
def test_launch_files_parse_and_wire_existing_configs(name, config) -> None:
    path = REPO / "launch" / name
    source = path.read_text()
    tree = ast.parse(source, str(path))
    compile(tree, str(path), "exec")
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    assert config in strings and (REPO / "config" / config).is_file()
    declared = {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", getattr(n.func, "attr", "")) == "DeclareLaunchArgument"}
    assert {"model", "map", "camera_topic", "image_transport"} <= declared
    assert {"vpr_node", "vpr_ros", "LifecycleNode"} <= strings | _names(tree)
    assert "image" in strings  # the camera topic is wired by a remap of the node's 'image'


def _names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


# ---------------------------------------------------------------------------- stage timing

def test_encode_is_timed_in_stages_on_the_host_path_and_whole_otherwise() -> None:
    from vpr_ros.ros.pipeline import encode_one, host_preprocessing
    from vpr_ros.runtime.encoder import Encoder
    from vpr_ros.runtime.preprocess import Preprocessing

    class Host(Encoder):
        dim, input_size, fingerprint, backend = 4, (8, 8), "fake", "fake-cpu"

        @property
        def preprocessing(self) -> Preprocessing:
            return Preprocessing((8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

        def _encode_batch(self, batch: np.ndarray) -> np.ndarray:
            return np.tile([[1.0, 0.0, 0.0, 0.0]], (len(batch), 1)).astype(np.float32)

    class Device(Host):
        backend = "fake-cuda"

        def encode(self, images):  # preprocessing inside, as a GPU backend does
            return self._encode_batch(np.zeros((len(images), 3, 8, 8), np.float32))

    rgb = np.zeros((16, 16, 3), np.uint8)
    timing = FrameTiming(0)
    out = encode_one(Host(), rgb, timing)
    assert out.shape == (1, 4) and host_preprocessing(Host())
    assert timing.preprocess >= 0 and timing.encode >= 0
    assert set(timing.cpu) == {"preprocess", "encode"}
    timing = FrameTiming(0)
    assert not host_preprocessing(Device())
    encode_one(Device(), rgb, timing)
    assert math.isnan(timing.preprocess) and timing.encode >= 0
