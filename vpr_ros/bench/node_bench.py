"""`vpr bench node`: where the time of one camera frame goes inside ``vpr_node``, through real
DDS, at several input rates.

Set-up: a small model (GeM over ImageNet EfficientNet-Lite0 by default), a map of
``--map-size`` keyframes with synthetic unit descriptors (search cost depends on the count and
dimension, not on where the vectors came from), the node hosted in this process in localization
mode, and a separate camera process publishing 640x480 ``sensor_msgs/Image`` (or JPEG
``CompressedImage``) at each rate, stamped with the wall clock, reliable by default (see
``--qos``).

Per processed frame the node records, in seconds: ``conversion`` (message -> RGB),
``preprocess`` (resize + normalise), ``encode`` (inference), ``search`` (map search + candidate
lookup), ``sequence`` (sequence matching over the last frames, see
:mod:`vpr_ros.localization.sequence`), ``decision`` (relocalizer), ``publish`` (building and
publishing the outputs),
``wait`` (receive -> the encoder thread picks the frame up), ``total`` (receive -> published)
and ``transport`` (camera publish -> node callback). ``overhead`` is everything but encode:
conversion + preprocess + search + sequence + decision + publish.

"No queue growth" is checked two ways: frames waiting for the encoder never exceed one
(sampled every 100 ms), and no frame waits longer than 1.5x the longest processing of a frame
(a queue of q frames would make it wait q times that). The latency trend (median of the last
third of each run minus the first third) is reported too, for the eye: on a shared machine it
moves with the load.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vpr_ros.errors import ConfigError
from vpr_ros.runtime.local_features import LocalFeatures

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_CONFIG = REPO / "config" / "models" / "gem_effnetlite0.yaml"
STAGES = ("conversion", "preprocess", "encode", "search", "sequence", "extract", "match",
          "estimate", "decision", "publish")
#: ``overhead``: every stage but inference.
OVERHEAD_STAGES = tuple(s for s in STAGES if s != "encode")
REPORTED = (*STAGES, "overhead", "wait", "total", "transport")
TOPIC = "/vpr_bench/image"
CAMERA_INFO_TOPIC = "/vpr_bench/camera_info"
STREET_CAMERA = "street"
STREET_START_M = 6.0
OVERHEAD_TARGET_MS = 5.0
#: How often the mailbox depth is sampled. Not faster: the sampler is a Python thread of the
#: node's process, and every wake-up takes the interpreter lock; at 5 ms it made the encoder
#: thread block (wait for the lock) in 6-15% of frames' preprocessing. A growing queue stays
#: grown, so 10 samples a second see it as well.
PENDING_SAMPLE_S = 0.1


@dataclass
class NodeBenchConfig:
    """What to measure; the defaults are the documented run (docs/bench_node.md)."""

    model: Optional[Path] = None
    model_config: Path = DEFAULT_MODEL_CONFIG
    input_size: Optional[int] = None
    map_size: int = 10_000
    rates: list[float] = field(default_factory=lambda: [5.0, 15.0, 30.0, 100.0])
    seconds: float = 8.0
    min_frames: int = 150
    width: int = 640
    height: int = 480
    compressed: bool = False
    qos: str = "reliable"
    backend: str = "auto"
    threads: int = 0
    top_k: int = 5
    index: str = "flat"
    workdir: Optional[Path] = None
    seed: int = 0
    #: Geometric verification on: the map's first ``street_keyframes`` keyframes are the demo
    #: street's (SIFT keypoints with 3-D points from depth, calibrated), the rest random
    #: descriptors without keypoints, and the camera publishes dusk revisits of that street
    #: with its CameraInfo, so the verifier does its real work every frame.
    verify: bool = False
    street_keyframes: int = 40
    frames_file: Optional[Path] = None  # set by the run: the street frames for the camera

    def __post_init__(self) -> None:
        if self.map_size < 1 or self.seconds <= 0 or not self.rates or min(self.rates) <= 0:
            raise ConfigError("--map-size must be >= 1, --seconds > 0 and every rate > 0")
        if self.qos not in ("reliable", "best_effort"):
            raise ConfigError(f"--qos {self.qos!r} must be reliable or best_effort")
        if self.width < 1 or self.height < 1:
            raise ConfigError(f"image size {self.width}x{self.height} must be positive")
        if self.min_frames < 0:
            raise ConfigError(f"--min-frames {self.min_frames} must be >= 0")

    def seconds_for(self, rate: float) -> float:
        """How long a rate is measured: ``seconds``, stretched so that at least ``min_frames``
        frames are sent. Why: a p95 over the 40 frames of 8 s at 5 Hz is the second-worst
        frame, so one scheduler burst decided it; 150 frames make it the eighth-worst."""
        return max(self.seconds, self.min_frames / rate)


def _stage_values(timings: list[Any], name: str, cpu: bool = False) -> np.ndarray:
    def one(t: Any, stage: str) -> float:
        return t.cpu.get(stage, math.nan) if cpu else t.stage(stage)

    if name == "overhead":
        vals = [sum(0.0 if math.isnan(one(t, s)) else one(t, s) for s in OVERHEAD_STAGES)
                for t in timings]
    else:
        vals = [one(t, name) for t in timings]
    arr = np.asarray(vals, dtype=np.float64) * 1e3
    return arr[np.isfinite(arr)]


def overhead_attribution(timings: list[Any]) -> dict[str, Any]:
    """Where the wall time of the overhead stages went beyond their CPU time, per frame.

    Needs ``FrameTiming.sched`` (the benchmark turns :attr:`Stopwatch.probe_scheduler` on).
    Per frame, over the overhead stages: wall W, thread CPU C, run-queue delay R (runnable,
    waiting for a core of this machine) and voluntary switches V (blocked on a lock, the
    interpreter lock or I/O). In a frame with V = 0 the rest, W - C - R, is time the thread
    was on a CPU that did not run it: the hypervisor running other guests (steal) or
    interrupt handling, neither of which the node controls. ``overhead_unpaused_ms`` is W
    minus that rest (nothing is taken off a frame that blocked: there the rest may be the
    node's own lock waits). Returned as p50/p95/max in ms, with the share of frames that
    blocked."""
    rows = []
    for t in timings:
        if not all(s in t.sched and s in t.cpu for s in OVERHEAD_STAGES):
            continue
        wall = sum(t.stage(s) for s in OVERHEAD_STAGES)
        cpu = sum(t.cpu[s] for s in OVERHEAD_STAGES)
        queue = sum(t.sched[s][0] for s in OVERHEAD_STAGES)
        blocked = sum(t.sched[s][1] for s in OVERHEAD_STAGES) > 0
        paused = 0.0 if blocked else max(0.0, wall - cpu - queue)
        rows.append((wall, queue, paused, blocked))
    if not rows:
        return {}
    arr = np.asarray(rows, dtype=np.float64)
    return {"frames": len(rows),
            "run_queue_ms": _percentiles(arr[:, 1] * 1e3),
            "paused_ms": _percentiles(arr[:, 2] * 1e3),
            "overhead_unpaused_ms": _percentiles((arr[:, 0] - arr[:, 2]) * 1e3),
            "blocked_frames_pct": round(100.0 * float(arr[:, 3].mean()), 1)}


def _percentiles(arr: np.ndarray) -> dict[str, float]:
    if arr.size == 0:
        return {"p50": math.nan, "p95": math.nan, "max": math.nan}
    p50, p95 = np.percentile(arr, [50, 95])
    return {"p50": float(p50), "p95": float(p95), "max": float(arr.max())}


def summarise(timings: list[Any]) -> dict[str, dict[str, float]]:
    """p50 / p95 / max in ms of every reported stage (wall clock)."""
    return {name: _percentiles(_stage_values(timings, name)) for name in REPORTED}


def summarise_cpu(timings: list[Any]) -> dict[str, dict[str, float]]:
    """The same for the encoder thread's CPU time per stage: the cost of the work itself,
    without the time spent waiting for a core on a shared machine."""
    return {name: _percentiles(_stage_values(timings, name, cpu=True))
            for name in (*STAGES, "overhead")}


def latency_trend_ms(timings: list[Any]) -> float:
    """Median total latency of the last third minus the first third (ms): > 0 means growth."""
    totals = _stage_values(timings, "total")
    if totals.size < 6:
        return math.nan
    third = totals.size // 3
    return float(np.median(totals[-third:]) - np.median(totals[:third]))


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(),
                            "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def _prepare_model(cfg: NodeBenchConfig, workdir: Path) -> Path:
    if cfg.model is not None:
        return cfg.model
    import yaml

    from vpr_ros.models.model_dir import create_model_dir

    data = yaml.safe_load(Path(cfg.model_config).read_text())
    if cfg.input_size:
        data.setdefault("input", {})["size"] = [cfg.input_size, cfg.input_size]
    spec = workdir / "model.yaml"
    spec.write_text(yaml.safe_dump(data))
    out = workdir / "model"
    create_model_dir(spec, out, seed=cfg.seed)
    return out


def _prepare_map(cfg: NodeBenchConfig, model: Path, workdir: Path) -> Path:
    """``map_size`` posed keyframes with random unit descriptors of the model's dimension."""
    from vpr_ros.mapdb import Keyframe, PlaceMap
    from vpr_ros.models.model_dir import read_model_meta

    meta = read_model_meta(model)
    rng = np.random.default_rng(cfg.seed)
    pm = PlaceMap.create(meta.descriptor_dim, meta.fingerprint, index=cfg.index,
                         keypoints="sift" if cfg.verify else None)
    block = 2048
    first = 0
    if cfg.verify:
        first = _add_street(pm, cfg, model)
    for start in range(first, cfg.map_size, block):
        n = min(block, cfg.map_size - start)
        desc = rng.standard_normal((n, meta.descriptor_dim)).astype(np.float32)
        desc /= np.linalg.norm(desc, axis=1, keepdims=True)
        kfs = [Keyframe("bench", (1_000 + i) * 1_000_000_000, "map",
                        (float(i % 100), float(i // 100), 0.0), (0.0, 0.0, 0.0, 1.0))
               for i in range(start, start + n)]
        empty = [LocalFeatures.empty("sift")] * n if cfg.verify else None
        pm.add(desc, kfs, keypoints=empty)
    out = workdir / "map"
    pm.save(out)
    return out


def _add_street(pm: Any, cfg: NodeBenchConfig, model: Path) -> int:
    """The demo street's keyframes (1 m apart, daylight), encoded, with keypoints and depth
    points and the camera's calibration; returns how many."""
    from vpr_ros.demo.scenario import (Route, ScenarioConfig, World, camera_matrix,
                                       camera_mount, render_with_depth)
    from vpr_ros.mapdb import Keyframe
    from vpr_ros.mapdb.camera import CameraModel
    from vpr_ros.mapdb.keypoint_depth import points_from_depth
    from vpr_ros.runtime.encoder import load_encoder
    from vpr_ros.runtime.local_features import FeatureExtractor

    scfg = ScenarioConfig(image_size=(cfg.height, cfg.width))
    world, route = World(scfg), Route(scfg)
    cam = CameraModel(STREET_CAMERA, cfg.width, cfg.height, camera_matrix(scfg),
                      mount=camera_mount(scfg))
    options: dict[str, Any] = {"threads": cfg.threads} if cfg.threads else {}
    encoder = load_encoder(model, backend=cfg.backend, **options)
    extractor = FeatureExtractor("sift", 1000)
    n = min(cfg.street_keyframes, cfg.map_size)
    for i in range(n):
        x, y, yaw = route.pose(STREET_START_M + i)
        rgb, depth = render_with_depth(world, scfg, x, y, yaw, 1)
        feats = extractor.extract(rgb)
        feats = LocalFeatures("sift", feats.xy, feats.descriptors,
                              points_from_depth(feats, cam, depth))
        kf = Keyframe("bench", (1_000 + i) * 1_000_000_000, "map", (x, y, 0.0),
                      (0.0, 0.0, float(np.sin(yaw / 2)), float(np.cos(yaw / 2))),
                      camera=STREET_CAMERA)
        pm.add(encoder.encode([rgb]), [kf], keypoints=[feats])
    pm.add_camera("bench", cam)
    return n


def _street_k(cfg: NodeBenchConfig) -> tuple[float, ...]:
    from vpr_ros.demo.scenario import ScenarioConfig, camera_matrix

    return camera_matrix(ScenarioConfig(image_size=(cfg.height, cfg.width)))


def _street_frames(cfg: NodeBenchConfig, out: Path) -> Path:
    """Dusk revisits (other lane) of the street the map holds, for the camera process."""
    from vpr_ros.demo.scenario import Route, ScenarioConfig, World, render

    scfg = ScenarioConfig(image_size=(cfg.height, cfg.width))
    world, route = World(scfg), Route(scfg)
    n = min(cfg.street_keyframes, cfg.map_size)
    frames = [render(world, scfg, *route.pose(STREET_START_M + 0.5 + s,
                                              scfg.lap2_lateral_offset_m), 2)
              for s in np.linspace(0.0, max(1.0, n - 2.0), 8)]
    np.save(out, np.stack(frames))
    return out


def _publisher(cfg: NodeBenchConfig, rate: float) -> subprocess.Popen:
    from vpr_ros._bootstrap import env_with_ros_libs

    cmd = [sys.executable, "-m", "vpr_ros.ros.node_harness", "publish", TOPIC, "--rate",
           str(rate), "--seconds", str(cfg.seconds_for(rate)), "--width", str(cfg.width), "--height",
           str(cfg.height), "--qos", cfg.qos] + (["--compressed"] if cfg.compressed else []) \
        + (["--frames", str(cfg.frames_file), "--camera-info", CAMERA_INFO_TOPIC,
            "--camera-k", ",".join(str(v) for v in _street_k(cfg))] if cfg.verify else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_with_ros_libs())


def cpu_times() -> Optional[list[int]]:
    """The machine's aggregate CPU tick counters (user, nice, system, idle, iowait, irq,
    softirq, steal) from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu" or len(first) < 9:
        return None
    return [int(v) for v in first[1:9]]


def steal_percent(before: Optional[list[int]], after: Optional[list[int]]) -> float:
    """Share of CPU time the hypervisor gave to other guests between two :func:`cpu_times`.

    Why it is reported: on a virtual machine the wall-clock tail of a few-millisecond stage
    is mostly the vCPU being descheduled, which no code in the node can change; a p95 read
    next to this figure says whether it measured the node or the host."""
    if before is None or after is None:
        return math.nan
    delta = [a - b for a, b in zip(after, before)]
    total = sum(delta)
    return round(100.0 * delta[7] / total, 2) if total > 0 else math.nan


def thread_cpu_s(native_id: Optional[int]) -> float:
    """CPU seconds a thread of this process has run (Linux schedstat, ns resolution), NaN
    where that is not available.

    Why: the executor thread takes and deserializes every camera message, including those the
    mailbox then drops; its CPU per received frame is the cost of the input rate itself, which
    the per-frame stages (encoder thread) do not show."""
    from vpr_ros.ros.diagnostics import schedstat

    times = schedstat(native_id) if native_id is not None else None
    return times[0] / 1e9 if times is not None else math.nan


def _measure_rate(harness: Any, cfg: NodeBenchConfig, rate: float) -> dict[str, Any]:
    stats = harness.stats
    stats.clear_timings()
    ticks = cpu_times()
    executor_cpu = thread_cpu_s(harness.executor_thread_id)
    before = (stats.received, stats.processed, stats.dropped, sum(stats.errors.values()))
    max_pending = [0]
    stop = threading.Event()

    def sample() -> None:  # the mailbox depth, every PENDING_SAMPLE_S
        while not stop.is_set():
            max_pending[0] = max(max_pending[0], harness.node.pending_frames)
            time.sleep(PENDING_SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc = _publisher(cfg, rate)
    try:
        out, err = proc.communicate(timeout=cfg.seconds_for(rate) + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    while not harness.idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    stop.set()
    sampler.join(1)
    if proc.returncode != 0:
        raise ConfigError(f"the camera process failed (exit {proc.returncode}): "
                          f"{(err or out).strip()[-2000:]}")
    sent = json.loads(out.strip().splitlines()[-1])
    timings = stats.timings()
    stages = summarise(timings)
    processing = [t.total - t.wait for t in timings]
    received = stats.received - before[0]
    executor_cpu = thread_cpu_s(harness.executor_thread_id) - executor_cpu
    return {
        "rate_hz": rate, "achieved_hz": round(sent["achieved_hz"], 2), "sent": sent["sent"],
        "received": received, "processed": stats.processed - before[1],
        "dropped": stats.dropped - before[2],
        "errors": sum(stats.errors.values()) - before[3],
        "max_pending": max_pending[0],
        "max_wait_over_processing": (max(t.wait for t in timings) / max(processing)
                                     if timings and max(processing) > 0 else math.nan),
        "latency_trend_ms": latency_trend_ms(timings),
        "cpu_steal_pct": steal_percent(ticks, cpu_times()),
        "executor_cpu_ms_per_received": (round(1e3 * executor_cpu / received, 3)
                                         if received else math.nan),
        "stages_ms": stages,
        "stages_cpu_ms": summarise_cpu(timings),
        "overhead_attribution": overhead_attribution(timings),
    }


def run_node_bench(cfg: NodeBenchConfig,
                   progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Prepare model and map, host the node, play the camera at each rate; plain figures."""
    from vpr_ros.ros.diagnostics import Stopwatch
    from vpr_ros.ros.node_harness import NodeHarness

    say = progress or (lambda msg: None)
    tmp = None
    if cfg.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vpr_bench_node_")
        workdir = Path(tmp.name)
    else:
        workdir = Path(cfg.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        say("model")
        model = _prepare_model(cfg, workdir)
        say(f"map of {cfg.map_size} keyframes")
        pmap = _prepare_map(cfg, model, workdir)
        if cfg.verify:
            cfg.frames_file = _street_frames(cfg, workdir / "street_frames.npy")
        say("configuring the node")
        params = {"mode": "localization", "model": str(model), "map": str(pmap),
                  "backend": cfg.backend, "threads": cfg.threads, "top_k": cfg.top_k,
                  "image_transport": "compressed" if cfg.compressed else "raw",
                  "qos_reliability": cfg.qos,
                  "relocalization.one_shot": False, "diagnostics_window": 1_000_000,
                  "log_throttle_s": 60.0,
                  # random descriptors have no keypoints: without --verify nothing to verify
                  "verification.enabled": cfg.verify, "camera.name": STREET_CAMERA,
                  # every frame's candidates reach verification (what is measured)
                  **({"relocalization.min_score": 0.0} if cfg.verify else {})}
        t0 = time.perf_counter()
        harness = NodeHarness(params, {"image": TOPIC, "camera_info": CAMERA_INFO_TOPIC})
        configure_s = time.perf_counter() - t0
        try:
            encoder = harness.node.pipeline.encoder
            identity = {"backend": encoder.backend, "input_size": list(encoder.input_size),
                        "dim": encoder.dim, "fingerprint": encoder.fingerprint}
            rows = []
            Stopwatch.probe_scheduler = True  # per-stage run-queue delay and blocking
            for rate in cfg.rates:
                say(f"{rate:g} Hz for {cfg.seconds_for(rate):g} s")
                rows.append(_measure_rate(harness, cfg, rate))
        finally:
            Stopwatch.probe_scheduler = False
            harness.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    worst = max(r["stages_ms"]["overhead"]["p95"] for r in rows)
    # A queue of q frames makes a frame wait q processing times; the mailbox allows one at
    # most, and then a frame waits at most for the one being processed.
    no_growth = all(r["max_pending"] <= 1 and not r["max_wait_over_processing"] > 1.5
                    for r in rows)
    cfg_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {"config": cfg_dict, "machine": machine_info(), "encoder": identity,
            "configure_s": round(configure_s, 2), "rates": rows,
            "overhead_p95_ms_worst": worst,
            "target": {"overhead_p95_ms": OVERHEAD_TARGET_MS,
                       "overhead_met": bool(worst <= OVERHEAD_TARGET_MS),
                       "no_queue_growth": bool(no_growth)}}


def _f(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per input rate, p50 / p95 per stage in ms."""
    head = ["rate Hz", "sent", "processed", "dropped", "max waiting", "wait/proc", *REPORTED,
            "overhead CPU", "overhead w/o paused vCPU", "run queue", "blocked %",
            "executor CPU / received", "trend", "steal %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rates"]:
        cells = [f"{r['rate_hz']:g} ({r['achieved_hz']:g})", str(r["sent"]), str(r["processed"]),
                 str(r["dropped"]), str(r["max_pending"]), _f(r["max_wait_over_processing"])]
        cells += [f"{_f(r['stages_ms'][s]['p50'])} / {_f(r['stages_ms'][s]['p95'])}"
                  for s in REPORTED]
        cpu = r["stages_cpu_ms"]["overhead"]
        cells.append(f"{_f(cpu['p50'])} / {_f(cpu['p95'])}")
        att = r.get("overhead_attribution") or {}
        for key in ("overhead_unpaused_ms", "run_queue_ms"):
            pct = att.get(key, {})
            cells.append(f"{_f(pct.get('p50', math.nan))} / {_f(pct.get('p95', math.nan))}")
        cells.append(_f(att.get("blocked_frames_pct", math.nan)))
        cells.append(_f(r.get("executor_cpu_ms_per_received", math.nan)))
        cells.append(_f(r["latency_trend_ms"]))
        cells.append(_f(r.get("cpu_steal_pct", math.nan)))
        lines.append("| " + " | ".join(cells) + " |")
    t = result["target"]
    enc = result["encoder"]
    lines += ["", f"encoder {enc['backend']} {enc['input_size']} -> {enc['dim']}-D; map "
              f"{result['config']['map_size']} keyframes ({result['config']['index']}); "
              f"frames {result['config']['width']}x{result['config']['height']} "
              f"{'JPEG' if result['config']['compressed'] else 'rgb8'}",
              f"overhead (all but encode) p95, worst rate: {_f(result['overhead_p95_ms_worst'])}"
              f" ms (target <= {t['overhead_p95_ms']:g}: "
              f"{'met' if t['overhead_met'] else 'NOT met'})"
              f"; queue growth: {'none' if t['no_queue_growth'] else 'YES'}",
              f"machine: {result['machine'].get('cpu')} x{result['machine'].get('cores')}, "
              f"load {result['machine'].get('load_average_1m')}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- the CLI

def _float_list(text: str) -> list[float]:
    import argparse

    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive rates, e.g. 5,15,30,100")
    return values


def register(sub: Any) -> None:
    """Add ``node`` to the ``vpr bench`` sub-parsers."""
    p = sub.add_parser(
        "node", help="per-frame latency breakdown of vpr_node through DDS at several rates",
        description="Host vpr_node (localization mode) with a small model and a map of "
        "synthetic keyframes, publish camera frames to it from another process at each rate, "
        "and report p50/p95 per stage (conversion, preprocess, encode, search, sequence, "
        "decision, publish), waiting, end-to-end and transport latency, drops and queue growth.")
    p.add_argument("--model", type=Path, help="model directory (default: a new "
                   "GeM + EfficientNet-Lite0 from config/models/gem_effnetlite0.yaml)")
    p.add_argument("--input-size", type=int, help="square input size of the default model "
                   "(default: the config's, 224)")
    p.add_argument("--map-size", type=int, default=10_000, help="keyframes in the map "
                   "(default 10000)")
    p.add_argument("--index", default="flat", help="map index kind (default flat)")
    p.add_argument("--rates", type=_float_list, default=[5.0, 15.0, 30.0, 100.0],
                   metavar="HZ[,HZ...]", help="camera rates (default 5,15,30,100)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per rate (default 8)")
    p.add_argument("--min-frames", type=int, default=150, help="measure each rate long enough "
                   "to send at least this many frames, so that p95 is not one frame's luck "
                   "(default 150: 30 s at 5 Hz; 0: --seconds only)")
    p.add_argument("--image-size", default="640x480", metavar="WxH",
                   help="camera frame size (default 640x480)")
    p.add_argument("--compressed", action="store_true", help="JPEG CompressedImage frames")
    p.add_argument("--qos", choices=["reliable", "best_effort"], default="reliable",
                   help="camera and subscription reliability (default reliable: best-effort "
                   "raw 640x480 frames are mostly lost in DDS fragmentation on a busy host)")
    p.add_argument("--backend", default="auto",
                   help="encoder backend: auto, torch, onnxruntime, tensorrt (default auto)")
    p.add_argument("--threads", type=int, default=0, help="encoder threads (0: default)")
    p.add_argument("--workdir", type=Path, help="keep model and map here (default: temp)")
    p.add_argument("--verify", action="store_true",
                   help="geometric verification on: the camera shows dusk revisits of the "
                   "demo street whose 40 keyframes (SIFT + depth points) are in the map; the "
                   "extract, match and estimate stages are timed")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_cli)


def run_cli(args: Any) -> int:
    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--image-size {args.image_size!r} must look like 640x480")
    cfg = NodeBenchConfig(model=args.model, input_size=args.input_size, map_size=args.map_size,
                          index=args.index, rates=args.rates, seconds=args.seconds,
                          min_frames=args.min_frames,
                          width=width, height=height, compressed=args.compressed, qos=args.qos,
                          backend=args.backend, threads=args.threads, workdir=args.workdir,
                          verify=args.verify)

    def progress(msg: str) -> None:
        print(f"[bench node] {msg}", file=sys.stderr, flush=True)

    result = run_node_bench(cfg, progress)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry (``python -m vpr_ros.bench.node_bench``), same options as the CLI."""
    import argparse

    from vpr_ros._bootstrap import ensure_ros_libs

    ensure_ros_libs()
    parser = argparse.ArgumentParser(prog="vpr bench")
    register(parser.add_subparsers(dest="benchmark", required=True))
    args = parser.parse_args(["node", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
