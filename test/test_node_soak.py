"""Soak: a real vpr_node process fed mixed good and bad camera frames for about 40 s at several
rates (5, 30 and 100 Hz), with lifecycle transitions between the bursts (activate, deactivate,
cleanup, reconfigure in the other mode). It must stay alive, account for every frame it
received (``frames_received = frames_processed + frames_dropped + errors_total`` once the
bursts stop), and keep its memory (RSS) and thread count bounded across the transitions."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")

from test_node_common import (NS, UNVERIFIED_ARGS, RosProbe, build_lap_map,  # noqa: E402
                              image_msg, make_route, set_remote_parameters, set_stamp,
                              small_model_dir, start_node, stop_process)

TOPIC = "/vpr_soak/image"
#: Bounds. Within one configuration (activations, bursts, deactivations) RSS may grow by
#: allocator slack only and no thread may be added (one per activation would be a leak). Across
#: the reconfigure (another mode, the model loaded again) a few lazily created thread pools and
#: the new model's allocations are allowed (measured: +2 threads, +70-100 MB).
RSS_GROWTH_MB = {"within": 50, "overall": 250}
THREAD_GROWTH = {"within": 1, "overall": 6}


def _proc_status(pid: int) -> tuple[float, int]:
    """(RSS in MB, thread count) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


class Frames:
    """Good frames with rising stamps, and bad ones of every kind the node must survive."""

    def __init__(self, route) -> None:
        from sensor_msgs.msg import Image

        self.Image = Image
        self.images = [route.images[i] for i in route.frames(lap=1)]
        self.stamp = 2_000 * NS
        self.n = 0

    def good(self):
        self.stamp += NS // 10
        self.n += 1
        return image_msg(self.images[self.n % len(self.images)], self.stamp)

    def clock_reset(self):
        """A good frame after the camera clock jumped back 100 s (a restarted bag): an event
        the node counts, not a frame error (the frame is processed)."""
        self.stamp -= 100 * NS
        return self.good()

    def bad(self, kind: int):
        Image, img = self.Image, self.images[0]
        if kind == 0:  # truncated pixels
            msg = self.good()
            msg.data = msg.data[: len(msg.data) // 3]
            return msg
        if kind == 1:
            return set_stamp(Image(height=4, width=4, encoding="fancy16", step=64,
                                   data=bytes(64)), self._next())
        if kind == 2:
            return set_stamp(Image(height=0, width=0, encoding="rgb8", step=0), self._next())
        if kind == 3:  # a header claiming 20000 x 20000 pixels
            return set_stamp(Image(height=20000, width=20000, encoding="rgb8", step=60000,
                                   data=bytes(16)), self._next())
        if kind == 4:  # a late frame: stamped before the previous one
            return image_msg(img, self.stamp - NS // 4)
        return b"\x00\x01\x00\x00" + bytes(np.random.default_rng(self.n).integers(
            0, 256, 40, dtype=np.uint8))  # not CDR of an Image at all

    def _next(self) -> int:
        self.stamp += NS // 10
        return self.stamp


@pytest.fixture(scope="module")
def setup(effnet_gem_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    model = small_model_dir(effnet_gem_model_dir, tmp_path_factory.getbasetemp())
    route = make_route(frames_per_lap=12, radius_m=6.4, out_px=96)
    lap = build_lap_map(model, route, 0, tmp_path_factory.mktemp("soak") / "lap1")
    return model, route, lap


def test_soak_mixed_frames_rates_and_transitions(setup, tmp_path: Path) -> None:
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image

    model, route, lap = setup
    log = tmp_path / "node.log"
    proc = start_node(["--ros-args", "-p", f"model:={model}", "-p", f"map:={lap}",
                       "-p", "mode:=localization", "-p", "threads:=1",
                       "-p", "qos_reliability:=reliable", "-p", "qos_depth:=10",
                       "-p", "diagnostics_period_s:=0.25", *UNVERIFIED_ARGS,
                       "-r", f"image:={TOPIC}"], log)
    probe = RosProbe()
    frames = Frames(route)
    samples: list[tuple[str, float, int]] = []
    totals = {"sent": 0, "bad": 0}
    try:
        probe.record("/diagnostics", DiagnosticArray, depth=50)
        pub = probe.publisher(TOPIC, Image, reliable=True, depth=100)

        def publish_one(i: int, bad_every: int) -> None:
            if i % bad_every == 0:
                pub.publish(frames.bad((i // bad_every) % 6))
                totals["bad"] += 1
            else:
                pub.publish(frames.clock_reset() if i % 97 == 0 else frames.good())
            totals["sent"] += 1

        def burst(rate_hz: float, seconds: float, bad_every: int) -> None:
            assert probe.spin_until(lambda: pub.get_subscription_count() >= 1, 30), "no match"
            period, t0, i = 1.0 / rate_hz, time.monotonic(), 0
            while time.monotonic() - t0 < seconds:
                i += 1
                publish_one(i, bad_every)
                probe.spin_until(lambda: False, max(0.0, t0 + i * period - time.monotonic()))
            assert proc.poll() is None, log.read_text()[-3000:]

        def transition_under_fire(label: str, rate_hz: float = 100.0) -> None:
            """A transition while frames keep arriving (another thread publishes): frames
            waiting in the mailbox when the encoder stops must still be accounted for."""
            stop = threading.Event()

            def fire() -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    publish_one(i, 4)
                    time.sleep(1.0 / rate_hz)

            thread = threading.Thread(target=fire, daemon=True)
            thread.start()
            try:
                transition(label)
            finally:
                stop.set()
                thread.join(5)

        def settled(label: str) -> dict[str, str]:
            """Wait until every received frame is accounted for, then sample RSS/threads."""
            def adds_up() -> bool:
                s = probe.latest_status() or {}
                if "frames_received" not in s:
                    return False
                return int(s["frames_received"]) == int(s["frames_processed"]) + \
                    int(s["frames_dropped"]) + int(s["errors_total"])
            probe.received["/diagnostics"].clear()
            assert probe.spin_until(adds_up, 30), (label, probe.latest_status())
            samples.append((label, *_proc_status(proc.pid)))
            return probe.latest_status()

        def transition(label: str) -> None:
            assert probe.transition(label), (label, log.read_text()[-3000:])

        transition("configure")
        transition("activate")
        burst(5, 6, bad_every=3)
        settled("localization 5 Hz")
        burst(30, 6, bad_every=4)
        transition_under_fire("deactivate")  # frames still waiting when it lands are dropped
        settled("after deactivate")
        transition("activate")
        burst(100, 6, bad_every=5)
        first = settled("localization 100 Hz")
        assert int(first["frames_processed"]) > 0 and int(first["errors_total"]) > 0
        transition("deactivate")
        transition("cleanup")
        set_remote_parameters(probe, {"mode": "loop_closure", "map": ""})
        transition("configure")
        transition("activate")
        burst(30, 6, bad_every=3)
        settled("loop closure 30 Hz")
        transition("deactivate")
        transition("activate")
        burst(100, 6, bad_every=4)
        transition_under_fire("deactivate")
        last = settled("end")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        probe.close()
        code = stop_process(proc)
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]
    assert code in (0, -2), (code, text[-3000:])
    # Counters restart at configure: the loop-closure configuration's ledger saw its frames.
    received = int(last["frames_received"])
    assert 0 < received <= totals["sent"] and int(last["errors_total"]) > 0
    for kind in ("corrupt_image", "unsupported_encoding", "empty_image", "oversized_image",
                 "stamp_backwards"):
        assert int(last.get(f"errors.{kind}", "0")) > 0, (kind, last)
    assert int(last["time_jumps"]) > 0, last
    by_label = {label: (rss, threads) for label, rss, threads in samples}
    for first_label, later_label in (("localization 5 Hz", "localization 100 Hz"),
                                     ("loop closure 30 Hz", "end")):
        (r0, t0), (r1, t1) = by_label[first_label], by_label[later_label]
        assert r1 - r0 < RSS_GROWTH_MB["within"], samples
        assert t1 - t0 <= THREAD_GROWTH["within"], samples
    rss = [r for _, r, _ in samples]
    threads = [t for _, _, t in samples]
    assert max(rss) - rss[0] < RSS_GROWTH_MB["overall"], samples
    assert max(threads) - threads[0] <= THREAD_GROWTH["overall"], samples
    print("soak samples (label, RSS MB, threads):", samples, "sent", totals)
