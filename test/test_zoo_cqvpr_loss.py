"""CQVPR's contextual query matching loss (Eq. 7) and the mutual-nearest-neighbour local
feature loss, each against a loop-by-loop reading of its definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vpr_ros.train.losses import build_extra_loss
from vpr_ros.train.losses_extra import (contextual_query_matching_loss, mnn_mean_similarity,
                                        mutual_nn_local_loss, mutual_nn_similarity,
                                        same_place_pairs)


def test_same_place_pairs() -> None:
    i, j = same_place_pairs(torch.tensor([0, 1, 0, 2, 1, 0]))
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 2), (0, 5), (1, 4), (2, 5)]


def _mnn_mean(ta: torch.Tensor, tb: torch.Tensor) -> float:
    """Eq. 7's s: mean of T_a(i) . T_b(j) over the mutual nearest neighbours of T_a T_b^T."""
    m = ta @ tb.T
    pairs = [(i, int(m[i].argmax())) for i in range(len(ta))
             if int(m[:, int(m[i].argmax())].argmax()) == i]
    return sum(float(m[i, j]) for i, j in pairs) / len(pairs)


def _eq7_reference(t: torch.Tensor, g: torch.Tensor, labels: list[int], n_neg: int) -> float:
    total, count = 0.0, 0
    for a in range(len(labels)):
        negs = sorted((j for j in range(len(labels)) if labels[j] != labels[a]),
                      key=lambda j: -float(g[a] @ g[j]))[:n_neg]
        for p in range(len(labels)):
            if p == a or labels[p] != labels[a]:
                continue
            s_p = _mnn_mean(t[a], t[p])
            total += sum(max(_mnn_mean(t[a], t[n]) - s_p, 0.0) for n in negs)
            count += 1
    return total / count


def test_mnn_mean_similarity_matches_brute_force() -> None:
    torch.manual_seed(2)
    sim = torch.randn(5, 6, 10, 10)
    got = mnn_mean_similarity(sim)
    for i in range(5):
        for j in range(6):
            m = sim[i, j]
            pairs = [(r, int(m[r].argmax())) for r in range(10)
                     if int(m[:, int(m[r].argmax())].argmax()) == r]
            want = sum(float(m[r, c]) for r, c in pairs) / len(pairs)
            assert math.isclose(float(got[i, j]), want, rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("n_neg", [1, 3, 10])
def test_contextual_query_matching_is_eq7(n_neg: int) -> None:
    torch.manual_seed(3)
    t = torch.randn(8, 10, 16)
    g = F.normalize(torch.randn(8, 32), dim=-1)
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    got = contextual_query_matching_loss(t, g, torch.tensor(labels), num_negatives=n_neg)
    assert math.isclose(float(got), _eq7_reference(t, g, labels, n_neg), rel_tol=1e-5)


def test_query_matching_rewards_agreeing_places_and_backpropagates() -> None:
    torch.manual_seed(4)
    base = torch.randn(4, 10, 16)
    labels = torch.tensor([0, 0, 1, 1])
    agree = base.clone()
    agree[1], agree[3] = base[0] * 1.5, base[2] * 1.5      # same contexts, same place
    g = F.normalize(torch.randn(4, 8), dim=-1)
    assert float(contextual_query_matching_loss(agree, g, labels)) == 0.0
    confused = agree.clone()
    confused[2] = agree[0] * 2                              # another place, the same contexts
    t = confused.requires_grad_()
    loss = contextual_query_matching_loss(t, g, labels)
    assert float(loss.detach()) > 0
    loss.backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


def test_no_same_place_pair_gives_zero_and_still_backpropagates() -> None:
    q = torch.randn(3, 4, 8, requires_grad=True)
    loss = contextual_query_matching_loss(q, torch.randn(3, 5), torch.tensor([0, 1, 2]))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert q.grad is not None


def test_mutual_nn_similarity_and_local_loss() -> None:
    torch.manual_seed(1)
    a = F.normalize(torch.randn(20, 8), dim=-1)
    assert math.isclose(float(mutual_nn_similarity(a, a)), 1.0, rel_tol=1e-6)
    b = F.normalize(torch.randn(20, 8), dim=-1)
    sim = a @ b.T
    mutual = [(i, int(sim[i].argmax())) for i in range(20)
              if int(sim[:, int(sim[i].argmax())].argmax()) == i]
    expected = sum(float(sim[i, j]) for i, j in mutual) / len(mutual)
    assert math.isclose(float(mutual_nn_similarity(a, b)), expected, rel_tol=1e-6)

    local = F.normalize(torch.randn(4, 3, 4, 8), dim=-1)
    local[1] = local[0]                       # a perfect positive pair
    glob = F.normalize(torch.randn(4, 16), dim=-1)
    labels = torch.tensor([0, 0, 1, 2])
    loss = mutual_nn_local_loss(local.requires_grad_(), glob, labels)
    assert float(loss.detach()) == 0.0        # positives (sim 1) beat any negative
    swapped = local.detach().clone()
    swapped[1] = F.normalize(torch.randn(3, 4, 8), dim=-1)
    swapped[2] = swapped[0]                   # the negative now matches the anchor perfectly
    glob[2] = glob[0]                         # and is the hardest negative by global similarity
    bad = mutual_nn_local_loss(swapped.requires_grad_(), glob, labels)
    assert float(bad.detach()) > 0.0
    bad.backward()


def test_local_loss_sums_over_the_hardest_negatives() -> None:
    """SelaVPR's LocalFeatureLoss: sum over the tuple's negatives; here the N hardest by
    global descriptor."""
    torch.manual_seed(5)
    local = F.normalize(torch.randn(6, 2, 3, 8), dim=-1)
    glob = F.normalize(torch.randn(6, 16), dim=-1)
    labels = [0, 0, 1, 1, 2, 2]
    feats = local.reshape(6, -1, 8)
    got = mutual_nn_local_loss(local, glob, torch.tensor(labels), margin=0.1, num_negatives=3)
    terms = []
    for a in range(6):
        p = next(j for j in range(6) if j != a and labels[j] == labels[a])
        negs = sorted((j for j in range(6) if labels[j] != labels[a]),
                      key=lambda j: -float(glob[a] @ glob[j]))[:3]
        s_p = float(mutual_nn_similarity(feats[a], feats[p]))
        terms.append(sum(max(float(mutual_nn_similarity(feats[a], feats[n])) - s_p + 0.1, 0)
                         for n in negs))
    assert math.isclose(float(got), sum(terms) / len(terms), rel_tol=1e-5)


def test_registered_losses_read_training_outputs() -> None:
    qm = build_extra_loss("cqvpr_query_matching", {"num_negatives": 2})
    local = build_extra_loss("mnn_local", {"margin": 0.1, "num_negatives": 2})
    out = {"global": F.normalize(torch.randn(4, 8), dim=-1),
           "local": F.normalize(torch.randn(4, 3, 3, 8), dim=-1),
           "contextual_queries": torch.randn(4, 5, 8)}
    labels = torch.tensor([0, 0, 1, 1])
    assert torch.isfinite(qm(out, labels)) and torch.isfinite(local(out, labels))
