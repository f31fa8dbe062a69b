"""CQVPR query matching loss and the mutual-nearest-neighbour local feature loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vpr_ros.train.losses import build_extra_loss
from vpr_ros.train.losses_extra import (mutual_nn_local_loss, mutual_nn_similarity,
                                        query_matching_loss, same_place_pairs)


def test_same_place_pairs() -> None:
    i, j = same_place_pairs(torch.tensor([0, 1, 0, 2, 1, 0]))
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 2), (0, 5), (1, 4), (2, 5)]


def test_query_matching_by_hand() -> None:
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, -0.6]]])
    tau = 0.5
    s = q[0] @ q[1].T / tau                       # [[1.2, 1.6], [1.6, -1.2]]
    rows = -(torch.log_softmax(s, 1).diagonal().mean())
    cols = -(torch.log_softmax(s.T, 1).diagonal().mean())
    expected = 0.5 * (rows + cols)
    got = query_matching_loss(q, torch.tensor([3, 3]), temperature=tau)
    assert math.isclose(float(got), float(expected), rel_tol=1e-6)


def test_matching_queries_score_lower_than_swapped_ones() -> None:
    torch.manual_seed(0)
    base = F.normalize(torch.randn(4, 10, 32), dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    same = base.clone()
    same[1], same[3] = base[0], base[2]                           # same contexts, same order
    swapped = same.clone()
    swapped[1] = same[1][torch.randperm(10)]                      # same contexts, other queries
    swapped[3] = same[3][torch.randperm(10)]
    assert query_matching_loss(same, labels) < 0.1 < query_matching_loss(swapped, labels)


def test_no_same_place_pair_gives_zero_and_still_backpropagates() -> None:
    q = torch.randn(3, 4, 8, requires_grad=True)
    loss = query_matching_loss(F.normalize(q, dim=-1), torch.tensor([0, 1, 2]))
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


def test_registered_losses_read_training_outputs() -> None:
    qm = build_extra_loss("cqvpr_query_matching", {"temperature": 0.2})
    local = build_extra_loss("mnn_local", {"margin": 0.1})
    out = {"global": F.normalize(torch.randn(4, 8), dim=-1),
           "local": F.normalize(torch.randn(4, 3, 3, 8), dim=-1),
           "query_features": F.normalize(torch.randn(4, 5, 8), dim=-1)}
    labels = torch.tensor([0, 0, 1, 1])
    assert torch.isfinite(qm(out, labels)) and torch.isfinite(local(out, labels))
