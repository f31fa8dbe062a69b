"""From a verified PnP pose to the robot's map pose: the chain through both camera mounts and
the keyframe's pose, checked end to end on rendered RGB-D views of the demo street (a mapping
pass and a dusk revisit 0.8 m to the side), and the covariance carried through the chain."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vpr_ros.demo.scenario import (Route, ScenarioConfig, World, camera_matrix, camera_mount,
                                   render_with_depth)
from vpr_ros.localization.metric_pose import query_robot_pose
from vpr_ros.localization.verification import GeometricVerifier, RelativePose, View
from vpr_ros.mapdb.camera import CameraModel
from vpr_ros.mapdb.keypoint_depth import points_from_depth
from vpr_ros.mapdb.transforms import quat_to_matrix
from vpr_ros.runtime.local_features import FeatureExtractor, LocalFeatures

CFG = ScenarioConfig(image_size=(480, 640))


def yaw_quat(yaw: float) -> tuple[float, float, float, float]:
    return (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))


def test_pnp_on_a_rendered_revisit_gives_the_query_robot_pose() -> None:
    world, route = World(CFG), Route(CFG)
    cam = CameraModel("cam", 640, 480, camera_matrix(CFG), mount=camera_mount(CFG))
    ext = FeatureExtractor("sift", 1000)
    verifier = GeometricVerifier()
    errors, headings = [], []
    for s in (10.0, 40.0, 95.0, 150.0):
        x1, y1, yaw1 = route.pose(s)
        x2, y2, yaw2 = route.pose(s + 0.6, CFG.lap2_lateral_offset_m)
        rgb1, depth1 = render_with_depth(world, CFG, x1, y1, yaw1, 1)
        rgb2, _ = render_with_depth(world, CFG, x2, y2, yaw2, 2)
        f1 = ext.extract(rgb1)
        f1 = LocalFeatures("sift", f1.xy, f1.descriptors, points_from_depth(f1, cam, depth1))
        r = verifier.verify_pair(View(ext.extract(rgb2), cam), View(f1, cam))
        assert r.verified and r.method == "pnp", r.reason
        pose = query_robot_pose((x1, y1, 0.0), yaw_quat(yaw1), r.pose, cam.mount, cam.mount)
        errors.append(math.hypot(pose.position[0] - x2, pose.position[1] - y2))
        r_est = quat_to_matrix(pose.orientation)
        headings.append(abs(math.degrees(math.remainder(
            math.atan2(r_est[1, 0], r_est[0, 0]) - yaw2, 2 * math.pi))))
        assert abs(pose.position[2]) < 0.1  # the robot stays on the ground
        cov = np.asarray(pose.covariance).reshape(6, 6)
        assert (np.linalg.eigvalsh(cov) > 0).all()
    # keyframe pose alone would be off by the 0.8 m lane change and 0.6 m along the street
    assert max(errors) < 0.2 and max(headings) < 1.0, (errors, headings)


def test_covariance_is_carried_through_the_chain() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T * 1e-4
    rel = RelativePose((0.0, 0.0, 0.0, 1.0), (0.5, 0.0, 0.2), True, tuple(cov.reshape(-1)))
    same = query_robot_pose((0, 0, 0), (0, 0, 0, 1), rel, None, None)
    np.testing.assert_allclose(np.asarray(same.covariance).reshape(6, 6), cov, atol=1e-9)
    assert same.position == pytest.approx((0.5, 0.0, 0.2))
    # a keyframe turned 90 degrees: the translation covariance turns with it
    turned = query_robot_pose((1, 2, 0), yaw_quat(math.pi / 2), rel, None, None)
    r = quat_to_matrix(yaw_quat(math.pi / 2))
    out = np.asarray(turned.covariance).reshape(6, 6)
    np.testing.assert_allclose(out[:3, :3], r @ cov[:3, :3] @ r.T, atol=1e-8)
    np.testing.assert_allclose(out[3:, 3:], r @ cov[3:, 3:] @ r.T, atol=1e-8)
    assert turned.position == pytest.approx((1.0, 2.5, 0.2))
    # a unit direction or a keyframe without orientation gives no metric pose
    assert query_robot_pose((0, 0, 0), (0, 0, 0, 1), RelativePose(
        (0, 0, 0, 1), (1, 0, 0), False, tuple(cov.reshape(-1))), None, None) is None
    assert query_robot_pose((0, 0, 0), None, rel, None, None) is None


def test_the_query_cameras_own_mount_is_used_with_several_cameras() -> None:
    """A rear camera's PnP pose against a front camera's keyframe: the robot pose goes
    through the front mount on the keyframe's side and the rear mount (from the map's
    calibration of the rear camera) on the query's."""
    from vpr_ros.localization.verification import Verification, VerificationConfig
    from vpr_ros.localization.verification_stage import VerificationStage
    from vpr_ros.mapdb import Keyframe, PlaceMap

    front = (0.0, 0.0, 1.6, -0.5, 0.5, -0.5, 0.5)
    rear = (0.0, 0.0, 1.6, 0.5, 0.5, -0.5, -0.5)  # the front mount turned about z by pi
    k = (400.0, 0, 320.0, 0, 400.0, 240.0, 0, 0, 1)
    pm = PlaceMap.create(4, "fp", keypoints="sift")
    pm.add(np.eye(4, dtype=np.float32)[:1], [Keyframe("s", 1, "map", (2.0, 3.0, 0.0),
                                                      yaw_quat(0.3), camera="front")],
           keypoints=[LocalFeatures.empty("sift")])
    pm.add_camera("s", CameraModel("front", 640, 480, k, mount=front))
    pm.add_camera("s", CameraModel("rear", 640, 480, k, mount=rear))
    stage = VerificationStage(VerificationConfig(), pm)
    same = RelativePose((0.0, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0), True, tuple(np.eye(6).ravel()))
    accepted = Verification(0, True, "", "pnp", 50, 40, 0.8, 0.5, same)
    as_front = stage.metric_pose(accepted, CameraModel("front", 640, 480, k))
    as_rear = stage.metric_pose(accepted, CameraModel("rear", 640, 480, k))
    yaw = lambda q: math.atan2(quat_to_matrix(q)[1, 0], quat_to_matrix(q)[0, 0])  # noqa: E731
    assert as_front.position == pytest.approx((2.0, 3.0, 0.0), abs=1e-9)
    assert yaw(as_front.orientation) == pytest.approx(0.3)
    # the rear camera looking where the front one looked: the robot faces the other way
    assert abs(math.remainder(yaw(as_rear.orientation) - (0.3 + math.pi), 2 * math.pi)) < 1e-9
