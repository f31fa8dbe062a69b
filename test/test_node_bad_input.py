"""Bad input over the wire: truncated CompressedImage, unsupported encoding, zero-size and huge
images, stamps going backwards, and a flood faster than the encoder. The node logs each kind
(throttled), counts it in /diagnostics, drops old frames instead of queueing them, and keeps
publishing for the good frames."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")

from test_node_common import (NS, InProcessNode, build_lap_map, compressed_msg,  # noqa: E402
                              image_msg, make_route, set_stamp, small_model_dir)

TOPIC = "/vpr_bad_input_test/image"
MAX_PIXELS = 200_000  # a 640x480 frame (307 200 px) is "huge" for this node


@pytest.fixture(scope="module")
def route():
    return make_route(frames_per_lap=12, radius_m=6.4, out_px=96)


@pytest.fixture(scope="module")
def harness(effnet_gem_model_dir: Path, route,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessNode]:
    model = small_model_dir(effnet_gem_model_dir, tmp_path_factory.getbasetemp())
    pmap = build_lap_map(model, route, 0, tmp_path_factory.mktemp("maps") / "lap1")
    h = InProcessNode({"threads": 1, "model": str(model), "map": str(pmap),
                       "mode": "localization", "qos_reliability": "reliable",
                       "max_pixels": MAX_PIXELS, "log_throttle_s": 600.0,
                       "diagnostics_period_s": 0.2, "diagnostics_window": 1000}, {"image": TOPIC})
    try:
        yield h
    finally:
        h.close()


class _Feed:
    """Publishes frames with increasing stamps and waits for the node's reaction."""

    def __init__(self, h: InProcessNode, msg_type) -> None:
        from sensor_msgs.msg import PointCloud2

        self.h, self.probe = h, h.probe
        self.pub = self.probe.publisher(TOPIC, msg_type, reliable=True, depth=500)
        self.clouds = self.probe.record("/vpr_node/candidates", PointCloud2)
        self.stamp_ns = 3000 * NS

    def wait_for_node(self) -> None:
        assert self.probe.spin_until(lambda: self.pub.get_subscription_count() == 1, 15)

    def close(self) -> None:
        """Drop the publisher, so a later test may publish another type on the topic."""
        self.probe.node.destroy_publisher(self.pub)

    def next_stamp(self) -> int:
        self.stamp_ns += NS // 10
        return self.stamp_ns

    def answered(self, stamp_ns: int, timeout: float = 20.0) -> bool:
        return self.probe.spin_until(lambda: any(
            c.header.stamp.sec * NS + c.header.stamp.nanosec == stamp_ns for c in self.clouds),
            timeout)

    def errors(self, kind: str) -> int:
        return self.h.node.stats.errors.get(kind, 0)

    def send_bad(self, msg, kind: str, times: int = 1) -> None:
        """Publish ``msg`` ``times`` times (fresh stamps) and wait until each was counted."""
        before = self.errors(kind)
        for _ in range(times):
            set_stamp(msg, self.next_stamp())
            self.pub.publish(msg)
        assert self.probe.spin_until(lambda: self.errors(kind) >= before + times, 20), \
            f"{kind}: {self.errors(kind) - before} of {times} counted"

    def send_good(self, msg) -> None:
        stamp = self.next_stamp()
        set_stamp(msg, stamp)
        self.pub.publish(msg)
        assert self.answered(stamp), "a good frame after bad ones got no answer"


@pytest.fixture
def feeds() -> Iterator[list]:
    """Feeds made by a test; their publishers are dropped at its end, pass or fail, so the
    next test may publish another message type on the same topic."""
    made: list[_Feed] = []
    yield made
    for feed in made:
        feed.close()


def _status_after(probe, key: str, at_least: int, timeout: float = 10.0) -> dict:
    assert probe.spin_until(lambda: int((probe.latest_status() or {}).get(key, "0")) >= at_least,
                            timeout), (key, probe.latest_status())
    return probe.latest_status()


def test_raw_frames_bad_in_every_way_are_counted_and_good_ones_still_answered(
        harness: InProcessNode, route, feeds, capfd) -> None:
    from sensor_msgs.msg import Image

    h = harness
    h.set(image_transport="raw")
    assert h.probe.transition("configure") and h.probe.transition("activate")
    feed = _Feed(h, Image)
    feeds.append(feed)
    feed.wait_for_node()
    good = route.images[route.frames(lap=1)[0]]
    feed.send_good(image_msg(good, 0))

    feed.send_bad(Image(height=4, width=4, encoding="fancy16", step=64, data=bytes(64)),
                  "unsupported_encoding", times=3)
    feed.send_good(image_msg(good, 0))
    feed.send_bad(Image(height=0, width=0, encoding="rgb8", step=0), "empty_image", times=2)
    huge = image_msg(np.zeros((480, 640, 3), np.uint8), 0, encoding="mono8")
    feed.send_bad(huge, "oversized_image", times=2)
    truncated = image_msg(good, 0)
    truncated.data = truncated.data[: len(truncated.data) // 2]
    feed.send_bad(truncated, "corrupt_image")
    feed.send_good(image_msg(good, 0))

    # Stamps going backwards: a late frame (0.5 s back) is dropped; a clock reset (50 s back)
    # is counted (an event, not an error: the frame is processed), and frames after it are
    # answered.
    last = feed.stamp_ns
    late = set_stamp(image_msg(good, 0), last - NS // 2)
    before = feed.errors("stamp_backwards")
    feed.pub.publish(late)
    assert h.probe.spin_until(lambda: feed.errors("stamp_backwards") == before + 1, 20)
    assert not feed.answered(last - NS // 2, timeout=1.0)
    feed.stamp_ns = last - 50 * NS
    feed.send_good(image_msg(good, 0))
    assert h.node.stats.time_jumps == 1 and feed.errors("time_jump") == 0
    feed.send_good(image_msg(good, 0))

    status = _status_after(h.probe, "time_jumps", 1)  # the last count above (it is no error)
    for key, n in (("errors.unsupported_encoding", 3), ("errors.empty_image", 2),
                   ("errors.oversized_image", 2), ("errors.corrupt_image", 1),
                   ("time_jumps", 1)):
        assert int(status[key]) == n, (key, status)
    assert status["lifecycle_state"] == "active"
    log = capfd.readouterr().err
    # Throttled: three unsupported frames, one log line; every kind said at least once.
    assert log.count("[unsupported_encoding]") == 1, log
    for kind in ("empty_image", "oversized_image", "corrupt_image", "stamp_backwards",
                 "time_jump"):
        assert log.count(f"[{kind}]") == 1, (kind, log)
    assert "max_pixels" in log and "fancy16" in log


def test_flood_faster_than_the_encoder_drops_old_frames_without_latency_build_up(
        harness: InProcessNode, route, feeds) -> None:
    from sensor_msgs.msg import Image

    h = harness
    feed = _Feed(h, Image)
    feeds.append(feed)
    feed.wait_for_node()
    stats = h.node.stats
    stats.clear_timings()
    before = (stats.received, stats.processed, stats.dropped)
    frames = [image_msg(route.images[i], 0) for i in route.frames()]
    stamps = []
    for n in range(150):  # as fast as Python publishes: far above ~100 frames/s of encoding
        stamps.append(feed.next_stamp())
        feed.pub.publish(set_stamp(frames[n % len(frames)], stamps[-1]))
    # Newest wins: the last frame of the flood is answered, whatever happened to the others.
    assert feed.answered(stamps[-1], timeout=30)

    def settled() -> bool:  # every received frame was either processed or dropped
        return (stats.processed - before[1]) + (stats.dropped - before[2]) == \
            stats.received - before[0]

    assert h.probe.spin_until(settled, 10)
    received = stats.received - before[0]
    processed = stats.processed - before[1]
    dropped = stats.dropped - before[2]
    assert dropped > 0 and processed < received
    timings = stats.timings()
    assert len(timings) == processed
    # A frame waits at most for the one being encoded: no queue, so no build-up.
    busiest = max(t.total - t.wait for t in timings)
    assert max(t.wait for t in timings) <= 1.5 * busiest + 0.05, \
        ([round(t.wait, 3) for t in timings], busiest)
    assert h.probe.spin_until(lambda: int((h.probe.latest_status() or {}).get(
        "frames_processed", "0")) == stats.processed, 10)
    status = h.probe.latest_status()
    assert int(status["frames_dropped"]) == stats.dropped
    assert int(status["latency_window_frames"]) == processed
    assert float(status["latency_encode_p95_ms"]) > 0
    assert h.probe.transition("deactivate") and h.probe.transition("cleanup")


def test_compressed_frames_truncated_or_empty_are_counted(harness: InProcessNode, route,
                                                          feeds, capfd) -> None:
    from sensor_msgs.msg import CompressedImage

    h = harness
    h.set(image_transport="compressed")
    assert h.probe.transition("configure") and h.probe.transition("activate")
    feed = _Feed(h, CompressedImage)
    feeds.append(feed)
    feed.wait_for_node()
    good = route.images[route.frames(lap=1)[3]]
    feed.send_good(compressed_msg(good, 0))
    jpeg = compressed_msg(good, 0)
    before = feed.errors("corrupt_image")
    for cut in (0.3, 0.6, 0.9):  # one at a time: decoding failures surface on the encoder thread
        truncated = compressed_msg(good, 0)
        truncated.data = jpeg.data[: int(len(jpeg.data) * cut)]
        feed.send_bad(truncated, "corrupt_image")
    assert feed.errors("corrupt_image") == before + 3
    feed.send_bad(CompressedImage(format="jpeg"), "empty_image")
    huge = compressed_msg(np.zeros((480, 640, 3), np.uint8), 0, fmt="png")
    feed.send_bad(huge, "oversized_image")
    feed.send_good(compressed_msg(good, 0))
    log = capfd.readouterr().err
    assert "could not be decoded" in log
    assert h.probe.transition("deactivate") and h.probe.transition("cleanup")
