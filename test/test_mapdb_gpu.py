"""Map search on a GPU: the same results as the CPU search, the size threshold, and the fall back
to the CPU (with the reason in the map's search note) when the GPU copy or a search fails.

Where faiss has no GPU (every CI machine), the GPU indexes are replaced at the seam
(``PlaceMap.use_gpu(backend=...)``) by faiss CPU indexes with the GPU indexes' interface; the
binary one returns equal-distance codes in the worst order (largest id first), as a GPU may, so
the tie handling is exercised. The tests with faiss's own GPU indexes run wherever a GPU build of
faiss sees a GPU and skip, saying so, elsewhere."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from vpr_ros.bench.search_bench import clustered_descriptors, noisy_queries
from vpr_ros.errors import ConfigError
from vpr_ros.mapdb import Exclusion, Keyframe, PlaceMap
from vpr_ros.mapdb.index.gpu import canonical_hamming, gpu_support

FP = "gpu-test"
GPUS, NO_GPU_REASON = gpu_support()
needs_gpu = pytest.mark.skipif(GPUS == 0, reason=f"no GPU search here: {NO_GPU_REASON}")


class _Index:
    """A faiss CPU index behind the GPU index's interface, counting calls, failing on request."""

    def __init__(self, inner, owner: "StandIn", binary: bool) -> None:
        self.inner, self.owner, self.binary = inner, owner, binary

    @property
    def ntotal(self) -> int:
        return self.inner.ntotal

    def add(self, rows: np.ndarray) -> None:
        o = self.owner
        if o.oom_after is not None and self.inner.ntotal + len(rows) > o.oom_after:
            raise RuntimeError("Error in virtual void* faiss::gpu::StandardGpuResourcesImpl::"
                               "allocMemory: Error: 'err == cudaSuccess' failed: StandardGpu"
                               "Resources: alloc fail type IVFLists dev 0 space Device stream "
                               "0x0 size 4194304 bytes (cudaMalloc error out of memory [2])")
        o.added += len(rows)
        self.inner.add(rows)

    def search(self, q: np.ndarray, k: int):
        o = self.owner
        o.searches += 1
        if o.fail_search:
            raise RuntimeError("CUDA error 700 an illegal memory access was encountered")
        if k > o.limit:
            raise RuntimeError(f"GPU index only supports k <= {o.limit} (requested {k})")
        # Every row, ties ordered largest id first, then cut at k: a legal but worst order.
        # Inner products are perturbed by up to 5e-4 (a TF32 GEMM's error) before ordering.
        d, i = self.inner.search(q, int(self.inner.ntotal))
        if not self.binary:
            d = d + o.rng.uniform(-5e-4, 5e-4, d.shape).astype(np.float32)
        key = d if self.binary else -d
        out_d = np.empty((len(q), k), d.dtype)
        out_i = np.empty((len(q), k), i.dtype)
        for r in range(len(q)):
            order = np.lexsort((-i[r], key[r]))[:k]
            out_d[r], out_i[r] = d[r][order], i[r][order]
        return out_d, out_i

    def reset(self) -> None:
        self.owner.released += 1
        self.inner.reset()


class StandIn:
    device = "stand-in"

    def __init__(self, limit: int = 2048, oom_after: int | None = None) -> None:
        self.limit, self.oom_after = limit, oom_after
        self.fail_search = False
        self.searches = self.added = self.released = 0
        self.rng = np.random.default_rng(5)

    def flat(self, dim: int) -> _Index:
        return _Index(faiss.IndexFlatIP(dim), self, binary=False)

    def binary(self, bits: int) -> _Index:
        return _Index(faiss.IndexBinaryFlat(bits), self, binary=True)

    def max_k(self) -> int:
        return self.limit


def keyframes(n: int, start: int = 0) -> list[Keyframe]:
    return [Keyframe(session=f"run{(start + i) % 3}", stamp_ns=1_000_000 * (start + i))
            for i in range(n)]


def two_maps(index, n: int, dim: int = 64, dtype: str = "float32", seed: int = 0,
             clusters: int = 40, repeat: int = 1, jitter: float = 0.0):
    """The same descriptors in two maps (one to search on the CPU, one through the GPU seam)
    and queries near them; ``repeat``: each descriptor stored that many times in a row (a
    robot standing still), so equal codes straddle every cut; ``jitter``: noise added to the
    repeats, so inner products differ by less than a GPU's rounding error."""
    db = np.repeat(clustered_descriptors(n // repeat, dim, clusters=clusters, seed=seed),
                   repeat, axis=0)
    if jitter:
        db = db + np.random.default_rng(seed + 2).normal(0, jitter, db.shape).astype(np.float32)
        db /= np.linalg.norm(db, axis=1, keepdims=True)
    n = len(db)
    q, _ = noisy_queries(db, 12, noise=0.3, seed=seed + 1)
    maps = []
    for _ in range(2):
        pm = PlaceMap.create(dim, FP, index=index, storage_dtype=dtype)
        pm.add(db, keyframes(n))
        maps.append(pm)
    return maps[0], maps[1], db, q


EXCLUSIONS = [None, Exclusion(sessions=frozenset({"run1"})),
              Exclusion(around_stamp_ns=300_000_000, window_ns=100_000_000)]


def assert_same(cpu: PlaceMap, gpu: PlaceMap, q: np.ndarray, k: int, exclude=None) -> None:
    for rows in (q[:1], q):  # one query (the node) and a batch (evaluation)
        ids_c, s_c = cpu.search(rows, k, exclude=exclude)
        ids_g, s_g = gpu.search(rows, k, exclude=exclude)
        np.testing.assert_array_equal(ids_g, ids_c)
        np.testing.assert_allclose(s_g, s_c, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype, repeat", [("float32", 1), ("float16", 1), ("float32", 40)])
@pytest.mark.parametrize("exclude", EXCLUSIONS)
def test_flat_search_through_the_gpu_seam_equals_the_cpu_search(dtype, repeat, exclude) -> None:
    # repeat 40 with jitter 1e-3: forty rows per place whose scores lie ~2e-5 apart, less than
    # the stand-in's 5e-4 score error, so the GPU's own order at the cut cannot be trusted.
    cpu, gpu, _, q = two_maps("flat", 3000, dtype=dtype, repeat=repeat,
                              jitter=1e-3 if repeat > 1 else 0.0)
    dev = StandIn()
    gpu.use_gpu(1000, backend=dev)
    assert_same(cpu, gpu, q, 10, exclude)
    assert dev.searches >= 2 and dev.added == 3000
    assert gpu.search_device == "stand-in (flat, 3000 rows on the GPU)"


@pytest.mark.parametrize("spec", [
    {"kind": "binary", "bits": 64, "codes": "simhash", "rerank": 0},    # Hamming order itself
    {"kind": "binary", "bits": 64, "codes": "simhash", "rerank": 20},   # Hamming + exact re-rank
    {"kind": "binary", "bits": 128, "codes": "pca", "min_train": 500},  # + asymmetric shortlist
])
@pytest.mark.parametrize("exclude", EXCLUSIONS)
@pytest.mark.parametrize("repeat", [1, 60])
def test_binary_search_through_the_gpu_seam_equals_the_cpu_search(spec, exclude, repeat) -> None:
    # Codes of clustered (and repeated) descriptors: many codes at equal Hamming distance, so
    # the stand-in's worst tie order at the cut must be detected and completed.
    cpu, gpu, _, q = two_maps(spec, 6000, clusters=30, repeat=repeat)
    dev = StandIn()
    gpu.use_gpu(1000, backend=dev)
    assert_same(cpu, gpu, q, 10, exclude)
    assert dev.searches >= 2
    assert gpu.search_device.startswith("stand-in (binary, 6000 rows")


def test_canonical_hamming_trusts_only_lists_that_ran_past_the_cut() -> None:
    dist = np.array([[1, 1, 2, 2], [1, 1, 1, 1], [0, 3, -1, -1]], np.int32)
    ids = np.array([[9, 4, 7, 3], [5, 6, 7, 8], [2, 1, -1, -1]], np.int64)
    out, sure = canonical_hamming(dist, ids, 2, 100, None)
    assert out.tolist() == [[4, 9], [5, 6], [2, 1]]
    # row 0: distance 2 was seen after the kept 1s; row 1: more 1s may hide smaller ids;
    # row 2: fewer codes than asked of a 100-code map, so unknown
    assert sure.tolist() == [True, False, False]
    allowed = np.ones(100, bool)
    allowed[4] = False
    out, sure = canonical_hamming(dist, ids, 2, 100, allowed)
    # 3 is the last code seen: an unseen one at distance 2 may have a smaller id
    assert out[0].tolist() == [9, 3] and not sure[0]
    out, sure = canonical_hamming(dist[2:], ids[2:], 2, 2, None)
    assert sure.all()  # the list held every code of the map


def test_small_maps_stay_on_the_cpu_until_they_reach_the_threshold() -> None:
    cpu, gpu, db, q = two_maps("flat", 500)
    dev = StandIn()
    gpu.use_gpu(800, backend=dev)
    assert_same(cpu, gpu, q, 5)
    assert dev.searches == 0 and dev.added == 0
    assert "below the GPU threshold of 800" in gpu.search_device
    more = clustered_descriptors(400, 64, clusters=40, seed=7)
    for pm in (cpu, gpu):
        pm.add(more, keyframes(400, start=500))
    assert_same(cpu, gpu, q, 5)  # the live map grew past it: copied at this search
    assert dev.added == 900 and dev.searches >= 1
    gpu.add(more[:3], keyframes(3, start=900))
    cpu.add(more[:3], keyframes(3, start=900))
    assert_same(cpu, gpu, q, 5)
    assert dev.added == 903  # only the new rows are copied


def test_gpu_memory_short_falls_back_to_the_cpu_with_the_reason_noted() -> None:
    cpu, gpu, _, q = two_maps("flat", 3000)
    dev = StandIn(oom_after=2000)
    gpu.use_gpu(1000, backend=dev)
    assert_same(cpu, gpu, q, 10)
    note = gpu.search_device
    assert note.startswith("cpu (GPU search off after an error: copying the map to the GPU")
    assert "out of memory" in note
    assert dev.released == 1  # the partial copy was freed
    searches, added = dev.searches, dev.added
    assert_same(cpu, gpu, q, 10)
    assert (dev.searches, dev.added) == (searches, added)  # no retry on every search


@pytest.mark.parametrize("index", ["flat", {"kind": "binary", "bits": 64, "codes": "simhash"}])
def test_a_failed_gpu_search_is_served_by_the_cpu(index) -> None:
    cpu, gpu, _, q = two_maps(index, 3000)
    dev = StandIn()
    gpu.use_gpu(1000, backend=dev)
    assert_same(cpu, gpu, q, 10)
    dev.fail_search = True
    assert_same(cpu, gpu, q, 10)
    assert "searching on the GPU: RuntimeError: CUDA error 700" in gpu.search_device
    assert dev.released == 1


@pytest.mark.parametrize("index", ["flat", {"kind": "binary", "bits": 64, "codes": "simhash",
                                            "rerank": 30}])
def test_more_candidates_than_the_gpu_can_select_are_listed_on_the_cpu(index) -> None:
    cpu, gpu, _, q = two_maps(index, 3000)
    dev = StandIn(limit=64)
    gpu.use_gpu(1000, backend=dev)
    big = Exclusion(ids=frozenset(range(0, 3000, 20)))  # 150 excluded: over the 64 limit
    assert_same(cpu, gpu, q, 10, big)
    assert_same(cpu, gpu, q, 10)
    assert gpu.search_device.startswith("stand-in")  # a limit is not a failure


def test_gpu_search_settings_and_notes() -> None:
    pm = PlaceMap.create(8, FP, index="hnsw")
    assert pm.search_device == "cpu"
    assert "index hnsw is searched on the CPU" in pm.use_gpu(10, backend=StandIn())
    flat = PlaceMap.create(8, FP)
    assert flat.use_gpu(0, backend=StandIn()) == "cpu (GPU search off)"
    with pytest.raises(ConfigError, match="GPU threshold"):
        flat.use_gpu(-1)
    if GPUS == 0:
        note = flat.use_gpu(10)
        assert note.startswith("cpu (") and NO_GPU_REASON in note
        assert flat.search(np.eye(8, dtype=np.float32)[:1], 3)[0].tolist() == [[-1, -1, -1]]
    else:
        with pytest.raises(ConfigError, match="GPU device"):
            flat.use_gpu(10, device=GPUS)


def test_a_loaded_map_moves_to_the_gpu_and_keeps_its_results(tmp_path) -> None:
    cpu, gpu, _, q = two_maps({"kind": "binary", "bits": 128, "codes": "pca",
                               "min_train": 500}, 3000)
    gpu.save(tmp_path / "m")
    loaded = PlaceMap.load(tmp_path / "m")
    dev = StandIn()
    loaded.use_gpu(1000, backend=dev)
    assert_same(cpu, loaded, q, 10)
    assert dev.added == 3000


# ------------------------------------------------------------------- faiss's own GPU indexes

@needs_gpu
@pytest.mark.parametrize("index", ["flat", {"kind": "binary", "bits": 512, "codes": "pca"}])
@pytest.mark.parametrize("exclude", EXCLUSIONS)
def test_faiss_gpu_search_equals_the_cpu_search(index, exclude) -> None:
    cpu, gpu, _, q = two_maps(index, 20000, dim=256, clusters=200)
    note = gpu.use_gpu(1000)
    assert "below the GPU threshold" not in note or note.startswith("cpu")
    assert_same(cpu, gpu, q, 20, exclude)
    assert gpu.search_device.startswith("cuda:0"), gpu.search_device


@needs_gpu
def test_faiss_gpu_fp16_storage_equals_the_cpu_search() -> None:
    cpu, gpu, _, q = two_maps("flat", 20000, dim=256, dtype="float16", clusters=200)
    gpu.use_gpu(1000)
    assert_same(cpu, gpu, q, 20)
    assert gpu.search_device.startswith("cuda:0")
