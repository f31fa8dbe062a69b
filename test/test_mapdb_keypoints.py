"""Keypoints in the map: stored beside the descriptors under the map's rules (ragged rows,
memory-mapped on load, checksummed, validated, atomic with the rest, appended live, merged),
and refused clearly when they do not fit the map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.errors import InputError, MapError, MapMismatchError
from vpr_ros.mapdb import Keyframe, PlaceMap
from vpr_ros.mapdb.storage import MANIFEST, seal_manifest
from vpr_ros.runtime.local_features import LocalFeatures

D = 8


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def feats(n: int, seed: int, points: bool, kind: str = "sift") -> LocalFeatures:
    rng = np.random.default_rng(seed)
    width = {"sift": 128, "orb": 32}[kind]
    xyz = None
    if points:
        xyz = rng.uniform(1, 5, (n, 3)).astype(np.float32)
        xyz[::3] = np.nan  # some keypoints without depth
    return LocalFeatures(kind, rng.uniform(0, 640, (n, 2)),
                         rng.integers(0, 256, (n, width), dtype=np.uint8), xyz)


def make(session: str = "a", kind: str = "sift", points: bool = True, seed: int = 0
         ) -> tuple[PlaceMap, list[LocalFeatures]]:
    pm = PlaceMap.create(D, "fp", keypoints=kind)
    kps = [feats(n, seed + i, points and i != 1, kind) for i, n in enumerate((50, 0, 17, 120))]
    pm.add(unit(4, seed), [Keyframe(session, i) for i in range(4)], keypoints=kps)
    return pm, kps


def same(a: LocalFeatures, b: LocalFeatures) -> None:
    np.testing.assert_array_equal(a.xy, b.xy)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    if b.xyz is None:
        assert a.xyz is None or np.isnan(a.xyz).all()
    else:
        np.testing.assert_array_equal(a.xyz, b.xyz)


def test_keypoints_round_trip_memory_mapped_and_grow_after_loading(tmp_path: Path) -> None:
    pm, kps = make()
    assert pm.keypoint_kind == "sift" and pm.has_keypoint_points
    pm.save(tmp_path / "m")
    back = PlaceMap.load(tmp_path / "m")
    assert back.keypoint_kind == "sift"
    for i, k in enumerate(kps):
        same(back.keypoints(i), k)
    assert isinstance(back._keypoints._base["keypoint_xy"], np.memmap)
    info = back.info()["keypoints"]
    assert info["kind"] == "sift" and info["rows"] == 187 and info["points"]
    assert info["with_points"] == pytest.approx((33 + 11 + 80) / 187, abs=1e-3)
    extra = feats(9, 99, False)
    back.add(unit(1, 5), [Keyframe("b", 9)], keypoints=[extra])
    back.save(tmp_path / "m")
    again = PlaceMap.load(tmp_path / "m")
    same(again.keypoints(4), extra)
    same(again.keypoints(3), kps[3])
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert {"keypoint_offsets", "keypoint_xy", "keypoint_descriptors",
            "keypoint_points"} <= set(manifest["files"])


def test_a_map_without_depth_stores_no_points_file(tmp_path: Path) -> None:
    pm, _ = make(kind="orb", points=False)
    assert not pm.has_keypoint_points
    pm.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert "keypoint_points" not in manifest["files"]
    back = PlaceMap.load(tmp_path / "m")
    assert back.keypoints(0).xyz is None and back.keypoint_kind == "orb"


def test_merge_concatenates_keypoints_and_refuses_another_kind(tmp_path: Path) -> None:
    a, ka = make("a")
    b, kb = make("b", seed=10)
    a.merge(b)
    for i, k in enumerate(ka + kb):
        same(a.keypoints(i), k)
    c, _ = make("c", kind="orb")
    with pytest.raises(MapMismatchError, match="stores sift keypoints, the other orb"):
        a.merge(c)
    plain = PlaceMap.create(D, "fp")
    plain.add(unit(1, 3), [Keyframe("d", 1)])
    with pytest.raises(MapMismatchError, match="stores sift keypoints, the other none"):
        a.merge(plain)
    with pytest.raises(InputError, match="stores no keypoints"):
        plain.keypoints(0)


def test_adding_without_or_with_the_wrong_keypoints_is_refused() -> None:
    pm, _ = make()
    with pytest.raises(InputError, match="pass one LocalFeatures per keyframe"):
        pm.add(unit(1, 1), [Keyframe("a", 7)])
    with pytest.raises(InputError, match="keypoints are orb but this map stores sift"):
        pm.add(unit(1, 1), [Keyframe("a", 7)], keypoints=[feats(3, 1, False, "orb")])
    assert len(pm) == 4
    plain = PlaceMap.create(D, "fp")
    with pytest.raises(InputError, match="no keypoint store"):
        plain.add(unit(1, 1), [Keyframe("a", 7)], keypoints=[feats(3, 1, False)])


@pytest.mark.parametrize("damage, match", [
    ("truncate_xy", "truncated|bytes"),
    ("bad_offsets", "not monotonic"),
    ("drop_entry", "lists keypoint files but no keypoints entry"),
    ("bad_entry", "keypoints entry"),
])
def test_damaged_keypoint_files_are_clear_map_errors(tmp_path: Path, damage: str,
                                                     match: str) -> None:
    from vpr_ros.mapdb.storage import sha256_file

    pm, _ = make()
    pm.save(tmp_path / "m")
    mpath = tmp_path / "m" / MANIFEST
    manifest = json.loads(mpath.read_text())
    if damage == "truncate_xy":
        f = tmp_path / "m" / manifest["files"]["keypoint_xy"]["name"]
        f.write_bytes(f.read_bytes()[:-16])
    elif damage == "bad_offsets":
        rec = manifest["files"]["keypoint_offsets"]
        f = tmp_path / "m" / rec["name"]
        arr = np.load(f)
        arr[2] = arr[1] - 1
        np.save(f, arr)
        rec.update(bytes=f.stat().st_size, sha256=sha256_file(f))
    elif damage == "drop_entry":
        del manifest["keypoints"]
    else:
        manifest["keypoints"]["descriptor_bytes"] = 32
    mpath.write_text(json.dumps(seal_manifest(manifest)))
    with pytest.raises(MapError, match=match):
        PlaceMap.load(tmp_path / "m")
