"""The pose-graph back end without ROS: closures read by label, frame conventions, and what the
graph does to a drifting trajectory (evo ATE against ground truth) on the demo's route, with
the odometry drift model the demo records."""

from __future__ import annotations

import math

import gtsam
import numpy as np
import pytest

from slam_common import QUICK, ate, feed, make_run, same_place_closures
from vpr_ros.demo.drift import OdometryDrift, drift_planar
from vpr_ros.errors import ConfigError, InputError
from vpr_ros.eval.trajectory import absolute_trajectory_error, track_from_samples
from vpr_ros.slam import se3
from vpr_ros.slam.closures import COV_FIELDS, REL_FIELDS, ClosureMeasurement, closure_from_fields
from vpr_ros.slam.config import PoseGraphConfig
from vpr_ros.slam.pose_graph import PoseGraph

NS = 1_000_000_000


# ---------------------------------------------------------------------------- closure fields

def test_closure_fields_are_read_by_label_whatever_else_is_there() -> None:
    cov = np.diag([0.01, 0.02, 0.03, 0.001, 0.002, 0.003])
    fields = {"seq_run_length": 7.0, "rel_qw": 1.0, "score": 0.9, "query_stamp_s": 12.5,
              "rel_tx": 1.0, "rel_ty": 2.0, "rel_tz": 3.0, "rel_qx": 0.0, "rel_qy": 0.0,
              "rel_qz": 0.0, "match_stamp_s": 3.25, "verified": 1.0, "inliers": 57.0,
              "rel_metric": 1.0, "some_future_field": -4.0,
              **{name: float(v) for name, v in zip(COV_FIELDS, cov.ravel())}}
    c = closure_from_fields(fields)
    assert (c.query_stamp_ns, c.match_stamp_ns) == (12_500_000_000, 3_250_000_000)
    assert c.score == 0.9 and c.verified is True and c.inliers == 57 and c.metric
    assert np.allclose(c.relative.translation(), [1, 2, 3])
    assert np.allclose(c.covariance, cov)


def test_partial_or_nan_groups_count_as_absent_and_stamps_are_required() -> None:
    base = {"query_stamp_s": 10.0, "match_stamp_s": 2.0, "score": 0.8}
    c = closure_from_fields(base)  # what vpr_node publishes without geometric verification
    assert c.relative is None and c.covariance is None and c.verified is None
    partial = {**base, **{n: 0.0 for n in REL_FIELDS[:5]}}
    assert closure_from_fields(partial).relative is None
    nan_rel = {**base, **{n: math.nan for n in REL_FIELDS}, "verified": 0.0}
    c = closure_from_fields(nan_rel)
    assert c.relative is None and c.verified is False
    unit_dir = {**base, **dict(zip(REL_FIELDS, (0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))),
                "rel_metric": 0.0}
    assert closure_from_fields(unit_dir).metric is False
    with pytest.raises(InputError, match="match_stamp_s"):
        closure_from_fields({"query_stamp_s": 1.0, "score": 0.5})
    with pytest.raises(InputError, match="query_stamp_s"):
        closure_from_fields({"query_stamp_s": math.nan, "match_stamp_s": 1.0})


# ---------------------------------------------------------------------------- conventions

def test_covariance_order_and_camera_to_robot_conjugation() -> None:
    ros = np.diag([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    g = se3.ros_to_gtsam_covariance(ros)
    assert np.allclose(np.diag(g), [4, 5, 6, 1, 2, 3])
    assert np.allclose(se3.gtsam_to_ros_covariance(g), ros)
    # An optical camera (z forward, x right, y down) looking along the robot's x axis, 0.5 m
    # ahead of the base. Driving 1 m forward is +1 m along the camera's z.
    optical = gtsam.Rot3(np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]))
    extrinsic = gtsam.Pose3(optical, np.array([0.5, 0.0, 0.2]))
    cam_motion = gtsam.Pose3(gtsam.Rot3(), np.array([0.0, 0.0, 1.0]))
    base_motion = se3.conjugate(cam_motion, extrinsic)
    assert np.allclose(base_motion.translation(), [1.0, 0.0, 0.0], atol=1e-12)
    assert se3.rotation_angle(base_motion) < 1e-12
    # uncertainty along the camera's z (gtsam order: index 5) is uncertainty along base x (3)
    cov = np.diag([1e-6] * 5 + [0.25])
    moved = se3.conjugate_covariance(cov, gtsam.Pose3(optical, np.zeros(3)))
    assert math.isclose(moved[3, 3], 0.25, rel_tol=1e-9) and moved[4, 4] < 1e-5
    assert se3.is_covariance(ros) and not se3.is_covariance(-ros)
    assert not se3.is_covariance(np.full((6, 6), np.nan))


def test_published_covariance_convention_becomes_gtsams_right_perturbation() -> None:
    """vpr_node's covariance perturbs the query pose in the match frame (t + dt, exp(dtheta) R);
    sampled that way, the spread of gtsam's own local coordinates (Logmap(T^-1 T')) must match
    the converted covariance."""
    rng = np.random.default_rng(4)
    rel = se3.pose3((1.5, -0.3, 4.0), (0.1, -0.2, 0.05, 0.97))
    a = rng.normal(size=(6, 6))
    cov_ros = 1e-4 * (a @ a.T + 0.5 * np.eye(6))              # x, y, z, rx, ry, rz
    samples = rng.multivariate_normal(np.zeros(6), cov_ros, size=20000)
    r, t = np.asarray(rel.rotation().matrix()), np.asarray(rel.translation())
    xi = np.array([gtsam.Pose3.Logmap(rel.between(gtsam.Pose3(
        gtsam.Rot3(gtsam.Rot3.Expmap(d[3:]).matrix() @ r), t + d[:3]))) for d in samples])
    empirical = np.cov(xi.T)
    converted = se3.match_frame_to_right_covariance(se3.ros_to_gtsam_covariance(cov_ros), rel)
    assert np.allclose(empirical, converted, atol=0.06 * np.abs(converted).max())
    naive = se3.ros_to_gtsam_covariance(cov_ros)             # without the conversion
    assert not np.allclose(empirical, naive, atol=0.06 * np.abs(converted).max())


def test_config_refuses_bad_values_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="robust_kernel"):
        PoseGraphConfig(robust_kernel="magic")
    with pytest.raises(ConfigError, match="keyframe_distance_m"):
        PoseGraphConfig(keyframe_distance_m=-1.0)
    with pytest.raises(ConfigError, match="unit quaternion"):
        PoseGraphConfig(camera_mount_qw=0.9)
    with pytest.raises(ConfigError, match="no parameter"):
        PoseGraphConfig.from_mapping({"robust_kernal": "dcs"})


# ---------------------------------------------------------------------------- the drift model

def test_drift_model_scale_and_heading_random_walk() -> None:
    n = 401
    x, y, yaw = np.linspace(0, 100, n), np.zeros(n), np.zeros(n)   # 100 m straight ahead
    same = drift_planar(x, y, yaw, OdometryDrift(0.0, 0.0))
    assert np.allclose(same[0], x) and np.allclose(same[1], y)
    scaled = drift_planar(x, y, yaw, OdometryDrift(0.02, 0.0))
    assert math.isclose(scaled[0][-1], 102.0, rel_tol=1e-9)
    a = drift_planar(x, y, yaw, OdometryDrift(0.0, 0.02, seed=3))
    b = drift_planar(x, y, yaw, OdometryDrift(0.0, 0.02, seed=3))
    assert np.array_equal(a[2], b[2])                                 # reproducible
    finals = np.array([drift_planar(x, y, yaw, OdometryDrift(0.0, 0.02, seed=s))[2][-1]
                       for s in range(300)])
    # heading error after 100 m: 0.02 rad/sqrt(m) * 10 sqrt(m) = 0.2 rad standard deviation
    assert 0.17 < finals.std() < 0.23 and abs(finals.mean()) < 0.04


# ---------------------------------------------------------------------------- evo ATE

def test_ate_aligns_rigidly_and_measures_what_remains() -> None:
    t = np.arange(50)
    gt = track_from_samples([(int(s * NS), (float(s), math.sin(s / 5), 0.0), (0, 0, 0, 1))
                             for s in t])
    move = gtsam.Pose3(gtsam.Rot3.Yaw(0.7), np.array([10.0, -3.0, 1.0]))
    moved = []
    for s in t:
        p = move.compose(se3.pose3((float(s), math.sin(s / 5), 0.0), (0, 0, 0, 1)))
        moved.append((int(s * NS), se3.position_of(p), se3.quaternion_of(p)))
    assert absolute_trajectory_error(moved, gt).rmse < 1e-6            # SE(3) alignment
    bent = [(st, (p[0], p[1] + (0.5 if i % 2 else -0.5), p[2]), q)
            for i, (st, p, q) in enumerate(moved)]
    assert math.isclose(absolute_trajectory_error(bent, gt).rmse, 0.5, rel_tol=0.02)
    with pytest.raises(InputError, match="ground truth's time span"):
        absolute_trajectory_error([(int(1e12), (0, 0, 0), (0, 0, 0, 1))], gt)


# ---------------------------------------------------------------------------- the graph

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_place_closures_cut_the_drift_error_at_least_five_times(seed: int) -> None:
    run = make_run(drift=OdometryDrift(seed=seed))
    graph = feed(run, PoseGraphConfig(), same_place_closures(run))
    odo, opt = ate(graph, run)
    assert odo > 4.0, odo                     # the drift model really drifts
    assert opt * 5 <= odo, (odo, opt)
    s = graph.summary()
    assert s["closures_added"] > 200 and s["closures_rejected"] == 0


def test_one_planted_wrong_closure_leaves_the_result_within_ten_percent() -> None:
    run = make_run(QUICK)
    closures = same_place_closures(run)
    lap2 = np.where(run.lap == 2)[0]
    j = int(lap2[len(lap2) // 2])
    wrong = ClosureMeasurement(int(run.stamps[j]), int(run.stamps[run.farthest_lap1(j)]),
                               score=0.95)
    assert math.hypot(run.x[j] - run.x[run.farthest_lap1(j)],
                      run.y[j] - run.y[run.farthest_lap1(j)]) > 20
    _, clean = ate(feed(run, PoseGraphConfig(), closures), run)
    graph = feed(run, PoseGraphConfig(), closures, extra={j: wrong})
    _, planted = ate(graph, run)
    assert abs(planted - clean) <= 0.1 * clean, (clean, planted)
    verdict = {(i.closure.query_stamp_ns, i.closure.match_stamp_ns): i.accepted
               for i in graph.evaluate_loops()}
    assert verdict[(wrong.query_stamp_ns, wrong.match_stamp_ns)] is False
    assert sum(verdict.values()) == len(closures)          # every true closure accepted
    # Without the robust kernel the same closure folds the graph: the kernel is what protects.
    _, bent = ate(feed(run, PoseGraphConfig(robust_kernel="none"), closures,
                       extra={j: wrong}), run)
    assert bent > 2 * clean, (clean, bent)


def test_metric_transforms_through_a_rotated_camera_are_used_as_measured() -> None:
    """Closures carrying the true relative pose of an optical camera mounted ahead of the base
    (what geometric verification publishes), on exact odometry: every factor then agrees with
    the truth, so the optimum is the ground truth itself if and only if the graph undoes the
    extrinsic and moves each end from its image stamp to its keyframe correctly. Same-place
    constraints cannot do that here (lap 2 runs 0.8 m beside lap 1)."""
    run = make_run(QUICK, OdometryDrift(0.0, 0.0))
    optical_q = (-0.5, 0.5, -0.5, 0.5)  # z forward, x right, y down, in a base x-forward frame
    extrinsic = se3.pose3((0.4, 0.0, 1.2), optical_q)
    cov = np.diag([0.05 ** 2] * 3 + [0.01 ** 2] * 3)                  # ROS order
    closures = {}
    for j, i in run.revisit_matches().items():
        cam_i = run.true_pose(i).compose(extrinsic)
        cam_j = run.true_pose(j).compose(extrinsic)
        closures[j] = ClosureMeasurement(int(run.stamps[j]), int(run.stamps[i]),
                                         relative=cam_i.between(cam_j), covariance=cov)
    cfg = dict(camera_mount_x=0.4, camera_mount_z=1.2)  # the default rotation is optical
    odo, metric = ate(feed(run, PoseGraphConfig(**cfg), closures), run)
    _, same = ate(feed(run, PoseGraphConfig(), same_place_closures(run)), run)
    assert metric < 0.01 and same > 0.2, (odo, metric, same)
    # The same transforms read with a wrong mount (identity) are wrong measurements.
    _, wrong_frame = ate(feed(run, PoseGraphConfig(camera_mount_qx=0.0, camera_mount_qy=0.0,
                                                   camera_mount_qz=0.0, camera_mount_qw=1.0),
                              closures), run)
    assert wrong_frame > 0.2


def test_exact_tight_transforms_on_drifting_odometry_are_all_accepted() -> None:
    """A closure's ends are moved from the image stamps to the nearest keyframes with odometry;
    in a curve that odometry is itself a degree of heading off, as much as a verified
    transform's deviation, so its noise must join the closure's covariance or exact closures
    are judged outliers."""
    run = make_run(QUICK)
    extrinsic = se3.pose3((0.0, 0.0, 1.6), (-0.5, 0.5, -0.5, 0.5))
    cov = np.diag([0.05 ** 2] * 3 + [0.005 ** 2] * 3)
    closures = {}
    for j, i in run.revisit_matches().items():
        rel = run.true_pose(i).compose(extrinsic).between(run.true_pose(j).compose(extrinsic))
        closures[j] = ClosureMeasurement(int(run.stamps[j]), int(run.stamps[i]), relative=rel,
                                         covariance=cov)
    graph = feed(run, PoseGraphConfig(camera_mount_z=1.6), closures)
    loops = graph.evaluate_loops()
    assert len(loops) == len(closures) and all(i.accepted for i in loops), \
        sorted(round(i.mahalanobis, 1) for i in loops)[-5:]


def test_closures_wait_for_odometry_and_are_skipped_for_stated_reasons() -> None:
    graph = PoseGraph(PoseGraphConfig(keyframe_distance_m=1.0, closure_wait_s=5.0))
    step = NS // 5
    for k in range(30):  # 30 m straight ahead at 5 Hz, 1 m per message
        graph.add_odometry(k * step + NS, se3.pose3((float(k), 0.0, 0.0), (0, 0, 0, 1)), 0.0)
    early = ClosureMeasurement(40 * step + NS, 2 * step + NS)
    assert graph.add_closure(early, now_s=1.0) == "pending"
    for k in range(30, 45):
        graph.add_odometry(k * step + NS, se3.pose3((float(k), 0.0, 0.0), (0, 0, 0, 1)), 2.0)
    assert graph.pending_closures == 0 and graph.stats.closures_added == 1
    late = ClosureMeasurement(60 * step + NS, 2 * step + NS)
    assert graph.add_closure(late, now_s=3.0) == "pending"
    graph.process_pending(now_s=9.0)
    assert graph.stats.closures_skipped["odometry_timeout"] == 1
    assert graph.add_closure(ClosureMeasurement(20 * step + NS, 2 * step + NS,
                                                verified=False)) == "skipped:unverified"
    assert graph.add_closure(ClosureMeasurement(20 * step + NS, 20 * step + NS + 10)) \
        == "skipped:same_keyframe"
    assert graph.add_closure(ClosureMeasurement(20 * step + NS, 10)) == "skipped:before_odometry"
    skip = PoseGraph(PoseGraphConfig(closure_without_transform="skip"))
    assert skip.add_closure(early) == "skipped:no_transform"
    assert graph.summary()["closures_skipped"] == 4


def test_clock_reset_restarts_and_late_odometry_is_dropped() -> None:
    graph = PoseGraph()
    for k in range(10):
        graph.add_odometry(100 * NS + k * NS, se3.pose3((2.0 * k, 0, 0), (0, 0, 0, 1)))
    assert len(graph.keyframes) == 10
    assert graph.add_odometry(100 * NS + 9 * NS - NS // 10, se3.pose3((0, 0, 0),
                                                                     (0, 0, 0, 1))) is False
    assert graph.stats.odometry_dropped == 1
    graph.add_odometry(5 * NS, se3.pose3((0, 0, 0), (0, 0, 0, 1)))      # a bag restarted
    assert graph.stats.resets == 1 and len(graph.keyframes) == 1


def test_map_to_odom_carries_the_latest_odometry_onto_its_optimised_pose() -> None:
    run = make_run(QUICK)
    graph = feed(run, PoseGraphConfig(), same_place_closures(run))
    last = graph.keyframes[-1]
    corrected = graph.corrected(last.odom)
    assert corrected.equals(graph.trajectory()[-1][1], 1e-6)
    assert se3.translation_norm(graph.map_to_odom()) > 0.5  # the drift is being corrected
