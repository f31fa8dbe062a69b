"""Camera calibrations in the map: CameraInfo validation (zeros, NaN, unknown models, wrong
coefficient counts, a size that disagrees with the images), OpenCV undistortion of the three ROS
distortion models, and the map's rules for them (kept per session and camera through save, load
and merge; version-1 maps without cameras still load)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vpr_ros.errors import InputError, MapError, MapMismatchError
from vpr_ros.mapdb import Keyframe, PlaceMap
from vpr_ros.mapdb.camera import CameraModel
from vpr_ros.mapdb.storage import MANIFEST, MANIFEST_CHECKSUM, seal_manifest, sha256_file

K = (458.654, 0.0, 367.215, 0.0, 457.296, 248.375, 0.0, 0.0, 1.0)
EUROC_D = (-0.28340811, 0.07395907, 0.00019359, 1.76187114e-05)


def info(**kw):
    base = dict(width=752, height=480, k=list(K), d=list(EUROC_D), distortion_model="plumb_bob",
                header=SimpleNamespace(frame_id="cam0"))
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("bad, match", [
    (dict(k=[0.0] * 9), "focal lengths"),
    (dict(width=0, height=0), "width 0 must be a positive integer"),
    (dict(k=[float("nan")] + list(K[1:])), "NaN or Inf"),
    (dict(d=[0.1, float("inf"), 0, 0, 0]), "NaN or Inf"),
    (dict(distortion_model="kannala_brandt"), "not supported"),
    (dict(distortion_model="equidistant", d=[0.1, 0.2]), "takes 4 coefficients"),
    (dict(distortion_model="rational_polynomial", d=[0.1] * 5), "takes 8 or 12 or 14"),
    (dict(k=[400.0, 0, 5000.0, 0, 400.0, 240.0, 0, 0, 1]), "principal point"),
    (dict(k=[400.0, 0, 300.0, 0, 400.0, 240.0, 1, 0, 1]), "not a pinhole matrix"),
])
def test_camera_info_that_cannot_be_right_is_refused_with_the_field_named(bad, match) -> None:
    with pytest.raises(InputError, match=match):
        CameraModel.from_camera_info(info(**bad), "/cam0/image_raw")


def test_zero_plumb_bob_is_an_ideal_pinhole_and_the_image_size_is_checked() -> None:
    cam = CameraModel.from_camera_info(info(d=[0.0] * 5), "cam")
    assert cam.distortion_model == "none" and cam.d == () and not cam.is_distorted
    cam.check_image(480, 752)
    with pytest.raises(InputError, match="image is 640x480 but the CameraInfo"):
        cam.check_image(480, 640)


@pytest.mark.parametrize("model, d", [
    ("plumb_bob", EUROC_D + (0.0,)),
    ("rational_polynomial", (-0.2, 0.05, 1e-4, -2e-4, 0.01, 0.05, 0.01, 0.002)),
    ("equidistant", (-0.01, 0.02, -0.01, 0.003)),
    ("none", ()),
])
def test_undistortion_inverts_the_opencv_projection_of_each_model(model, d) -> None:
    """Points projected through the model come back as their true rays (what verification
    needs: the essential matrix is estimated on undistorted normalised coordinates)."""
    cam = CameraModel("c", 752, 480, K, model, d)
    rng = np.random.default_rng(0)
    xy = rng.uniform([-0.7, -0.45], [0.7, 0.45], (200, 2))
    z = rng.uniform(1, 20, 200)
    pts = np.column_stack([xy * z[:, None], z])
    uv = cam.project(pts)
    if model != "none":  # the distortion really moves the pixels
        assert np.abs(uv - CameraModel("c", 752, 480, K).project(pts)).max() > 2.0
    np.testing.assert_allclose(cam.normalize(uv), xy, atol=2e-6)
    np.testing.assert_allclose(cam.back_project(uv, z), pts, rtol=2e-5, atol=1e-5)


def _map_with_cameras(session: str = "run1", k=K) -> PlaceMap:
    pm = PlaceMap.create(8, "fp")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    kfs = [Keyframe(session, 10 + i, source_topic="/cam0", camera="/cam0" if i < 3 else "/cam1")
           for i in range(4)]
    pm.add(x, kfs)
    pm.add_camera(session, CameraModel("/cam0", 752, 480, k, "plumb_bob", EUROC_D, "cam0",
                                       "base_link", (0.1, 0.0, 0.2, -0.5, 0.5, -0.5, 0.5)))
    pm.add_camera(session, CameraModel("/cam1", 640, 480, (500, 0, 320, 0, 500, 240, 0, 0, 1),
                                       "equidistant", (0.01, 0.0, 0.0, 0.0)))
    return pm


def test_cameras_round_trip_per_session_and_camera(tmp_path: Path) -> None:
    pm = _map_with_cameras()
    pm.save(tmp_path / "m")
    back = PlaceMap.load(tmp_path / "m")
    assert back.cameras() == pm.cameras() and len(back.cameras()) == 2
    assert back.keyframe(3).camera == "/cam1" and back.camera_of(0).name == "/cam0"
    assert back.camera_of(3).distortion_model == "equidistant"
    assert back.camera_of(0).mount == pytest.approx((0.1, 0.0, 0.2, -0.5, 0.5, -0.5, 0.5))
    assert back.camera("run1", "/nope") is None
    assert [c["name"] for c in back.info()["cameras"]] == ["/cam0", "/cam1"]
    # readable with sqlite3 alone
    _, db = _keyframes_db(tmp_path / "m")
    con = sqlite3.connect(db)
    rows = con.execute("SELECT session, camera, model FROM cameras ORDER BY camera").fetchall()
    con.close()
    assert rows[0][:2] == ("run1", "/cam0") and json.loads(rows[0][2])["width"] == 752


def _keyframes_db(folder: Path) -> tuple[dict, Path]:
    """A saved map's manifest and its keyframe database (the SQLite file the cameras table is
    in), for tests that read or damage it directly."""
    manifest = json.loads((folder / MANIFEST).read_text())
    return manifest, folder / manifest["files"]["keyframes"]["name"]


def test_merge_keeps_cameras_and_refuses_a_conflicting_calibration(tmp_path: Path) -> None:
    a = _map_with_cameras("run1")
    b = _map_with_cameras("run2")
    a.merge(b)
    assert set(a.cameras()) == {("run1", "/cam0"), ("run1", "/cam1"), ("run2", "/cam0"),
                                ("run2", "/cam1")}
    assert a.camera_of(7).name == "/cam1" and a.keyframe(7).session == "run2"
    other_k = (400.0, 0.0, 367.0, 0.0, 400.0, 248.0, 0.0, 0.0, 1.0)
    c = _map_with_cameras("run1", k=other_k)
    n = len(a)
    with pytest.raises(MapMismatchError, match="calibrated differently in the two maps"):
        a.merge(c)
    assert len(a) == n  # nothing half-merged
    with pytest.raises(MapMismatchError, match="already calibrated differently"):
        a.add_camera("run1", c.camera("run1", "/cam0"))


def test_version_one_map_without_cameras_still_loads(tmp_path: Path) -> None:
    """A map written before cameras were kept: no camera column, no cameras table."""
    pm = _map_with_cameras()
    pm.save(tmp_path / "m")
    manifest, db = _keyframes_db(tmp_path / "m")
    con = sqlite3.connect(db)
    con.executescript("DROP TABLE cameras; ALTER TABLE keyframes DROP COLUMN camera;")
    con.commit()
    con.execute("VACUUM")
    con.close()
    manifest["format_version"] = 1
    manifest["files"]["keyframes"].update(bytes=db.stat().st_size, sha256=sha256_file(db))
    manifest.pop(MANIFEST_CHECKSUM)  # nor did such maps carry a manifest checksum
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(manifest))
    back = PlaceMap.load(tmp_path / "m")
    assert len(back) == 4 and back.cameras() == {} and back.keyframe(0).camera == ""
    assert back.camera_of(0) is None


def test_a_corrupt_calibration_row_is_a_map_error(tmp_path: Path) -> None:
    pm = _map_with_cameras()
    pm.save(tmp_path / "m")
    manifest, db = _keyframes_db(tmp_path / "m")
    con = sqlite3.connect(db)
    model = json.loads(con.execute("SELECT model FROM cameras WHERE camera='/cam0'").fetchone()[0])
    model["k"] = [0.0] * 9
    con.execute("UPDATE cameras SET model=? WHERE camera='/cam0'", (json.dumps(model),))
    con.commit()
    con.close()
    manifest["files"]["keyframes"].update(bytes=db.stat().st_size, sha256=sha256_file(db))
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(seal_manifest(manifest)))
    with pytest.raises(MapError, match="calibration of camera '/cam0' in session 'run1' is "
                       "invalid"):
        PlaceMap.load(tmp_path / "m")
