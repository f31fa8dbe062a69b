"""The pose-graph proof: ``vpr_node``'s closures into ``vpr_pose_graph``, trajectory error with evo.

Used by ``vpr demo`` (its loop-closure stage) and ``vpr eval slam`` (a user's bag). Beside the
real ``vpr_node`` in loop-closure mode, fed by ``vpr bag play``:

- ``vpr_pose_graph`` (subprocess, rclpy over DDS) takes the bag's odometry and the node's
  ``~/loop_closure`` messages and publishes the optimised path;
- optionally a second ``vpr_pose_graph`` runs *the same run* with one planted wrong closure:
  a relay copies every closure to it and, after the tenth, adds one that joins the query to the
  place farthest from it (by ground truth). Comparing the two shows what one wrong closure costs
  under the robust kernel.

Afterwards the absolute trajectory error (evo ``ape``, SE(3) Umeyama alignment, translation
part) of the odometry and of the optimised graph, both at the graph's keyframe stamps, against
ground truth; every closure checked against ground truth (:func:`judge_closure`: wrong when
what it claims about the query's place relative to the match is off by more than the radius),
and which of them the graph accepted at its optimum
(``pose_graph_closures.json``: stamps, Mahalanobis distance, weight, verdict, truth); a plot of
ground truth, odometry and the optimised trajectory.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vpr_ros.errors import ConfigError, VPRError
from vpr_ros.mapdb.poses import PoseTrack, interpolate

NS_PER_S = 1_000_000_000
PLANTED_NODE = "vpr_pose_graph_planted"
PLANTED_TOPIC = "/vpr_demo/planted_loop_closure"
#: The planted closure goes in after this many real ones (the graph has some closures then, as
#: in the middle of a run; a wrong closure before any true one is covered by the unit tests).
PLANT_AFTER = 10
#: The planted match is taken at least this long before the query (a plausible past keyframe).
PLANT_MIN_AGE_S = 10.0


def pose_graph_command() -> list[str]:
    """The ``vpr_pose_graph`` console script of this installation, or its module where the
    script is not installed (a checkout used without ``pip install -e .``)."""
    script = Path(sys.executable).with_name("vpr_pose_graph")
    if script.exists():
        return [str(script)]
    found = shutil.which("vpr_pose_graph")
    if found:
        return [found]
    return [sys.executable, "-m", "vpr_ros.ros.pose_graph_main"]


@dataclass
class SlamSetup:
    """What the companion needs besides the run: topics, ground truth, what to plant."""

    odom_topic: str
    ground_truth: PoseTrack
    odometry: PoseTrack
    plant: bool = True
    params: dict[str, Any] = field(default_factory=dict)
    correct_radius_m: float = 5.0


class PoseGraphCompanion:
    """``vpr_pose_graph`` (and the planted twin) running beside ``vpr_node`` for one run; see
    :func:`vpr_ros.demo.run._drive_node`, which starts it before playing the bag and settles it
    after the node has caught up."""

    def __init__(self, out: Path, setup: SlamSetup, log: Any = print) -> None:
        self.out = out
        self.setup = setup
        self.log = log
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.collectors: dict[str, Any] = {}
        self.relay: Any = None
        self.clean: Any = None
        self.planted: Any = None

    def _start_node(self, name: str, closures_topic: str) -> None:
        from vpr_ros.demo.run import _env
        from vpr_ros.resources import config_file

        cmd = [*pose_graph_command(), "--ros-args", "--params-file",
               str(config_file("vpr_pose_graph.yaml")),
               "-p", "odometry_qos_reliability:=reliable"]
        for k, v in self.setup.params.items():
            value = str(v).lower() if isinstance(v, bool) else str(v)
            cmd += ["-p", f"{k}:={value}"]
        cmd += ["-r", f"odometry:={self.setup.odom_topic}", "-r",
                f"loop_closure:={closures_topic}"]
        if name != "vpr_pose_graph":
            cmd += ["-r", f"__node:={name}"]
        log_path = self.out / f"{name}.log"
        log = open(log_path, "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
        log.close()
        self.procs.append((name, proc, log_path))

    def start(self) -> None:
        from vpr_ros.ros.pose_graph_collector import ClosureRelay, PoseGraphCollector

        self.collectors["vpr_pose_graph"] = PoseGraphCollector("vpr_pose_graph")
        self._start_node("vpr_pose_graph", "/vpr_node/loop_closure")
        if self.setup.plant:
            self.collectors[PLANTED_NODE] = PoseGraphCollector(PLANTED_NODE)
            self.relay = ClosureRelay("/vpr_node/loop_closure", PLANTED_TOPIC, PLANT_AFTER,
                                      self._wrong_closure)
            self._start_node(PLANTED_NODE, PLANTED_TOPIC)
        deadline = time.monotonic() + 120
        for name, collector in self.collectors.items():
            while not collector.diagnostics():
                self.check_alive()
                if time.monotonic() > deadline:
                    raise VPRError(f"{name} published no diagnostics in 120 s; see "
                                   f"{self.out / (name + '.log')}")
                time.sleep(0.3)
        self.log(f"  vpr_pose_graph running{' (and a twin with one planted wrong closure)' if self.setup.plant else ''}")

    def _wrong_closure(self, fields: Mapping[str, float]) -> Optional[dict[str, float]]:
        """The triggering closure with its match moved to the place farthest from the query."""
        gt = self.setup.ground_truth
        q_ns = int(round(fields["query_stamp_s"] * NS_PER_S))
        q = interpolate(gt, q_ns, max_gap_s=1.0)
        old = gt.stamps_ns < q_ns - int(PLANT_MIN_AGE_S * NS_PER_S)
        if q is None or not old.any():
            return None
        d = np.hypot(gt.positions[old, 0] - q.position[0], gt.positions[old, 1] - q.position[1])
        i = int(np.argmax(d))
        out = dict(fields)
        out["match_stamp_s"] = int(gt.stamps_ns[old][i]) / NS_PER_S
        for name in ("match_keyframe_id",):
            if name in out:
                out[name] = -1.0
        for name in ("match_x", "match_y", "match_z", "match_qx", "match_qy", "match_qz",
                     "match_qw"):
            if name in out:
                out[name] = math.nan
        out["planted_distance_m"] = float(d[i])
        return out

    def subscribers(self, topic: str) -> int:
        """How many of this companion's nodes listen to a played topic (the bag player waits
        for all of them, so none misses the first odometry)."""
        return len(self.procs) if topic == self.setup.odom_topic else 0

    def check_alive(self) -> None:
        for name, proc, log_path in self.procs:
            if proc.poll() is not None:
                raise VPRError(f"{name} exited with {proc.returncode}; log {log_path}:\n"
                               + log_path.read_text()[-2000:])

    def settle(self, closures_published: int, timeout_s: float = 120.0) -> None:
        """Wait until every graph took every closure sent to it and published its path."""
        if self.relay is not None:
            self.relay.wait_idle(3.0)
        expected = {"vpr_pose_graph": closures_published}
        if self.relay is not None:
            expected[PLANTED_NODE] = self.relay.sent
        deadline = time.monotonic() + timeout_s
        for name, n in expected.items():
            collector = self.collectors[name]
            while not collector.settled(n):
                self.check_alive()
                if time.monotonic() > deadline:
                    d = collector.diagnostics()
                    raise VPRError(f"{name} took {d.get('closures_received', '?')} of {n} "
                                   f"closures in {timeout_s:.0f} s; see {self.out / (name + '.log')}")
                time.sleep(0.3)
        time.sleep(1.2)  # one more path period: the last path reflects the last update
        self.clean = self.collectors["vpr_pose_graph"].snapshot()
        if PLANTED_NODE in self.collectors:
            self.planted = self.collectors[PLANTED_NODE].snapshot()

    def stop(self) -> None:
        import signal

        for name, proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for name, proc, _ in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for c in self.collectors.values():
            c.close()
        if self.relay is not None:
            self.relay.close()


# ------------------------------------------------------------------------------ evaluation

def _samples_at(track: PoseTrack, stamps: Sequence[int]) -> list:
    out = []
    for s in stamps:
        p = interpolate(track, int(s), max_gap_s=1.0)
        if p is not None and p.orientation is not None:
            out.append((int(s), p.position, p.orientation))
    return out


@dataclass
class ClosureTruth:
    distance_m: float                       # between the two robot poses, by ground truth
    transform_error_m: Optional[float]      # metric transform vs the true relative pose
    transform_error_deg: Optional[float]
    wrong: bool


def judge_closure(gt: PoseTrack, fields: Mapping[str, float], mount: Any, radius_m: float
                  ) -> Optional[ClosureTruth]:
    """A closure against ground truth, by what it claims about where the query is relative to
    the match: wrong when that claim is off by more than ``radius_m``. A closure with a metric
    transform claims the query camera's pose in the match camera's frame (compared with the
    true one through the camera mount): a verified pose between views 6 m apart is right. One
    without (or with a direction only) claims the same place: its error is the distance
    between the two places."""
    from vpr_ros.slam import se3
    from vpr_ros.slam.closures import closure_from_fields

    q = interpolate(gt, int(round(fields["query_stamp_s"] * NS_PER_S)), max_gap_s=1.0)
    m = interpolate(gt, int(round(fields["match_stamp_s"] * NS_PER_S)), max_gap_s=1.0)
    if q is None or m is None:
        return None
    dist = math.hypot(q.position[0] - m.position[0], q.position[1] - m.position[1])
    c = closure_from_fields(fields)
    if c.relative is None or not c.metric or q.orientation is None or m.orientation is None:
        return ClosureTruth(dist, None, None, dist > radius_m)
    true = se3.pose3(m.position, m.orientation).compose(mount).between(
        se3.pose3(q.position, q.orientation).compose(mount))
    err = c.relative.between(true)
    t_err, r_err = se3.translation_norm(err), math.degrees(se3.rotation_angle(err))
    return ClosureTruth(dist, t_err, r_err, t_err > radius_m)


def evaluate_slam(companion: PoseGraphCompanion, closures: Sequence[Mapping[str, float]],
                  out: Path) -> dict[str, Any]:
    """ATE of odometry and optimised graph, closure truth and acceptance, planted-closure
    effect; writes ``trajectories.png``."""
    from vpr_ros.eval.trajectory import absolute_trajectory_error, plot_trajectories

    setup = companion.setup
    gt = setup.ground_truth
    clean = companion.clean
    if clean is None or len(clean.path) < 3:
        raise VPRError("vpr_pose_graph published no path (did odometry arrive on "
                       f"{setup.odom_topic}?); see {out / 'vpr_pose_graph.log'}")
    stamps = [s for s, _, _ in clean.path]
    ate_odo = absolute_trajectory_error(_samples_at(setup.odometry, stamps), gt,
                                        name="odometry")
    ate_opt = absolute_trajectory_error(clean.path, gt, name="optimised graph")
    from vpr_ros.ros.pose_graph_params import settings_from_values
    from vpr_ros.slam import se3

    radius = setup.correct_radius_m
    graph_cfg = settings_from_values(setup.params)[1]
    mount = se3.pose3(graph_cfg.camera_position, graph_cfg.camera_orientation)
    truth = [judge_closure(gt, c, mount, radius) for c in closures]
    by_stamps = {(round(c["query_stamp_s"], 6), round(c["match_stamp_s"], 6)): t
                 for c, t in zip(closures, truth)}
    rows = [(r, by_stamps.get((round(r["query_stamp_s"], 6), round(r["match_stamp_s"], 6))))
            for r in clean.loop_factors]
    wrong_published = sum(1 for t in truth if t is not None and t.wrong)
    accepted = [(r, t) for r, t in rows if r.get("accepted", 0.0) >= 0.5]
    wrong_accepted = sum(1 for _, t in accepted if t is not None and t.wrong)
    diag = clean.diagnostics
    report: dict[str, Any] = {
        "keyframes": len(clean.path),
        "closures_published": len(closures),
        "closures_metric": sum(1 for t in truth if t is not None
                               and t.transform_error_m is not None),
        "closures_wrong_published": wrong_published,
        "closures_in_graph": int(diag.get("closures_added", len(clean.loop_factors))),
        "closures_accepted": len(accepted),
        "closures_wrong_accepted": wrong_accepted,
        "update_p95_ms": float(diag.get("update_p95_ms", "nan")),
        "pose_graph_diagnostics": dict(diag),
        "ate_odometry": ate_odo.as_dict(),
        "ate_optimised": ate_opt.as_dict(),
        "improvement": ate_odo.rmse / max(ate_opt.rmse, 1e-9),
        "correct_radius_m": radius,
    }
    verdicts = [{**row, **({} if t is None else {
        "truth_distance_m": t.distance_m, "transform_error_m": t.transform_error_m,
        "transform_error_deg": t.transform_error_deg, "wrong": t.wrong})} for row, t in rows]
    (out / "pose_graph_closures.json").write_text(json.dumps(verdicts, indent=1))
    results = {"odometry alone": ate_odo, "optimised pose graph": ate_opt}
    planted_segment = None
    if companion.planted is not None and companion.relay is not None \
            and companion.relay.planted is not None and len(companion.planted.path) >= 3:
        fields = companion.relay.planted
        ate_planted = absolute_trajectory_error(companion.planted.path, gt,
                                                name="planted run")
        verdict = [r for r in companion.planted.loop_factors
                   if abs(r["query_stamp_s"] - fields["query_stamp_s"]) < 1e-6
                   and abs(r["match_stamp_s"] - fields["match_stamp_s"]) < 1e-6]
        report["planted"] = {
            "query_stamp_s": fields["query_stamp_s"], "match_stamp_s": fields["match_stamp_s"],
            "distance_m": fields.get("planted_distance_m"),
            "ate_optimised": ate_planted.as_dict(),
            "ate_change": ate_planted.rmse / max(ate_opt.rmse, 1e-9) - 1.0,
            "accepted": bool(verdict and verdict[0].get("accepted", 0.0) >= 0.5),
            "mahalanobis": verdict[0]["mahalanobis"] if verdict else None,
        }
        results["optimised, one planted wrong closure"] = ate_planted
        q = interpolate(gt, int(round(fields["query_stamp_s"] * NS_PER_S)), 1.0)
        m = interpolate(gt, int(round(fields["match_stamp_s"] * NS_PER_S)), 1.0)
        if q is not None and m is not None:
            planted_segment = (q.position, m.position)
    segments = []
    for c, t in zip(closures, truth):
        if t is None:
            continue
        q = interpolate(gt, int(round(c["query_stamp_s"] * NS_PER_S)), 1.0)
        m = interpolate(gt, int(round(c["match_stamp_s"] * NS_PER_S)), 1.0)
        segments.append((q.position, m.position, not t.wrong))
    report["plot"] = str(plot_trajectories(
        out / "trajectories.png", gt, results, closures=segments, planted=planted_segment,
        title="odometry vs pose graph with loop closures (SE(3)-aligned, evo APE)"))
    return report


def format_slam(r: dict[str, Any]) -> list[str]:
    """The ATE table and the closure checks, as report lines."""
    odo, opt = r["ate_odometry"], r["ate_optimised"]
    lines = [
        f"pose graph     {r['keyframes']} keyframes; {r['closures_published']} closures "
        f"published ({r['closures_metric']} with a metric transform; "
        f"{r['closures_wrong_published']} wrong by ground truth), "
        f"{r['closures_in_graph']} in the graph, {r['closures_accepted']} accepted at the "
        f"optimum, {r['closures_wrong_accepted']} of them wrong",
        "               ATE (evo APE, SE(3) aligned)   RMSE      mean    median       max",
        f"               odometry alone             {odo['rmse_m']:7.2f} m {odo['mean_m']:7.2f} m"
        f" {odo['median_m']:7.2f} m {odo['max_m']:7.2f} m",
        f"               optimised pose graph       {opt['rmse_m']:7.2f} m {opt['mean_m']:7.2f} m"
        f" {opt['median_m']:7.2f} m {opt['max_m']:7.2f} m   ({r['improvement']:.1f}x lower)",
    ]
    p = r.get("planted")
    if p:
        pa = p["ate_optimised"]
        lines.append(
            f"               + 1 planted wrong closure  {pa['rmse_m']:7.2f} m {pa['mean_m']:7.2f} m"
            f" {pa['median_m']:7.2f} m {pa['max_m']:7.2f} m   ({100 * p['ate_change']:+.1f} %; "
            f"{p['distance_m']:.0f} m wrong, {'ACCEPTED' if p['accepted'] else 'rejected'})")
    lines.append(f"               plot: {r['plot']}")
    return lines


def ground_truth_tracks(bag: Path, odom_topic: str, gt_topic: str) -> tuple[PoseTrack, PoseTrack]:
    """(odometry, ground truth) pose tracks of a bag, both with orientations."""
    from vpr_ros.mapdb.bag_reader import BagReader

    with BagReader(bag) as reader:
        odom, gt = reader.poses(odom_topic), reader.poses(gt_topic)
    for name, topic, track in (("odometry", odom_topic, odom), ("ground truth", gt_topic, gt)):
        if len(track) < 3 or track.orientations is None:
            raise ConfigError(f"{topic}: the {name} topic has {len(track)} poses"
                              f"{'' if track.orientations is not None else ' without orientation'}"
                              "; trajectory error needs an Odometry or PoseStamped topic with "
                              "at least 3 messages")
    return odom, gt


def run_slam(bag: Path, image_topic: str, odom_topic: str, gt_topic: str, out: Path,
             model: Optional[Path] = None, rate: float = 1.0, backend: str = "auto",
             compressed: bool = False, exclusion_window_s: float = 30.0,
             radius_m: float = 5.0, plant: bool = False,
             graph_params: Optional[Mapping[str, Any]] = None,
             camera_info_topic: Optional[str] = None, depth_topic: Optional[str] = None,
             log: Any = print) -> dict[str, Any]:
    """``vpr eval slam``: vpr_node (loop closure, live map) + vpr_pose_graph over a bag played
    by ``vpr bag play``; returns (and writes to ``out/slam.json``) :func:`evaluate_slam`'s
    report."""
    from vpr_ros.demo.run import DemoOptions, _default_model, _drive_node
    from vpr_ros.mapdb.bag_reader import BagReader
    from vpr_ros.resources import config_file

    bag = Path(bag)
    if not bag.exists():
        raise ConfigError(f"{bag}: no such bag; give a rosbag2 directory (sqlite3 or MCAP)")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from vpr_ros.mapdb.camera import sibling_topic

    with BagReader(bag) as reader:
        topics = set(reader.topics)
    for what, topic in (("image", image_topic), ("camera_info", camera_info_topic),
                        ("depth", depth_topic)):
        if topic is not None and topic not in topics:
            raise ConfigError(f"{bag} has no {what} topic {topic}; it has: "
                              f"{', '.join(sorted(topics)) or 'none'}")
    if camera_info_topic is None and sibling_topic(image_topic) in topics:
        camera_info_topic = sibling_topic(image_topic)
    odom, gt = ground_truth_tracks(bag, odom_topic, gt_topic)
    log(f"vpr eval slam: {bag} ({len(odom)} odometry, {len(gt)} ground-truth poses); "
        f"writing to {out}")
    model = Path(model).resolve() if model else _default_model(out, log)
    opts = DemoOptions(out=out, model=model, bag=bag, image_topic=image_topic,
                       pose_topic=odom_topic, rate=rate, compressed=compressed,
                       correct_radius_m=radius_m, backend=backend, log=log)
    companion = PoseGraphCompanion(out, SlamSetup(odom_topic=odom_topic, ground_truth=gt,
                                                  odometry=odom, plant=plant,
                                                  params=dict(graph_params or {}),
                                                  correct_radius_m=radius_m), log=log)
    params: dict[str, Any] = {
        "model": str(model), "backend": backend,
        "image_transport": "compressed" if compressed else "raw",
        "pose_type": "odometry", "map_index": "flat",
        "loop_closure.exclusion_window_s": float(exclusion_window_s)}
    remaps = {"image": image_topic, "odometry": odom_topic}
    played = [image_topic, odom_topic]
    # Calibration (and registered depth) make vpr_node's verified closures carry a relative
    # camera pose (metric with depth): the pose graph uses it instead of a same-place guess.
    if camera_info_topic:
        remaps["camera_info"] = camera_info_topic
        played.append(camera_info_topic)
    if depth_topic:
        params["camera.use_depth"] = True
        remaps["depth"] = depth_topic
        played.append(depth_topic)
    log(f"  camera_info: {camera_info_topic or 'none (closures without a relative pose)'}; "
        f"depth: {depth_topic or 'none (relative poses up to scale)'}")
    data, diag = _drive_node(opts, config_file("vpr_loop_closure.yaml"), params, remaps, bag,
                             played, "slam", companions=[companion])
    report = evaluate_slam(companion, data.loop_closures, out)
    report = {"bag": str(bag), "frames_processed": int(diag.get("frames_processed", 0)),
              "frames_dropped": int(diag.get("frames_dropped", 0)),
              "graph_params": dict(graph_params or {}), **report}
    (out / "slam.json").write_text(json.dumps(report, indent=2))
    return report
