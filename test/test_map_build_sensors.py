"""Map building with the camera's calibration and 3-D: CameraInfo (the sibling topic by default),
the mount from /tf_static, keypoints with 3-D points from a registered depth image (16UC1 mm,
32FC1 m) or a calibrated stereo pair (real EuRoC frames), and what happens on bad input: a
CameraInfo of zeros, images of another size, depth of the wrong encoding, a stereo pair without
an extrinsic."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vpr_ros.datasets import euroc
from vpr_ros.datasets.public_data import find_dataset, missing_reason
from vpr_ros.demo.scenario import (Route, ScenarioConfig, World, camera_matrix, camera_mount,
                                   render_with_depth)
from vpr_ros.errors import BagError
from vpr_ros.mapdb.bag_writer import ODOMETRY, BagWriter
from vpr_ros.mapdb.build import BuildConfig, build_map
from vpr_ros.mapdb.camera_rig import SensorOptions, sibling_topic
from vpr_ros.mapdb.keypoint_depth import points_from_stereo
from vpr_ros.mapdb.place_map import PlaceMap
from vpr_ros.runtime.local_features import FeatureExtractor

from test_map_build import ThumbnailEncoder  # noqa: E402

CFG = ScenarioConfig(image_size=(240, 320))
S = 1_000_000_000
T0 = 1_700_000_000 * S


def rendered_bag(path: Path, n: int = 12, depth: str | None = "16UC1",
                 info_size: tuple[int, int] | None = None, info_k=None, tf: bool = True,
                 depth_rgb: bool = False) -> Path:
    """``n`` frames 1 m apart along the demo's street: image, CameraInfo, depth, odometry and
    the mount on /tf_static."""
    world, route = World(CFG), Route(CFG)
    h, w = CFG.image_size
    ih, iw = info_size or (h, w)
    cam = SimpleNamespace(width=iw, height=ih, k=info_k or camera_matrix(CFG), d=(),
                          distortion_model="none")
    with BagWriter(path) as bag:
        bag.add_image_topic("/camera/image_raw", frame_id="camera_optical")
        bag.add_camera_info_topic("/camera/camera_info", frame_id="camera_optical")
        if depth_rgb:
            bag.add_image_topic("/camera/depth", frame_id="camera_optical")
        elif depth:
            bag.add_depth_topic("/camera/depth", depth, frame_id="camera_optical")
        bag.add_pose_topic("/odom", ODOMETRY, frame_id="map", child_frame_id="base_link")
        if tf:
            bag.write_static_transforms(T0, [("base_link", "camera_optical", camera_mount(CFG))])
        for i in range(n):
            stamp = T0 + i * S // 2
            x, y, yaw = route.pose(5.0 + 1.0 * i)
            rgb, d = render_with_depth(world, CFG, x, y, yaw, 1)
            bag.write_pose("/odom", stamp, (x, y, 0.0),
                           (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)))
            bag.write_camera_info("/camera/camera_info", stamp, cam)
            bag.write_image("/camera/image_raw", stamp, rgb)
            if depth_rgb:
                bag.write_image("/camera/depth", stamp + 1000, rgb)
            elif depth:
                bag.write_depth("/camera/depth", stamp + 1000, d)  # 1 us later: synced by stamp
    return path


def build(bag: Path, out: Path | None, **sensors) -> tuple[PlaceMap, object]:
    return build_map(bag, "/camera/image_raw", ThumbnailEncoder(), out, pose_topic="/odom",
                     config=BuildConfig(batch_size=4), sensors=SensorOptions(**sensors))


def test_sibling_topic_follows_ros_naming() -> None:
    assert sibling_topic("/cam/image_raw") == "/cam/camera_info"
    assert sibling_topic("/cam/image_raw/compressed") == "/cam/camera_info"
    assert sibling_topic("image") == "/camera_info"
    assert sibling_topic("/stereo/right/image_rect", "camera_info") == "/stereo/right/camera_info"


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_depth_gives_keypoints_metric_points_and_the_map_the_calibration(
        tmp_path: Path, encoding: str) -> None:
    bag = rendered_bag(tmp_path / "bag", depth=encoding)
    pm, summary = build(bag, tmp_path / "map", depth_topic="/camera/depth")
    assert summary.calibrated and summary.keypoints == "sift" and summary.keyframes == 12
    assert summary.keypoints_with_points > 0.5 and summary.keyframes_without_depth == 0
    back = PlaceMap.load(tmp_path / "map")
    cam = back.camera_of(0)
    assert cam is not None and cam.name == "/camera/image_raw" and cam.frame_id == \
        "camera_optical"
    assert cam.k == pytest.approx(camera_matrix(CFG))
    assert cam.mount == pytest.approx(camera_mount(CFG), abs=1e-9)  # from /tf_static
    assert back.has_keypoint_points and back.keyframe(0).camera == "/camera/image_raw"
    # every stored point lies on its keypoint's ray at the rendered depth
    world, route = World(CFG), Route(CFG)
    for kf in (0, 7):
        feats = back.keypoints(kf)
        x, y, yaw = route.pose(5.0 + kf)
        _, depth = render_with_depth(world, CFG, x, y, yaw, 1)
        ok = np.isfinite(feats.xyz[:, 0])
        assert ok.mean() > 0.5
        np.testing.assert_allclose(cam.project(feats.xyz[ok]), feats.xy[ok], atol=1e-3)
        u, v = np.rint(feats.xy[ok]).astype(int).T
        tol = 0.002 if encoding == "16UC1" else 1e-4  # millimetre rounding
        truth = depth[v, u]
        rel = np.abs(feats.xyz[ok, 2] - truth) / truth
        rel = rel[np.isfinite(rel)]  # the nearest pixel may be sky where the window was not
        assert np.median(rel) < tol + 1e-6 and np.percentile(rel, 95) < 0.02


def test_camera_info_topic_is_optional_and_an_explicit_one_must_exist(tmp_path: Path) -> None:
    bag = rendered_bag(tmp_path / "bag", depth=None)
    pm, summary = build(bag, None, camera_info_topic="")
    assert not summary.calibrated and pm.cameras() == {} and pm.keypoint_kind == "sift"
    with pytest.raises(BagError, match="topic /nope/camera_info is not in bag"):
        build(bag, None, camera_info_topic="/nope/camera_info")
    pm, summary = build(bag, None)  # the sibling is found
    assert summary.calibrated and not pm.has_keypoint_points


def test_no_keypoints_when_asked_for_none(tmp_path: Path) -> None:
    bag = rendered_bag(tmp_path / "bag", n=4, depth=None)
    pm, summary = build_map(bag, "/camera/image_raw", ThumbnailEncoder(), None,
                            config=BuildConfig(keypoints="none"))
    assert pm.keypoint_kind is None and summary.keypoints == "none"
    assert "keypoints:     none" in summary.format()


def test_camera_info_of_zeros_is_a_clear_error(tmp_path: Path) -> None:
    bag = rendered_bag(tmp_path / "bag", n=3, depth=None, info_k=(0.0,) * 9)
    with pytest.raises(BagError, match="no valid CameraInfo on /camera/camera_info.*focal"):
        build(bag, None)


def test_frames_whose_size_differs_from_the_camera_info_are_refused(tmp_path: Path) -> None:
    bag = rendered_bag(tmp_path / "bag", n=4, depth=None, info_size=(480, 640),
                       info_k=(400.0, 0, 320.0, 0, 400.0, 240.0, 0, 0, 1))
    pm, summary = build(bag, None)
    assert summary.frames_wrong_size == 4 and summary.keyframes == 0 and len(pm) == 0
    assert any("differs from the CameraInfo's 640x480" in w for w in summary.warnings)


def test_depth_of_the_wrong_encoding_is_counted_not_fatal(tmp_path: Path) -> None:
    bag = rendered_bag(tmp_path / "bag", n=4, depth_rgb=True)
    pm, summary = build(bag, None, depth_topic="/camera/depth")
    assert summary.keyframes == 4 and summary.keyframes_without_depth == 4
    assert not pm.has_keypoint_points
    assert any("not a depth encoding" in w for w in summary.warnings)


def test_without_tf_static_the_mount_is_unknown_or_given(tmp_path: Path) -> None:
    bag = rendered_bag(tmp_path / "bag", n=3, depth=None, tf=False)
    pm, summary = build(bag, None)
    assert pm.camera_of(0).mount is None
    assert any("no camera-to-robot transform" in w for w in summary.warnings)
    mount = (0.1, 0.0, 1.0, -0.5, 0.5, -0.5, 0.5)
    pm, _ = build(bag, None, camera_mount=mount)
    assert pm.camera_of(0).mount == pytest.approx(mount)


EUROC = find_dataset(euroc.NAME)


def euroc_bag(path: Path, frames: range, tf: bool = True) -> Path:
    seq = euroc.load_euroc(EUROC)
    with BagWriter(path) as bag:
        for name, cam in (("cam0", seq.cam0), ("cam1", seq.cam1)):
            bag.add_image_topic(f"/{name}/image_raw", encoding="mono8", frame_id=name)
            bag.add_camera_info_topic(f"/{name}/camera_info", frame_id=name)
        if tf:
            bag.write_static_transforms(int(seq.cam0.stamps_ns[0]), [
                ("imu4", "cam0", seq.cam0.model.mount), ("imu4", "cam1", seq.cam1.model.mount)])
        for i in frames:
            j = seq.right_index(i)
            stamp = int(seq.cam0.stamps_ns[i])
            for name, cam, k in (("cam0", seq.cam0, i), ("cam1", seq.cam1, j)):
                bag.write_camera_info(f"/{name}/camera_info", stamp, cam.model)
                gray = cam.image(k)
                bag.write_image(f"/{name}/image_raw", stamp, np.repeat(gray[:, :, None], 3, 2))
    return path


@pytest.mark.skipif(EUROC is None, reason=missing_reason(euroc.NAME, euroc.SOURCE))
def test_stereo_pair_of_real_images_gives_3d_points(tmp_path: Path) -> None:
    bag = euroc_bag(tmp_path / "euroc", range(0, 40, 10))
    pm, summary = build_map(bag, "/cam0/image_raw", ThumbnailEncoder(), None,
                            config=BuildConfig(keyframes=BuildConfig().keyframes.__class__(
                                interval_s=0.1)),
                            sensors=SensorOptions(right_topic="/cam1/image_raw",
                                                  base_frame="imu4"))
    assert summary.keyframes == 4 and summary.calibrated
    assert summary.keypoints_with_points > 0.3
    seq = euroc.load_euroc(EUROC)
    cam = pm.camera_of(0)
    assert cam.distortion_model == "plumb_bob" and cam.mount == pytest.approx(
        seq.cam0.model.mount, abs=1e-6)
    # the same points as triangulating the pair directly
    ext = FeatureExtractor("sift", 1000)
    left = ext.extract(seq.cam0.image(0))
    right = ext.extract(seq.cam1.image(seq.right_index(0)))
    direct = points_from_stereo(left, right, seq.cam0.model, seq.cam1.model,
                                seq.stereo_extrinsic())
    stored = pm.keypoints(0).xyz
    np.testing.assert_allclose(stored, direct, atol=1e-4)


@pytest.mark.skipif(EUROC is None, reason=missing_reason(euroc.NAME, euroc.SOURCE))
def test_stereo_without_an_extrinsic_is_a_clear_error(tmp_path: Path) -> None:
    bag = euroc_bag(tmp_path / "euroc", range(0, 2), tf=False)
    with pytest.raises(BagError, match="stereo needs the left-from-right extrinsic"):
        build_map(bag, "/cam0/image_raw", ThumbnailEncoder(), None,
                  sensors=SensorOptions(right_topic="/cam1/image_raw"))


def test_vpr_map_build_and_info_show_keypoints(tmp_path: Path, effnet_gem_model_dir: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    from vpr_ros.cli import main

    bag = rendered_bag(tmp_path / "bag", n=6)
    out = tmp_path / "map"
    assert main(["map", "build", str(bag), "--image-topic", "/camera/image_raw", "--pose-topic",
                 "/odom", "--model", str(effnet_gem_model_dir), "-o", str(out),
                 "--depth-topic", "/camera/depth", "--local-features", "orb",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "keypoints:     orb" in text and "with 3-D points; camera calibrated" in text
    assert main(["map", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "keypoints    orb" in text and "/camera/image_raw 320x240" in text
    assert main(["map", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["keypoints"]["kind"] == "orb" and info["keypoints"]["points"]
    assert info["cameras"][0]["mount"] == pytest.approx(list(camera_mount(CFG)), abs=1e-9)
    with pytest.raises(SystemExit) as exc:
        main(["map", "build", str(bag), "--image-topic", "/camera/image_raw",
              "--model", str(effnet_gem_model_dir), "-o", str(tmp_path / "m2"),
              "--camera-to-robot", "1,2,3", "--no-progress"])
    assert exc.value.code == 2 and "expected 7 numbers" in capsys.readouterr().err
