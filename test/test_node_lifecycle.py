"""vpr_node's lifecycle over real rclpy and DDS: configure fails cleanly (missing model, missing
map, mismatched model and map), activate subscribes, deactivate unsubscribes and keeps the
model, cleanup releases; the services answer in each mode; save_map writes a loadable map."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")

from test_node_common import (NS, InProcessNode, RosProbe, build_lap_map,  # noqa: E402
                              image_msg, make_route)

TOPIC = "/vpr_lifecycle_test/image"


@pytest.fixture(scope="module")
def route():
    return make_route(frames_per_lap=12, radius_m=6.4, out_px=96)


@pytest.fixture(scope="module")
def lap1_map(model96: Path, route, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lap_map(model96, route, 0, tmp_path_factory.mktemp("maps") / "lap1")


@pytest.fixture(scope="module")
def running(model96: Path) -> Iterator[tuple[object, RosProbe]]:
    """The node under test in this process (own executor thread) and a probe node."""
    harness = InProcessNode({"threads": 1, "diagnostics_period_s": 0.2}, {"image": TOPIC})
    try:
        yield harness.node, harness.probe
    finally:
        harness.close()


def _set(node, **values) -> None:
    from rclpy.parameter import Parameter

    results = node.set_parameters([Parameter(k, value=v) for k, v in values.items()])
    assert all(r.successful for r in results), [r.reason for r in results]


def _configure_fails(node, probe: RosProbe, capfd, expect: str) -> None:
    probe.received["/diagnostics"].clear()
    assert probe.transition("configure") is False
    assert probe.state() == "unconfigured" and node.pipeline is None
    err = capfd.readouterr().err
    assert "configure failed" in err and expect in err, err
    def reported() -> bool:  # /diagnostics says ERROR, with the reason
        arrays = probe.received["/diagnostics"]
        return bool(arrays) and arrays[-1].status[0].level == b"\x02" \
            and expect in arrays[-1].status[0].message

    assert probe.spin_until(reported, 10), probe.received["/diagnostics"][-1:]
    assert probe.latest_status()["lifecycle_state"] == "unconfigured"


def test_configure_fails_cleanly_on_missing_files_and_mismatched_map(
        running, model96: Path, lap1_map: Path, effnet_gem_model_dir: Path, tmp_path: Path,
        capfd) -> None:
    node, probe = running
    _set(node, mode="localization", model=str(tmp_path / "no_model"), map=str(lap1_map))
    _configure_fails(node, probe, capfd, "does not exist")
    _set(node, model=str(model96), map=str(tmp_path / "no_map"))
    _configure_fails(node, probe, capfd, "does not exist")
    # The 224-px model has another fingerprint than the 96-px one the map was built with.
    _set(node, model=str(effnet_gem_model_dir), map=str(lap1_map))
    _configure_fails(node, probe, capfd, "fingerprint")
    _set(node, model=str(model96), map="")
    _configure_fails(node, probe, capfd, "needs a map")


def test_lifecycle_subscribes_only_while_active_and_keeps_the_model(
        running, model96: Path, lap1_map: Path, route) -> None:
    from sensor_msgs.msg import Image, PointCloud2

    node, probe = running
    _set(node, mode="localization", model=str(model96), map=str(lap1_map),
         image_transport="raw")
    clouds = probe.record("/vpr_node/candidates", PointCloud2)
    pub = probe.publisher(TOPIC, Image, reliable=False)
    assert probe.transition("configure") and probe.state() == "inactive"
    assert node.pipeline is not None and probe.node.count_subscribers(TOPIC) == 0

    def feed(i: int, attempts: int = 5) -> bool:
        """Publish lap-2 frame i until its candidates come back (best effort may drop one)."""
        stamp = route.stamps_ns[route.frames(lap=1)[i]]
        msg = image_msg(route.images[route.frames(lap=1)[i]], stamp)
        for _ in range(attempts):
            pub.publish(msg)
            if probe.spin_until(lambda: any(c.header.stamp.sec == stamp // NS for c in clouds),
                                3.0):
                return True
        return False

    assert probe.transition("activate") and probe.state() == "active"
    assert probe.spin_until(lambda: probe.node.count_subscribers(TOPIC) == 1, 10)
    assert probe.spin_until(lambda: pub.get_subscription_count() == 1, 10)
    assert feed(0)
    from vpr_ros.ros.messages import cloud_to_array

    best = cloud_to_array(clouds[-1])
    assert len(best) == 5 and best["rank"].tolist() == list(range(5))
    assert clouds[-1].header.frame_id == "map"

    assert probe.transition("deactivate") and probe.state() == "inactive"
    assert probe.spin_until(lambda: probe.node.count_subscribers(TOPIC) == 0, 10)
    loaded = node.pipeline
    assert loaded is not None  # the model stays loaded while inactive
    assert not feed(1, attempts=1)  # nobody listens: no candidates
    assert probe.transition("activate")
    assert node.pipeline is loaded  # re-activation reuses it
    assert probe.spin_until(lambda: pub.get_subscription_count() == 1, 10)
    assert feed(2)

    assert probe.trigger("relocalize").success
    saved = probe.trigger("save_map")
    assert not saved.success and "localization mode" in saved.message
    assert probe.transition("deactivate") and probe.transition("cleanup")
    assert probe.state() == "unconfigured" and node.pipeline is None
    assert not probe.trigger("relocalize").success  # not configured: a clear no

    # Any encoder artifact: the ONNX export of the same model serves the same map.
    from vpr_ros.runtime.backend_select import cached_onnx

    _set(node, model=str(cached_onnx(model96)), backend="onnxruntime")
    assert probe.transition("configure") and probe.transition("activate")
    assert node.pipeline.encoder.backend.startswith("onnxruntime")
    assert probe.spin_until(lambda: pub.get_subscription_count() == 1, 10)
    assert feed(3)
    assert probe.transition("deactivate") and probe.transition("cleanup")
    _set(node, backend="auto")


def test_loop_closure_mode_grows_saves_and_resets_the_live_map(
        running, model96: Path, route, tmp_path: Path) -> None:
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import Image

    from vpr_ros.mapdb import PlaceMap

    node, probe = running
    live = tmp_path / "live_map"
    _set(node, mode="loop_closure", model=str(model96), map=str(live), session="test-run",
         pose_type="pose")
    assert probe.transition("configure") and probe.transition("activate")
    pub = probe.publisher(TOPIC, Image, reliable=False)
    poses = probe.publisher("/pose", PoseStamped, reliable=True)
    assert probe.spin_until(lambda: pub.get_subscription_count() == 1
                            and poses.get_subscription_count() == 1, 10)

    def pose_at(stamp_ns: int, x: float) -> PoseStamped:
        msg = PoseStamped()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, NS)
        msg.header.frame_id = "odom"
        msg.pose.position.x = x
        return msg

    frames = route.frames(lap=0)[:6]
    for n, i in enumerate(frames):  # 2 m apart: every frame becomes a keyframe
        stamp = route.stamps_ns[i]
        poses.publish(pose_at(stamp - NS // 4, 2.0 * n - 0.5))
        poses.publish(pose_at(stamp + NS // 4, 2.0 * n + 0.5))
        probe.spin_for(0.2)
        pub.publish(image_msg(route.images[i], stamp))
        probe.spin_until(lambda: node.stats.processed > n, 5)
    assert probe.spin_until(lambda: node.stats.keyframes_inserted >= 3, 10)
    inserted = node.stats.keyframes_inserted

    saved = probe.trigger("save_map")
    assert saved.success, saved.message
    pm = PlaceMap.load(live)
    assert len(pm) == inserted and pm.sessions() == ["test-run"]
    # Keyframe poses: interpolated from the PoseStamped samples at each image stamp.
    for kf in pm.keyframes(range(len(pm))):
        n = frames.index(route.frame_at(kf.stamp_ns))
        assert kf.position == pytest.approx((2.0 * n, 0.0, 0.0)) and kf.frame_id == "odom"
    assert pm.fingerprint == node.pipeline.encoder.fingerprint

    reset = probe.trigger("reset_session")
    assert reset.success and "test-run-1" in reset.message
    assert node.pipeline.session == "test-run-1"
    assert not probe.trigger("relocalize").success  # loop-closure mode has no relocalizer
    assert probe.transition("deactivate") and probe.transition("cleanup")

    # Reconfigure on the saved map: it is loaded, and the same session name is refused.
    assert probe.transition("configure") is False
    _set(node, session="test-run-2")
    assert probe.transition("configure") and len(node.pipeline.map) == inserted
    assert probe.transition("cleanup")
