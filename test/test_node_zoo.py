"""vpr_node with zoo models that have extra outputs, over real rclpy and DDS, given only the
model path: a CQVPR model re-ranks its candidates by mutual-NN of local features (the published
order equals the re-rank computed offline), a SelaVPR++ model searches its binary map with its
own hash codes, and in loop-closure mode both keep their extras for the live keyframes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")

from test_node_common import InProcessNode, image_msg, make_route, write_bag  # noqa: E402
from zoo_models import zoo_model_dir  # noqa: E402

TOPIC = "/vpr_zoo_test/image"
TOP_K = 3
RERANK = 6


@pytest.fixture(scope="module")
def route():
    return make_route(frames_per_lap=12, radius_m=6.4, out_px=96)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp()
    return {name: zoo_model_dir(f"{name}_tiny", root) for name in ("cqvpr", "selavpr")}


@pytest.fixture(scope="module")
def lap1_maps(models: dict[str, Path], route, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    """Per model: a map of lap 1 built by `vpr map build`'s library from a real rosbag."""
    from vpr_ros.mapdb.build import build_map
    from vpr_ros.runtime.encoder import load_encoder

    root = tmp_path_factory.mktemp("zoo_maps")
    bag = write_bag(route, root / "lap1", "sqlite3", route.frames(lap=0))
    out = {}
    for name, model in models.items():
        _, summary = build_map(bag, "/camera/image_raw", load_encoder(model, threads=1),
                               root / f"map_{name}", pose_topic="/odom", session="lap1")
        assert summary.keyframes >= 8, summary.format()
        out[name] = root / f"map_{name}"
    return out


@pytest.fixture(scope="module")
def running() -> Iterator[InProcessNode]:
    harness = InProcessNode({"threads": 1, "top_k": TOP_K, "rerank.local_top_k": RERANK,
                             # the offline references are PyTorch fp32, so the node runs it too
                             # (auto could pick a reduced precision within cosine 0.999)
                             "backend": "torch"},
                            {"image": TOPIC})
    try:
        yield harness
    finally:
        harness.close()


def _run(harness: InProcessNode, route, frames: list[int], **params: Any) -> list[Any]:
    """Configure and activate with ``params``, publish ``frames`` one at a time, return the
    ~/candidates clouds; leaves the node active."""
    from sensor_msgs.msg import Image, PointCloud2

    node, probe = harness.node, harness.probe
    harness.set(**params)
    assert probe.transition("configure"), node.identity.problem
    assert probe.transition("activate")
    clouds = probe.record("/vpr_node/candidates", PointCloud2)
    clouds.clear()
    pub = probe.publisher(TOPIC, Image, reliable=True)
    assert probe.spin_until(lambda: pub.get_subscription_count() == 1, 10)
    start = node.stats.processed
    for n, i in enumerate(frames):
        pub.publish(image_msg(route.images[i], route.stamps_ns[i]))
        assert probe.spin_until(lambda: node.stats.processed > start + n, 30), \
            node.stats.errors
    assert probe.spin_until(lambda: len(clouds) >= len(frames), 10)
    assert sum(node.stats.errors.values()) == 0, node.stats.errors
    return list(clouds)


def _stop(harness: InProcessNode) -> None:
    assert harness.probe.transition("deactivate") and harness.probe.transition("cleanup")


def _published(cloud: Any, route) -> tuple[int, list[int]]:
    from vpr_ros.ros.conversions import stamp_to_ns
    from vpr_ros.ros.messages import cloud_to_array

    arr = cloud_to_array(cloud)
    return route.frame_at(stamp_to_ns(cloud.header.stamp)), arr["keyframe_id"].tolist()


def test_cqvpr_node_reranks_its_candidates_by_local_features(
        running: InProcessNode, route, models: dict[str, Path],
        lap1_maps: dict[str, Path]) -> None:
    from vpr_ros.mapdb import PlaceMap
    from vpr_ros.models.rerank import rerank_mutual_nn
    from vpr_ros.runtime.encoder import load_encoder

    frames = route.frames(lap=1)[::2]
    clouds = _run(running, route, frames, mode="localization", model=str(models["cqvpr"]),
                  map=str(lap1_maps["cqvpr"]))
    pipeline = running.node.pipeline
    assert pipeline.rerank_top_n == RERANK and pipeline.extras == ("local",)
    _stop(running)

    # The reference, offline: global search of the top RERANK, mutual-NN re-rank, top_k.
    pm = PlaceMap.load(lap1_maps["cqvpr"])
    enc = load_encoder(models["cqvpr"], threads=1)
    reordered = 0
    for cloud in clouds:
        i, published = _published(cloud, route)
        outs = enc.encode_all([route.images[i]])
        ids, _ = pm.search(outs["global"], RERANK)
        expected, _ = rerank_mutual_nn(outs["local"][0], ids[0], pm.local_features, RERANK)
        assert published == expected[:TOP_K].tolist(), (i, published, expected, ids)
        reordered += published != ids[0, :TOP_K].tolist()
    assert reordered > 0, "re-ranking never changed the global order: the test proves nothing"


def test_selavpr_node_searches_its_binary_map_with_its_codes(
        running: InProcessNode, route, models: dict[str, Path],
        lap1_maps: dict[str, Path]) -> None:
    from vpr_ros.mapdb import PlaceMap
    from vpr_ros.runtime.encoder import load_encoder

    frames = route.frames(lap=1)[1::3]
    clouds = _run(running, route, frames, mode="localization", model=str(models["selavpr"]),
                  map=str(lap1_maps["selavpr"]))
    pipeline = running.node.pipeline
    assert pipeline.map.model_codes and pipeline.extras == ("binary",)
    assert pipeline.rerank_top_n == 0
    _stop(running)

    pm = PlaceMap.load(lap1_maps["selavpr"])
    enc = load_encoder(models["selavpr"], threads=1)
    for cloud in clouds:
        i, published = _published(cloud, route)
        outs = enc.encode_all([route.images[i]])
        ids, _ = pm.search(outs["global"], TOP_K, query_codes=outs["binary"])
        assert published == ids[0].tolist(), (i, published, ids)


@pytest.mark.parametrize("name", ["cqvpr", "selavpr"])
def test_loop_closure_live_map_keeps_codes_and_local_features(
        running: InProcessNode, route, models: dict[str, Path], tmp_path: Path,
        name: str) -> None:
    from vpr_ros.mapdb import PlaceMap
    from vpr_ros.runtime.encoder import load_encoder

    live = tmp_path / "live"
    frames = route.frames(lap=0)[:5]
    _run(running, route, frames, mode="loop_closure", model=str(models[name]), map=str(live),
         session=f"live-{name}", **{"loop_closure.keyframe_max_interval_s": 0.5})
    saved = running.probe.trigger("save_map")
    assert saved.success, saved.message
    _stop(running)

    pm = PlaceMap.load(live)
    assert len(pm) == len(frames)  # a keyframe at least every 0.5 s, frames 1 s apart
    outs = load_encoder(models[name], threads=1).encode_all(
        [route.images[route.frame_at(kf.stamp_ns)] for kf in pm.keyframes(range(len(pm)))])
    np.testing.assert_allclose(pm.descriptors(), outs["global"], atol=1e-5)
    if name == "selavpr":
        assert pm.model_codes and pm.local_grid is None
        np.testing.assert_array_equal(pm.binary_codes(), outs["binary"])
    else:
        assert pm.index_kind == "flat" and pm.local_grid == (9, 9, 16)
        np.testing.assert_allclose(pm.local_features(np.arange(len(pm))), outs["local"],
                                   atol=2e-3)
