"""Search kernels of the binary index: sharded Hamming search returns what one faiss
IndexBinaryFlat returns (same distances, ties may be broken differently), with and without an
allowed mask, for single queries (shards scanned in parallel threads) and batches; the exact
re-rank kernel (DescriptorStore.dot) equals rows @ query across every storage segment."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.mapdb import Keyframe, PlaceMap
from vpr_ros.mapdb.index import hamming
from vpr_ros.mapdb.index.faiss_loader import load_faiss
from vpr_ros.mapdb.index.hamming import ShardedHamming


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.unpackbits(a[:, None, :] ^ b[None, :, :], axis=2).sum(axis=2)


@pytest.mark.parametrize("batch", [1, 3, 20])
@pytest.mark.parametrize("with_mask", [False, True])
def test_sharded_search_equals_one_flat_index(batch: int, with_mask: bool) -> None:
    faiss = load_faiss()
    rng = np.random.default_rng(batch)
    codes = rng.integers(0, 256, (2500, 8), dtype=np.uint8)
    queries = codes[rng.choice(len(codes), batch, replace=False)] ^ \
        rng.integers(0, 256, (batch, 8), dtype=np.uint8) & 0x11
    allowed = rng.random(len(codes)) < 0.3 if with_mask else None
    sharded = ShardedHamming(64, shard_rows=600)
    sharded.add(codes[:1000])
    sharded.add(codes[1000:])  # fills shard 2, then new ones
    assert [s.ntotal for s in sharded.shards] == [600, 600, 600, 600, 100]
    assert sharded.starts == [0, 600, 1200, 1800, 2400] and sharded.ntotal == 2500
    ids = sharded.search(queries, 30, allowed)
    dist = hamming_distances(queries, codes)
    if allowed is not None:
        dist = np.where(allowed[None], dist, 10**6)
        assert allowed[ids].all()
    flat = faiss.IndexBinaryFlat(64)
    flat.add(codes[allowed] if allowed is not None else codes)
    ref_d, _ = flat.search(queries, 30)
    got_d = np.take_along_axis(dist, ids, axis=1)
    np.testing.assert_array_equal(got_d, ref_d)  # the same distances, in order
    assert all(len(set(r)) == 30 for r in ids)


def test_short_results_are_padded() -> None:
    sharded = ShardedHamming(64, shard_rows=4)
    codes = np.arange(80, dtype=np.uint8).reshape(10, 8)
    sharded.add(codes)
    allowed = np.zeros(10, bool)
    allowed[[1, 7]] = True
    ids = sharded.search(codes[:1], 5, allowed)
    assert sorted(ids[0, :2].tolist()) == [1, 7] and (ids[0, 2:] == -1).all()
    assert (ShardedHamming(64).search(codes[:2], 3) == -1).all()


def test_binary_map_across_shards_matches_one_shard(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:40] + 0.05 * rng.standard_normal((40, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    kfs = [Keyframe(session="s", stamp_ns=i) for i in range(len(x))]
    spec = {"kind": "binary", "bits": 64, "rerank": 20}
    one = PlaceMap.create(64, "fp", spec)
    one.add(x, kfs)
    monkeypatch.setattr(hamming, "SHARD_ROWS", 700)
    many = PlaceMap.create(64, "fp", spec)
    many.add(x, kfs)
    for rows in (slice(0, 1), slice(0, 40)):
        a, b = one.search(q[rows], 10), many.search(q[rows], 10)
        np.testing.assert_array_equal(a[1], b[1])  # exact scores of the same top-10
    assert len(many._index.index.shards) == 5 and len(one._index.index.shards) == 1


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_store_dot_equals_rows_times_query_across_segments(dtype: str) -> None:
    """The re-rank kernel (gather into scratch buffers, convert, multiply) gives the scores of
    the rows themselves, for ids in any order spread over the loaded part, closed blocks and the
    open block, and for repeated ids."""
    from vpr_ros.mapdb.index.vectors import DescriptorStore

    rng = np.random.default_rng(4)
    dim = 48
    x = rng.standard_normal((900, dim)).astype(dtype)
    store = DescriptorStore(dim, dtype, x[:300].copy())
    store.BLOCK_BYTES = 64 * dim * np.dtype(dtype).itemsize  # small blocks: several segments
    for s in range(300, 900, 50):
        store.append(x[s: s + 50])
    assert len(store.segments()) > 3
    q = rng.standard_normal(dim).astype(np.float32)
    for ids in (rng.choice(900, 120, replace=False), np.array([899, 0, 5, 5, 450]),
                np.array([], np.int64)):
        np.testing.assert_allclose(store.dot(ids, q), store.rows(ids) @ q, rtol=1e-5,
                                   atol=1e-5)
    bigger = rng.choice(900, 600, replace=False)  # the scratch buffers grow
    np.testing.assert_allclose(store.dot(bigger, q), store.rows(bigger) @ q, rtol=1e-5,
                               atol=1e-5)
