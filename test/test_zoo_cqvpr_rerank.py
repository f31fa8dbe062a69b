"""Mutual-nearest-neighbour re-ranking with local features (numpy, for eval and the node)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_ros.errors import InputError
from vpr_ros.models import rerank
from vpr_ros.models.aggregators.cqvpr import CQVPRAggregator
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.rerank import mutual_nn_count, mutual_nn_counts, rerank_mutual_nn


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force_mnn(a: np.ndarray, b: np.ndarray) -> int:
    count = 0
    for i in range(len(a)):
        j = max(range(len(b)), key=lambda jj: (float(a[i] @ b[jj]), -jj))
        i_back = max(range(len(a)), key=lambda ii: (float(a[ii] @ b[j]), -ii))
        count += i_back == i
    return count


def test_counts_match_a_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    for la, lb in [(30, 40), (25, 25), (1, 9)]:
        a, b = unit(rng, la, 8), unit(rng, lb, 8)
        assert mutual_nn_count(a, b) == brute_force_mnn(a, b)
    a = unit(rng, 20, 8)
    assert mutual_nn_count(a, a) == 20  # identical sets: every location matches itself
    assert mutual_nn_count(a.reshape(4, 5, 8), a[::-1].copy()) == 20  # (H, W, D) accepted


def test_blocked_scan_equals_the_full_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    a, b = unit(rng, 53, 16), unit(rng, 41, 16)
    full = mutual_nn_count(a, b)
    monkeypatch.setattr(rerank, "BLOCK", 7)
    assert mutual_nn_count(a, b) == full == brute_force_mnn(a, b)


def test_rerank_moves_the_true_match_to_the_top() -> None:
    rng = np.random.default_rng(2)
    query = unit(rng, 6, 7, 16)
    cands = unit(rng, 10, 6, 7, 16)
    noisy = query + 0.05 * rng.standard_normal(query.shape).astype(np.float32)
    cands[6] = noisy / np.linalg.norm(noisy, axis=-1, keepdims=True)
    ids = np.array([40, 41, 42, 43, 44, 45, 46, 47, 48, 49, -1, -1])
    local = np.concatenate([cands, np.zeros((2, 6, 7, 16), np.float32)])
    new_ids, counts = rerank_mutual_nn(query, ids, local, top_n=100)
    assert new_ids[0] == 46 and counts[0] >= 35
    assert list(new_ids[-2:]) == [-1, -1] and list(counts[-2:]) == [-1, -1]
    assert sorted(new_ids[:10]) == list(range(40, 50))
    assert (np.diff(counts[:10]) <= 0).all()
    # Equal counts keep the global order.
    for c in np.unique(counts[:10]):
        same = new_ids[:10][counts[:10] == c]
        assert list(same) == sorted(same)
    np.testing.assert_array_equal(counts[:10], mutual_nn_counts(query, local[new_ids[:10] - 40]))


def test_only_the_top_n_are_reranked_and_a_lookup_function_works() -> None:
    rng = np.random.default_rng(3)
    store = unit(rng, 20, 30, 8)
    query = store[15] + 0.01
    query /= np.linalg.norm(query, axis=-1, keepdims=True)
    ids = np.array([3, 15, 7, 1, 9, 12])
    asked: list[list[int]] = []

    def lookup(which: np.ndarray) -> np.ndarray:
        asked.append(which.tolist())
        return store[which]

    new_ids, counts = rerank_mutual_nn(query, ids, lookup, top_n=3)
    assert asked == [[3, 15, 7]]
    assert new_ids[0] == 15 and list(new_ids[3:]) == [1, 9, 12]
    assert list(counts[3:]) == [-1, -1, -1]


def test_bad_inputs_are_input_errors() -> None:
    rng = np.random.default_rng(4)
    q = unit(rng, 10, 8)
    with pytest.raises(InputError, match="widths differ"):
        mutual_nn_count(q, unit(rng, 10, 4))
    with pytest.raises(InputError, match="one row per id"):
        rerank_mutual_nn(q, np.array([1, 2, 3]), unit(rng, 2, 10, 8))
    with pytest.raises(InputError, match="top_n"):
        rerank_mutual_nn(q, np.array([1]), unit(rng, 1, 10, 8), top_n=0)
    with pytest.raises(InputError, match="expected float local features"):
        mutual_nn_count(np.zeros((0, 8), np.float32), q)


def test_model_local_features_rerank_a_revisit_first() -> None:
    """End to end: CQVPR local head -> rerank. The revisit (same scene, small noise) ranked 5th
    by a weak global stage comes first after local re-ranking."""
    torch.manual_seed(0)
    agg = CQVPRAggregator(in_channels=48, num_queries=4, query_dim=16, num_heads=4,
                          local_dim=16, local_hidden=24).eval()
    scenes = torch.randn(8, 48, 4, 5)
    revisit = scenes[3] + 0.1 * torch.randn(48, 4, 5)
    with torch.no_grad():
        db_local = agg.forward_all(BackboneOutput(scenes))["local"].numpy()
        q_local = agg.forward_all(BackboneOutput(revisit[None]))["local"].numpy()[0]
    ids = np.array([0, 1, 2, 4, 3, 5, 6, 7])
    new_ids, counts = rerank_mutual_nn(q_local, ids, db_local[ids])
    assert new_ids[0] == 3 and counts[0] > counts[1]
