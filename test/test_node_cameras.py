"""Several cameras on one vpr_node: the merge rule (a place found by several cameras ranks
higher, a clearly better single-camera match still wins), and over real DDS a front and a rear
camera where the front one is blinded: both cameras together find the place, the front camera
alone does not; outputs and /diagnostics name the camera; a listed camera that delivers nothing
is named while the others keep working; sequence matching follows each camera's stream."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.localization import Candidate, Hypothesis
from vpr_ros.localization.cameras import merge_cameras

S = 1_000_000_000


def _h(id: int, score: float, frame_score: float, x: float, stamp_s: float = 0.0) -> Hypothesis:
    return Hypothesis(Candidate(id, score, int(stamp_s * S), (x, 0.0, 0.0), session="map"),
                      None, frame_score)


def test_vote_ranks_a_place_both_cameras_found_above_a_slightly_better_single_match() -> None:
    front = [_h(1, 0.80, 4.2, 0.0), _h(2, 0.78, 4.0, 50.0)]
    rear = [_h(11, 0.70, 3.9, 50.5), _h(12, 0.60, 1.0, 90.0)]   # 11: the rear view of place 2
    vote = merge_cameras([("front", front), ("rear", rear)], "vote", vote_bonus=0.5)
    assert vote.hypotheses[0].id == 2                   # 4.0 + 0.5 beats 4.2
    assert vote.votes[2] == vote.votes[11] == 2 and vote.votes[1] == 1
    assert vote.camera_of == {1: "front", 2: "front", 11: "rear", 12: "rear"}
    assert vote.hypotheses[0].score == 0.78             # cosine untouched, evidence raised
    assert vote.hypotheses[0].evidence == pytest.approx(4.5)
    best = merge_cameras([("front", front), ("rear", rear)], "best")
    assert best.hypotheses[0].id == 1 and best.hypotheses[0].evidence == pytest.approx(4.2)
    # a clearly better single-camera match still wins the vote
    strong = merge_cameras([("front", [_h(1, 0.9, 6.0, 0.0), *front[1:]]), ("rear", rear)])
    assert strong.hypotheses[0].id == 1


def test_matches_below_the_decision_threshold_rank_last_whatever_their_evidence() -> None:
    blind = [_h(1, 0.30, 2.1, 0.0)]                 # a flat frame: low cosine, inflated z
    rear = [_h(11, 0.84, 1.6, 50.0)]
    merged = merge_cameras([("front", blind), ("rear", rear)], min_score=0.6)
    assert [h.id for h in merged.hypotheses] == [11, 1]
    assert merge_cameras([("front", blind), ("rear", rear)]).hypotheses[0].id == 1


def test_places_without_positions_are_grouped_by_session_and_time() -> None:
    def unposed(id: int, fs: float, t: float, session: str = "map") -> Hypothesis:
        return Hypothesis(Candidate(id, 0.7, int(t * S), session=session), None, fs)

    merged = merge_cameras([("front", [unposed(1, 3.0, 10.0), unposed(2, 3.2, 40.0)]),
                            ("rear", [unposed(3, 2.9, 10.2), unposed(4, 2.0, 10.1, "other")])],
                           "vote", vote_bonus=1.0, window_ns=S // 2)
    assert merged.hypotheses[0].id == 1 and merged.votes[1] == 2  # 3.0 + 1 > 3.2
    assert merged.votes[4] == 1                                   # another session: not it


def test_bad_merge_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="merge rule"):
        merge_cameras([], "sum")
    with pytest.raises(ConfigError, match="vote bonus"):
        merge_cameras([], "vote", vote_bonus=-1.0)


def test_camera_parameter_is_checked() -> None:
    from vpr_ros.ros.params import NodeConfig

    assert NodeConfig().camera_topics == ["image"]
    assert NodeConfig(cameras=" /front/image_raw, /rear/image_raw ").camera_topics == [
        "/front/image_raw", "/rear/image_raw"]
    with pytest.raises(ConfigError, match="twice"):
        NodeConfig(cameras="/a,/a")
    with pytest.raises(ConfigError, match="not a valid topic"):
        NodeConfig(cameras="/front cam")


# ----------------------------------------------------------------------------- over DDS

rclpy = pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")

from test_node_common import (NS, InProcessNode, make_route, make_world,  # noqa: E402
                              render_view, yaw_quaternion)

FRONT, REAR, NOPE = "/vpr_cams_test/front", "/vpr_cams_test/rear", "/vpr_cams_test/nothing"


@pytest.fixture(scope="module")
def rig():
    """The node tests' circular route, seen by a front camera (the route's own views) and a
    rear one (heading + 180 degrees)."""
    route = make_route(frames_per_lap=16, radius_m=6.4, out_px=96)
    world = make_world()
    rear = []
    centre = world.shape[0] / 10.0 / 2  # WORLD_PX_PER_M = 10
    for (x, y, _), yaw, lap in zip(route.positions, route.yaws, route.lap):
        gain, bias = (0.7, 12.0) if lap == 1 else (1.0, 0.0)
        rear.append(render_view(world, x, y, yaw + math.pi, 96, view_m=10.0, gain=gain,
                                offset=bias))
    assert centre > 0
    return route, rear


@pytest.fixture(scope="module")
def two_camera_map(model96: Path, rig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vpr_ros.mapdb import Keyframe, PlaceMap
    from vpr_ros.runtime.encoder import load_encoder

    route, rear = rig
    enc = load_encoder(model96, threads=1)
    lap = route.frames(lap=0)
    pm = PlaceMap.create(enc.dim, enc.fingerprint)
    for camera, images in (("front", route.images), ("rear", rear)):
        pm.add(enc.encode([images[i] for i in lap]),
               [Keyframe("lap1", route.stamps_ns[i], "map", route.positions[i],
                         yaw_quaternion(route.yaws[i]), camera=camera) for i in lap])
    out = tmp_path_factory.mktemp("cams") / "map"
    pm.save(out)
    return out


@pytest.fixture()
def node_with(model96: Path, two_camera_map: Path) -> Iterator:
    harnesses = []

    def start(cameras: str, **extra) -> InProcessNode:
        while harnesses:  # one vpr_node at a time: the probe talks to /vpr_node by name
            harnesses.pop().close()
        h = InProcessNode({"threads": 1, "diagnostics_period_s": 0.2, "model": str(model96),
                           "map": str(two_camera_map), "cameras": cameras,
                           "cameras_sync_s": 0.5, "relocalization.one_shot": False, **extra},
                          {})
        harnesses.append(h)
        return h

    yield start
    for h in harnesses:
        h.close()


def _blind(img: np.ndarray) -> np.ndarray:
    """The front camera blinded (sun, a person in front of the lens): a flat bright frame."""
    return np.full_like(img, 235)


def _run(h: InProcessNode, rig, topics: list[str], blind_front: bool) -> list:
    """Feed lap 2 through the node's cameras; return the candidate clouds it published."""
    from sensor_msgs.msg import Image, PointCloud2
    from test_node_common import image_msg

    from vpr_ros.ros.messages import cloud_to_array

    route, rear = rig
    probe = h.probe
    clouds = probe.record("/vpr_node/candidates", PointCloud2)
    assert probe.transition("configure") and probe.transition("activate")
    pubs = {t: probe.publisher(t, Image, reliable=True) for t in topics}
    assert probe.spin_until(lambda: all(p.get_subscription_count() == 1 for p in pubs.values()),
                            20)
    views = {FRONT: lambda i: _blind(route.images[i]) if blind_front else route.images[i],
             REAR: lambda i: rear[i]}
    lap2 = route.frames(lap=1)
    for n, i in enumerate(lap2):
        for topic, pub in pubs.items():
            pub.publish(image_msg(views[topic](i), route.stamps_ns[i]))
        assert probe.spin_until(lambda: len(clouds) > n, 30), (n, probe.latest_status())
    return [(c.header.stamp.sec * NS + c.header.stamp.nanosec, cloud_to_array(c))
            for c in clouds]


def _top1_correct(rig, clouds, radius_m: float = 3.0) -> float:
    """Share of frames whose top candidate is within ``radius_m`` (frames are 2.5 m apart)."""
    route, _ = rig
    ok = []
    for stamp, arr in clouds:
        truth = route.position_at(stamp)
        ok.append(bool(len(arr)) and math.hypot(arr["x"][0] - truth[0],
                                                arr["y"][0] - truth[1]) <= radius_m)
    return float(np.mean(ok))


def test_a_blinded_front_camera_is_carried_by_the_rear_one(node_with, rig) -> None:
    front_only = _top1_correct(rig, _run(node_with(FRONT), rig, [FRONT], blind_front=True))
    h = node_with(f"{FRONT},{REAR}")
    clouds = _run(h, rig, [FRONT, REAR], blind_front=True)
    both = _top1_correct(rig, clouds)
    assert both >= 0.8 and both >= front_only + 0.4, (front_only, both)
    # the winners were found by the rear camera (index 1 in 'cameras')
    assert np.mean([arr["camera"][0] == 1 for _, arr in clouds if len(arr)]) > 0.7
    probe = h.probe
    assert probe.spin_until(lambda: probe.latest_status()["frames_processed"] == "16", 10)
    status = probe.latest_status()
    assert status["cameras"] == f"{FRONT},{REAR}"   # one decision per moment, not per camera
    processed = [int(status[f"camera.{t}.frames_processed"]) for t in (FRONT, REAR)]
    dropped = [int(status[f"camera.{t}.frames_dropped"]) for t in (FRONT, REAR)]
    assert [p + d for p, d in zip(processed, dropped)] == [16, 16] and min(processed) >= 14
    assert int(status[f"camera.{REAR}.matches_found"]) >= 0


def test_a_listed_camera_without_frames_is_named_and_the_others_carry_on(
        node_with, rig, capfd) -> None:
    h = node_with(f"{REAR},{NOPE}")
    clouds = _run(h, rig, [REAR], blind_front=False)
    assert _top1_correct(rig, clouds) >= 0.8
    probe = h.probe
    warned = [a.status[0] for a in probe.received["/diagnostics"]
              if "no frames from camera(s) " + NOPE in a.status[0].message]
    assert warned and warned[0].level == b"\x01"  # WARN while the other camera delivered
    assert probe.latest_status()[f"camera.{NOPE}.frames_received"] == "0"
    err = capfd.readouterr().err
    assert f"camera {NOPE} delivers no frames" in err and "nothing publishes on it" in err


def test_sequence_matching_follows_each_cameras_stream(node_with, rig) -> None:
    """Each camera's frames feed its own sequence matcher over its own keyframes (the map's
    front and rear views are separate tracks); the published candidates stay this moment's
    search results, and the relocalizations come from the sequence evidence."""
    from geometry_msgs.msg import PoseWithCovarianceStamped

    # a 16-frame lap with a blinded front camera: thresholds for this small rig
    h = node_with(f"{FRONT},{REAR}", **{"sequence.length": 5, "sequence.min_steps": 3,
                                        "relocalization.min_sequence_score": 0.5,
                                        "relocalization.min_margin": 0.0,
                                        "relocalization.min_consistent": 1})
    relocs = h.probe.record("/vpr_node/relocalization", PoseWithCovarianceStamped)
    clouds = _run(h, rig, [FRONT, REAR], blind_front=True)
    assert _top1_correct(rig, clouds) >= 0.8
    probe = h.probe
    assert probe.spin_until(lambda: probe.latest_status()["frames_processed"] == "16", 10)
    status = probe.latest_status()
    # every processed moment fed both cameras' matchers
    assert status["sequence_length"] == "5" and int(status["sequence_frames"]) >= 28
    route, _ = rig
    assert len(relocs) >= 3, [(k, v) for k, v in status.items()
                              if "reloc" in k and "latency" not in k]
    for msg in relocs:
        stamp = msg.header.stamp.sec * NS + msg.header.stamp.nanosec
        truth = route.position_at(stamp)
        p = msg.pose.pose.position
        assert math.hypot(p.x - truth[0], p.y - truth[1]) <= 3.0
