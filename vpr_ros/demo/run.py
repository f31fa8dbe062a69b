"""``vpr demo``: the whole system, end to end, as a robot would run it.

1. Record: the built-in scenario (a rendered route driven twice, dusk on lap 2) is written as
   real rosbags — or the user's own bag is used.
2. Model: a model directory (default: pretrained EfficientNet-Lite0 + GeM, which ships with
   the environment; any model directory can be passed).
3. Map: ``vpr map build`` on lap 1 (a subprocess, exactly the mapper's command).
4. Relocalization: the real ``vpr_node`` (subprocess, rclpy over DDS on loopback) in
   localization mode is fed lap 2 by ``vpr bag play``; what it publishes is collected from
   the wire and compared with ground truth.
5. Loop closure: the node in loop-closure mode (live map, odometry poses) is fed the whole run;
   its closures are checked against ground truth. Beside it, on the built-in route,
   ``vpr_pose_graph`` (gtsam, iSAM2) turns the drifting odometry and the closures into an
   optimised trajectory, and a twin of it gets one planted wrong closure more
   (:mod:`vpr_ros.demo.slam_run`); evo measures both against ground truth.
6. Report: a printed summary, ``report.json`` and plots (route with matches, PR curve,
   trajectories).

Ground truth of a user's bag: its pose topic (positions: a match is correct within
``correct_radius_m``), or, for a bag without poses, a loop ground-truth file (``loop_gt``: CSV
of query/match stamps or an N x N matrix, see :mod:`vpr_ros.eval.loop_truth`), which judges the
loop closures and the candidates; with neither, the report says in its first line that nothing
was checked and gives what can be known without ground truth (frames, closures, scores,
latency).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vpr_ros.errors import ConfigError, VPRError
from vpr_ros.mapdb.camera import sibling_topic

GroundTruth = Callable[[int], Optional[tuple[float, float]]]
#: Whether two stamps show the same place (None: cannot be told).
SamePlace = Callable[[int, int], Optional[bool]]


@dataclass
class DemoOptions:
    out: Path
    model: Optional[Path] = None
    bag: Optional[Path] = None           # the user's own recording (replaces the scenario)
    map_bag: Optional[Path] = None       # user mode: bag to build the map from (default: bag)
    image_topic: str = "/camera/image_raw"
    pose_topic: Optional[str] = "/odom"
    camera_info_topic: Optional[str] = None  # user mode: default the image topic's sibling
    depth_topic: Optional[str] = None        # user mode: registered depth (3-D map points)
    loop_gt: Optional[Path] = None       # user mode: loop ground truth of --bag (no poses)
    loop_gt_tolerance: int = 2           # frames either side a ground-truth loop still counts
    rate: float = 2.0
    storage: str = "sqlite3"
    compressed: bool = False
    correct_radius_m: float = 5.0
    backend: str = "auto"
    quick: bool = False                  # a shorter scenario (tests)
    rear_camera: bool = True             # scenario: a rear camera too, relocalization 1 vs 2
    node_params: dict[str, str] = field(default_factory=dict)  # -p NAME:=VALUE for every run
    log: Callable[[str], None] = field(default=print)


# ------------------------------------------------------------------------------ subprocesses

def _exe(name: str) -> str:
    """An entry point of this installation (beside the interpreter), else from PATH."""
    here = Path(sys.executable).with_name(name)
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"the `{name}` command is not installed; run `pip install -e .` in the "
                          "project (or `make demo`, which does it)")
    return found


def _env() -> dict[str, str]:
    from vpr_ros._bootstrap import env_with_ros_libs

    env = env_with_ros_libs()
    # The demo's DDS traffic stays on this machine.
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd: Sequence[str], log_path: Path, timeout_s: float) -> None:
    with open(log_path, "w") as log:
        proc = subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=_env(),
                              timeout=timeout_s)
    if proc.returncode != 0:
        tail = log_path.read_text()[-2000:]
        raise VPRError(f"`{' '.join(cmd[:3])} ...` failed (exit {proc.returncode}); log "
                       f"{log_path}:\n{tail}")


class _NodeProcess:
    """``vpr_node`` as a subprocess with autostart, stopped with SIGINT like Ctrl-C."""

    def __init__(self, params_file: Path, params: dict[str, Any], remaps: dict[str, str],
                 log_path: Path) -> None:
        cmd = [_exe("vpr_node"), "--ros-args", "--params-file", str(params_file)]
        for k, v in {**params, "autostart": True}.items():
            value = str(v).lower() if isinstance(v, bool) else str(v)
            cmd += ["-p", f"{k}:={value}"]
        for k, v in remaps.items():
            cmd += ["-r", f"{k}:={v}"]
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=_env())

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise VPRError(f"vpr_node exited with {self.proc.returncode}; log {self.log_path}:\n"
                           + self.log_path.read_text()[-2000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _drive_node(opts: DemoOptions, params_file: Path, params: dict[str, Any],
                remaps: dict[str, str], bag: Path, topics: Sequence[str], name: str,
                companions: Sequence[Any] = ()) -> tuple[Any, dict[str, str]]:
    """Start the node, wait until active, play the bag into it, wait until it has caught up;
    return what was collected from the wire and the node's last diagnostics.

    ``companions`` (e.g. the pose graph, :class:`~vpr_ros.demo.slam_run.PoseGraphCompanion`)
    are started once the node is active, before the bag plays, and settled with the number of
    loop closures the node published once it has caught up."""
    from vpr_ros.ros.output_collector import OutputCollector

    collector = OutputCollector("vpr_node")
    node = _NodeProcess(params_file, {**params, **opts.node_params}, remaps,
                        opts.out / f"{name}_node.log")
    started: list[Any] = []
    try:
        deadline = time.monotonic() + 300
        while collector.diagnostics().get("lifecycle_state") != "active":
            node.check_alive()
            if time.monotonic() > deadline:
                raise VPRError(f"vpr_node did not become active in 300 s; see {node.log_path}")
            time.sleep(0.3)
        for companion in companions:
            started.append(companion)
            companion.start()
        opts.log(f"  vpr_node active ({collector.diagnostics().get('backend')}); playing "
                 f"{bag.name} at rate {opts.rate:g}")
        extra = {t: 1 + sum(c.subscribers(t) for c in companions) for t in topics}
        _run([_exe("vpr"), "bag", "play", str(bag), "--rate", str(opts.rate),
              "--wait-subscribers", "30", "--topics", *topics,
              *(a for t, n in extra.items() if n > 1 for a in ("--min-subscribers", f"{t}={n}"))],
             opts.out / f"{name}_play.log", timeout_s=3600)

        def caught_up(c: Any) -> bool:
            d = c.diagnostics()
            cams = [k[:-len(".frames_received")] for k in d
                    if k.startswith("camera.") and k.endswith(".frames_received")]
            if len(cams) > 1:  # one decision takes a frame of every camera: count per camera
                done = sum(int(d.get(f"{cam}.{k}", 0)) for cam in cams
                           for k in ("frames_processed", "frames_dropped", "errors"))
            else:
                done = sum(int(d.get(k, 0)) for k in ("frames_processed", "frames_dropped",
                                                       "errors_total"))
            return int(d.get("frames_received", -1)) <= done
        time.sleep(1.5)  # at least one fresh diagnostics period after the last frame
        collector.wait_for(caught_up, timeout_s=120)
        time.sleep(1.2)
        node.check_alive()
        for companion in companions:
            companion.settle(len(collector.data.loop_closures))
        return collector.data, collector.diagnostics()
    finally:
        for companion in started:
            companion.stop()
        node.stop()
        collector.close()


# ------------------------------------------------------------------------------ evaluation

def _within(gt: GroundTruth, stamp_a: int, xy_b: tuple[float, float], radius: float
            ) -> Optional[bool]:
    a = gt(stamp_a)
    if a is None:
        return None
    return math.hypot(a[0] - xy_b[0], a[1] - xy_b[1]) <= radius


def evaluate_relocalization(data: Any, gt: GroundTruth, radius: float) -> dict[str, Any]:
    errors = []
    for r in data.relocalizations:
        a = gt(r["stamp_ns"])
        if a is not None:
            errors.append(math.hypot(a[0] - r["x"], a[1] - r["y"]))
    top1 = []
    for stamp, arr in data.candidates:
        if len(arr) and np.isfinite(arr["x"][0]):
            ok = _within(gt, stamp, (float(arr["x"][0]), float(arr["y"][0])), radius)
            if ok is not None:
                top1.append(ok)
    e = np.asarray(errors)
    return {"relocalizations": len(data.relocalizations),
            "median_error_m": float(np.median(e)) if e.size else None,
            "p90_error_m": float(np.percentile(e, 90)) if e.size else None,
            "within_radius": float((e <= radius).mean()) if e.size else None,
            "frames_with_candidates": len(top1),
            "top1_within_radius": float(np.mean(top1)) if top1 else None}


def same_place_by_position(gt: GroundTruth, radius: float) -> SamePlace:
    """Two stamps are the same place when their ground-truth positions are within
    ``radius`` metres."""
    def same(a: int, b: int) -> Optional[bool]:
        pa, pb = gt(a), gt(b)
        if pa is None or pb is None:
            return None
        return math.hypot(pa[0] - pb[0], pa[1] - pb[1]) <= radius
    return same


def evaluate_loop_closures(data: Any, same: SamePlace,
                           revisit_frames: Optional[int] = None,
                           frame_of: Optional[Callable[[int], Optional[int]]] = None
                           ) -> dict[str, Any]:
    """Precision of the published closures; with ``revisit_frames`` (the number of frames
    that revisit a place, from loop ground truth) and ``frame_of`` also the recall: the
    share of those frames for which a correct closure was published."""
    correct = []
    found: set[int] = set()
    for c in data.loop_closures:
        q_ns = int(round(c["query_stamp_s"] * 1e9))
        ok = same(q_ns, int(round(c["match_stamp_s"] * 1e9)))
        if ok is not None:
            correct.append(ok)
            if ok and frame_of is not None:
                frame = frame_of(q_ns)
                if frame is not None:
                    found.add(frame)
    out: dict[str, Any] = {"loop_closures": len(data.loop_closures),
                           "precision": float(np.mean(correct)) if correct else None,
                           "checked": len(correct)}
    if revisit_frames is not None:
        out["revisit_frames"] = revisit_frames
        out["recall"] = len(found) / revisit_frames if revisit_frames else None
    return out


def pr_curve(data: Any, same: SamePlace, revisits: Callable[[int], bool]
             ) -> dict[str, list[float]]:
    """Precision/recall of the top-1 candidate over score thresholds (single frames, before
    the detector's temporal consistency): what the threshold parameter trades off."""
    scored = []
    positives = 0
    for stamp, arr in data.candidates:
        has_revisit = revisits(stamp)
        positives += int(has_revisit)
        if len(arr):
            ok = same(stamp, int(round(float(arr["stamp"][0]) * 1e9)))
            if ok is not None:
                scored.append((float(arr["score"][0]), bool(ok)))
    if not scored or positives == 0:
        return {"threshold": [], "precision": [], "recall": []}
    scores = np.array([s for s, _ in scored])
    ok = np.array([c for _, c in scored])
    ths = np.unique(np.quantile(scores, np.linspace(0, 1, 41)))
    prec, rec = [], []
    for t in ths:
        sel = scores >= t
        tp = int((ok & sel).sum())
        prec.append(tp / max(1, int(sel.sum())))
        rec.append(tp / positives)
    return {"threshold": ths.tolist(), "precision": prec, "recall": rec}


# ------------------------------------------------------------------------------ plots

def plot_results(out: Path, map_xy: np.ndarray, gt_xy: np.ndarray, reloc_pairs: list,
                 loop_pairs: list, pr: dict[str, list[float]], route: bool = True
                 ) -> list[Path]:
    """``route_matches.png`` (only with positions: ``route``) and ``pr_curve.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if route:
        paths.append(_plot_route(out, map_xy, gt_xy, reloc_pairs, loop_pairs))
    fig, ax = plt.subplots(figsize=(5, 4))
    if pr["recall"]:
        ax.plot(pr["recall"], pr["precision"], marker=".", color="tab:blue")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("loop-closure candidates: top-1 precision/recall")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "pr_curve.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def _plot_route(out: Path, map_xy: np.ndarray, gt_xy: np.ndarray, reloc_pairs: list,
                loop_pairs: list) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    if len(gt_xy):
        ax.plot(gt_xy[:, 0], gt_xy[:, 1], color="0.75", lw=1, label="query run (ground truth)")
    if len(map_xy):
        ax.scatter(map_xy[:, 0], map_xy[:, 1], s=6, color="tab:blue", label="map keyframes")
    for (q, m, ok) in reloc_pairs:
        ax.plot([q[0], m[0]], [q[1], m[1]], color="tab:green" if ok else "tab:red", lw=0.8)
    for (q, m, ok) in loop_pairs:
        ax.plot([q[0], m[0]], [q[1], m[1]], color="tab:purple" if ok else "tab:orange",
                lw=0.8, ls="--")
    ax.plot([], [], color="tab:green", label="relocalization (correct)")
    ax.plot([], [], color="tab:red", label="relocalization (wrong)")
    ax.plot([], [], color="tab:purple", ls="--", label="loop closure (correct)")
    ax.plot([], [], color="tab:orange", ls="--", label="loop closure (wrong)")
    ax.set_aspect("equal")
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.set_title("vpr demo: map, query route and matches")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / "route_matches.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ the demo

def _default_model(out: Path, log: Callable[[str], None]) -> Path:
    from vpr_ros.models.model_dir import create_model_dir
    from vpr_ros.resources import config_file

    model = out / "model"
    if not (model / "model.json").is_file():
        meta = create_model_dir(config_file("models", "gem_effnetlite0.yaml"), model)
        log(f"  model: {meta.config.name} ({meta.descriptor_dim}-D, ImageNet EfficientNet-Lite0 "
            "from its pip package, no training needed)")
    return model


def _bag_ground_truth(bag: Path, pose_topic: str) -> tuple[GroundTruth, np.ndarray]:
    from vpr_ros.mapdb.bag_reader import BagReader
    from vpr_ros.mapdb.poses import interpolate

    with BagReader(bag) as reader:
        track = reader.poses(pose_topic)

    def at(stamp_ns: int) -> Optional[tuple[float, float]]:
        pose = interpolate(track, stamp_ns, max_gap_s=1.0)
        return None if pose is None else (float(pose.position[0]), float(pose.position[1]))
    xy = np.asarray(track.positions)[:, :2] if len(track) else np.zeros((0, 2))
    return at, xy


def bag_topics(bag: Path) -> set[str]:
    from vpr_ros.mapdb.bag_reader import BagReader

    with BagReader(bag) as reader:
        return set(reader.topics)


def evaluate_verification(data: Any, gt: GroundTruth, keyframe_xy: dict[int, tuple],
                          radius: float) -> dict[str, Any]:
    """Every verified and rejected candidate of the run (``~/verification``) judged against
    ground truth: a verified candidate should be the right place, a rejected one usually the
    wrong one (or one too far to see the same scene)."""
    rows = []
    for v in data.verifications:
        q = gt(int(round(v["stamp_s"] * 1e9)))
        m = keyframe_xy.get(int(v["keyframe_id"]))
        if q is None or m is None:
            continue
        rows.append((bool(v["verified"]), math.hypot(q[0] - m[0], q[1] - m[1]),
                     float(v["inliers"]), float(v["match_ms"]) + float(v["estimate_ms"])))
    verified = [r for r in rows if r[0]]
    rejected = [r for r in rows if not r[0]]
    cost = [r[3] for r in rows]
    return {
        "candidates": len(rows), "verified": len(verified), "rejected": len(rejected),
        "verified_correct": float(np.mean([r[1] <= radius for r in verified]))
        if verified else None,
        "rejected_wrong": float(np.mean([r[1] > radius for r in rejected]))
        if rejected else None,
        "cost_ms_per_candidate_p50": float(np.percentile(cost, 50)) if cost else None,
        "cost_ms_per_candidate_p95": float(np.percentile(cost, 95)) if cost else None,
        "rows": rows}


def plot_verification(out: Path, rows: list[tuple], radius: float) -> Path:
    """Verified and rejected candidates: inliers against their true distance to the query."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for ok, colour, label in ((True, "tab:green", "verified"), (False, "tab:red", "rejected")):
        pts = np.array([(r[1], max(r[2], 0.5)) for r in rows if r[0] == ok]).reshape(-1, 2)
        ax.scatter(pts[:, 0], pts[:, 1], s=10, color=colour, alpha=0.6,
                   label=f"{label} ({len(pts)})")
    ax.axvline(radius, color="0.5", ls="--", lw=0.8, label=f"{radius:g} m (correct within)")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_yscale("log")
    ax.set_xlabel("true distance between query and candidate keyframe [m]")
    ax.set_ylabel("inliers")
    ax.set_title("geometric verification of the candidates (localization run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "verification.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def image_stamps(bag: Path, topic: str) -> list[int]:
    """Header stamps of every message on an image topic, in recording order (the frame
    indices a loop ground-truth matrix counts)."""
    from vpr_ros.mapdb.bag_reader import BagReader

    with BagReader(bag) as reader:
        reader.check_topic(topic, ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage"))
        return reader.stamps(topic)


def _nearest_lookup(truth: dict[int, tuple[int, float, float, float]]
                    ) -> Callable[[int], Optional[tuple[int, float, float, float]]]:
    """Scenario ground truth by stamp, tolerant of the float-seconds round trip of stamps
    published in messages (to 1 ms)."""
    keys = np.array(sorted(truth), dtype=np.int64)

    def get(stamp_ns: int) -> Optional[tuple[int, float, float, float]]:
        at = int(np.searchsorted(keys, stamp_ns))
        best = min((k for k in (at - 1, at) if 0 <= k < len(keys)),
                   key=lambda k: abs(int(keys[k]) - stamp_ns), default=None)
        if best is None or abs(int(keys[best]) - stamp_ns) > 1_000_000:
            return None
        return truth[int(keys[best])]
    return get


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run every stage; return the report (also written to ``out/report.json``)."""
    from vpr_ros.mapdb.place_map import PlaceMap
    from vpr_ros.resources import config_file

    t0 = time.monotonic()
    out = opts.out.resolve()
    opts.out = out
    out.mkdir(parents=True, exist_ok=True)
    log = opts.log
    log(f"vpr demo: writing everything to {out}")
    if "ROS_DOMAIN_ID" not in os.environ:
        # The demo's nodes, player and collector talk only to each other: a domain of their
        # own keeps another ROS program on this machine (a second demo, a test run) from
        # feeding them its camera frames.
        os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)
        log(f"  ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']} (set ROS_DOMAIN_ID to choose)")
    model = opts.model.resolve() if opts.model else _default_model(out, log)
    loop_truth = None
    ground_truth = "poses"
    rear_topic: Optional[str] = None

    # 1. recordings and ground truth
    if opts.bag is None:
        from vpr_ros.demo.record import (CAMERA_INFO_TOPIC, DEPTH_TOPIC, GT_TOPIC, IMAGE_TOPIC,
                                         ODOM_TOPIC, REAR_CAMERA_INFO_TOPIC, REAR_IMAGE_TOPIC,
                                         read_ground_truth, record_scenario)
        from vpr_ros.demo.scenario import Route, ScenarioConfig

        cfg = ScenarioConfig(block_length_m=36.0, block_width_m=24.0, image_size=(240, 320)) \
            if opts.quick else ScenarioConfig()
        log("[1/5] rendering the built-in route (2 laps, dusk on lap 2) into rosbags ...")
        rec = record_scenario(out / "bags", cfg, storage=opts.storage, compressed=opts.compressed,
                              rear=opts.rear_camera)
        if opts.rear_camera:
            rear_topic = REAR_IMAGE_TOPIC
        # the RGB-D camera's calibration and registered depth (3-D points for PnP)
        info_topics = [CAMERA_INFO_TOPIC] + ([REAR_CAMERA_INFO_TOPIC] if rear_topic else [])
        depth_topic: Optional[str] = DEPTH_TOPIC
        truth = read_ground_truth(rec.ground_truth)
        lookup = _nearest_lookup(truth)
        map_bag, query_bag, full_bag = rec.lap1, rec.lap2, rec.full
        image_topic: str = IMAGE_TOPIC
        pose_topic: Optional[str] = ODOM_TOPIC
        # The site map comes from the mapping run's true poses (a map is normally built from
        # an optimised trajectory); loop closure and the pose graph get the drifting odometry.
        map_pose_topic: Optional[str] = GT_TOPIC
        log(f"  lap 1: {rec.frames_per_lap[0]} frames, lap 2: {rec.frames_per_lap[1]} frames "
            f"({opts.storage}); /odom drifts, /ground_truth is kept apart")

        def gt(stamp_ns: int) -> Optional[tuple[float, float]]:
            row = lookup(stamp_ns)
            return None if row is None else (row[1], row[2])
        query_xy = np.array([(r[1], r[2]) for r in truth.values() if r[0] == 2])
        lap_s = Route(cfg).length / cfg.lap1_speed_mps
        scenario = True
    else:
        map_bag, query_bag, full_bag = (opts.map_bag or opts.bag), opts.bag, opts.bag
        image_topic, pose_topic = opts.image_topic, opts.pose_topic or None
        map_pose_topic = pose_topic
        depth_topic = opts.depth_topic
        info_topics = [opts.camera_info_topic or sibling_topic(image_topic)]
        info_topics = [t for t in info_topics if t in bag_topics(query_bag)]
        log(f"[1/5] using your recording {opts.bag} (map from {map_bag})")
        if pose_topic:
            gt, query_xy = _bag_ground_truth(query_bag, pose_topic)
        else:
            def gt(stamp_ns: int) -> Optional[tuple[float, float]]:
                return None
            query_xy = np.zeros((0, 2))
            ground_truth = "none"
        if opts.loop_gt is not None:
            from vpr_ros.eval.loop_truth import load_loop_truth

            loop_truth = load_loop_truth(opts.loop_gt, image_stamps(query_bag, image_topic),
                                         opts.loop_gt_tolerance)
            ground_truth = "loop_gt" if not pose_topic else "poses+loop_gt"
            log(f"  loop ground truth {opts.loop_gt}: {len(loop_truth.revisit_frames)} of "
                f"{len(loop_truth)} frames revisit a place (tolerance "
                f"{opts.loop_gt_tolerance} frames)")
        elif not pose_topic:
            log("  no pose topic and no --loop-gt: NO GROUND TRUTH, the report cannot say "
                "whether any match is right (give --pose-topic or --loop-gt for that)")
        lap_s = 0.0
        scenario = False

    # 2. map from the mapping run
    log("[2/5] building the map with `vpr map build` ...")
    map_dir = out / "map"
    if map_dir.exists():
        shutil.rmtree(map_dir)
    depth_args = [] if not depth_topic else \
        ["--depth-topic", f"{image_topic}={depth_topic}" if rear_topic else depth_topic]
    _run([_exe("vpr"), "map", "build", str(map_bag), "--image-topic", image_topic,
          *([rear_topic] if rear_topic else []), *depth_args,
          *(["--pose-topic", map_pose_topic] if map_pose_topic else []), "--model", str(model),
          "-o", str(map_dir), "--no-progress", "--backend", opts.backend],
         out / "map_build.log", timeout_s=3600)
    place_map = PlaceMap.load(map_dir)
    map_kfs = place_map.keyframes(range(len(place_map)))
    map_xy = np.array([k.position[:2] for k in map_kfs if k.position is not None])
    log(f"  {len(place_map)} keyframes")

    common = {"model": str(model), "backend": opts.backend,
              "image_transport": "compressed" if opts.compressed else "raw"}
    # 3. relocalization in the prebuilt map
    log("[3/5] vpr_node in localization mode, fed the revisit by `vpr bag play` ...")
    info_remap = {"camera_info": info_topics[0]} if info_topics else {}
    loc_data, loc_diag = _drive_node(
        opts, config_file("vpr_localization.yaml"),
        {**common, "map": str(map_dir), "relocalization.one_shot": False},
        {"image": image_topic, **info_remap}, query_bag, [image_topic, *info_topics[:1]],
        "localization")
    reloc = evaluate_relocalization(loc_data, gt, opts.correct_radius_m)
    status = {round(st["stamp_s"] * 1e9): st for st in loc_data.relocalization_status}
    reloc["metric_poses"] = sum(1 for st in status.values() if st.get("metric") == 1.0)
    reloc["verified"] = sum(1 for st in status.values() if st.get("verified") == 1.0)
    keyframe_xy = {k.id: k.position[:2] for k in map_kfs if k.position is not None}
    verification = evaluate_verification(loc_data, gt, keyframe_xy, opts.correct_radius_m)
    reloc_both: Optional[dict[str, Any]] = None
    if rear_topic:
        log("[3/5] ... and again with the front and the rear camera together ...")
        both_data, both_diag = _drive_node(
            opts, config_file("vpr_localization.yaml"),
            {**common, "map": str(map_dir), "relocalization.one_shot": False,
             "cameras": f"{image_topic},{rear_topic}"},
            {}, query_bag, [image_topic, rear_topic, *info_topics], "localization_two_cameras")
        reloc_both = {**evaluate_relocalization(both_data, gt, opts.correct_radius_m),
                      "cameras": [image_topic, rear_topic],
                      "frames_processed": int(both_diag.get("frames_processed", 0)),
                      "matches_found_per_camera": {
                          t: int(both_diag.get(f"camera.{t}.matches_found", 0))
                          for t in (image_topic, rear_topic)}}

    # 4. loop closure within one run, and the pose graph that consumes the closures
    companions = []
    if scenario:
        from vpr_ros.demo.scenario import camera_mount
        from vpr_ros.demo.slam_run import PoseGraphCompanion, SlamSetup, ground_truth_tracks

        odom_track, gt_track = ground_truth_tracks(full_bag, ODOM_TOPIC, GT_TOPIC)
        mount = dict(zip(("camera.mount_x", "camera.mount_y", "camera.mount_z",
                          "camera.mount_qx", "camera.mount_qy", "camera.mount_qz",
                          "camera.mount_qw"), camera_mount(cfg)))
        companions.append(PoseGraphCompanion(out, SlamSetup(
            odom_topic=ODOM_TOPIC, ground_truth=gt_track, odometry=odom_track, params=mount,
            correct_radius_m=opts.correct_radius_m), log=log))
    log("[4/5] vpr_node in loop-closure mode over the whole run"
        + (", vpr_pose_graph beside it ..." if companions else " ..."))
    lc_params: dict[str, Any] = {
        **common, "map_index": "flat",
        # Exclusion of 85% of a lap (~40 s, ~160 m on the full route) keeps the detector from
        # "closing" on the street it drove down half a block earlier (measured offline with
        # pretrained GeM: precision 0.96 at recall 0.94 with 40 s, 0.81 with 30 s).
        "loop_closure.exclusion_window_s": round(0.85 * lap_s, 1) if scenario else 30.0,
        # A closure is judged a revisit within the correct radius; a verified metric pose
        # farther than that is the same scene seen from down the street, not a revisit.
        "verification.max_translation_m": opts.correct_radius_m}
    lc_remaps = {"image": image_topic, **info_remap}
    if depth_topic:
        lc_params["camera.use_depth"] = True
        lc_remaps["depth"] = depth_topic
    if pose_topic:
        lc_params["pose_type"] = "odometry"
        lc_remaps["odometry"] = pose_topic
    lc_data, lc_diag = _drive_node(
        opts, config_file("vpr_loop_closure.yaml"), lc_params, lc_remaps, full_bag,
        [image_topic, *info_topics[:1], *([depth_topic] if depth_topic else []),
         *([pose_topic] if pose_topic else [])], "loop_closure", companions=companions)
    slam = None
    if companions:
        from vpr_ros.demo.slam_run import evaluate_slam

        slam = evaluate_slam(companions[0], lc_data.loop_closures, out)
        plots_slam = [slam["plot"]]
    else:
        plots_slam = []
    if loop_truth is not None:
        same: Optional[SamePlace] = loop_truth.same_place
        loops = evaluate_loop_closures(lc_data, loop_truth.same_place,
                                       len(loop_truth.revisit_frames), loop_truth.frame_of)
        revisits: Callable[[int], bool] = loop_truth.has_revisit
    elif pose_topic:
        same = same_place_by_position(gt, opts.correct_radius_m)
        if scenario:
            lap2_start = min(s for s, r in truth.items() if r[0] == 2)
            revisits = lambda s: s >= lap2_start  # noqa: E731
            # every lap-2 frame revisits a place of lap 1: recall is the share of them that
            # got a correct closure
            lap2 = sorted(s for s, r in truth.items() if r[0] == 2)
            index = {s: i for i, s in enumerate(lap2)}
            loops = evaluate_loop_closures(lc_data, same, len(lap2),
                                           lambda ns: index.get(_nearest_stamp(lap2, ns)))
        else:
            revisits = lambda s: True  # noqa: E731
            loops = evaluate_loop_closures(lc_data, same)
    else:
        same = None
        loops = {"loop_closures": len(lc_data.loop_closures), "precision": None,
                 "checked": 0}
    pr = pr_curve(lc_data, same, revisits) if same is not None else \
        {"threshold": [], "precision": [], "recall": []}

    # 5. report
    log("[5/5] report and plots ...")
    reloc_pairs = []
    for r in loc_data.relocalizations:
        q = gt(r["stamp_ns"])
        if q is not None:
            reloc_pairs.append((q, (r["x"], r["y"]),
                                math.hypot(q[0] - r["x"], q[1] - r["y"]) <= opts.correct_radius_m))
    loop_pairs = []
    for c in lc_data.loop_closures:
        q, m = gt(int(round(c["query_stamp_s"] * 1e9))), gt(int(round(c["match_stamp_s"] * 1e9)))
        if q is not None and m is not None:
            loop_pairs.append((q, m, math.hypot(q[0] - m[0], q[1] - m[1]) <= opts.correct_radius_m))
    plots = plot_results(out, map_xy, query_xy, reloc_pairs, loop_pairs, pr,
                         route=bool(pose_topic)) if same is not None else []
    stamps = loop_truth.stamps_ns if loop_truth is not None else \
        np.asarray(image_stamps(full_bag, image_topic), dtype=np.int64)
    plots.append(plot_loop_matrix(out, lc_data, stamps, loop_truth))
    if verification["candidates"]:
        plots.append(plot_verification(out, verification.pop("rows"), opts.correct_radius_m))
    else:
        verification.pop("rows")
    plots.extend(Path(p) for p in plots_slam)
    _dump_wire(out / "wire_localization.json", loc_data, gt)
    _dump_wire(out / "wire_loop_closure.json", lc_data, gt)

    def lat(diag: dict[str, str]) -> dict[str, float]:
        keys = ("encode_p50", "encode_p95", "total_p50", "total_p95", "extract_p50",
                "extract_p95", "match_p50", "match_p95", "estimate_p50", "estimate_p95",
                "sequence_p50", "sequence_p95")
        return {k + "_ms": float(diag.get(f"latency_{k}_ms", "nan")) for k in keys}
    report = {
        "output_dir": str(out), "model": str(model), "map": str(map_dir),
        "map_keyframes": len(place_map), "correct_radius_m": opts.correct_radius_m,
        "ground_truth": ground_truth,
        "loop_ground_truth": None if loop_truth is None else {
            "file": loop_truth.source, "frames": len(loop_truth),
            "revisit_frames": len(loop_truth.revisit_frames),
            "tolerance_frames": loop_truth.tolerance,
            "unmatched_rows": loop_truth.unmatched_rows},
        "relocalization_two_cameras": reloc_both,
        "verification": {**verification,
                         "enabled": loc_diag.get("verification_enabled", "false") == "true",
                         **{k: int(v) for k, v in loc_diag.items()
                            if k.startswith("verification.")}},
        "relocalization": {**reloc, "frames_received": int(loc_diag.get("frames_received", 0)),
                           "frames_processed": int(loc_diag.get("frames_processed", 0)),
                           "frames_dropped": int(loc_diag.get("frames_dropped", 0)),
                           "errors": int(loc_diag.get("errors_total", 0)),
                           "relocalizations_without_pose": int(loc_diag.get(
                               "relocalizations_without_pose", 0)),
                           "top1_score_median": _top1_median(loc_data),
                           "backend": loc_diag.get("backend", ""), "latency": lat(loc_diag)},
        "loop_closure": {**loops, "frames_processed": int(lc_diag.get("frames_processed", 0)),
                         "keyframes_inserted": int(lc_diag.get("keyframes_inserted", 0)),
                         "top1_score_median": _top1_median(lc_data),
                         "sequence_length": int(lc_diag.get("sequence_length", 1)),
                         "latency": lat(lc_diag)},
        "pr_curve": pr, "plots": [str(p) for p in plots], "slam": slam,
        "wall_time_s": round(time.monotonic() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(format_report(report))
    return report


def _top1_median(data: Any) -> Optional[float]:
    scores = [float(a["score"][0]) for _, a in data.candidates if len(a)]
    return float(np.median(scores)) if scores else None


def plot_loop_matrix(out: Path, data: Any, stamps_ns: np.ndarray, truth: Any) -> Path:
    """Closures as (query frame, match frame) points over the ground-truth loop pairs when
    there are any: the picture loop-closure papers draw, and the one that needs no poses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vpr_ros.eval.loop_truth import LoopTruth

    frames = truth if truth is not None else LoopTruth(stamps_ns, set(), 0)
    fig, ax = plt.subplots(figsize=(6, 6))
    if truth is not None and truth.pairs:
        gt = np.array(sorted(truth.pairs))
        ax.scatter(gt[:, 0], gt[:, 1], s=2, color="0.8", label="ground-truth loops")
    points = {True: [], False: [], None: []}  # type: dict[Optional[bool], list]
    for c in data.loop_closures:
        q_ns, m_ns = int(round(c["query_stamp_s"] * 1e9)), int(round(c["match_stamp_s"] * 1e9))
        q, m = frames.frame_of(q_ns), frames.frame_of(m_ns)
        if q is None or m is None:
            continue
        ok = truth.same_place(q_ns, m_ns) if truth is not None else None
        points[ok].append((q, m))
    for ok, colour, label in ((True, "tab:green", "closure (correct)"),
                              (False, "tab:red", "closure (wrong)"),
                              (None, "tab:blue", "closure (no ground truth)")):
        if points[ok]:
            arr = np.array(points[ok])
            ax.scatter(arr[:, 0], arr[:, 1], s=8, color=colour, label=label)
    n = len(frames)
    ax.set_xlim(0, n)
    ax.set_ylim(0, n)
    ax.set_xlabel("query frame")
    ax.set_ylabel("matched frame")
    ax.set_title("loop closures over the frames of the run"
                 + ("" if truth is not None else "\n(NO GROUND TRUTH: not checked)"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = out / "loop_matrix.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _dump_wire(path: Path, data: Any, gt: GroundTruth) -> None:
    """What the node published, with ground truth beside it, for a closer look."""
    def truth(stamp_ns: int) -> Optional[list[float]]:
        p = gt(stamp_ns)
        return None if p is None else [p[0], p[1]]
    doc = {
        "relocalizations": [{**r, "truth": truth(r["stamp_ns"])} for r in data.relocalizations],
        "loop_closures": [{**c, "query_truth": truth(int(round(c["query_stamp_s"] * 1e9))),
                           "match_truth": truth(int(round(c["match_stamp_s"] * 1e9)))}
                          for c in data.loop_closures],
        "top1_candidates": [{"stamp_ns": s, "x": float(a["x"][0]), "y": float(a["y"][0]),
                             "score": float(a["score"][0]), "truth": truth(s)}
                            for s, a in data.candidates if len(a)],
    }
    path.write_text(json.dumps(doc, indent=1, default=float))


def _m2(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f} m"


def _ms(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _m(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.1f} m"


def _score(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _nearest_stamp(stamps: list[int], ns: int, tol_ns: int = 1_000_000) -> Optional[int]:
    """The stamp in sorted ``stamps`` within ``tol_ns`` of ``ns`` (float-seconds round trip)."""
    import bisect

    i = bisect.bisect_left(stamps, ns)
    best = min((stamps[j] for j in (i - 1, i) if 0 <= j < len(stamps)),
               key=lambda s: abs(s - ns), default=None)
    return best if best is not None and abs(best - ns) <= tol_ns else None


def format_report(r: dict[str, Any]) -> str:
    rl, lc = r["relocalization"], r["loop_closure"]
    rad = r["correct_radius_m"]
    kind = r.get("ground_truth", "poses")
    lines = ["", "== vpr demo report =="]
    if kind == "none":
        lines.append("ground truth   NONE: the bag has no pose topic and no --loop-gt was "
                     "given, so no match below is checked; counts, scores and latency only")
    elif "loop_gt" in kind:
        g = r["loop_ground_truth"]
        lines.append(f"ground truth   loops from {g['file']}: {g['revisit_frames']} of "
                     f"{g['frames']} frames revisit a place (+-{g['tolerance_frames']} frames)"
                     + ("; positions from the pose topic" if kind.startswith("poses") else ""))
    lines.append(f"map            {r['map_keyframes']} keyframes  ({r['map']})")
    lines.append(f"relocalization {rl['frames_processed']} of {rl['frames_received']} frames "
                 f"processed ({rl['frames_dropped']} dropped, {rl['errors']} errors), backend "
                 f"{rl['backend']}")
    if kind.startswith("poses"):
        lines += [
            f"               {rl['relocalizations']} poses published "
            f"({rl.get('metric_poses', 0)} PnP poses, {rl.get('verified', 0)} verified); error "
            f"median {_m2(rl['median_error_m'])}, p90 {_m2(rl['p90_error_m'])}; "
            f"{_pct(rl['within_radius'])} within {rad:g} m",
            f"               top-1 candidate within {rad:g} m on "
            f"{_pct(rl['top1_within_radius'])} of {rl['frames_with_candidates']} frames"]
        both = r.get("relocalization_two_cameras")
        if both:
            lines += [
                f"two cameras    front + rear merged: {both['relocalizations']} poses, "
                f"{_pct(both['within_radius'])} within {rad:g} m (front alone: "
                f"{_pct(rl['within_radius'])}); top-1 within {rad:g} m on "
                f"{_pct(both['top1_within_radius'])} of frames (front alone: "
                f"{_pct(rl['top1_within_radius'])})"]
    else:
        lines.append(f"               {rl['relocalizations']} poses published, "
                     f"{rl.get('relocalizations_without_pose', 0)} recognitions of keyframes "
                     f"without a pose; top-1 score median {_score(rl.get('top1_score_median'))}"
                     " (accuracy not measured: no positions)")
    if kind == "none":
        lines.append(f"loop closure   {lc['loop_closures']} closures published (not checked); "
                     f"{lc['keyframes_inserted']} live keyframes; top-1 score median "
                     f"{_score(lc.get('top1_score_median'))}")
    else:
        judged = "by the loop ground truth" if "loop_gt" in kind else \
            f"within {rad:g} m of ground truth"
        recall = f", recall {_pct(lc['recall'])} of revisiting frames" if "recall" in lc else ""
        lines.append(f"loop closure   {lc['loop_closures']} closures published, precision "
                     f"{_pct(lc['precision'])} ({judged}; {lc['checked']} checked){recall}; "
                     f"{lc['keyframes_inserted']} live keyframes")
    vr = r.get("verification") or {}
    if vr.get("enabled"):
        lines.append(
            f"verification   {vr.get('candidates', 0)} candidates checked in localization: "
            f"{vr.get('verified', 0)} verified ({_pct(vr.get('verified_correct'))} at the right "
            f"place), {vr.get('rejected', 0)} rejected ({_pct(vr.get('rejected_wrong'))} at "
            f"another place); per candidate p50 {_ms(vr.get('cost_ms_per_candidate_p50'))}, "
            f"p95 {_ms(vr.get('cost_ms_per_candidate_p95'))}; keypoint extraction p50 "
            f"{rl['latency'].get('extract_p50_ms', float('nan')):.1f} ms")
    else:
        lines.append("verification   OFF (verification.enabled false): decisions unverified")
    if r.get("slam"):
        from vpr_ros.demo.slam_run import format_slam

        lines += format_slam(r["slam"])
    lines += [
        f"latency        encode p50 {rl['latency']['encode_p50_ms']:.1f} ms / p95 "
        f"{rl['latency']['encode_p95_ms']:.1f} ms; total p50 {rl['latency']['total_p50_ms']:.1f}"
        f" ms / p95 {rl['latency']['total_p95_ms']:.1f} ms; sequence matching p50 "
        f"{rl['latency'].get('sequence_p50_ms', float('nan')):.2f} / p95 "
        f"{rl['latency'].get('sequence_p95_ms', float('nan')):.2f} ms (localization), "
        f"{lc['latency'].get('sequence_p50_ms', float('nan')):.2f} / "
        f"{lc['latency'].get('sequence_p95_ms', float('nan')):.2f} ms (loop closure)",
        f"plots          {', '.join(Path(p).name for p in r['plots'])}",
        f"everything in  {r['output_dir']}  (report.json, logs, bags, map)",
        f"wall time      {r['wall_time_s']:.0f} s",
    ]
    return "\n".join(lines)
