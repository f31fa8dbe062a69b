"""The node's per-frame pipeline (no ROS) in loop-closure mode with verification: live keyframes
get keypoints and, from the registered depth, 3-D points; revisits are closed only when verified,
and each closure carries the metric pose of the query camera in the match keyframe's camera
frame, checked against ground truth; an unverified look-alike is never published."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from rgbd_street import Street, yaw_quat
from test_node_common import small_model_dir

from vpr_ros.localization.verification import Verification
from vpr_ros.mapdb import PlaceMap
from vpr_ros.mapdb.camera import CameraModel
from vpr_ros.mapdb.poses import Pose
from vpr_ros.mapdb.transforms import pose7_to_matrix
from vpr_ros.ros.diagnostics import FrameTiming
from vpr_ros.ros.params import all_parameter_specs, settings_from_values
from vpr_ros.ros.pipeline import Pipeline

NS = 1_000_000_000


def _settings(**overrides):
    values = {s.name: s.default for s in all_parameter_specs()}
    values.update({"mode": "loop_closure", "loop_closure.exclusion_window_s": 5.8,
                   "loop_closure.exclusion_recent_keyframes": 2,
                   "loop_closure.consistency_k": 1, "loop_closure.consistency_n": 1,
                   "loop_closure.min_score": 0.0, "camera.name": "cam",
                   # single frames: this drive is too short for sequence evidence, and what is
                   # tested is the verification of each frame's candidates
                   "sequence.length": 1, **overrides})
    return settings_from_values(values)


def _robot(x: float, y: float, yaw: float) -> np.ndarray:
    t = np.eye(4)
    t[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
    t[:2, 3] = (x, y)
    return t


@pytest.fixture(scope="module")
def model96(effnet_gem_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_model_dir(effnet_gem_model_dir, tmp_path_factory.mktemp("m"), 96)


def test_loop_closures_are_verified_with_the_metric_relative_pose(model96: Path) -> None:
    from vpr_ros.runtime.encoder import load_encoder

    street = Street((480, 640))
    enc = load_encoder(model96, threads=1)
    settings = _settings()
    pm = PlaceMap.create(enc.dim, enc.fingerprint, keypoints="sift")
    pipe = Pipeline(enc, pm, settings, "live")
    cam = CameraModel("cam", 640, 480, street.k, mount=street.mount)
    mount = pose7_to_matrix(street.mount)
    truth: dict[int, np.ndarray] = {}   # stamp -> camera pose in the world
    closures = []
    stamp = 1_000 * NS
    # lap 1 in daylight, then the same street again at dusk in the other lane
    drive = [(s, 1, 0.0) for s in np.arange(4.0, 16.0, 1.0)] + \
        [(s, 2, 0.8) for s in (4.6, 5.4, 6.5, 7.6, 8.4, 9.3, 10.6, 11.7)]
    for s, lap, lane in drive:
        rgb, depth, (x, y, yaw) = street.view(float(s), lap, lane)
        truth[stamp] = _robot(x, y, yaw) @ mount
        timing = FrameTiming(stamp)
        query = pipe.encode(rgb, timing)
        query.camera, query.depth_m = cam, depth
        pose = (Pose((x, y, 0.0), yaw_quat(yaw)), "map")
        out = pipe.decide(stamp, query, pose, "camera_optical", timing)
        if out.closure is not None:
            closures.append(out.closure)
            assert out.verification is not None and timing.extract > 0
        stamp += NS // 2
    assert len(pm) >= 12 and pm.keypoint_kind == "sift" and pm.has_keypoint_points
    assert pm.camera("live", "cam") == cam and pm.keyframe(0).camera == "cam"
    assert len(closures) >= 3, [c.match_id for c in closures]
    metric = 0
    for c in closures:
        v = c.verification
        assert isinstance(v, Verification) and v.verified and v.pose is not None, v
        # ground truth of the query camera in the match keyframe's camera frame
        expect = np.linalg.inv(truth[c.match_stamp_ns]) @ truth[c.query_stamp_ns]
        t = np.asarray(v.pose.translation)
        if v.pose.metric:  # PnP on the live keyframe's depth points
            metric += 1
            assert np.linalg.norm(t - expect[:3, 3]) < 0.15, (t, expect[:3, 3])
        else:  # too few 3-D inliers (a farther keyframe): the essential matrix's direction
            direction = expect[:3, 3] / np.linalg.norm(expect[:3, 3])
            assert v.method == "essential" and np.degrees(np.arccos(t @ direction)) < 10.0
    assert metric >= 2
    counters = dict(pipe.counters())
    assert int(counters["verification.verified_pnp"]) >= metric


def test_without_verification_nothing_is_extracted_or_stored(model96: Path) -> None:
    from vpr_ros.runtime.encoder import load_encoder

    street = Street((240, 320))
    enc = load_encoder(model96, threads=1)
    pm = PlaceMap.create(enc.dim, enc.fingerprint)
    pipe = Pipeline(enc, pm, _settings(**{"verification.enabled": False}), "live")
    rgb, _, (x, y, yaw) = street.view(5.0)
    timing = FrameTiming(NS)
    out = pipe.decide(NS, pipe.encode(rgb, timing), (Pose((x, y, 0.0), yaw_quat(yaw)),
                                                     "map"), "cam", timing)
    assert out.verification is None and timing.extract == 0 and pm.keypoint_kind is None
    assert dict(pipe.counters())["verification_enabled"] == "false"
