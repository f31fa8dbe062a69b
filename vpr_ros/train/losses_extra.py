"""Method-specific training losses: SelaVPR++ hashing, CQVPR query matching, MNN local features.

Each loss is a plain function over tensors plus an ``nn.Module`` registered with
:func:`vpr_ros.train.losses.register_loss`, so a recipe adds it by name
(``loss.extra: [{name: selavpr_hashing, weight: 1.0}]``) next to the Multi-Similarity loss on the
global descriptor. The modules read the named outputs ``VPRModel.forward_all`` returns in
training mode (``selavpr``: ``hash_codes``/``hash_float``; ``cqvpr``: ``query_features``,
``local``, ``global``) and the batch's place labels.

* SelaVPR++ similarity-constrained hashing (Lu et al., T-PAMI 2025): a Multi-Similarity loss
  (alpha 1, beta 50, base 0, pairs mined by the MS miner with epsilon 0.1 on code cosine) on the
  +-1 codes, plus ``0.1 x`` the mean squared gap, over the mined positive and negative pairs,
  between the cosine of the continuous (pre-sign, L2-normalised) hash outputs and the codes'
  similarity ``b_i . b_j / bits``. Why: the codes alone are trained through a straight-through
  sign whose gradient ignores quantisation error; tying code similarity to the continuous
  similarity keeps the two consistent so Hamming ranking follows cosine ranking.
* CQVPR query matching: two images of one place should see the same contexts in the same
  queries. For every same-place pair, the K x K cosine matrix between their per-query region
  descriptors is scored with a cross-entropy whose target is the diagonal (query k of one image
  matches query k of the other, not another query), in both directions. No official code is
  public; this is the loss as the paper describes its purpose.
* Mutual-nearest-neighbour local loss (SelaVPR, ICLR 2024; CQVPR trains its local head with it):
  the mean similarity of mutually nearest local features must be higher for an anchor and a
  positive than for the anchor and its hardest negative (by global descriptor).
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


def query_matching_loss(query_features: torch.Tensor, labels: torch.Tensor,
                        temperature: float = 0.1) -> torch.Tensor:
    """Cross-entropy that query k of one image matches query k of a same-place image.

    ``query_features`` (B, K, C) are L2-normalised per query. For every same-place pair the
    K x K cosine matrix divided by ``temperature`` is scored against the identity, rows and
    columns (both directions); the mean over pairs is returned (0 if the batch has none).
    """
    if query_features.ndim != 3:
        raise ValueError(f"query_features must be (B, K, C), got {tuple(query_features.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    i, j = same_place_pairs(labels)
    if not len(i):
        return _zero(query_features)
    k = query_features.shape[1]
    logits = torch.matmul(query_features[i], query_features[j].transpose(1, 2)) / temperature
    target = torch.arange(k, device=logits.device).expand(len(i), k).reshape(-1)
    rows = F.cross_entropy(logits.reshape(-1, k), target)
    cols = F.cross_entropy(logits.transpose(1, 2).reshape(-1, k), target)
    return 0.5 * (rows + cols)


@register_loss("cqvpr_query_matching")
class QueryMatchingLoss(nn.Module):
    """:func:`query_matching_loss` over ``cqvpr`` training outputs."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        qf = _need(outputs, "query_features", "cqvpr_query_matching", "cqvpr")
        return query_matching_loss(qf, labels, self.temperature)


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
                         margin: float = 0.0) -> torch.Tensor:
    """Triplet hinge on mutual-NN similarity: for every anchor with a same-place image, its
    first same-place partner is the positive and the different-place image most similar by
    global descriptor the negative; ``mean(relu(sim_neg - sim_pos + margin))``.

    ``local`` is (B, H, W, D) or (B, L, D), unit norm along D.
    """
    feats = local.reshape(local.shape[0], -1, local.shape[-1])
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    with torch.no_grad():
        gsim = global_desc @ global_desc.T
        gsim = gsim.masked_fill(same, float("-inf"))
    terms = []
    for a in range(len(labels)):
        partners = torch.nonzero(same[a] & ~eye[a]).flatten()
        if not len(partners) or not bool(torch.isfinite(gsim[a]).any()):
            continue
        p, n = int(partners[0]), int(gsim[a].argmax())
        s_pos = mutual_nn_similarity(feats[a], feats[p])
        s_neg = mutual_nn_similarity(feats[a], feats[n])
        terms.append(F.relu(s_neg - s_pos + margin))
    if not terms:
        return _zero(local)
    return torch.stack(terms).mean()


@register_loss("mnn_local")
class MutualNNLocalLoss(nn.Module):
    """:func:`mutual_nn_local_loss` over ``local`` + ``global`` training outputs."""

    def __init__(self, margin: float = 0.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        local = _need(outputs, "local", "mnn_local", "cqvpr")
        glob = _need(outputs, "global", "mnn_local", "cqvpr")
        return mutual_nn_local_loss(local, glob, labels, self.margin)
