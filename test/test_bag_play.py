"""`vpr bag play`: a real rclpy subscriber (its own process) receives every Image and Odometry
message of a written bag, in order, bit-exact, with the recorded timing at rate 1 and faster at
rate 4; a ROS 1 bag the same way; --loop, --topics and --start-offset; plus the pure scheduling
rules."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vpr_ros._bootstrap import env_with_ros_libs
from vpr_ros.errors import ConfigError
from vpr_ros.mapdb.bag_reader import RawMessage
from vpr_ros.mapdb.bag_writer import write_route_bag
from vpr_ros.ros.bag_play import PlayOptions, playback_schedule

S = 1_000_000_000
T0 = 1_700_000_000 * S
N_IMAGES = 10  # 10 Hz camera and 20 Hz odometry over one second

SUBSCRIBER = r"""
import json, sys, time
import numpy as np
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from nav_msgs.msg import Odometry

out_path, stop_path = sys.argv[1], sys.argv[2]
rclpy.init()
node = rclpy.create_node("vpr_test_listener")
qos = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
out = open(out_path, "a")

def record(topic, msg, extra):
    stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
    out.write(json.dumps({"topic": topic, "t": time.monotonic(), "stamp": stamp, **extra}) + "\n")
    out.flush()

def on_image(msg):
    pixels = np.frombuffer(bytes(msg.data), np.uint8)
    record("/camera/image_raw", msg, {"sum": int(pixels.astype(np.int64).sum()),
                                      "shape": [msg.height, msg.width], "enc": msg.encoding})

def on_odom(msg):
    record("/odom", msg, {"x": msg.pose.pose.position.x})

node.create_subscription(Image, "/camera/image_raw", on_image, qos)
node.create_subscription(Odometry, "/odom", on_odom, qos)
print("READY", flush=True)
import os
deadline = time.monotonic() + 900  # a safety net only: the module's last test writes stop_path
while not os.path.exists(stop_path) and time.monotonic() < deadline:
    rclpy.spin_once(node, timeout_sec=0.05)
node.destroy_node()
rclpy.shutdown()
"""


def frame(i: int) -> np.ndarray:
    y, x = np.mgrid[0:48, 0:64]
    return np.stack([(x * 4 + i * 10) % 256, (y * 5 + i * 3) % 256,
                     (x + y + i * 7) % 256], axis=-1).astype(np.uint8)


def _ros_env() -> dict[str, str]:
    env = env_with_ros_libs()
    # A private DDS domain on this machine only: parallel test runs never hear each other.
    env["ROS_DOMAIN_ID"] = str(20 + os.getpid() % 80)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    return env


def _rclpy_loads(env: dict[str, str]) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import rclpy, sensor_msgs.msg, nav_msgs.msg"],
                           env=env, capture_output=True, timeout=120)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def ros_env() -> dict[str, str]:
    env = _ros_env()
    if not _rclpy_loads(env):
        pytest.skip("rclpy (ros-kilted wheels) cannot be loaded in this environment")
    return env


@pytest.fixture(scope="module")
def bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("play")
    frames = [(T0 + i * S // 10, frame(i)) for i in range(N_IMAGES)]
    poses = [(T0 + i * S // 20, (0.05 * i, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))
             for i in range(2 * N_IMAGES)]
    return write_route_bag(root / "route", frames, poses, storage="mcap")


class Listener:
    """The subscriber process and what it has recorded so far."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.out, self.stop = tmp / "received.jsonl", tmp / "stop"
        self.proc = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, str(self.out),
                                      str(self.stop)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", self.proc.stderr.read()

    def records(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(x) for x in self.out.read_text().splitlines() if x.strip()]

    def mark(self) -> int:
        """Where the next test's messages start (the listener serves the whole module)."""
        return len(self.records())

    def wait_for(self, start: int, count: int, timeout: float = 30.0) -> list[dict]:
        """The records after ``start`` once there are ``count`` of them (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.records()[start:]
            if len(got) >= count:
                return got
            time.sleep(0.05)
        return self.records()[start:]

    def close(self) -> None:
        self.stop.write_text("stop")
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def listener(ros_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    lis = Listener(ros_env, tmp_path_factory.mktemp("listener"))
    yield lis
    lis.close()


def _play_cmd(bag: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from vpr_ros.cli import main; "
            "sys.exit(main(sys.argv[1:]))", "bag", "play", str(bag), "--wait-subscribers", "20",
            *extra]


def _play(env: dict[str, str], bag: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_play_cmd(bag, *extra), env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done


# The rate-1 span measured by the first test, to compare rate 4 against.
_RATE1_SPAN: list[float] = []


def _span(records: list[dict]) -> float:
    return records[-1]["t"] - records[0]["t"]


def test_every_message_arrives_in_order_with_recorded_timing(
        ros_env: dict[str, str], bag: Path, listener: Listener) -> None:
    start = listener.mark()
    done = _play(ros_env, bag, "--rate", "1")
    assert "published 30 messages" in done.stdout
    got = listener.wait_for(start, 3 * N_IMAGES)
    images = [r for r in got if r["topic"] == "/camera/image_raw"]
    odom = [r for r in got if r["topic"] == "/odom"]
    assert [r["stamp"] for r in images] == [T0 + i * S // 10 for i in range(N_IMAGES)]
    assert [r["stamp"] for r in odom] == [T0 + i * S // 20 for i in range(2 * N_IMAGES)]
    # Bit-exact payloads: the pixel sums of what was written.
    assert [r["sum"] for r in images] == [int(frame(i).astype(np.int64).sum())
                                          for i in range(N_IMAGES)]
    assert images[0]["shape"] == [48, 64] and images[0]["enc"] == "rgb8"
    assert [r["x"] for r in odom] == pytest.approx([0.05 * i for i in range(2 * N_IMAGES)])
    # Recorded span: 0.95 s from the first to the last message (loose bounds).
    everything = sorted(got, key=lambda r: r["t"])
    assert 0.6 < _span(everything) < 3.0
    _RATE1_SPAN.append(_span(everything))
    gaps = np.diff([r["t"] for r in images])
    assert 0.05 < float(np.median(gaps)) < 0.3


def test_rate_4_plays_faster(ros_env: dict[str, str], bag: Path, listener: Listener) -> None:
    if not _RATE1_SPAN:  # run alone: measure rate 1 here
        start = listener.mark()
        _play(ros_env, bag, "--rate", "1")
        _RATE1_SPAN.append(_span(sorted(listener.wait_for(start, 3 * N_IMAGES),
                                        key=lambda r: r["t"])))
    start = listener.mark()
    _play(ros_env, bag, "--rate", "4")
    got = sorted(listener.wait_for(start, 3 * N_IMAGES), key=lambda r: r["t"])
    assert len(got) == 3 * N_IMAGES
    # Nominally 0.95 s / 4 = 0.24 s; loose bounds so a loaded machine does not make it flaky.
    assert _span(got) < 1.0 and _span(got) < 0.7 * _RATE1_SPAN[0]
    images = [r["stamp"] for r in got if r["topic"] == "/camera/image_raw"]
    assert images == sorted(images)


def test_topics_and_start_offset(ros_env: dict[str, str], bag: Path,
                                 listener: Listener) -> None:
    start = listener.mark()
    _play(ros_env, bag, "--topics", "/odom", "--start-offset", "0.5", "--rate", "4")
    got = listener.wait_for(start, N_IMAGES)
    time.sleep(0.3)  # anything wrongly published would have arrived by now
    got = listener.records()[start:]
    assert {r["topic"] for r in got} == {"/odom"}
    assert [r["stamp"] for r in got] == [T0 + i * S // 20 for i in range(10, 2 * N_IMAGES)]


def test_unknown_topic_is_a_clean_error(ros_env: dict[str, str], bag: Path) -> None:
    done = subprocess.run(_play_cmd(bag, "--topics", "/nope"), env=ros_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "/nope not in bag" in done.stderr and "/odom (nav_msgs/msg/Odometry)" in done.stderr


def test_a_ros1_bag_plays_as_ros2_messages(ros_env: dict[str, str], tmp_path: Path,
                                           listener: Listener) -> None:
    """A ROS 1 .bag, no conversion step: ROS 2 subscribers get every Image and Odometry,
    bit-exact, in order; a corrupt ROS 1 message is not published and is counted."""
    from vpr_ros.mapdb.bag_writer import BagWriter

    bag = tmp_path / "route.bag"
    with BagWriter(bag, "rosbag1") as w:
        w.add_image_topic("/camera/image_raw")
        w.add_pose_topic("/odom")
        for i in range(2 * N_IMAGES):
            w.write_pose("/odom", T0 + i * S // 20, (0.05 * i, 0.0, 0.0))
            if i % 2 == 0:
                w.write_image("/camera/image_raw", T0 + i * S // 20, frame(i // 2))
        w.write_raw("/camera/image_raw", T0 + 2 * S, b"\x05\x00")
    start = listener.mark()
    done = _play(ros_env, bag, "--rate", "4")
    assert "published 30 messages" in done.stdout
    assert "1 undecodable message(s) not published" in done.stdout
    got = listener.wait_for(start, 3 * N_IMAGES)
    images = [r for r in got if r["topic"] == "/camera/image_raw"]
    odom = [r for r in got if r["topic"] == "/odom"]
    assert [r["stamp"] for r in images] == [T0 + i * S // 10 for i in range(N_IMAGES)]
    assert [r["sum"] for r in images] == [int(frame(i).astype(np.int64).sum())
                                          for i in range(N_IMAGES)]
    assert images[0]["shape"] == [48, 64] and images[0]["enc"] == "rgb8"
    assert [r["x"] for r in odom] == pytest.approx([0.05 * i for i in range(2 * N_IMAGES)])


def test_loop_plays_again_until_interrupted(ros_env: dict[str, str], bag: Path,
                                            listener: Listener) -> None:
    # Last of the listener tests: messages still in flight after Ctrl-C end with the module.
    start = listener.mark()
    proc = subprocess.Popen(_play_cmd(bag, "--loop", "--rate", "4", "--topics", "/odom",
                                      "--qos", "reliable"),
                            env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        got = listener.wait_for(start, 2 * 2 * N_IMAGES + 1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:  # never leave a looping player publishing after a failure
                proc.kill()
                proc.communicate()
    assert len(got) > 4 * N_IMAGES
    stamps = [r["stamp"] for r in got]
    assert stamps[2 * N_IMAGES] == stamps[0] == T0  # the second pass starts over
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err


# ------------------------------------------------------------------- no ROS needed below

def _msgs(times_s: list[float]) -> list[RawMessage]:
    return [RawMessage("/t", "std_msgs/msg/Empty", T0 + int(t * S), b"") for t in times_s]


def test_schedule_follows_bag_time_scaled_by_rate() -> None:
    plan = [(round(due, 6), m.log_time_ns) for due, m in
            playback_schedule(_msgs([0.0, 0.1, 0.5, 2.0]), rate=2.0)]
    assert plan == [(0.0, T0), (0.05, T0 + S // 10), (0.25, T0 + S // 2), (1.0, T0 + 2 * S)]


def test_schedule_start_offset_skips_the_beginning() -> None:
    plan = [(round(due, 6), m.log_time_ns) for due, m in
            playback_schedule(_msgs([0.0, 0.4, 0.5, 1.5]), rate=1.0, start_offset_ns=S // 2)]
    assert plan == [(0.0, T0 + S // 2), (1.0, T0 + 3 * S // 2)]


@pytest.mark.parametrize("kwargs,match", [
    ({"rate": 0}, "--rate must be > 0"),
    ({"rate": -1.0}, "--rate must be > 0"),
    ({"start_offset_s": -1}, "--start-offset must be >= 0"),
    ({"qos": "fast"}, "--qos 'fast' is not one of reliable, sensor"),
])
def test_bad_play_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PlayOptions(**kwargs)


def test_rate_nan_is_refused() -> None:
    with pytest.raises(ConfigError):
        PlayOptions(rate=math.nan)


def test_waits_for_the_asked_number_of_subscribers_per_topic() -> None:
    """A topic several nodes listen to is played once all are matched, not at the first."""
    import threading

    from vpr_ros.ros.bag_play import _wait_for_subscribers

    class Pub:
        def __init__(self, counts: list[int]) -> None:
            self.counts = counts

        def get_subscription_count(self) -> int:
            return self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]

    odom, image = Pub([1, 1, 1, 2, 3]), Pub([1])
    t0 = time.monotonic()
    _wait_for_subscribers({"/odom": odom, "/image": image}, 5.0, threading.Event(),
                          {"/odom": 3})
    assert odom.counts == [3] and time.monotonic() - t0 < 4.0
    with pytest.raises(Exception, match="TOPIC=N"):
        from vpr_ros.cli.bag_cmd import _topic_counts

        _topic_counts(["/odom"])
    from vpr_ros.errors import ConfigError
    from vpr_ros.ros.bag_play import PlayOptions

    with pytest.raises(ConfigError, match="min-subscribers"):
        PlayOptions(min_subscribers={"/odom": 0})
