"""Merging maps of several sessions: ids renumbered after the first map, metadata preserved,
search equal to a map built from all sessions at once, and maps of different models refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vpr_ros.bench.search_bench import clustered_descriptors, noisy_queries
from vpr_ros.errors import InputError, MapMismatchError
from vpr_ros.mapdb import Exclusion, Keyframe, PlaceMap

FP = "fp-model-a"
D = 24


def session(name: str, n: int, seed: int) -> tuple[np.ndarray, list[Keyframe]]:
    x = clustered_descriptors(n, D, clusters=8, seed=seed)
    kfs = [Keyframe(session=name, stamp_ns=seed * 10**12 + i, frame_id=f"{name}_cam",
                    position=(float(i), float(seed), 0.0), source_bag=f"/bags/{name}",
                    source_topic="/image") for i in range(n)]
    return x, kfs


@pytest.mark.parametrize("kind", ["flat", "hnsw", "binary"])
def test_merge_renumbers_and_preserves_metadata(tmp_path: Path, kind: str) -> None:
    parts = [session("monday", 300, 1), session("tuesday", 200, 2), session("friday", 100, 3)]
    maps = []
    for i, (x, kfs) in enumerate(parts):
        pm = PlaceMap.create(D, FP, kind, "float16" if i == 1 else "float32")
        pm.add(x, kfs)
        pm.save(tmp_path / f"m{i}")
        maps.append(PlaceMap.load(tmp_path / f"m{i}"))  # memory-mapped inputs
    merged = PlaceMap.create(D, FP, kind)
    offsets = [merged.merge(m)[0] for m in maps]
    assert offsets == [0, 300, 500] and len(merged) == 600
    assert merged.sessions() == ["monday", "tuesday", "friday"]
    kf = merged.keyframe(305)
    assert kf == Keyframe(session="tuesday", stamp_ns=2 * 10**12 + 5, frame_id="tuesday_cam",
                          position=(5.0, 2.0, 0.0), source_bag="/bags/tuesday",
                          source_topic="/image", id=305)
    everything = PlaceMap.create(D, FP, kind)
    for i, (x, kfs) in enumerate(parts):
        everything.add(x.astype(np.float16).astype(np.float32) if i == 1 else x, kfs)
    np.testing.assert_array_equal(merged.descriptors(), everything.descriptors())
    q = noisy_queries(merged.descriptors().astype(np.float32), 30, seed=4)[0]
    ex = Exclusion(sessions=frozenset({"tuesday"}))
    a, b = merged.search(q, 5, ex), everything.search(q, 5, ex)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
    merged.save(tmp_path / "merged")
    again = PlaceMap.load(tmp_path / "merged")
    assert again.keyframes([0, 305, 599]) == merged.keyframes([0, 305, 599])
    assert again.info()["sessions"] == {"monday": 300, "tuesday": 200, "friday": 100}


def test_merge_refuses_other_models() -> None:
    a = PlaceMap.create(D, FP)
    a.add(*session("s", 5, 1))
    with pytest.raises(MapMismatchError) as err:
        a.merge(PlaceMap.create(D, "fp-model-b"))
    assert FP in str(err.value) and "fp-model-b" in str(err.value)
    with pytest.raises(MapMismatchError, match="dim 32"):
        a.merge(PlaceMap.create(32, FP))
    with pytest.raises(InputError, match="itself"):
        a.merge(a)
    assert len(a) == 5


def test_merge_of_hash_head_codes() -> None:
    head = np.random.default_rng(0).standard_normal((D, 64)).astype(np.float32)
    spec = {"kind": "binary", "bits": 64}
    a, b = PlaceMap.create(D, FP, spec), PlaceMap.create(D, FP, spec)
    xa, ka = session("a", 50, 1)
    xb, kb = session("b", 40, 2)
    a.add(xa, ka, binary_codes=xa @ head)
    b.add(xb, kb, binary_codes=xb @ head)
    a.merge(b)
    ids, _ = a.search(xb[:5], 1, query_codes=xb[:5] @ head)
    assert ids[:, 0].tolist() == list(range(50, 55))
    projected = PlaceMap.create(D, FP, spec)
    projected.add(xb, kb)
    with pytest.raises(MapMismatchError, match="hash head"):
        a.merge(projected)
