"""What the node counts and times, and how it reports it on ``/diagnostics``.

An operator looking at a robot that "stopped relocalizing" needs to tell, without a debugger,
whether frames arrive at all (input rate), whether the encoder keeps up (processed rate, drops,
encode latency), whether frames are broken (errors by kind) and whether the node is even
active (lifecycle state). :class:`NodeStats` is that ledger (thread-safe: the subscription
callback, the encoder thread and the diagnostics timer all write or read it);
:func:`diagnostic_array` turns a snapshot of it into the standard message.
:class:`LogThrottle` keeps a flood of bad frames from flooding the log too.
"""

from __future__ import annotations

import math
import resource
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

#: Per-frame stages, in pipeline order; each is timed separately.
STAGES = ("conversion", "preprocess", "encode", "search", "sequence", "extract", "match",
          "estimate", "decision", "publish")


@dataclass
class FrameTiming:
    """Seconds spent on one processed frame.

    ``wait`` is receive -> the encoder thread picking the frame up (bounded by one frame's
    processing thanks to the one-slot mailbox); ``total`` is receive -> outputs published.
    ``transport`` is receive wall time minus the header stamp: meaningful only when the
    publisher stamps with the same clock (the benchmark does); NaN when the stamp is not a
    wall-clock time.
    """

    stamp_ns: int
    wait: float = 0.0
    conversion: float = 0.0
    preprocess: float = 0.0
    encode: float = 0.0
    search: float = 0.0
    sequence: float = 0.0
    #: Geometric verification, inside the decision: the frame's keypoint extraction, the
    #: descriptor matching and the robust estimation over the candidates verified (0 when
    #: verification is off or no candidate reached it); ``decision`` excludes them.
    extract: float = 0.0
    match: float = 0.0
    estimate: float = 0.0
    decision: float = 0.0
    publish: float = 0.0
    total: float = 0.0
    transport: float = math.nan
    #: Thread CPU seconds of each stage on the encoder thread: what the work itself costs,
    #: apart from time spent waiting for a core on a busy machine (helper threads of BLAS,
    #: OpenCV or torch are not included).
    cpu: dict[str, float] = field(default_factory=dict)
    #: Per stage, when :attr:`Stopwatch.probe_scheduler` is on (the benchmark): seconds the
    #: thread was runnable but waiting for a core, and how often it blocked (voluntary
    #: context switches: a lock, the interpreter lock, I/O). See :func:`sched_sample`.
    sched: dict[str, tuple[float, int]] = field(default_factory=dict)

    def stage(self, name: str) -> float:
        return float(getattr(self, name))


def sched_sample() -> Optional[tuple[float, int]]:
    """(seconds this thread has waited runnable for a core, voluntary context switches) so
    far, or None where Linux does not say (no /proc/thread-self/schedstat).

    Why: a stage whose wall time exceeds its CPU time either waited for a core (run-queue
    delay, other threads or processes of this machine), blocked (a voluntary switch), or ran
    on a virtual CPU the hypervisor had paused; the last shows in neither counter, so it is
    what remains when the first two are taken off."""
    times = schedstat()
    if times is None:
        return None
    return times[1] / 1e9, resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


def schedstat(native_id: Optional[int] = None) -> Optional[tuple[int, int]]:
    """(ns on a CPU, ns runnable but waiting for one) of a thread of this process (the calling
    one by default), from Linux's schedstat; None where it is not available."""
    path = "/proc/thread-self/schedstat" if native_id is None else \
        f"/proc/self/task/{native_id}/schedstat"
    try:
        with open(path) as f:
            fields = f.read().split()
        return int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return None


class Stopwatch:
    """Times consecutive stages of one frame, wall clock and thread CPU, into a FrameTiming."""

    #: Also record run-queue delay and voluntary switches per stage (``FrameTiming.sched``):
    #: two small /proc reads per stage, so only the benchmark turns it on.
    probe_scheduler = False

    def __init__(self, timing: FrameTiming) -> None:
        self.timing = timing
        self._sched = sched_sample() if Stopwatch.probe_scheduler else None
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def lap(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        setattr(self.timing, stage, wall - self._wall)
        self.timing.cpu[stage] = cpu - self._cpu
        if self._sched is not None:
            now = sched_sample()
            if now is not None:
                self.timing.sched[stage] = (now[0] - self._sched[0], now[1] - self._sched[1])
            self._sched = now
            wall, cpu = time.perf_counter(), time.thread_time()  # the probe is not a stage
        self._wall, self._cpu = wall, cpu


class LogThrottle:
    """At most one log line per error kind per ``period_s``; counts what it held back so the
    next line can say how many similar errors were suppressed."""

    def __init__(self, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = float(period_s)
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.emitted: Counter[str] = Counter()

    def check(self, kind: str) -> Optional[int]:
        """``None``: stay silent. Otherwise log now; the value is how many were suppressed
        since the last line of this kind."""
        now = self._clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.period_s:
                self._suppressed[kind] += 1
                return None
            self._last[kind] = now
            held = self._suppressed.pop(kind, 0)
            self.emitted[kind] += 1
            return held


@dataclass
class StatsSnapshot:
    """A consistent copy of the counters and latency percentiles at one instant."""

    received: int
    dropped: int
    processed: int
    errors: dict[str, int]
    relocalizations: int
    relocalizations_without_pose: int
    loop_closures: int
    keyframes_inserted: int
    percentiles_ms: dict[str, tuple[float, float]]  # stage -> (p50, p95) in ms
    window: int
    monotonic_s: float
    time_jumps: int = 0

    @property
    def errors_total(self) -> int:
        return int(sum(self.errors.values()))


@dataclass
class NodeStats:
    """Counters since the last configure (the node makes a new ledger then) and a sliding
    window of per-frame timings.

    Every received camera frame ends in exactly one of ``processed``, ``dropped`` or
    ``errors`` (one per frame, by kind), so once no frame is in flight (at most one waiting per
    camera, and the one being encoded) ``received = processed + dropped + sum(errors)``. With
    several cameras ``processed`` counts decisions (one per group of frames) and the identity
    holds per camera (``camera.<topic>.*`` in /diagnostics)."""

    window: int = 300
    received: int = 0
    dropped: int = 0
    processed: int = 0
    relocalizations: int = 0
    relocalizations_without_pose: int = 0
    loop_closures: int = 0
    keyframes_inserted: int = 0
    #: Clock resets seen in frame stamps: events, not errors (the frame is processed).
    time_jumps: int = 0
    errors: Counter = field(default_factory=Counter)
    _timings: deque = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._timings = deque(maxlen=max(1, int(self.window)))

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def frame(self, timing: FrameTiming) -> None:
        with self._lock:
            self.processed += 1
            self._timings.append(timing)

    def timings(self) -> list[FrameTiming]:
        """The frames in the window, oldest first (for benchmarks)."""
        with self._lock:
            return list(self._timings)

    def clear_timings(self) -> None:
        with self._lock:
            self._timings.clear()

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            timings = list(self._timings)
            snap = StatsSnapshot(
                received=self.received, dropped=self.dropped, processed=self.processed,
                errors=dict(self.errors), relocalizations=self.relocalizations,
                relocalizations_without_pose=self.relocalizations_without_pose,
                loop_closures=self.loop_closures, keyframes_inserted=self.keyframes_inserted,
                percentiles_ms={}, window=len(timings), monotonic_s=time.monotonic(),
                time_jumps=self.time_jumps)
        for name in ("wait", *STAGES, "total"):
            snap.percentiles_ms[name] = percentiles_ms([t.stage(name) for t in timings])
        return snap


def percentiles_ms(values_s: list[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds; NaN for no values."""
    vals = np.asarray([v for v in values_s if math.isfinite(v)], dtype=np.float64)
    if vals.size == 0:
        return math.nan, math.nan
    p50, p95 = np.percentile(vals, [50, 95])
    return float(p50) * 1e3, float(p95) * 1e3


class RateMeter:
    """Rate of a monotonically growing counter between successive reports."""

    def __init__(self) -> None:
        self._last: Optional[tuple[float, int]] = None

    def update(self, t_s: float, count: int) -> float:
        last, self._last = self._last, (t_s, count)
        if last is None or t_s <= last[0]:
            return 0.0
        return max(0, count - last[1]) / (t_s - last[0])


@dataclass
class NodeIdentity:
    """What does not change per frame: shown with every status."""

    lifecycle_state: str = "unconfigured"
    mode: str = ""
    backend: str = ""
    backend_choice: str = ""  # the named choice, e.g. openvino:bf16
    backend_note: str = ""    # why auto chose it (measured timings, cached decision, fallback)
    fingerprint: str = ""
    map_path: str = ""
    map_size: int = 0
    map_search: str = ""  # where map searches run (cpu / cuda:N) and why
    session: str = ""
    problem: str = ""  # the last configure failure, shown as an ERROR status
    bond: str = "off"  # the bond with nav2_lifecycle_manager (vpr_ros.ros.nav2_bond states)
    cameras: str = ""  # the camera topics, comma-separated (index = the camera field of outputs)
    silent_cameras: str = ""  # cameras of several that deliver nothing while others do


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.3f}"


def status_fields(snap: StatsSnapshot, ident: NodeIdentity, input_hz: float,
                  processed_hz: float, extra: Optional[list[tuple[str, str]]] = None
                  ) -> tuple[int, str, list[tuple[str, str]]]:
    """(level, message, key/values) of one status: level 0 OK, 1 WARN, 2 ERROR. ``extra``:
    further key/values (the decision stages' counters) appended as they are."""
    values: list[tuple[str, str]] = [
        ("lifecycle_state", ident.lifecycle_state), ("mode", ident.mode),
        ("backend", ident.backend), ("backend_choice", ident.backend_choice),
        ("backend_auto", ident.backend_note), ("model_fingerprint", ident.fingerprint),
        ("map_path", ident.map_path), ("map_size", str(ident.map_size)),
        ("map_search", ident.map_search),
        ("session", ident.session), ("bond", ident.bond),
        ("input_rate_hz", _fmt(input_hz)), ("processed_rate_hz", _fmt(processed_hz)),
        ("frames_received", str(snap.received)), ("frames_processed", str(snap.processed)),
        ("frames_dropped", str(snap.dropped)), ("errors_total", str(snap.errors_total)),
        ("relocalizations", str(snap.relocalizations)),
        ("relocalizations_without_pose", str(snap.relocalizations_without_pose)),
        ("loop_closures", str(snap.loop_closures)),
        ("keyframes_inserted", str(snap.keyframes_inserted)),
        ("time_jumps", str(snap.time_jumps)),
        ("latency_window_frames", str(snap.window)),
    ]
    p = snap.percentiles_ms
    values += [("latency_encode_p50_ms", _fmt(p["encode"][0])),
               ("latency_encode_p95_ms", _fmt(p["encode"][1])),
               ("latency_total_p50_ms", _fmt(p["total"][0])),
               ("latency_total_p95_ms", _fmt(p["total"][1]))]
    for name in ("wait", "conversion", "preprocess", "search", "sequence", "extract", "match",
                 "estimate", "decision", "publish"):
        values += [(f"latency_{name}_p50_ms", _fmt(p[name][0])),
                   (f"latency_{name}_p95_ms", _fmt(p[name][1]))]
    values += [(f"errors.{kind}", str(n)) for kind, n in sorted(snap.errors.items())]
    values += list(extra or [])
    if ident.problem:
        return 2, ident.problem, values
    if ident.bond == "broken":
        return 2, (f"{ident.lifecycle_state}; the bond with the lifecycle manager broke (no "
                   "heartbeat): the manager stopped or cannot be reached"), values
    if ident.lifecycle_state != "active":
        return 1, f"{ident.lifecycle_state}: not processing frames", values
    if input_hz == 0.0:
        return 1, "active, no camera frames arriving", values
    if ident.silent_cameras:
        return 1, (f"active, no frames from camera(s) {ident.silent_cameras}; "
                   f"{processed_hz:.1f} of {input_hz:.1f} frames/s processed"), values
    return 0, f"active, {processed_hz:.1f} of {input_hz:.1f} frames/s processed", values


def diagnostic_array(node_name: str, stamp: Any, snap: StatsSnapshot, ident: NodeIdentity,
                     input_hz: float, processed_hz: float,
                     extra: Optional[list[tuple[str, str]]] = None) -> Any:
    """A ``diagnostic_msgs/DiagnosticArray`` with the node's one status."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    level, message, values = status_fields(snap, ident, input_hz, processed_hz, extra)
    status = DiagnosticStatus(
        level=bytes([level]), name=f"{node_name}: visual place recognition", message=message,
        hardware_id=ident.fingerprint or "none",
        values=[KeyValue(key=k, value=v) for k, v in values])
    arr = DiagnosticArray(status=[status])
    arr.header.stamp = stamp
    return arr


def status_values(status: Any) -> dict[str, str]:
    """A received DiagnosticStatus's key/values as a dict (tests, benchmark)."""
    return {kv.key: kv.value for kv in status.values}
