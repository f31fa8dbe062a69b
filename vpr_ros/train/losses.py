"""Losses: Multi-Similarity + MS miner (or triplet + its miner), plus the hook for
method-specific extra losses.

The base loss is what GSV-Cities, MixVPR, BoQ, SALAD and QAA train with:
``MultiSimilarityLoss(alpha=1, beta=50, base=0)`` on dot-product similarity of the L2-normalised
descriptors, with pairs mined by ``MultiSimilarityMiner(epsilon=0.1)`` on cosine similarity
(amaralibey/Bag-of-Queries ``src/model.py``, OpenVPRLab ``src/losses/vpr_losses.py``, QAA's
``miner.margin: 0.1``). Note these are *not* pytorch-metric-learning's defaults (alpha 2,
base 0.5, the MS paper's values for classification-style retrieval), hence the explicit config.

``loss.name: triplet`` is the margin triplet loss of NetVLAD and the SelaVPR / CQVPR papers
(CQVPR Eq. 6: ``max(||G_q - G_p|| - ||G_q - G_n|| + m, 0)`` on Euclidean distances of the
L2-normalised descriptors, ``m = loss.margin``, 0.1 in CQVPR Sec. IV-B), as
pytorch-metric-learning's ``TripletMarginLoss`` with ``LpDistance``; its miner is
``TripletMarginMiner`` (``loss.miner: {name: triplet_margin, margin, type_of_triplets}``), which
keeps the triplets of the P x K batch that violate the margin. The papers sample (query,
positive, negatives) tuples; in a P x K batch every image is an anchor, its place's other
images the positives and all other places' images the negatives, from which the miner picks.
Either miner can be combined with either loss.

Extra losses plug in two ways, both computed per dataset and added to its MS loss:

1. **Aggregator hook**: an aggregator may define
   ``extra_loss(outputs: dict[str, Tensor], labels: Tensor) -> Tensor | None``; ``outputs`` is
   ``VPRModel.forward_all``'s dict (``"global"`` plus the aggregator's ``extra_outputs``, e.g. a
   hash head's ``"binary"``). It is weighted by ``loss.aggregator_extra_weight``.
2. **Registry**: a class registered with :func:`register_loss` is named in the recipe,
   ``loss.extra: [{name: ..., weight: ..., params: {...}}]``; it is built with ``params`` and
   called as ``loss(outputs, labels) -> Tensor``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Protocol, TypeVar

import torch
from torch import nn

from vpr_ros.errors import ConfigError
from vpr_ros.train.config import LossConfig

T = TypeVar("T")

EXTRA_LOSSES: dict[str, type] = {}


class ExtraLoss(Protocol):
    def __call__(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        ...


def register_loss(name: str) -> Callable[[type[T]], type[T]]:
    """Register an extra loss class under ``name`` for ``loss.extra`` in training recipes."""
    def deco(cls: type[T]) -> type[T]:
        if name in EXTRA_LOSSES and EXTRA_LOSSES[name] is not cls:
            raise RuntimeError(f"extra loss {name!r} registered twice")
        EXTRA_LOSSES[name] = cls
        return cls
    return deco


def build_extra_loss(name: str, params: dict[str, Any]) -> ExtraLoss:
    # The method-specific losses of the zoo register themselves on import.
    from vpr_ros.train import losses_extra  # noqa: F401

    if name not in EXTRA_LOSSES:
        raise ConfigError(f"loss.extra: unknown loss {name!r}; registered extra losses are "
                          f"{sorted(EXTRA_LOSSES)} (register one with "
                          "vpr_ros.train.losses.register_loss)")
    cls = EXTRA_LOSSES[name]
    sig = inspect.signature(cls.__init__)
    accepted = {p for p in sig.parameters if p != "self"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(f"loss.extra {name!r}: unknown parameter(s) {unknown}; it accepts "
                          f"{sorted(accepted)}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"loss.extra {name!r}: {exc}") from exc


def build_base_loss(cfg: LossConfig) -> tuple[Any, Any, str]:
    """(loss, miner or None, stats key) of ``loss.name`` / ``loss.miner`` (pytorch-metric-learning).

    Multi-Similarity works on dot products of the unit descriptors (= cosine); the triplet loss
    on their Euclidean distances (``LpDistance``, unit vectors, p=2). The MS miner compares
    cosine similarities, the triplet miner the loss's own distances."""
    from pytorch_metric_learning import losses, miners
    from pytorch_metric_learning.distances import (CosineSimilarity, DotProductSimilarity,
                                                   LpDistance)

    if cfg.name == "triplet":
        loss: Any = losses.TripletMarginLoss(margin=cfg.margin, distance=LpDistance(p=2),
                                             swap=False, smooth_loss=False,
                                             triplets_per_anchor="all")
        key = "triplet"
    else:
        loss = losses.MultiSimilarityLoss(alpha=cfg.alpha, beta=cfg.beta, base=cfg.base,
                                          distance=DotProductSimilarity())
        key = "ms"
    miner: Any = None
    if cfg.miner is not None and cfg.miner.name == "triplet_margin":
        miner = miners.TripletMarginMiner(margin=cfg.miner.margin,
                                          type_of_triplets=cfg.miner.type_of_triplets,
                                          distance=LpDistance(p=2))
    elif cfg.miner is not None:
        miner = miners.MultiSimilarityMiner(epsilon=cfg.miner.epsilon,
                                            distance=CosineSimilarity())
    return loss, miner, key


class PlaceLoss(nn.Module):
    """Loss of one dataset's batch: the base loss (+ mined pairs or triplets) + weighted
    extras; returns the terms. ``stats["base"]`` is the base loss, also under its own name
    (``"ms"`` or ``"triplet"``)."""

    def __init__(self, cfg: LossConfig, aggregator: nn.Module) -> None:
        super().__init__()
        self.base_loss, self.miner, self.base_key = build_base_loss(cfg)
        self.extras = [(e.name, e.weight, build_extra_loss(e.name, dict(e.params)))
                       for e in cfg.extra]
        self._aggregator_hook: Optional[Callable] = getattr(aggregator, "extra_loss", None)
        self.aggregator_weight = cfg.aggregator_extra_weight

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, float]]:
        desc = outputs["global"].float()
        stats: dict[str, float] = {}
        if self.miner is not None:
            mined = self.miner(desc, labels)
            loss = self.base_loss(desc, labels, mined)
            # Share of the batch that served as a mined anchor: 0 means the batch taught nothing.
            stats["mined_fraction"] = float(len(torch.unique(mined[0]))) / max(1, len(desc))
        else:
            loss = self.base_loss(desc, labels)
        stats["base"] = stats[self.base_key] = float(loss.detach())
        for name, weight, fn in self.extras:
            term = fn(outputs, labels)
            stats[name] = float(term.detach())
            loss = loss + weight * term
        if self._aggregator_hook is not None:
            term = self._aggregator_hook(outputs, labels)
            if term is not None:
                stats["aggregator_extra"] = float(term.detach())
                loss = loss + self.aggregator_weight * term
        return loss, stats
