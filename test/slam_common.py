"""Shared helpers of the pose-graph tests (no tests here): the demo route's ground truth
without rendering, its drifted odometry, and closures built from ground truth the way
``vpr_node`` publishes them (lap-2 query stamp, the nearest lap-1 frame as the match)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from vpr_ros.demo.drift import OdometryDrift, drift_planar
from vpr_ros.demo.scenario import ScenarioConfig, poses
from vpr_ros.eval.trajectory import absolute_trajectory_error, track_from_samples
from vpr_ros.mapdb.poses import PoseTrack
from vpr_ros.slam import se3
from vpr_ros.slam.closures import ClosureMeasurement
from vpr_ros.slam.config import PoseGraphConfig
from vpr_ros.slam.pose_graph import PoseGraph

QUICK = ScenarioConfig(block_length_m=36.0, block_width_m=24.0, image_size=(240, 320))


@dataclass
class Run:
    lap: np.ndarray
    stamps: np.ndarray
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray
    ox: np.ndarray
    oy: np.ndarray
    oyaw: np.ndarray

    @property
    def ground_truth(self) -> PoseTrack:
        return track_from_samples([(s, (a, b, 0.0), se3.yaw_quaternion(c)) for s, a, b, c in
                                   zip(self.stamps, self.x, self.y, self.yaw)])

    def odometry(self, k: int):
        return se3.pose3((self.ox[k], self.oy[k], 0.0), se3.yaw_quaternion(self.oyaw[k]))

    def true_pose(self, k: int):
        return se3.pose3((self.x[k], self.y[k], 0.0), se3.yaw_quaternion(self.yaw[k]))

    def revisit_matches(self, start: int = 5, radius_m: float = 5.0) -> dict[int, int]:
        """Lap-2 frame index -> nearest lap-1 frame index (within ``radius_m``)."""
        l1, l2 = np.where(self.lap == 1)[0], np.where(self.lap == 2)[0]
        out = {}
        for j in l2[start:]:
            d = np.hypot(self.x[l1] - self.x[j], self.y[l1] - self.y[j])
            if d.min() < radius_m:
                out[int(j)] = int(l1[np.argmin(d)])
        return out

    def farthest_lap1(self, j: int) -> int:
        l1 = np.where(self.lap == 1)[0]
        return int(l1[np.argmax(np.hypot(self.x[l1] - self.x[j], self.y[l1] - self.y[j]))])


def make_run(cfg: ScenarioConfig = ScenarioConfig(), drift: OdometryDrift = OdometryDrift()
             ) -> Run:
    rows = list(poses(cfg))
    lap, st, x, y, yaw = (np.array(c) for c in zip(*rows))
    ox, oy, oyaw = drift_planar(x, y, yaw, drift)
    return Run(lap, st.astype(np.int64), x, y, yaw, ox, oy, oyaw)


def feed(run: Run, config: PoseGraphConfig, closures: dict[int, ClosureMeasurement],
         extra: Optional[dict[int, ClosureMeasurement]] = None) -> PoseGraph:
    """Odometry of every frame in order; a frame's closures right after its odometry."""
    graph = PoseGraph(config)
    for k, stamp in enumerate(run.stamps):
        graph.add_odometry(int(stamp), run.odometry(k))
        for source in (closures, extra or {}):
            if k in source:
                graph.add_closure(source[k])
    graph.refine()
    return graph


def ate(graph: PoseGraph, run: Run) -> tuple[float, float]:
    """(odometry ATE, optimised ATE) RMSE in metres, at the graph's keyframes."""
    gt = run.ground_truth
    opt = [(s, se3.position_of(p), se3.quaternion_of(p)) for s, p in graph.trajectory()]
    odo = [(s, se3.position_of(p), se3.quaternion_of(p)) for s, p in
           graph.odometry_trajectory()]
    return (absolute_trajectory_error(odo, gt).rmse, absolute_trajectory_error(opt, gt).rmse)


def same_place_closures(run: Run) -> dict[int, ClosureMeasurement]:
    return {j: ClosureMeasurement(int(run.stamps[j]), int(run.stamps[i]))
            for j, i in run.revisit_matches().items()}
