"""Maps of zoo models with extra outputs, built from real rosbags with real model directories:
SelaVPR++ maps store the hash head's own codes and are searched with them (index ``auto``);
CQVPR maps keep a memory-mapped float16 local-feature store that round-trips, merges, and is
refused with a clear error when truncated, corrupt or inconsistent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_map_build import S, T0, frame, straight_route
from zoo_models import zoo_model_dir
from vpr_ros.errors import InputError, MapError, MapMismatchError
from vpr_ros.mapdb.build import BuildConfig, build_map
from vpr_ros.mapdb.keyframe_selection import KeyframePolicy
from vpr_ros.mapdb.local_store import ROLE as LOCAL_ROLE
from vpr_ros.mapdb.model_outputs import ModelOutputs
from vpr_ros.mapdb.place_map import PlaceMap
from vpr_ros.mapdb.storage import MANIFEST, seal_manifest
from vpr_ros.runtime.encoder import load_encoder

TOPIC = "/camera/image_raw"
#: A keyframe every 0.3 m: the 1 m/s route of straight_route gives one about every 3rd frame.
DENSE = BuildConfig(keyframes=KeyframePolicy(distance_m=0.3))


@pytest.fixture(scope="module")
def selavpr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zoo_model_dir("selavpr_tiny", tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def cqvpr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zoo_model_dir("cqvpr_tiny", tmp_path_factory.getbasetemp())


def _vpr(*argv: str) -> int:
    from vpr_ros.cli import main

    return main(list(argv))


def _frames_of(pm: PlaceMap) -> list[np.ndarray]:
    """The bag images of the map's keyframes (straight_route: frame i at T0 + i * 0.1 s)."""
    return [frame(round((kf.stamp_ns - T0) / (S // 10))) for kf in pm.keyframes(range(len(pm)))]


# --------------------------------------------------------------------------- SelaVPR++ codes

def test_selavpr_map_stores_the_models_codes_and_search_uses_them(
        tmp_path: Path, selavpr: Path, capsys: pytest.CaptureFixture) -> None:
    bag = straight_route(tmp_path / "run", "mcap", n=20)
    out = tmp_path / "map"
    assert _vpr("map", "build", str(bag), "--image-topic", TOPIC, "--pose-topic", "/odom",
                "--model", str(selavpr), "-o", str(out), "--no-progress", "--json",
                "--backend", "torch") == 0  # the reference below is PyTorch fp32
    summary = json.loads(capsys.readouterr().out)
    assert summary["index"] == "binary (model codes)" and not summary["local_features"]

    pm = PlaceMap.load(out)
    info = pm.info()["index"]
    assert (info["kind"], info["codes"], info["bits"]) == ("binary", "model", 512)
    assert pm.model_codes and pm.local_grid is None and len(pm) >= 2
    enc = load_encoder(selavpr, threads=1)
    outs = enc.encode_all(_frames_of(pm))
    np.testing.assert_array_equal(pm.binary_codes(), outs["binary"])
    np.testing.assert_allclose(pm.descriptors(), outs["global"], atol=1e-6)

    # Search runs on the query's codes: without them it is refused, with them each keyframe's
    # own image finds it first.
    with pytest.raises(InputError, match="query_codes"):
        pm.search(outs["global"], k=2)
    ids, _ = pm.search(outs["global"], k=2, query_codes=outs["binary"])
    assert ids[:, 0].tolist() == list(range(len(pm)))

    # A model (or export) without the hash head cannot search this map.
    with pytest.raises(MapMismatchError, match="no 'binary' output"):
        pm.check_outputs(ModelOutputs())
    with pytest.raises(MapMismatchError, match="512-bit hash codes but the model gives 256"):
        pm.check_outputs(ModelOutputs(code_bytes=32))

    assert _vpr("map", "info", str(out)) == 0
    assert "binary (512-bit codes from the model's hash head; hamming -> exact, re-rank 100)" \
        in capsys.readouterr().out

    # An explicit flat index still works with this model.
    flat = tmp_path / "flat"
    assert _vpr("map", "build", str(bag), "--image-topic", TOPIC, "--model", str(selavpr),
                "-o", str(flat), "--index", "flat", "--no-progress") == 0
    capsys.readouterr()
    assert PlaceMap.load(flat).index_kind == "flat"


def test_appending_to_a_model_code_map_adds_codes_and_refuses_another_model(
        tmp_path: Path, selavpr: Path, cqvpr: Path) -> None:
    enc = load_encoder(selavpr, threads=1)
    out = tmp_path / "map"
    build_map(straight_route(tmp_path / "a", n=10), TOPIC, enc, out, pose_topic="/odom",
              config=DENSE)
    pm, _ = build_map(straight_route(tmp_path / "b", "mcap", n=10), TOPIC, enc, out,
                      pose_topic="/odom", session="b", config=DENSE, append=True)
    assert pm.sessions() == ["a", "b"] and len(pm.binary_codes()) == len(pm)
    np.testing.assert_array_equal(PlaceMap.load(out).binary_codes(),
                                  enc.encode_all(_frames_of(pm))["binary"])
    with pytest.raises(MapMismatchError, match="fingerprint"):
        build_map(straight_route(tmp_path / "c", n=5), TOPIC, load_encoder(cqvpr), out,
                  session="c", append=True)


# ------------------------------------------------------------------------ CQVPR local store

@pytest.fixture(scope="module")
def cqvpr_maps(cqvpr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two CQVPR maps (sqlite3 and MCAP bags) and one built with --no-local-features."""
    root = tmp_path_factory.mktemp("cqvpr_maps")
    enc = load_encoder(cqvpr, threads=1)
    out = {}
    for name, storage in (("m1", "sqlite3"), ("m2", "mcap")):
        bag = straight_route(root / f"run_{name}", storage, n=20)
        build_map(bag, TOPIC, enc, root / name, pose_topic="/odom", session=name, config=DENSE)
        out[name] = root / name
    bag = straight_route(root / "run_plain", n=10)
    build_map(bag, TOPIC, enc, root / "plain", config=DENSE.replace(local_features=False))
    out["plain"] = root / "plain"
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_cqvpr_map_stores_local_features_that_round_trip(cqvpr: Path,
                                                         cqvpr_maps: dict[str, Path],
                                                         capsys: pytest.CaptureFixture) -> None:
    pm = PlaceMap.load(cqvpr_maps["m1"])
    enc = load_encoder(cqvpr, threads=1)
    outs = enc.encode_all(_frames_of(pm))
    assert pm.local_grid == outs["local"].shape[1:] == (9, 9, 16)
    assert pm.index_kind == "flat" and not pm.model_codes  # auto: no hash head -> flat
    ids = np.arange(len(pm))[::-1]
    got = pm.local_features(ids)
    assert got.dtype == np.float32 and got.shape == (len(pm), 9, 9, 16)
    np.testing.assert_allclose(got, outs["local"][ids], atol=2e-3)  # float16 storage
    manifest = json.loads((cqvpr_maps["m1"] / MANIFEST).read_text())
    stored = np.load(cqvpr_maps["m1"] / manifest["files"][LOCAL_ROLE]["name"], mmap_mode="r")
    assert isinstance(stored, np.memmap) and stored.dtype == np.float16
    assert stored.shape == (len(pm), 9, 9, 16)

    assert pm.info()["local_features"] == {"grid": [9, 9, 16], "dtype": "float16",
                                           "bytes": len(pm) * 9 * 9 * 16 * 2}
    assert _vpr("map", "info", str(cqvpr_maps["m1"])) == 0
    assert "9 x 9 x 16 float16 per keyframe" in capsys.readouterr().out
    assert PlaceMap.load(cqvpr_maps["plain"]).local_grid is None

    # Live adds need the grid, of the right shape.
    with pytest.raises(InputError, match="pass local_features"):
        pm.add(outs["global"][:1], pm.keyframes([0]))
    with pytest.raises(InputError, match="shape"):
        pm.add(outs["global"][:1], pm.keyframes([0]), local_features=outs["local"][:1, :4])


def test_merge_keeps_local_features_and_refuses_a_map_without(
        tmp_path: Path, cqvpr_maps: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    merged = tmp_path / "merged"
    assert _vpr("map", "merge", str(cqvpr_maps["m1"]), str(cqvpr_maps["m2"]), "-o",
                str(merged)) == 0
    a, b, m = (PlaceMap.load(p) for p in (cqvpr_maps["m1"], cqvpr_maps["m2"], merged))
    assert len(m) == len(a) + len(b) and m.local_grid == a.local_grid
    np.testing.assert_array_equal(m.local_features(np.arange(len(m))), np.concatenate(
        [a.local_features(np.arange(len(a))), b.local_features(np.arange(len(b)))]))

    assert _vpr("map", "merge", str(cqvpr_maps["m1"]), str(cqvpr_maps["plain"]), "-o",
                str(tmp_path / "bad")) == 2
    err = capsys.readouterr().err
    assert "local features" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def _local_file(map_dir: Path) -> Path:
    manifest = json.loads((map_dir / MANIFEST).read_text())
    return map_dir / manifest["files"][LOCAL_ROLE]["name"]


def test_truncated_or_corrupt_local_features_are_clear_errors(
        tmp_path: Path, cqvpr_maps: dict[str, Path]) -> None:
    truncated = _copy(cqvpr_maps["m1"], tmp_path / "truncated")
    path = _local_file(truncated)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(MapError, match="truncated"):
        PlaceMap.load(truncated, verify=False)

    flipped = _copy(cqvpr_maps["m1"], tmp_path / "flipped")
    path = _local_file(flipped)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MapError, match="sha256"):
        PlaceMap.load(flipped)

    # A well-formed file of the wrong grid, with the manifest patched to match its size: the
    # shape check still refuses it.
    wrong = _copy(cqvpr_maps["m1"], tmp_path / "wrong")
    path = _local_file(wrong)
    count = len(PlaceMap.load(wrong))
    np.save(path, np.zeros((count, 9, 9, 8), np.float16))
    manifest = json.loads((wrong / MANIFEST).read_text())
    manifest["files"][LOCAL_ROLE]["bytes"] = path.stat().st_size
    (wrong / MANIFEST).write_text(json.dumps(seal_manifest(manifest)))
    with pytest.raises(MapError, match=r"expected float16 \(\d+, 9, 9, 16\)"):
        PlaceMap.load(wrong, verify=False)

    # The manifest names a grid but the file is gone from its list.
    missing = _copy(cqvpr_maps["m1"], tmp_path / "missing")
    manifest = json.loads((missing / MANIFEST).read_text())
    del manifest["files"][LOCAL_ROLE]
    (missing / MANIFEST).write_text(json.dumps(seal_manifest(manifest)))
    with pytest.raises(MapError, match="lists no local_features file"):
        PlaceMap.load(missing)
