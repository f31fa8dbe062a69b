"""PlaceMap search: the exact index equals a numpy brute-force reference (ids and scores, with
every kind of exclusion), approximate kinds agree with exact search on clustered data, excluded
keyframes never come back, and bad inputs are refused with clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.bench.search_bench import clustered_descriptors, noisy_queries, normalize
from vpr_ros.errors import ConfigError, InputError
from vpr_ros.mapdb import Exclusion, Keyframe, PlaceMap

FP = "model-fingerprint-a"


def keyframes_for(n: int, sessions: int = 3, start: int = 0) -> list[Keyframe]:
    return [Keyframe(session=f"run{(start + i) % sessions}", stamp_ns=1_000_000 * (start + i),
                     frame_id="cam", position=(float(i), 0.0, 0.0) if i % 2 else None)
            for i in range(n)]


def reference_mask(kfs: list[Keyframe], ex: Exclusion | None) -> np.ndarray:
    """Excluded ids, computed the slow obvious way from the keyframes themselves."""
    out = np.zeros(len(kfs), dtype=bool)
    if ex is None:
        return out
    for i, kf in enumerate(kfs):
        if kf.session in ex.sessions or i in ex.ids:
            out[i] = True
        in_window = ex.around_stamp_ns is not None \
            and abs(kf.stamp_ns - ex.around_stamp_ns) <= ex.window_ns
        if in_window and (ex.window_session is None or kf.session == ex.window_session):
            out[i] = True
    return out


def brute_force(db: np.ndarray, q: np.ndarray, k: int,
                excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ db.astype(np.float32).T
    ids = np.full((len(q), k), -1, np.int64)
    out = np.full((len(q), k), -np.inf, np.float32)
    for r in range(len(q)):
        cand = np.flatnonzero(~excluded)
        order = cand[np.lexsort((cand, -scores[r, cand]))][:k]
        ids[r, : len(order)] = order
        out[r, : len(order)] = scores[r, order]
    return ids, out


EXCLUSIONS = [
    None,
    Exclusion(sessions=frozenset({"run1"})),
    Exclusion(ids=frozenset(range(0, 400, 3))),
    Exclusion(around_stamp_ns=500_000_000, window_ns=200_000_000),
    Exclusion(around_stamp_ns=500_000_000, window_ns=200_000_000, window_session="run2",
              sessions=frozenset({"run0"}), ids=frozenset({7, 8, 9})),
]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("ex", EXCLUSIONS)
def test_flat_equals_brute_force(dtype: str, batch: int, ex: Exclusion | None) -> None:
    rng = np.random.default_rng(batch)
    db = normalize(rng.standard_normal((1500, 48)))
    kfs = keyframes_for(len(db))
    pm = PlaceMap.create(48, FP, "flat", dtype)
    pm.add(db[:1000], kfs[:1000])
    pm.add(db[1000:], kfs[1000:])
    q = normalize(rng.standard_normal((batch, 48)))
    ids, scores = pm.search(q, 12, exclude=ex)
    ref_ids, ref_scores = brute_force(pm.descriptors(), q, 12, reference_mask(kfs, ex))
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (batch, 12)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_flat_fp16_threaded_scan_equals_brute_force() -> None:
    """Above 65536 rows the fp16 scan splits the ids between threads; results must not change."""
    rng = np.random.default_rng(5)
    n, d = 70_000, 16
    db = normalize(rng.standard_normal((n, d)))
    kfs = [Keyframe(session="a" if i < n // 2 else "b", stamp_ns=i) for i in range(n)]
    pm = PlaceMap.create(d, FP, "flat", "float16")
    pm.add(db, kfs)
    q = normalize(rng.standard_normal((2, d)))
    for ex in (None, Exclusion(sessions=frozenset({"a"}), ids=frozenset({n - 1}))):
        ids, scores = pm.search(q, 5, exclude=ex)
        ref_ids, ref_scores = brute_force(pm.descriptors(), q, 5, reference_mask(kfs, ex))
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_padding_when_fewer_allowed_than_k() -> None:
    db = normalize(np.random.default_rng(0).standard_normal((6, 8)))
    pm = PlaceMap.create(8, FP)
    pm.add(db, keyframes_for(6))
    ids, scores = pm.search(db[:1], 10, Exclusion(ids=frozenset({0, 1})))
    assert sorted(ids[0, :4].tolist()) == [2, 3, 4, 5]
    assert (ids[0, 4:] == -1).all() and np.isneginf(scores[0, 4:]).all()
    ids, _ = pm.search(db[:1], 3, Exclusion(sessions=frozenset({"run0", "run1", "run2"})))
    assert (ids == -1).all()
    empty = PlaceMap.create(8, FP)
    ids, scores = empty.search(db[:2], 4)
    assert ids.shape == (2, 4) and (ids == -1).all()


# Fewer, smaller PQ codebooks keep training fast; the defaults are covered elsewhere.
IVFPQ_SMALL = {"kind": "ivfpq", "m": 8, "nbits": 6, "nlist": 16, "train_size": 2000}
KINDS = ["flat", "hnsw", IVFPQ_SMALL, "binary"]


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    db = clustered_descriptors(4000, 128, clusters=60, seed=3)
    q, _ = noisy_queries(db, 100, noise=0.5, seed=4)
    return db, q


def exact_topk(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("kind,min_r1,min_r10", [
    ("hnsw", 0.97, 0.95), (IVFPQ_SMALL, 0.93, 0.85), ("binary", 0.97, 0.95)],
    ids=["hnsw", "ivfpq", "binary"])
def test_approximate_kinds_agree_with_exact(clustered, kind, min_r1: float,
                                            min_r10: float) -> None:
    db, q = clustered
    pm = PlaceMap.create(db.shape[1], FP, kind)
    pm.add(db, keyframes_for(len(db)))
    ids, scores = pm.search(q, 10)
    ref = exact_topk(db, q, 10)
    r1 = float((ids[:, 0] == ref[:, 0]).mean())
    r10 = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)]))
    assert r1 >= min_r1 and r10 >= min_r10, (kind, r1, r10)
    # Scores are exact inner products of the returned ids, whatever the kind.
    np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, ids, axis=1), rtol=1e-5,
                               atol=1e-6)
    assert (np.diff(scores, axis=1) <= 1e-7).all()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k if isinstance(k, str) else k["kind"])
def test_exclusion_never_leaks_even_when_it_fills_the_top_k(kind) -> None:
    """The 300 nearest neighbours of the query are in the excluded live session: every kind must
    skip them and still return k allowed results (loop closure against older sessions)."""
    rng = np.random.default_rng(9)
    d = 64
    old = clustered_descriptors(1500, d, clusters=30, seed=11)
    target = old[0]
    near = normalize(target + rng.standard_normal((300, d)).astype(np.float32) * 0.02)
    db = np.concatenate([old, near])
    kfs = [Keyframe(session="old", stamp_ns=i) for i in range(len(old))] + \
          [Keyframe(session="live", stamp_ns=10_000 + i) for i in range(len(near))]
    pm = PlaceMap.create(d, FP, kind)
    pm.add(db, kfs)
    q = normalize(target[None] + 0.01 * rng.standard_normal((1, d)).astype(np.float32))
    for ex in (Exclusion(sessions=frozenset({"live"})),
               Exclusion(around_stamp_ns=10_150, window_ns=150, window_session="live"),
               Exclusion(ids=frozenset(range(len(old), len(db))))):
        ids, scores = pm.search(q, 10, exclude=ex)
        assert (ids >= 0).all() and (ids < len(old)).all(), (kind, ex, ids)
        ref = brute_force(db, q, 10, np.arange(len(db)) >= len(old))[0]
        if kind == "flat":
            np.testing.assert_array_equal(ids, ref)
        else:
            assert ids[0, 0] == ref[0, 0]


def test_binary_uses_model_codes_when_given(clustered) -> None:
    db, q = clustered
    hash_head = np.random.default_rng(21).standard_normal((db.shape[1], 256)).astype(np.float32)
    pm = PlaceMap.create(db.shape[1], FP, {"kind": "binary", "bits": 256})
    pm.add(db[:2000], keyframes_for(2000), binary_codes=db[:2000] @ hash_head)  # unpacked
    packed = np.packbits(db[2000:] @ hash_head > 0, axis=1)
    pm.add(db[2000:], keyframes_for(2000, start=2000), binary_codes=packed)
    assert pm.info()["index"]["codes"] == "model"
    with pytest.raises(InputError, match="query_codes"):
        pm.search(q, 5)
    with pytest.raises(InputError, match="binary_codes"):
        pm.add(db[:1], keyframes_for(1))
    ids, _ = pm.search(q, 10, query_codes=q @ hash_head)
    ref = exact_topk(db, q, 10)
    assert (ids[:, 0] == ref[:, 0]).mean() >= 0.95
    projected = PlaceMap.create(db.shape[1], FP, "binary")
    projected.add(db[:10], keyframes_for(10))
    with pytest.raises(InputError, match="derives binary codes from the descriptors"):
        projected.add(db[10:20], keyframes_for(10), binary_codes=db[10:20] @ hash_head)
    with pytest.raises(InputError, match="derives binary codes from the descriptors"):
        projected.search(q, 5, query_codes=q @ hash_head)
    with pytest.raises(InputError, match="shape"):
        pm.search(q, 5, query_codes=np.zeros((len(q), 7), np.uint8))


def test_ivfpq_searches_exactly_until_it_can_train() -> None:
    db = clustered_descriptors(1500, 32, clusters=20, seed=1)
    kfs = keyframes_for(len(db))
    pm = PlaceMap.create(32, FP, {"kind": "ivfpq", "nbits": 6})  # trains from 4 * 2**6 rows
    flat = PlaceMap.create(32, FP, "flat")
    pm.add(db[:200], kfs[:200])
    flat.add(db[:200], kfs[:200])
    info = pm.info()["index"]
    assert info["trained"] is False and "exact search until the map holds 256" in info["note"]
    q = db[:20]
    np.testing.assert_array_equal(pm.search(q, 5)[0], flat.search(q, 5)[0])
    pm.add(db[200:], kfs[200:])  # crosses min_train: trains on the map's own descriptors
    info = pm.info()["index"]
    # Defaults scale with the map: nlist ~ sqrt(N) capped at N / 39, m cuts D=32 into 8 x 4.
    assert info["trained"] is True and info["nlist"] == 38 and info["m"] == 8
    assert (pm.search(q, 1)[0][:, 0] == np.arange(20)).mean() >= 0.95
    with pytest.raises(ConfigError, match="min_train"):
        PlaceMap.create(32, FP, {"kind": "ivfpq", "nlist": 100, "min_train": 300})
    with pytest.raises(ConfigError, match="divide"):
        PlaceMap.create(32, FP, {"kind": "ivfpq", "m": 5})


def test_incremental_add_assigns_sequential_ids_and_finds_the_newest() -> None:
    rng = np.random.default_rng(2)
    pm = PlaceMap.create(16, FP, "hnsw")
    for i in range(50):
        x = normalize(rng.standard_normal((1, 16)))
        ids = pm.add(x, [Keyframe(session="live", stamp_ns=i, source_bag="bag", id=99)])
        assert ids.tolist() == [i] and ids.dtype == np.int64
        assert pm.search(x, 1)[0][0, 0] == i
    assert pm.keyframe(49) == Keyframe(session="live", stamp_ns=49, source_bag="bag", id=49)
    assert [kf.id for kf in pm.keyframes([3, 1])] == [3, 1]


def test_bad_inputs_are_refused_with_clear_errors() -> None:
    pm = PlaceMap.create(8, FP)
    x = normalize(np.random.default_rng(0).standard_normal((3, 8)))
    with pytest.raises(InputError, match=r"expected \(B, 8\)"):
        pm.add(np.zeros((3, 9), np.float32), keyframes_for(3))
    with pytest.raises(InputError, match="L2-normalised"):
        pm.add(x * 2, keyframes_for(3))
    with pytest.raises(InputError, match="one keyframe per descriptor"):
        pm.add(x, keyframes_for(2))
    with pytest.raises(InputError, match="NaN"):
        pm.add(np.full((1, 8), np.nan, np.float32), keyframes_for(1))
    with pytest.raises(InputError, match="session"):
        pm.add(x[:1], [Keyframe(session="", stamp_ns=0)])
    with pytest.raises(InputError, match="position"):
        pm.add(x[:1], [Keyframe(session="a", stamp_ns=0, position=(1.0, 2.0))])  # type: ignore
    with pytest.raises(InputError, match="binary_codes"):
        pm.add(x, keyframes_for(3), binary_codes=np.zeros((3, 64), np.uint8))
    assert len(pm) == 0  # nothing half-added
    pm.add(x, keyframes_for(3))
    with pytest.raises(InputError, match="k="):
        pm.search(x, 0)
    with pytest.raises(InputError, match="shape"):
        pm.search(np.zeros((2, 5), np.float32), 1)
    with pytest.raises(InputError, match="window_ns"):
        pm.search(x, 1, Exclusion(around_stamp_ns=0, window_ns=-1))
    with pytest.raises(ConfigError, match="unknown index kind"):
        PlaceMap.create(8, FP, "annoy")
    with pytest.raises(ConfigError, match="no parameter"):
        PlaceMap.create(8, FP, {"kind": "hnsw", "efSearch": 3})
    with pytest.raises(ConfigError, match="storage_dtype"):
        PlaceMap.create(8, FP, storage_dtype="int8")
    with pytest.raises(KeyError, match="not in this map"):
        pm.keyframe(3)


def test_search_exact_is_the_reference_for_every_kind(clustered) -> None:
    db, q = clustered
    pm = PlaceMap.create(db.shape[1], FP, "binary", "float16")
    pm.add(db[:1000], keyframes_for(1000))
    ex = Exclusion(sessions=frozenset({"run0"}))
    ids, scores = pm.search_exact(q[:5], 7, ex)
    ref_ids, ref_scores = brute_force(pm.descriptors(), q[:5], 7,
                                      reference_mask(keyframes_for(1000), ex))
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_descriptor_store_blocks_keep_row_order() -> None:
    """Rows added in many sizes (small appends share a block, large ones get their own) read
    back in id order through every accessor."""
    from vpr_ros.mapdb.index.vectors import DescriptorStore

    class Small(DescriptorStore):
        BLOCK_BYTES = 4096

    rng = np.random.default_rng(0)
    base = rng.standard_normal((10, 4)).astype(np.float32)
    store = Small(4, "float32", base)
    parts = [base]
    for n in (1, 3, 100, 2, 500, 7, 300):
        x = rng.standard_normal((n, 4)).astype(np.float32)
        store.append(x)
        parts.append(x)
    ref = np.concatenate(parts)
    assert len(store) == len(ref) and len(store.segments()) > 3
    np.testing.assert_array_equal(store.array(), ref)
    ids = rng.integers(0, len(ref), 200)
    np.testing.assert_array_equal(store.rows(ids), ref[ids])
    np.testing.assert_array_equal(np.concatenate([b for _, b in store.chunks(33)]), ref)


def test_faiss_is_loaded_with_sleeping_openmp_threads() -> None:
    """The wait policy is set only while faiss's own libgomp initialises, never left behind."""
    import os
    import subprocess
    import sys

    code = ("import os, sys\n"
            "from vpr_ros.mapdb.index.faiss_loader import load_faiss\n"
            "seen = []\n"
            "real_import = __builtins__.__import__\n"
            "def spy(name, *a, **k):\n"
            "    if name == 'faiss' and 'faiss' not in sys.modules:\n"
            "        seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
            "    return real_import(name, *a, **k)\n"
            "__builtins__.__import__ = spy\n"
            "load_faiss()\n"
            "print(seen[0], os.environ.get('OMP_WAIT_POLICY'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"},
                         check=True).stdout.split()
    assert out == ["PASSIVE", "None"]


@pytest.mark.parametrize("kind", KINDS[1:], ids=lambda k: k if isinstance(k, str) else k["kind"])
def test_single_query_searches_run_faiss_on_one_thread(clustered, kind, monkeypatch) -> None:
    """A one-query search must not wake faiss's OpenMP team (the node's encoder thread blocked
    on it); a large batch keeps the team, and the caller's setting is restored either way.
    (The float32 flat index scans with numpy, not faiss.)"""
    from vpr_ros.mapdb.index.faiss_loader import load_faiss

    faiss = load_faiss()
    db, q = clustered
    pm = PlaceMap.create(db.shape[1], FP, kind)
    pm.add(db, keyframes_for(len(db)))
    real_set, settings = faiss.omp_set_num_threads, []

    def spy(n: int) -> None:
        settings.append(n)
        real_set(n)

    monkeypatch.setattr(faiss, "omp_set_num_threads", spy)
    before = faiss.omp_get_max_threads()
    pm.search(q[:1], 5)
    assert settings and settings[0] == 1 and faiss.omp_get_max_threads() == before
    settings.clear()
    pm.search(q[:64], 5)
    assert 1 not in settings
