"""Method-specific training losses: SelaVPR++ hashing, CQVPR query matching, MNN local features.

Each loss is a plain function over tensors plus an ``nn.Module`` registered with
:func:`vpr_ros.train.losses.register_loss`, so a recipe adds it by name
(``loss.extra: [{name: selavpr_hashing, weight: 1.0}]``) next to the Multi-Similarity loss on the
global descriptor. The modules read the named outputs ``VPRModel.forward_all`` returns in
training mode (``selavpr``: ``hash_codes``/``hash_float``; ``cqvpr``: ``contextual_queries``,
``local``, ``global``) and the batch's place labels.

* SelaVPR++ similarity-constrained hashing (Lu et al., T-PAMI 2025): a Multi-Similarity loss
  (alpha 1, beta 50, base 0, pairs mined by the MS miner with epsilon 0.1 on code cosine) on the
  +-1 codes, plus ``0.1 x`` the mean squared gap, over the mined positive and negative pairs,
  between the cosine of the continuous (pre-sign, L2-normalised) hash outputs and the codes'
  similarity ``b_i . b_j / bits``. Why: the codes alone are trained through a straight-through
  sign whose gradient ignores quantisation error; tying code similarity to the continuous
  similarity keeps the two consistent so Hamming ranking follows cosine ranking.
* CQVPR contextual query matching (Li et al., arXiv 2503.08170, Eq. 7): the contextual
  embeddings T of two images of one place should agree, those of different places should not.
  The agreement of two images is the mean dot product ``T_a(i) . T_b(j)`` over the mutually
  nearest query pairs (i, j) of ``T_a T_b^T``; the loss is ``sum_k max(s_{n,k} - s_p, 0)`` over
  the negatives of each (query, positive) pair. The paper trains on (query, positive,
  negatives) tuples; in a P x K batch every image with a same-place partner is a query, each
  partner a positive, and the negatives are its ``num_negatives`` hardest other-place images by
  global descriptor (NetVLAD-style mining, as SelaVPR's training, whose tuples carry 10
  negatives, picks them). Mean over the (query, positive) pairs.
* Mutual-nearest-neighbour local loss (SelaVPR, ICLR 2024; CQVPR's L_l, Eq. 8): the mean
  similarity of mutually nearest local features must be higher for an anchor and a positive
  than for the anchor and its hardest negatives (by global descriptor), summed over the
  ``num_negatives`` hardest as SelaVPR's ``LocalFeatureLoss`` sums over a tuple's negatives.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vpr_ros.errors import ModelError
from vpr_ros.train.losses import register_loss


def _need(outputs: Mapping[str, torch.Tensor], key: str, loss: str, provider: str
          ) -> torch.Tensor:
    if key not in outputs:
        raise ModelError(f"loss {loss!r} needs the model output {key!r} (from the {provider} "
                         f"aggregator's forward_all in training mode); got {sorted(outputs)}. "
                         f"Use this loss only with a {provider} model.")
    return outputs[key]


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A zero loss still attached to the graph (so backward() works on an all-trivial batch)."""
    return like.sum() * 0.0


# -- SelaVPR++ --------------------------------------------------------------------------------

def mine_ms_pairs(codes: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-Similarity miner on code cosine: (anchor+, positive, anchor-, negative) indices."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    miner = MultiSimilarityMiner(epsilon=epsilon, distance=CosineSimilarity())
    return miner(codes, labels)


def similarity_gap(hash_float: torch.Tensor, hash_codes: torch.Tensor,
                   pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
                   ) -> torch.Tensor:
    """Mean over the given positive and negative pairs of
    ``(cos(f_i, f_j) - b_i . b_j / bits)^2`` (``hash_float`` rows are L2-normalised)."""
    a1, p, a2, n = pairs
    i = torch.cat([a1, a2])
    j = torch.cat([p, n])
    if not len(i):
        return _zero(hash_float) + _zero(hash_codes)
    float_sim = (hash_float[i] * hash_float[j]).sum(dim=-1)
    code_sim = (hash_codes[i] * hash_codes[j]).sum(dim=-1) / hash_codes.shape[-1]
    return (float_sim - code_sim).pow(2).mean()


def similarity_constrained_hashing_loss(hash_codes: torch.Tensor, hash_float: torch.Tensor,
                                        labels: torch.Tensor, gap_weight: float = 0.1,
                                        alpha: float = 1.0, beta: float = 50.0,
                                        base: float = 0.0, epsilon: float = 0.1) -> torch.Tensor:
    """SelaVPR++'s hashing loss: MS loss on the codes + ``gap_weight`` x :func:`similarity_gap`.

    ``hash_codes`` are the +-1 codes (straight-through, so gradients reach the hash head) and
    ``hash_float`` the L2-normalised continuous outputs they are the signs of. The MS term uses
    pytorch-metric-learning's ``DotProductSimilarity``, which L2-normalises embeddings first, so
    it sees the code cosine ``b_i . b_j / bits`` in [-1, 1], exactly as the release's call does.
    """
    from pytorch_metric_learning.distances import DotProductSimilarity
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    if hash_codes.shape != hash_float.shape or hash_codes.ndim != 2:
        raise ValueError(f"hash_codes {tuple(hash_codes.shape)} and hash_float "
                         f"{tuple(hash_float.shape)} must be the same (B, bits) shape")
    pairs = mine_ms_pairs(hash_codes.detach(), labels, epsilon)
    ms = MultiSimilarityLoss(alpha=alpha, beta=beta, base=base,
                             distance=DotProductSimilarity())(hash_codes, labels, pairs)
    return ms + gap_weight * similarity_gap(hash_float, hash_codes, pairs)


@register_loss("selavpr_hashing")
class SimilarityConstrainedHashingLoss(nn.Module):
    """:func:`similarity_constrained_hashing_loss` over ``selavpr`` training outputs."""

    def __init__(self, gap_weight: float = 0.1, alpha: float = 1.0, beta: float = 50.0,
                 base: float = 0.0, epsilon: float = 0.1) -> None:
        super().__init__()
        self.kwargs = dict(gap_weight=gap_weight, alpha=alpha, beta=beta, base=base,
                           epsilon=epsilon)

    def forward(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        codes = _need(outputs, "hash_codes", "selavpr_hashing", "selavpr")
        cont = _need(outputs, "hash_float", "selavpr_hashing", "selavpr")
        return similarity_constrained_hashing_loss(codes, cont, labels, **self.kwargs)


# -- CQVPR ------------------------------------------------------------------------------------

def same_place_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i < j) of images with the same label."""
    same = labels[:, None] == labels[None, :]
    i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
    keep = same[i, j]
    return i[keep], j[keep]


def mnn_mean_similarity(sim: torch.Tensor) -> torch.Tensor:
    """``sim`` (..., K, L): the mean of ``sim[i, j]`` over the mutually nearest pairs (i's best
    j is j's best i), per leading index. There is always one: the largest entry. Differentiable
    through the similarities; the matching itself is not."""
    ab = sim.argmax(dim=-1)                                   # (..., K): best j of each i
    ba = sim.argmax(dim=-2)                                   # (..., L): best i of each j
    idx = torch.arange(sim.shape[-2], device=sim.device)
    mutual = torch.gather(ba, -1, ab) == idx                  # (..., K)
    best = torch.gather(sim, -1, ab.unsqueeze(-1)).squeeze(-1)
    return (best * mutual).sum(-1) / mutual.sum(-1).clamp(min=1)


def hardest_negatives(global_desc: torch.Tensor, labels: torch.Tensor, count: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the ``count`` other-place images most similar by global descriptor:
    (B, n) indices and a (B, n) mask of which exist (n = min(count, most negatives any image
    has))."""
    with torch.no_grad():
        gsim = global_desc.float() @ global_desc.float().T
        same = labels[:, None] == labels[None, :]
        gsim = gsim.masked_fill(same, float("-inf"))
        n = min(int(count), int((~same).sum(1).max()))
        if n <= 0:
            empty = torch.empty(len(labels), 0, dtype=torch.long, device=labels.device)
            return empty, empty.bool()
        top, idx = gsim.topk(n, dim=1)
        return idx, torch.isfinite(top)


def contextual_query_matching_loss(queries: torch.Tensor, global_desc: torch.Tensor,
                                   labels: torch.Tensor, num_negatives: int = 10
                                   ) -> torch.Tensor:
    """CQVPR's Eq. 7 over a P x K batch (see the module docstring).

    ``queries`` (B, K, d) are the contextual embeddings T; ``global_desc`` (B, D) picks the
    hardest negatives. Returns the mean over (query, positive) pairs of
    ``sum_k relu(s(q, n_k) - s(q, p))`` (0, still attached to the graph, without any pair)."""
    if queries.ndim != 3:
        raise ValueError(f"contextual queries must be (B, K, d), got {tuple(queries.shape)}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    t = queries.float()
    s = mnn_mean_similarity(torch.einsum("akd,bld->abkl", t, t))      # (B, B)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    a, p = torch.nonzero(same & ~eye, as_tuple=True)
    neg, valid = hardest_negatives(global_desc, labels, num_negatives)
    if not len(a) or not neg.shape[1]:
        return _zero(queries)
    s_neg = torch.gather(s, 1, neg)                                     # (B, n)
    terms = torch.relu(s_neg[a] - s[a, p][:, None]) * valid[a]
    return terms.sum(dim=1).mean()


@register_loss("cqvpr_query_matching")
class QueryMatchingLoss(nn.Module):
    """:func:`contextual_query_matching_loss` over ``cqvpr`` training outputs."""

    def __init__(self, num_negatives: int = 10) -> None:
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        self.num_negatives = num_negatives

    def forward(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        t = _need(outputs, "contextual_queries", "cqvpr_query_matching", "cqvpr")
        glob = _need(outputs, "global", "cqvpr_query_matching", "cqvpr")
        return contextual_query_matching_loss(t, glob, labels, self.num_negatives)


# -- local features ---------------------------------------------------------------------------

def mutual_nn_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean cosine of the mutually nearest location pairs of two (L, D) unit-norm feature sets
    (differentiable through the similarities; the matching itself is not). There is always at
    least one mutual pair: the most similar pair overall is one."""
    sim = a @ b.T
    ab = sim.argmax(dim=1)
    ba = sim.argmax(dim=0)
    idx = torch.arange(len(a), device=a.device)
    mutual = ba[ab] == idx
    return sim[idx[mutual], ab[mutual]].mean()


def mutual_nn_local_loss(local: torch.Tensor, global_desc: torch.Tensor, labels: torch.Tensor,
                         margin: float = 0.0, num_negatives: int = 1) -> torch.Tensor:
    """Triplet hinge on mutual-NN similarity: for every anchor with a same-place image, its
    first same-place partner is the positive and the ``num_negatives`` different-place images
    most similar by global descriptor the negatives;
    ``mean over anchors of sum_n relu(sim_neg - sim_pos + margin)``.

    ``local`` is (B, H, W, D) or (B, L, D), unit norm along D.
    """
    feats = local.reshape(local.shape[0], -1, local.shape[-1])
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    neg, valid = hardest_negatives(global_desc, labels, num_negatives)
    terms = []
    for a in range(len(labels)):
        partners = torch.nonzero(same[a] & ~eye[a]).flatten()
        negs = neg[a][valid[a]] if neg.shape[1] else neg[a]
        if not len(partners) or not len(negs):
            continue
        s_pos = mutual_nn_similarity(feats[a], feats[int(partners[0])])
        s_neg = torch.stack([mutual_nn_similarity(feats[a], feats[int(n)]) for n in negs])
        terms.append(F.relu(s_neg - s_pos + margin).sum())
    if not terms:
        return _zero(local)
    return torch.stack(terms).mean()


@register_loss("mnn_local")
class MutualNNLocalLoss(nn.Module):
    """:func:`mutual_nn_local_loss` over ``local`` + ``global`` training outputs."""

    def __init__(self, margin: float = 0.0, num_negatives: int = 1) -> None:
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        self.margin = margin
        self.num_negatives = num_negatives

    def forward(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        local = _need(outputs, "local", "mnn_local", "cqvpr")
        glob = _need(outputs, "global", "mnn_local", "cqvpr")
        return mutual_nn_local_loss(local, glob, labels, self.margin, self.num_negatives)
