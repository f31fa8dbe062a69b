"""vpr_node with geometric verification, over real DDS: relocalization in a map with 3-D points
publishes the query robot's PnP pose (not the keyframe's) with its covariance and a status
saying it was verified; /diagnostics times the extract, match and estimate stages and counts
verdicts; a camera_info of zeros, a frame whose size disagrees with camera_info, and a map
without keypoints under a configuration that needs them are clear errors that never crash the
node or publish a wrong pose."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")

from rgbd_street import T0, Street, camera_info_msg, street_bag  # noqa: E402
from test_node_common import (InProcessNode, build_lap_map, image_msg, make_route,  # noqa: E402
                              small_model_dir)

from vpr_ros.mapdb.build import BuildConfig, build_map  # noqa: E402
from vpr_ros.mapdb.camera_rig import SensorOptions  # noqa: E402
from vpr_ros.mapdb.transforms import quat_to_matrix  # noqa: E402

TOPIC, INFO = "/vpr_verify_test/image", "/vpr_verify_test/camera_info"
NS = 1_000_000_000
MAP_ARC = [float(s) for s in np.arange(4.0, 22.0, 1.0)]
QUERY_ARC = [7.3, 8.6, 10.2, 12.5, 15.4]
LANE = 0.8


@pytest.fixture(scope="module")
def street() -> Street:
    return Street((480, 640))


@pytest.fixture(scope="module")
def model96(effnet_gem_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_model_dir(effnet_gem_model_dir, tmp_path_factory.mktemp("m"), 96)


@pytest.fixture(scope="module")
def rgbd_map(street: Street, model96: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vpr_ros.runtime.encoder import load_encoder

    root = tmp_path_factory.mktemp("rgbd")
    bag = street_bag(root / "lap1", street, MAP_ARC)
    _, summary = build_map(bag, "/camera/image_raw", load_encoder(model96, threads=1),
                           root / "map", pose_topic="/odom", session="lap1",
                           config=BuildConfig(batch_size=8),
                           sensors=SensorOptions(depth_topic="/camera/depth"))
    assert summary.calibrated and summary.keypoints_with_points > 0.5, summary.format()
    return root / "map"


def _status(h: InProcessNode) -> dict[str, str]:
    h.probe.spin_for(0.5)
    return h.probe.latest_status() or {}


def test_relocalization_publishes_the_verified_pnp_pose(street: Street, rgbd_map: Path,
                                                        model96: Path) -> None:
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from sensor_msgs.msg import CameraInfo, Image
    from std_msgs.msg import Float64MultiArray

    from vpr_ros.ros.messages import parse_loop_closure

    h = InProcessNode({"threads": 1, "model": str(model96), "map": str(rgbd_map),
                       "verification.enabled": True, "relocalization.one_shot": False,
                       "relocalization.min_consistent": 1, "relocalization.min_score": 0.0,
                       # single frames: the query arc is too short for sequence evidence
                       "sequence.length": 1,
                       "diagnostics_period_s": 0.2, "qos_reliability": "reliable"},
                      {"image": TOPIC, "camera_info": INFO})
    try:
        p = h.probe
        relocs = p.record("/vpr_node/relocalization", PoseWithCovarianceStamped)
        statuses = p.record("/vpr_node/relocalization_status", Float64MultiArray)
        assert p.transition("configure") and p.transition("activate")
        pub = p.publisher(TOPIC, Image)
        info_pub = p.publisher(INFO, CameraInfo)
        assert p.spin_until(lambda: pub.get_subscription_count() > 0 and
                            info_pub.get_subscription_count() > 0, 30)
        truth = {}
        for i, s in enumerate(QUERY_ARC):
            stamp = T0 + 100 * NS + i * NS
            rgb, _, (x, y, yaw) = street.view(s, lap=2, lateral=LANE)
            truth[stamp] = (x, y, yaw)
            info_pub.publish(camera_info_msg(street, stamp))
            p.spin_for(0.3)
            pub.publish(image_msg(rgb, stamp))
            assert p.spin_until(lambda: int(_status(h).get("frames_processed", 0)) >= i + 1, 90)
        assert p.spin_until(lambda: len(statuses) >= 3, 30), \
            {k: v for k, v in _status(h).items() if "verif" in k or "reloc" in k or "err" in k}
        status = {round(st["stamp_s"] * NS): st for st in map(parse_loop_closure, statuses)}
        assert all(st["verified"] == 1.0 for st in status.values())
        errors, headings = [], []
        for msg in relocs:
            stamp = msg.header.stamp.sec * NS + msg.header.stamp.nanosec
            if status[stamp]["metric"] != 1.0:  # essential matrix: the keyframe's pose
                assert status[stamp]["method"] == 2.0
                continue
            assert status[stamp]["method"] == 3.0 and status[stamp]["inliers"] >= 20
            x, y, yaw = truth[stamp]
            q = msg.pose.pose.orientation
            r = quat_to_matrix((q.x, q.y, q.z, q.w))
            errors.append(math.hypot(msg.pose.pose.position.x - x, msg.pose.pose.position.y - y))
            headings.append(abs(math.degrees(math.remainder(
                math.atan2(r[1, 0], r[0, 0]) - yaw, 2 * math.pi))))
            cov = np.asarray(msg.pose.covariance).reshape(6, 6)
            assert (np.linalg.eigvalsh(cov) > 0).all() and cov[0, 0] < 0.05
        # the keyframes are 1 m apart in the other lane: their own poses are >= 0.8 m off
        assert len(errors) >= 3 and max(errors) < 0.3, errors
        assert max(headings) < 2.0, headings
        st = _status(h)
        assert float(st["latency_extract_p50_ms"]) > 0 and float(st["latency_match_p50_ms"]) > 0
        assert float(st["latency_estimate_p95_ms"]) > 0
        assert int(st["verification.verified_pnp"]) >= 3
        assert int(st["verification.relocalizations_metric"]) == len(errors)
        assert st["verification_enabled"] == "true"

        # bad input: a camera_info of zeros is refused and counted, the old one kept
        info_pub.publish(camera_info_msg(street, T0 + 200 * NS, k=[0.0] * 9))
        assert p.spin_until(lambda: int(_status(h).get("errors.camera_info_invalid", 0)) == 1,
                            20)
        # a frame whose size disagrees with camera_info is refused, nothing published for it
        before = len(relocs)
        small = np.ascontiguousarray(street.view(9.0, lap=2)[0][::2, ::2])
        pub.publish(image_msg(small, T0 + 201 * NS))
        assert p.spin_until(lambda: int(_status(h).get("errors.camera_info_mismatch", 0)) == 1,
                            20)
        # ... and the node carries on with the next good frame
        rgb, _, _ = street.view(11.0, lap=2, lateral=LANE)
        pub.publish(image_msg(rgb, T0 + 202 * NS))
        assert p.spin_until(lambda: len(relocs) == before + 1, 60), _status(h)
    finally:
        h.close()


def test_a_map_without_keypoints_is_refused_at_configure_when_verifying(
        model96: Path, tmp_path: Path) -> None:
    route = make_route(frames_per_lap=8, out_px=96)
    plain = build_lap_map(model96, route, 0, tmp_path / "plain")
    h = InProcessNode({"threads": 1, "model": str(model96), "map": str(plain),
                       "verification.enabled": True, "diagnostics_period_s": 0.2},
                      {"image": TOPIC})
    try:
        assert not h.probe.transition("configure")
        assert "stores no keypoints" in h.node.identity.problem
        assert "--local-features sift" in h.node.identity.problem
        h.set(**{"verification.enabled": False})
        assert h.probe.transition("configure")
    finally:
        h.close()


def test_require_points_refuses_a_map_without_depth(street: Street, model96: Path,
                                                     tmp_path: Path) -> None:
    from vpr_ros.runtime.encoder import load_encoder

    bag = street_bag(tmp_path / "nodepth", street, MAP_ARC[:4], depth=None)
    build_map(bag, "/camera/image_raw", load_encoder(model96, threads=1), tmp_path / "map",
              pose_topic="/odom")
    h = InProcessNode({"threads": 1, "model": str(model96), "map": str(tmp_path / "map"),
                       "verification.enabled": True, "verification.require_points": True,
                       # a 4-keyframe map: shorter than sequence evidence needs (refused too)
                       "sequence.length": 1},
                      {"image": TOPIC})
    try:
        assert not h.probe.transition("configure")
        assert "has no 3-D points" in h.node.identity.problem
        h.set(**{"verification.require_points": False})
        assert h.probe.transition("configure")
    finally:
        h.close()
