"""Adversarial trials on saved maps: damaged bytes, cut and missing files, swapped files, edited
manifests, a reader racing a writer, and writers killed mid-save. Each trial asserts a clear
error or a correct result (see ``trials.py``); counts are seeded and bounded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.bench.search_bench import clustered_descriptors, noisy_queries
from vpr_ros.errors import MapError, VPRError
from vpr_ros.mapdb import Keyframe, PlaceMap
from vpr_ros.mapdb.storage import MANIFEST, MANIFEST_CHECKSUM, seal_manifest

from trials import REMOVE, assert_clear, count, rng, set_field  # noqa: E402

FP = "fingerprint-of-trial-model"
D = 32
N = 400
GRID = (3, 3, 4)
KINDS = {
    "flat": "flat",
    "hnsw": {"kind": "hnsw", "M": 8},
    "ivfpq": {"kind": "ivfpq", "m": 4, "nbits": 6, "min_train": 300},
    "binary": {"kind": "binary", "bits": 64, "codes": "pca"},
}
QUERIES = noisy_queries(clustered_descriptors(N, D, clusters=8, seed=3), 12, seed=5)[0]


def keyframes(n: int, start: int = 0, session: str = "run1") -> list[Keyframe]:
    return [Keyframe(session=session, stamp_ns=1_000_000_000 * (i + 1), frame_id="cam",
                     position=(float(i), 0.0, 0.0) if i % 2 else None,
                     source_bag="bag", source_topic="/cam") for i in range(start, start + n)]


def local_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *GRID)).astype(np.float32)


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """One saved map per index kind, each with a local-feature store, so every file role a
    map can have is on disk."""
    root = tmp_path_factory.mktemp("trial_maps")
    out = {}
    for name, spec in KINDS.items():
        pm = PlaceMap.create(D, FP, spec, local_grid=GRID)
        pm.add(clustered_descriptors(N, D, clusters=8, seed=3), keyframes(N),
               local_features=local_rows(N, 1))
        pm.save(root / name)
        out[name] = root / name
    return out


def answers(pm: PlaceMap) -> tuple:
    ids, scores = pm.search(QUERIES, 6)
    return (ids, scores, pm.keyframes(range(len(pm))),
            pm.local_features(np.arange(len(pm))) if pm.local_grid else None)


@pytest.fixture(scope="module")
def reference(templates) -> dict[str, tuple]:
    return {name: answers(PlaceMap.load(path)) for name, path in templates.items()}


def assert_same(got: tuple, want: tuple, what: str) -> None:
    np.testing.assert_array_equal(got[0], want[0], err_msg=f"{what}: different ids")
    np.testing.assert_array_equal(got[1], want[1], err_msg=f"{what}: different scores")
    assert got[2] == want[2], f"{what}: different keyframes"
    if want[3] is not None:
        np.testing.assert_array_equal(got[3], want[3], err_msg=f"{what}: different local feats")


def outcome(path: Path, want: tuple, what: str, **load_kw) -> str:
    """'error' (clear) or 'same' (loads and answers exactly as the undamaged map)."""
    try:
        pm = PlaceMap.load(path, **load_kw)
        got = answers(pm)
    except VPRError as exc:
        assert_clear(exc, what)
        return "error"
    assert_same(got, want, what)
    return "same"


def fresh_copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def map_files(path: Path) -> dict[str, Path]:
    manifest = json.loads((path / MANIFEST).read_text())
    files = {role: path / rec["name"] for role, rec in manifest["files"].items()}
    return {**files, "manifest": path / MANIFEST}


# -- bytes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_byte_flips_in_every_file(templates, reference, tmp_path: Path, kind: str) -> None:
    """A flipped byte anywhere in any file: refused (checksums), never a different answer."""
    roles = list(map_files(templates[kind]))
    for role in roles:
        g = rng("flip", kind, role)
        size = map_files(templates[kind])[role].stat().st_size
        for offset in g.choice(size, size=min(size, count(3)), replace=False):
            path = fresh_copy(templates[kind], tmp_path / "m")
            f = map_files(path)[role]
            data = bytearray(f.read_bytes())
            data[offset] ^= int(g.integers(1, 256))
            f.write_bytes(bytes(data))
            what = f"{kind}: byte {offset} of {role} flipped"
            result = outcome(path, reference[kind], what)
            # Only map.json may survive a flip: one whitespace byte turned into another.
            assert result == "error" or role == "manifest", what


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_truncated_and_deleted_files(templates, reference, tmp_path: Path, kind: str,
                                     verify: bool) -> None:
    """A cut or missing file is refused even without checksums (sizes and structure)."""
    for role in map_files(templates[kind]):
        g = rng("cut", kind, role)
        size = map_files(templates[kind])[role].stat().st_size
        for keep in sorted({0, *g.integers(0, size, size=count(2)).tolist()}):
            path = fresh_copy(templates[kind], tmp_path / "m")
            f = map_files(path)[role]
            f.write_bytes(f.read_bytes()[:keep])
            what = f"{kind}: {role} cut to {keep} of {size} bytes (verify={verify})"
            assert outcome(path, reference[kind], what, verify=verify) == "error", what
        path = fresh_copy(templates[kind], tmp_path / "m")
        map_files(path)[role].unlink()
        what = f"{kind}: {role} deleted (verify={verify})"
        assert outcome(path, reference[kind], what, verify=verify) == "error", what


@pytest.mark.parametrize("kind", list(KINDS))
def test_swapped_files(templates, reference, tmp_path: Path, kind: str) -> None:
    """Two files of a map exchanged, or a file replaced by the same role of another map of the
    same shape: refused."""
    other_root = tmp_path / "other"
    pm = PlaceMap.create(D, FP, KINDS[kind], local_grid=GRID)
    pm.add(clustered_descriptors(N, D, clusters=8, seed=11), keyframes(N),
           local_features=local_rows(N, 2))
    pm.save(other_root)
    roles = [r for r in map_files(templates[kind]) if r != "manifest"]
    g = rng("swap", kind)
    pairs = [(a, b) for i, a in enumerate(roles) for b in roles[i + 1:]]
    for j in g.choice(len(pairs), size=min(len(pairs), count(3)), replace=False):
        a, b = pairs[j]
        path = fresh_copy(templates[kind], tmp_path / "m")
        files = map_files(path)
        tmp = files[a].with_suffix(".swap")
        files[a].rename(tmp)
        files[b].rename(files[a])
        tmp.rename(files[b])
        what = f"{kind}: {a} and {b} swapped"
        assert outcome(path, reference[kind], what) == "error", what
    for role in roles:
        path = fresh_copy(templates[kind], tmp_path / "m")
        theirs = map_files(other_root)[role]
        if theirs.read_bytes() == map_files(path)[role].read_bytes():
            continue  # the same keyframes give the same database: nothing to swap
        shutil.copyfile(theirs, map_files(path)[role])
        what = f"{kind}: {role} replaced by another map's"
        assert outcome(path, reference[kind], what) == "error", what


# -- manifest edits ----------------------------------------------------------------------------


def _edits(manifest: dict, g: np.random.Generator) -> list[tuple[str, dict]]:
    """Seeded edits of every field: another value of the same type, another type, removed."""
    out = []

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            candidates = [None, "x", [1], {"a": 1}, -1, 10 ** 12, 0.5, True]
            if isinstance(value, bool):
                candidates.append(not value)
            elif isinstance(value, int):
                candidates += [value + 1, value - 1, value * 10]
            elif isinstance(value, str):
                candidates += [value + "x", value[:-1]]
            for new in [candidates[i] for i in g.choice(len(candidates), 2, replace=False)]:
                if new != value:
                    out.append((f"{name} = {new!r}", _edited(manifest, name, new)))
            out.append((f"{name} removed", _edited(manifest, name, REMOVE)))

    walk(manifest, "")
    return out


def _edited(manifest: dict, name: str, value) -> dict:
    return set_field(json.loads(json.dumps(manifest)), name, value)


@pytest.mark.parametrize("kind", list(KINDS))
def test_manifest_edits_are_refused(templates, reference, tmp_path: Path, kind: str) -> None:
    """Any edit of map.json (a search parameter such as a binary index's rerank included) is
    refused by the manifest's checksum; removing the checksum leaves the other checks, and a
    map without one still loads (maps written before it) with a warning."""
    manifest = json.loads((templates[kind] / MANIFEST).read_text())
    edits = _edits(manifest, rng("manifest", kind))
    g = rng("manifest-pick", kind)
    picked = [edits[i] for i in g.choice(len(edits), size=min(len(edits), count(12)),
                                         replace=False)]
    for label, edited in picked:
        path = fresh_copy(templates[kind], tmp_path / "m")
        (path / MANIFEST).write_text(json.dumps(edited, indent=1))
        what = f"{kind}: map.json {label}"
        result = outcome(path, reference[kind], what)
        if label != f"{MANIFEST_CHECKSUM} removed":
            assert result == "error", what


def test_edited_search_parameter_is_refused(templates, tmp_path: Path) -> None:
    """The reported case: ``rerank: 100 -> 10`` in a binary map changed ranks 2-20 of every
    query without a word."""
    path = fresh_copy(templates["binary"], tmp_path / "m")
    text = (path / MANIFEST).read_text()
    assert '"rerank": 100' in text
    (path / MANIFEST).write_text(text.replace('"rerank": 100', '"rerank": 10'))
    with pytest.raises(MapError, match="manifest_sha256.*edited or is corrupt"):
        PlaceMap.load(path)


@pytest.mark.parametrize("edit", ["kind", "drop-file"])
def test_index_kind_without_its_file(templates, tmp_path: Path, edit: str, capsys) -> None:
    """A manifest (even one re-sealed, as a buggy writer would leave it) naming an index kind
    whose file it does not list: a MapError naming map.json, not a KeyError."""
    src = templates["flat" if edit == "kind" else "hnsw"]
    path = fresh_copy(src, tmp_path / "m")
    manifest = json.loads((path / MANIFEST).read_text())
    if edit == "kind":
        manifest["index"] = {"kind": "hnsw"}
    else:
        del manifest["files"]["hnsw"]
    (path / MANIFEST).write_text(json.dumps(seal_manifest(manifest)))
    with pytest.raises(MapError, match=r"map.json: the 'hnsw' index needs a 'hnsw' file"):
        PlaceMap.load(path)
    from vpr_ros.cli import main

    assert main(["map", "info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err and "'hnsw' file" in err, err


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000, "\xff\xfe", ""])
def test_pathological_manifest_text(templates, tmp_path: Path, text: str) -> None:
    path = fresh_copy(templates["flat"], tmp_path / "m")
    (path / MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(MapError) as err:
        PlaceMap.load(path)
    assert_clear(err.value, f"map.json of {len(text)} chars")


# -- a reader racing a writer ------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from vpr_ros.bench.search_bench import clustered_descriptors
    from vpr_ros.mapdb import Keyframe, PlaceMap
    path, spec, n, seconds = sys.argv[1], eval(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    maps = []
    for extra in (0, 25):
        pm = PlaceMap.create(32, "fp", spec)
        x = clustered_descriptors(n + extra, 32, clusters=8, seed=3)
        pm.add(x, [Keyframe(session="s", stamp_ns=i + 1) for i in range(n + extra)])
        maps.append(pm)
    maps[0].save(path)
    print("ready", flush=True)
    saves, end = 1, time.monotonic() + seconds
    while time.monotonic() < end:
        maps[saves % 2].save(path)
        saves += 1
    print(saves, flush=True)
""")

READER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from vpr_ros.errors import VPRError
    from vpr_ros.mapdb import PlaceMap
    path, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    q = np.eye(32, dtype=np.float32)[:4]
    seen, errors, end = {}, [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            pm = PlaceMap.load(path)
            ids = pm.search(q, 3)[0]
            key = f"{len(pm)}:{ids.tolist()}"
            seen[key] = seen.get(key, 0) + 1
        except VPRError as exc:
            errors.append(str(exc))
    print(json.dumps({"seen": seen, "errors": errors[:5], "n_errors": len(errors)}))
""")


@pytest.mark.parametrize("kind", ["hnsw", "flat", "binary"])
def test_reader_never_sees_a_half_switched_generation(tmp_path: Path, kind: str) -> None:
    """Real processes: one saves two maps in turn to one path as fast as it can, two others
    load it over and over. Every load must give one of the two maps, never an error: a writer
    removing the generation being read is not damage."""
    spec = {"flat": "'flat'", "hnsw": "{'kind': 'hnsw', 'M': 8}",
            "binary": "{'kind': 'binary', 'bits': 64, 'codes': 'simhash'}"}[kind]
    n, seconds = 1500, 4.0
    path = tmp_path / "m"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), spec, str(n),
                               str(seconds + 2)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert writer.stdout.readline().strip() == "ready"
        readers = [subprocess.Popen([sys.executable, "-c", READER, str(path), str(n),
                                     str(seconds)], stdout=subprocess.PIPE, text=True, env=env)
                   for _ in range(2)]
        results = [json.loads(r.communicate(timeout=120)[0]) for r in readers]
        saves = int(writer.communicate(timeout=120)[0].strip())
    finally:
        writer.kill()
    expected = {}
    for extra in (0, 25):
        pm = PlaceMap.create(32, "fp", eval(spec))
        pm.add(clustered_descriptors(n + extra, 32, clusters=8, seed=3),
               [Keyframe(session="s", stamp_ns=i + 1) for i in range(n + extra)])
        expected[f"{len(pm)}:{pm.search(np.eye(32, dtype=np.float32)[:4], 3)[0].tolist()}"] = 1
    loads = sum(sum(r["seen"].values()) for r in results)
    assert saves > 10 and loads > 10, (saves, loads)
    for r in results:
        assert r["n_errors"] == 0, f"{r['n_errors']} of {loads} loads failed: {r['errors']}"
        assert set(r["seen"]) <= set(expected), f"a load gave neither map: {r['seen']}"


# -- writers killed mid-save -------------------------------------------------------------------

APPENDER = textwrap.dedent("""
    import sys
    from vpr_ros.bench.search_bench import clustered_descriptors
    from vpr_ros.mapdb import Keyframe, PlaceMap
    path = sys.argv[1]
    print("start", flush=True)
    while True:
        pm = PlaceMap.load(path)
        n = len(pm)
        pm.add(clustered_descriptors(20, 32, clusters=2, seed=n),
               [Keyframe(session="appended", stamp_ns=10**12 + i) for i in range(n, n + 20)])
        pm.save(path)
""")


@pytest.mark.parametrize("kind", ["hnsw", "binary"])
def test_sigkill_at_random_moments_of_append_loops(tmp_path: Path, kind: str) -> None:
    """An appending writer killed at seeded random moments (no pause hook: wherever it is)
    leaves a map that loads with every checksum verified and holds a whole number of appends
    over the untouched original."""
    spec = KINDS[kind] if kind != "binary" else {"kind": "binary", "bits": 64,
                                                 "codes": "simhash"}
    path = tmp_path / "m"
    base = clustered_descriptors(N, 32, clusters=8, seed=3)
    pm = PlaceMap.create(32, FP, spec)
    pm.add(base, keyframes(N))
    pm.save(path)
    g = rng("kill", kind)
    for delay in g.uniform(0.05, 0.8, size=count(4)):
        proc = subprocess.Popen([sys.executable, "-c", APPENDER, str(path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "start"
        time.sleep(float(delay))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        loaded = PlaceMap.load(path)  # every checksum verified
        grown = len(loaded) - N
        assert grown >= 0 and grown % 20 == 0, (delay, len(loaded))
        np.testing.assert_array_equal(loaded.descriptors()[:N], base)
        assert loaded.sessions() == (["run1"] + (["appended"] if grown else []))
