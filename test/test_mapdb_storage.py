"""PlaceMap persistence: round trips of every index kind and dtype, the on-disk format (SQLite
metadata, memory-mapped .npy descriptors, manifest with version, fingerprint, dim, counts and
checksums), atomic saves that survive a SIGKILL at every stage, and a clear MapError naming the
file for every kind of damage."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.bench.search_bench import clustered_descriptors, noisy_queries
from vpr_ros.errors import MapError, MapMismatchError
from vpr_ros.mapdb import Exclusion, Keyframe, PlaceMap, storage
from vpr_ros.mapdb.storage import MANIFEST, PAUSE_ENV, PAUSE_MARK, seal_manifest

FP = "fingerprint-of-model-a"
D = 32


def make_keyframes(n: int, session: str = "run1", start: int = 0) -> list[Keyframe]:
    out = []
    for i in range(start, start + n):
        out.append(Keyframe(
            session=session, stamp_ns=1_700_000_000_000_000_000 + i * 50_000_000,
            frame_id="camera_optical",
            position=(0.5 * i, -1.25, 0.0) if i % 3 else None,
            orientation=(0.0, 0.0, 0.382683, 0.923880) if i % 3 else None,
            gnss=(59.3293 + i * 1e-6, 18.0686, 12.5) if i % 4 == 0 else None,
            source_bag=f"bags/{session}", source_topic="/cam/image_raw"))
    return out


def build(n: int = 600, kind="flat", dtype: str = "float32", seed: int = 0) -> PlaceMap:
    pm = PlaceMap.create(D, FP, kind, dtype)
    pm.add(clustered_descriptors(n, D, clusters=12, seed=seed), make_keyframes(n))
    return pm


QUERIES = noisy_queries(clustered_descriptors(600, D, clusters=12, seed=0), 20, seed=7)[0]
EX = Exclusion(ids=frozenset({1, 2, 3}), around_stamp_ns=1_700_000_000_000_000_000,
               window_ns=500_000_000)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", ["flat", "hnsw", {"kind": "ivfpq", "m": 4, "nbits": 6,
                                                   "min_train": 400}, "binary"],
                         ids=["flat", "hnsw", "ivfpq", "binary"])
def test_round_trip_gives_identical_answers(tmp_path: Path, kind, dtype: str) -> None:
    pm = build(kind=kind, dtype=dtype)
    before = pm.search(QUERIES, 8, exclude=EX)
    pm.save(tmp_path / "map")
    loaded = PlaceMap.load(tmp_path / "map", expected_fingerprint=FP)
    after = loaded.search(QUERIES, 8, exclude=EX)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert len(loaded) == 600 and loaded.dim == D and loaded.fingerprint == FP
    assert loaded.index_kind == pm.index_kind and loaded.storage_dtype == dtype
    assert loaded.keyframes(range(600)) == pm.keyframes(range(600))
    assert isinstance(loaded.descriptors(), np.memmap)
    np.testing.assert_array_equal(loaded.descriptors(), pm.descriptors())
    assert loaded.info()["index"] == pm.info()["index"]
    # The loaded map keeps growing and saving like a fresh one.
    extra = clustered_descriptors(50, D, clusters=3, seed=9)
    assert loaded.add(extra, make_keyframes(50, "run2")).tolist() == list(range(600, 650))
    loaded.save(tmp_path / "map")
    again = PlaceMap.load(tmp_path / "map", mmap=False)
    assert len(again) == 650 and again.sessions() == ["run1", "run2"]
    np.testing.assert_array_equal(again.search(extra[:5], 1)[0][:, 0], np.arange(600, 605))


def test_on_disk_format_is_open_and_documented(tmp_path: Path) -> None:
    pm = build(kind="binary", dtype="float16")
    pm.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert manifest["format"] == "vpr_ros.map" and manifest["format_version"] == 2
    assert manifest["fingerprint"] == FP and manifest["dim"] == D and manifest["count"] == 600
    assert manifest["storage_dtype"] == "float16" and manifest["index"]["kind"] == "binary"
    assert manifest["sessions"] == {"run1": 600} and manifest["has_poses"] is True
    assert set(manifest["files"]) == {"descriptors", "keyframes", "binary_codes",
                                      "binary_projection", "binary_thresholds"}
    for rec in manifest["files"].values():
        path = tmp_path / "m" / rec["name"]
        assert path.stat().st_size == rec["bytes"] and len(rec["sha256"]) == 64
    desc = np.load(tmp_path / "m" / manifest["files"]["descriptors"]["name"], mmap_mode="r")
    assert desc.dtype == np.float16 and desc.shape == (600, D)
    con = sqlite3.connect(tmp_path / "m" / manifest["files"]["keyframes"]["name"])
    rows = con.execute("SELECT id, session, stamp_ns, px, qw, lat, source_topic FROM keyframes "
                       "WHERE id IN (0, 1) ORDER BY id").fetchall()
    meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    con.close()
    assert rows[0][:3] == (0, "run1", 1_700_000_000_000_000_000)
    assert rows[0][3] is None and rows[0][5] == pytest.approx(59.3293)
    assert rows[1][3] == 0.5 and rows[1][4] == pytest.approx(0.92388) and rows[1][5] is None
    assert rows[1][6] == "/cam/image_raw" and meta["fingerprint"] == FP
    info = PlaceMap.load(tmp_path / "m").info()
    assert info["count"] == 600 and info["descriptor_bytes"] == 600 * D * 2
    assert info["disk_bytes"] > info["descriptor_bytes"]
    assert info["stamp_range_ns"] == [1_700_000_000_000_000_000,
                                      1_700_000_000_000_000_000 + 599 * 50_000_000]
    assert info["has_gnss"] and info["created"] <= info["updated"]


def test_repeated_saves_keep_one_generation(tmp_path: Path) -> None:
    pm = build(kind="hnsw")
    for _ in range(3):
        pm.add(clustered_descriptors(10, D, seed=len(pm)), make_keyframes(10, start=len(pm)))
        pm.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    names = sorted(p.name for p in (tmp_path / "m").iterdir() 
             if p.name not in (storage.LOCK, storage.READERS_LOCK))
    assert manifest["generation"] == 3
    assert names == sorted([MANIFEST] + [r["name"] for r in manifest["files"].values()])


# -- damage ------------------------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    build(kind="hnsw").save(tmp_path / "map")
    return tmp_path / "map"


def manifest_of(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def file_of(path: Path, role: str) -> Path:
    return path / manifest_of(path)["files"][role]["name"]


def test_truncated_descriptor_file(saved: Path) -> None:
    f = file_of(saved, "descriptors")
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(MapError, match=f"{f.name}.*truncated"):
        PlaceMap.load(saved)


def test_descriptor_bytes_flipped_in_place(saved: Path) -> None:
    f = file_of(saved, "descriptors")
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(MapError, match=f"{f.name}.*sha256"):
        PlaceMap.load(saved)


@pytest.mark.parametrize("verify", [True, False])
def test_garbage_sqlite(saved: Path, verify: bool) -> None:
    f = file_of(saved, "keyframes")
    size = f.stat().st_size
    f.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    with pytest.raises(MapError, match=f.name):
        PlaceMap.load(saved, verify=verify)


def test_garbage_faiss_index_without_checksums(saved: Path) -> None:
    f = file_of(saved, "hnsw")
    f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.raises(MapError, match=f"{f.name}.*faiss"):
        PlaceMap.load(saved, verify=False)


def test_index_file_of_another_map_is_detected(tmp_path: Path, saved: Path) -> None:
    other = tmp_path / "other"
    build(kind="hnsw", seed=5).save(other)
    mine, theirs = file_of(saved, "hnsw"), file_of(other, "hnsw")
    mine.write_bytes(theirs.read_bytes())
    m = manifest_of(saved)
    m["files"]["hnsw"]["bytes"] = mine.stat().st_size  # as if the manifest were "fixed" by hand
    (saved / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(MapError, match="differ from the map's descriptors"):
        PlaceMap.load(saved, verify=False)


def test_binary_codes_of_another_map_are_detected(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    build(kind="binary").save(a)
    build(kind="binary", seed=3).save(b)
    file_of(a, "binary_codes").write_bytes(file_of(b, "binary_codes").read_bytes())
    with pytest.raises(MapError, match="code bits differ"):
        PlaceMap.load(a, verify=False)


@pytest.mark.parametrize("role", ["descriptors", "keyframes", "hnsw"])
def test_missing_file(saved: Path, role: str) -> None:
    f = file_of(saved, role)
    f.unlink()
    with pytest.raises(MapError, match=f"{f.name}: missing"):
        PlaceMap.load(saved)


def test_missing_manifest_and_missing_map(tmp_path: Path, saved: Path) -> None:
    (saved / MANIFEST).unlink()
    with pytest.raises(MapError, match="map.json is missing"):
        PlaceMap.load(saved)
    with pytest.raises(MapError, match="does not exist"):
        PlaceMap.load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MapError, match="is a file"):
        PlaceMap.load(tmp_path / "file")


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(format_version=3), "newer vpr_ros"),
    (lambda m: m.update(format_version=0), "not a released format"),
    (lambda m: m.update(format="something.else"), "not a vpr_ros map"),
    (lambda m: m.update(dim=64), r"expected float32 \(600, 64\)"),
    (lambda m: m.update(count=601), "601"),
    (lambda m: m.update(storage_dtype="int8"), "storage_dtype"),
    (lambda m: m["index"].update(kind="annoy"), "unknown index kind"),
    (lambda m: m.pop("fingerprint"), "fingerprint"),
])
def test_manifest_damage(saved: Path, edit, message: str) -> None:
    m = manifest_of(saved)
    edit(m)
    (saved / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(MapError, match="does not match its manifest_sha256"):
        PlaceMap.load(saved)
    # The same edit with a matching checksum (as a buggy writer would leave it): the field
    # checks behind the checksum still refuse it.
    (saved / MANIFEST).write_text(json.dumps(seal_manifest(m)))
    with pytest.raises(MapError, match=message):
        PlaceMap.load(saved)


def test_manifest_not_json(saved: Path) -> None:
    (saved / MANIFEST).write_text("{ not json")
    with pytest.raises(MapError, match="not valid JSON"):
        PlaceMap.load(saved)


def test_fingerprint_and_dim_mismatch(saved: Path) -> None:
    with pytest.raises(MapMismatchError) as err:
        PlaceMap.load(saved, expected_fingerprint="fingerprint-of-model-b")
    assert FP in str(err.value) and "fingerprint-of-model-b" in str(err.value)
    assert "vpr map build" in str(err.value)
    pm = PlaceMap.load(saved, expected_fingerprint=FP)
    pm.check_compatible(FP, D)
    with pytest.raises(MapMismatchError, match="fingerprint-of-model-b"):
        pm.check_compatible("fingerprint-of-model-b", D)
    with pytest.raises(MapMismatchError, match=r"\(dim 64\)"):
        pm.check_compatible(FP, 64)


def test_save_refuses_a_file_path(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(MapError, match="is a file"):
        build(n=20).save(tmp_path / "f")


# -- crash safety ------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from vpr_ros.bench.search_bench import clustered_descriptors
    from vpr_ros.mapdb import Keyframe, PlaceMap
    n = int(sys.argv[2])
    if sys.argv[3] == "new":
        pm = PlaceMap.create(32, "fingerprint-of-model-a", "binary")
    else:
        pm = PlaceMap.load(sys.argv[1])
    x = clustered_descriptors(n, pm.dim, seed=77)
    pm.add(x, [Keyframe(session="appended", stamp_ns=i) for i in range(n)])
    pm.save(sys.argv[1])
    print("saved", flush=True)
""")


def run_child_until(stage: str, path: Path, n: int = 100, mode: str = "append") -> None:
    env = dict(os.environ, **{PAUSE_ENV: stage})
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(n), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        while True:
            line = proc.stderr.readline()
            if not line:
                pytest.fail(f"child exited without pausing at {stage!r}: {''.join(seen)}")
            seen.append(line)
            if line.startswith(f"{PAUSE_MARK} {stage}"):
                break
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("stage", ["descriptors", "keyframes", "artifacts", "manifest",
                                   "committed"])
def test_sigkill_mid_save_leaves_a_loadable_intact_map(tmp_path: Path, stage: str) -> None:
    path = tmp_path / "map"
    original = build(kind="binary")
    original.save(path)
    before = original.search(QUERIES, 5, exclude=EX)
    run_child_until(stage, path)
    loaded = PlaceMap.load(path, expected_fingerprint=FP)  # verifies every checksum
    if stage == "committed":  # the new manifest was in place: the append is complete
        assert len(loaded) == 700 and loaded.sessions() == ["run1", "appended"]
    else:
        assert len(loaded) == 600 and loaded.sessions() == ["run1"]
        np.testing.assert_array_equal(loaded.descriptors(), original.descriptors())
        assert loaded.keyframes(range(600)) == original.keyframes(range(600))
        after = loaded.search(QUERIES, 5, exclude=EX)
        np.testing.assert_array_equal(before[0], after[0])
    # The next save completes normally and removes what the killed one left behind.
    loaded.save(path)
    manifest = manifest_of(path)
    leftovers = {p.name for p in path.iterdir()} - {MANIFEST, storage.LOCK, storage.READERS_LOCK} - \
        {r["name"] for r in manifest["files"].values()}
    assert leftovers == set()
    assert len(PlaceMap.load(path)) == len(loaded)


def test_sigkill_during_first_save_leaves_no_map(tmp_path: Path) -> None:
    path = tmp_path / "map"
    run_child_until("manifest", path, mode="new")
    assert any(p.suffix == ".npy" for p in path.iterdir())  # files written, never committed
    with pytest.raises(MapError, match="map.json is missing"):
        PlaceMap.load(path)
    build(n=50).save(path)  # a later save over the debris works and cleans it up
    assert len(PlaceMap.load(path)) == 50
    assert len([p for p in path.iterdir() if p.suffix == ".npy"]) == 1
