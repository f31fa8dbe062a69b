"""A reference pose-graph back end for loop closures: gtsam factors, iSAM2, a robust kernel.

What a SLAM back end does with ``vpr_node``'s closures, in the smallest honest form:

- **Keyframes from odometry.** Every odometry pose is looked at; one becomes a graph variable
  when the robot has travelled ``keyframe_distance_m``, turned ``keyframe_rotation_deg`` or
  ``keyframe_interval_s`` passed. Consecutive keyframes are joined by a ``BetweenFactorPose3``
  holding the odometry increment; its noise grows with the square root of the distance (a
  random walk per metre, :attr:`PoseGraphConfig.odom_translation_noise`), so a long stretch of
  odometry is soft and a short one stiff. The first keyframe is held by a tight prior: the map
  frame is the odometry frame at start.
- **Closures onto the keyframes.** A closure names two image stamps, not keyframes; each end is
  attached to the keyframe nearest in time, and the small odometry motion between the stamp and
  that keyframe is composed into the measurement (looked up in the raw odometry history of
  ``odometry_history_s``, or between keyframes for older stamps), and its noise into the
  measurement's covariance. What the measurement is depends on what the front end
  published (:mod:`vpr_ros.slam.closures`):

  - a *metric relative transform* (geometric verification): the query camera's pose in the
    match camera's frame, carried into the robot frame through the camera's mount
    (``camera.mount_*``), with the published covariance (or ``transform_*`` deviations without
    one);
  - a *unit-direction transform* (scale unknown): its rotation, and a same-place translation;
  - *no transform* (place recognition only): with ``closure_without_transform: same_place``,
    the weak constraint that the two robot poses coincide, with deviations of a few metres and
    ~20 degrees (``same_place_*``). A place recogniser matches views taken from nearby and facing
    the same way, so this is what the match itself says; it is far looser than a verified
    transform but far tighter than odometry after a lap. ``skip`` ignores such closures.

- **Robust kernel.** Every loop factor goes through an M-estimator (dynamic covariance scaling
  by default, full weight up to ``robust_kernel_width`` standard deviations): a closure that
  disagrees with odometry and the other closures by many deviations keeps only a small weight,
  so one wrong closure cannot fold the map. Odometry factors are Gaussian.
- **iSAM2.** Each new keyframe is one incremental update; a closure triggers the update plus
  ``closure_extra_updates`` more iterations (relinearisation re-evaluates the robust weights).

No ROS types: the node (:mod:`vpr_ros.ros.pose_graph_node`) converts messages, the demo and
``vpr eval slam`` read the result through :meth:`PoseGraph.trajectory`.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Optional

import gtsam
import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.slam import se3
from vpr_ros.slam.closures import ClosureMeasurement
from vpr_ros.slam.config import PoseGraphConfig

NS_PER_S = 1_000_000_000
#: Standard deviations of the prior holding the first keyframe (fixes the gauge freedom).
_PRIOR_SIGMAS = np.array([1e-4] * 3 + [1e-3] * 3)


def _key(index: int) -> int:
    return gtsam.symbol("x", index)


@dataclass
class GraphKeyframe:
    """One pose variable: its stamp and the odometry pose there (odometry frame)."""

    index: int
    stamp_ns: int
    odom: gtsam.Pose3


@dataclass
class LoopFactorInfo:
    """A loop factor that entered the graph, and what the optimum says about it."""

    closure: ClosureMeasurement
    match_index: int
    query_index: int
    kind: str                      # transform | rotation_same_place | same_place
    factor: Any = field(repr=False)
    gaussian: Any = field(repr=False)
    mahalanobis: float = math.nan  # at the latest estimate
    weight: float = math.nan       # robust weight at the latest estimate
    accepted: bool = False


@dataclass
class PoseGraphStats:
    odometry_messages: int = 0
    odometry_dropped: int = 0      # stamps going backwards (late), not a clock reset
    resets: int = 0
    keyframes: int = 0
    closures_received: int = 0
    closures_added: int = 0
    closures_skipped: Counter = field(default_factory=Counter)  # reason -> count
    updates: int = 0
    update_ms: deque = field(default_factory=lambda: deque(maxlen=500))

    def as_dict(self) -> dict[str, Any]:
        ms = np.asarray(self.update_ms, dtype=np.float64)
        return {"odometry_messages": self.odometry_messages,
                "odometry_dropped": self.odometry_dropped, "resets": self.resets,
                "keyframes": self.keyframes, "closures_received": self.closures_received,
                "closures_added": self.closures_added,
                "closures_skipped": sum(self.closures_skipped.values()),
                **{f"closures_skipped_{k}": v for k, v in sorted(self.closures_skipped.items())},
                "updates": self.updates,
                "update_p50_ms": float(np.percentile(ms, 50)) if ms.size else math.nan,
                "update_p95_ms": float(np.percentile(ms, 95)) if ms.size else math.nan}


class OdometryHistory:
    """Raw odometry samples of the last ``horizon_s``, as growable arrays (64 bytes a sample:
    an hour at 50 Hz is 11 MB), for looking up the pose at any closure stamp between two
    samples instead of between keyframes metres apart."""

    def __init__(self, horizon_s: float) -> None:
        self.horizon_ns = int(horizon_s * NS_PER_S)
        self._stamps = np.zeros(1024, dtype=np.int64)
        self._poses = np.zeros((1024, 7), dtype=np.float64)  # x y z qx qy qz qw
        self._start = 0
        self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    def append(self, stamp_ns: int, pose: gtsam.Pose3) -> None:
        if self._end == len(self._stamps):
            keep = slice(self._start, self._end)
            n = self._end - self._start
            size = max(1024, 2 * n)
            stamps, poses = np.zeros(size, dtype=np.int64), np.zeros((size, 7))
            stamps[:n], poses[:n] = self._stamps[keep], self._poses[keep]
            self._stamps, self._poses, self._start, self._end = stamps, poses, 0, n
        self._stamps[self._end] = stamp_ns
        self._poses[self._end, :3] = se3.position_of(pose)
        self._poses[self._end, 3:] = se3.quaternion_of(pose)
        self._end += 1
        horizon = stamp_ns - self.horizon_ns
        while self._end - self._start > 2 and self._stamps[self._start + 1] < horizon:
            self._start += 1

    def at(self, stamp_ns: int) -> Optional[gtsam.Pose3]:
        stamps = self._stamps[self._start:self._end]
        if stamps.size == 0 or not (stamps[0] <= stamp_ns <= stamps[-1]):
            return None
        i = int(np.searchsorted(stamps, stamp_ns, side="left"))
        row = self._start + i
        exact = se3.pose3(self._poses[row, :3], self._poses[row, 3:])
        if stamps[i] == stamp_ns:
            return exact
        before = se3.pose3(self._poses[row - 1, :3], self._poses[row - 1, 3:])
        t = (stamp_ns - int(stamps[i - 1])) / (int(stamps[i]) - int(stamps[i - 1]))
        return se3.interpolate(before, exact, t)


def _robust(kind: str, width: float) -> Any:
    """The M-estimator, its parameter in Mahalanobis distance for all kinds (gtsam's DCS
    takes a squared distance: full weight up to sqrt(c))."""
    est = gtsam.noiseModel.mEstimator
    if kind == "dcs":
        return est.DCS.Create(width * width)
    return {"huber": est.Huber, "cauchy": est.Cauchy,
            "geman_mcclure": est.GemanMcClure}[kind].Create(width)


class PoseGraph:
    """Odometry keyframes + loop closures, optimised incrementally (see the module doc)."""

    def __init__(self, config: PoseGraphConfig = PoseGraphConfig()) -> None:
        self.config = config
        self.extrinsic = se3.pose3(config.camera_position, config.camera_orientation)
        self._robust = None if config.robust_kernel == "none" else \
            _robust(config.robust_kernel, config.robust_kernel_width)
        self.stats = PoseGraphStats()
        self._init_state()

    # ------------------------------------------------------------------------------ state
    def _init_state(self) -> None:
        params = gtsam.ISAM2Params()
        params.setRelinearizeThreshold(self.config.relinearize_threshold)
        params.relinearizeSkip = self.config.relinearize_skip
        self._isam = gtsam.ISAM2(params)
        self.keyframes: list[GraphKeyframe] = []
        self._kf_stamps: list[int] = []
        self._kf_odom: list[gtsam.Pose3] = []
        self.loops: list[LoopFactorInfo] = []
        self._raw = OdometryHistory(self.config.odometry_history_s)
        self._pending: list[tuple[ClosureMeasurement, float]] = []
        self._latest_estimate: Optional[gtsam.Pose3] = None
        self._last_stamp: Optional[int] = None
        self._estimate_cache: Optional[gtsam.Values] = None

    def reset(self) -> None:
        """Start over (a clock reset: a bag restarted, a new run)."""
        self.stats.resets += 1
        self._init_state()

    @property
    def last_odometry_stamp_ns(self) -> Optional[int]:
        return self._last_stamp

    @property
    def pending_closures(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------------------ odometry
    def add_odometry(self, stamp_ns: int, pose: gtsam.Pose3, now_s: Optional[float] = None
                     ) -> bool:
        """Feed one odometry pose (odometry frame). Returns True when it became a keyframe
        (the graph was updated). Stamps must increase: one far behind restarts the graph
        (``time_jump_s``), one slightly behind is dropped and counted."""
        stamp_ns = int(stamp_ns)
        if self._last_stamp is not None and stamp_ns <= self._last_stamp:
            if self._last_stamp - stamp_ns > self.config.time_jump_s * NS_PER_S:
                self.reset()
            else:
                self.stats.odometry_dropped += 1
                return False
        self.stats.odometry_messages += 1
        self._last_stamp = stamp_ns
        self._raw.append(stamp_ns, pose)
        added = self._maybe_keyframe(stamp_ns, pose)
        if self._pending:
            self.process_pending(now_s)
        return added

    def _maybe_keyframe(self, stamp_ns: int, pose: gtsam.Pose3) -> bool:
        c = self.config
        if self.keyframes:
            last = self.keyframes[-1]
            delta = last.odom.between(pose)
            moved = se3.translation_norm(delta) >= c.keyframe_distance_m > 0
            turned = c.keyframe_rotation_deg > 0 and \
                math.degrees(se3.rotation_angle(delta)) >= c.keyframe_rotation_deg
            waited = c.keyframe_interval_s > 0 and \
                (stamp_ns - last.stamp_ns) >= c.keyframe_interval_s * NS_PER_S
            if not (moved or turned or waited):
                return False
        self._add_keyframe(stamp_ns, pose)
        return True

    def _odometry_sigmas(self, delta: gtsam.Pose3) -> np.ndarray:
        """Standard deviations (gtsam order) of an odometry increment: a random walk per
        metre travelled, floored."""
        c = self.config
        root = math.sqrt(max(se3.translation_norm(delta), 0.0))
        st = max(c.odom_translation_sigma_min_m, c.odom_translation_noise * root)
        sr = max(c.odom_rotation_sigma_min_rad, c.odom_rotation_noise * root)
        return np.array([sr] * 3 + [st] * 3)

    def _odometry_noise(self, delta: gtsam.Pose3) -> Any:
        return gtsam.noiseModel.Diagonal.Sigmas(self._odometry_sigmas(delta))

    def _add_keyframe(self, stamp_ns: int, pose: gtsam.Pose3) -> None:
        index = len(self.keyframes)
        graph = gtsam.NonlinearFactorGraph()
        values = gtsam.Values()
        if index == 0:
            graph.add(gtsam.PriorFactorPose3(_key(0), pose,
                                             gtsam.noiseModel.Diagonal.Sigmas(_PRIOR_SIGMAS)))
            initial = pose
        else:
            prev = self.keyframes[-1]
            delta = prev.odom.between(pose)
            graph.add(gtsam.BetweenFactorPose3(_key(prev.index), _key(index), delta,
                                               self._odometry_noise(delta)))
            base = self._latest_estimate if self._latest_estimate is not None else prev.odom
            initial = base.compose(delta)
        values.insert(_key(index), initial)
        self.keyframes.append(GraphKeyframe(index, stamp_ns, pose))
        self._kf_stamps.append(stamp_ns)
        self._kf_odom.append(pose)
        self.stats.keyframes = len(self.keyframes)
        self._update(graph, values, extra=0)

    # ------------------------------------------------------------------------------ closures
    def add_closure(self, closure: ClosureMeasurement, now_s: Optional[float] = None) -> str:
        """Feed one closure; returns what happened: ``added``, ``pending`` (its query stamp is
        newer than the odometry so far) or ``skipped:<reason>``."""
        self.stats.closures_received += 1
        return self._try_closure(closure, now_s, first=True)

    def process_pending(self, now_s: Optional[float] = None) -> None:
        """Retry closures that waited for odometry; drop those that waited too long."""
        waiting, self._pending = self._pending, []
        for closure, since in waiting:
            if now_s is not None and now_s - since > self.config.closure_wait_s:
                self.stats.closures_skipped["odometry_timeout"] += 1
                continue
            self._try_closure(closure, since, first=False)

    def _skip(self, reason: str) -> str:
        self.stats.closures_skipped[reason] += 1
        return f"skipped:{reason}"

    def _try_closure(self, closure: ClosureMeasurement, now_s: Optional[float], first: bool
                     ) -> str:
        c = self.config
        if c.require_verified and closure.verified is False:
            return self._skip("unverified")
        if not closure.has_transform and c.closure_without_transform == "skip":
            return self._skip("no_transform")
        if not self.keyframes:
            if first:
                self._pending.append((closure, time.monotonic() if now_s is None else now_s))
                return "pending"
            return self._skip("before_odometry")
        if closure.query_stamp_ns > (self._last_stamp or 0):
            self._pending.append((closure, time.monotonic() if now_s is None else now_s))
            return "pending"
        first_stamp = self._kf_stamps[0]
        if closure.match_stamp_ns < first_stamp or closure.query_stamp_ns < first_stamp:
            return self._skip("before_odometry")
        m_pose, q_pose = self.odometry_at(closure.match_stamp_ns), \
            self.odometry_at(closure.query_stamp_ns)
        if m_pose is None or q_pose is None:
            return self._skip("no_odometry_at_stamp")
        a, b = self._nearest_keyframe(closure.match_stamp_ns), \
            self._nearest_keyframe(closure.query_stamp_ns)
        if a == b:
            return self._skip("same_keyframe")
        measured_q_in_m, cov_z, kind = self._measurement(closure)
        # Move the measurement's two ends from the image stamps to the keyframes:
        # T_a_b = (T_a^-1 T_m) Z (T_q^-1 T_b), the offsets taken from odometry. Their own
        # odometry noise joins the covariance (right perturbations: for A Z B,
        # xi = Ad(B^-1 Z^-1) xi_A + Ad(B^-1) xi_Z + xi_B): in a curve, half a keyframe
        # spacing of odometry is already a degree of heading, as much as a verified transform's.
        ka, kb = self.keyframes[a], self.keyframes[b]
        d_a, d_b = ka.odom.between(m_pose), q_pose.between(kb.odom)
        z = d_a.compose(measured_q_in_m).compose(d_b)
        ad_a = measured_q_in_m.compose(d_b).inverse().AdjointMap()
        ad_z = d_b.inverse().AdjointMap()
        cov = (ad_a @ np.diag(self._odometry_sigmas(d_a) ** 2) @ ad_a.T
               + ad_z @ cov_z @ ad_z.T + np.diag(self._odometry_sigmas(d_b) ** 2))
        gaussian = gtsam.noiseModel.Gaussian.Covariance(0.5 * (cov + cov.T))
        model = gaussian if self._robust is None else \
            gtsam.noiseModel.Robust.Create(self._robust, gaussian)
        factor = gtsam.BetweenFactorPose3(_key(a), _key(b), z, model)
        graph = gtsam.NonlinearFactorGraph()
        graph.add(factor)
        self.loops.append(LoopFactorInfo(closure, a, b, kind, factor, gaussian))
        self.stats.closures_added += 1
        self._update(graph, gtsam.Values(), extra=c.closure_extra_updates)
        return "added"

    def _measurement(self, closure: ClosureMeasurement) -> tuple[gtsam.Pose3, np.ndarray, str]:
        """The robot-frame relative pose (query in match) and its covariance (gtsam order)."""
        c = self.config
        same_place = se3.diagonal_covariance(c.same_place_translation_sigma_m,
                                             c.same_place_rotation_sigma_rad)
        if closure.relative is None:
            return gtsam.Pose3(), same_place, "same_place"
        if closure.covariance is not None and se3.is_covariance(closure.covariance):
            cov_cam = se3.match_frame_to_right_covariance(
                se3.ros_to_gtsam_covariance(closure.covariance), closure.relative)
        else:
            cov_cam = se3.diagonal_covariance(c.transform_translation_sigma_m,
                                              c.transform_rotation_sigma_rad)
        rel = se3.conjugate(closure.relative, self.extrinsic)
        cov = se3.conjugate_covariance(cov_cam, self.extrinsic)
        if closure.metric:
            return rel, cov, "transform"
        # Scale unknown: keep the rotation (and its covariance), say "same place" for the
        # translation (a unit direction carries no distance).
        out = np.zeros((6, 6))
        out[:3, :3] = cov[:3, :3]
        out[3:, 3:] = same_place[3:, 3:]
        return gtsam.Pose3(rel.rotation(), np.zeros(3)), out, "rotation_same_place"

    # ------------------------------------------------------------------------------ lookups
    def _nearest_keyframe(self, stamp_ns: int) -> int:
        i = bisect.bisect_left(self._kf_stamps, stamp_ns)
        if i == 0:
            return 0
        if i == len(self._kf_stamps):
            return i - 1
        before, after = self._kf_stamps[i - 1], self._kf_stamps[i]
        return i if after - stamp_ns < stamp_ns - before else i - 1

    def odometry_at(self, stamp_ns: int) -> Optional[gtsam.Pose3]:
        """Odometry pose at a stamp: from the raw history where it reaches, else between
        keyframes; None outside both."""
        pose = self._raw.at(stamp_ns)
        if pose is not None:
            return pose
        stamps = self._kf_stamps
        if not stamps or not (stamps[0] <= stamp_ns <= stamps[-1]):
            return None
        i = bisect.bisect_left(stamps, stamp_ns)
        if stamps[i] == stamp_ns:
            return self._kf_odom[i]
        t = (stamp_ns - stamps[i - 1]) / (stamps[i] - stamps[i - 1])
        return se3.interpolate(self._kf_odom[i - 1], self._kf_odom[i], t)

    # ------------------------------------------------------------------------------ solve
    def _update(self, graph: gtsam.NonlinearFactorGraph, values: gtsam.Values, extra: int
                ) -> None:
        t0 = time.perf_counter()
        self._isam.update(graph, values)
        for _ in range(extra):
            self._isam.update()
        self._latest_estimate = self._isam.calculateEstimatePose3(_key(len(self.keyframes) - 1))
        self._estimate_cache = None
        self.stats.updates += 1
        self.stats.update_ms.append(1e3 * (time.perf_counter() - t0))

    def estimate(self) -> gtsam.Values:
        """The current estimate of every keyframe (computed once per graph change)."""
        if self._estimate_cache is None:
            self._estimate_cache = self._isam.calculateEstimate() if self.keyframes \
                else gtsam.Values()
        return self._estimate_cache

    def refine(self, iterations: int = 10) -> None:
        """Extra iSAM2 iterations (e.g. once at the end of a run, before reporting)."""
        if not self.keyframes:
            return
        self._update(gtsam.NonlinearFactorGraph(), gtsam.Values(), extra=max(0, iterations - 1))

    # ------------------------------------------------------------------------------ outputs
    def trajectory(self) -> list[tuple[int, gtsam.Pose3]]:
        """Optimised keyframe poses (map frame), in time order."""
        est = self.estimate()
        return [(k.stamp_ns, est.atPose3(_key(k.index))) for k in self.keyframes]

    def odometry_trajectory(self) -> list[tuple[int, gtsam.Pose3]]:
        """The keyframes' raw odometry poses (odometry frame)."""
        return [(k.stamp_ns, k.odom) for k in self.keyframes]

    def latest_pose(self) -> Optional[gtsam.Pose3]:
        return self._latest_estimate

    def map_to_odom(self) -> gtsam.Pose3:
        """T_map_odom: where the odometry frame sits in the map frame after optimisation
        (identity before any keyframe)."""
        if not self.keyframes or self._latest_estimate is None:
            return gtsam.Pose3()
        return self._latest_estimate.compose(self.keyframes[-1].odom.inverse())

    def corrected(self, odom_pose: gtsam.Pose3) -> gtsam.Pose3:
        """An odometry pose carried into the map frame."""
        return self.map_to_odom().compose(odom_pose)

    def evaluate_loops(self) -> list[LoopFactorInfo]:
        """Residual (Mahalanobis distance), robust weight and acceptance of every loop factor
        at the current estimate."""
        est = self.estimate()
        for info in self.loops:
            err = info.factor.unwhitenedError(est)
            d = float(info.gaussian.mahalanobisDistance(err))
            info.mahalanobis = d
            info.weight = 1.0 if self._robust is None else float(self._robust.weight(d))
            info.accepted = d <= self.config.inlier_distance
        return self.loops

    def summary(self) -> dict[str, Any]:
        loops = self.evaluate_loops()
        out = self.stats.as_dict()
        out["closures_pending"] = len(self._pending)
        out["closures_accepted"] = sum(1 for i in loops if i.accepted)
        out["closures_rejected"] = sum(1 for i in loops if not i.accepted)
        return out


def check_pose(position: Any, quaternion_xyzw: Any) -> gtsam.Pose3:
    """Validate and convert an incoming pose (raises :class:`InputError` on a bad one)."""
    try:
        return se3.pose3(position, quaternion_xyzw)
    except (TypeError, ValueError) as exc:
        raise InputError(f"pose {position!r} / {quaternion_xyzw!r} is malformed: {exc}") from None
