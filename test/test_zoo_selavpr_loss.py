"""SelaVPR++ similarity-constrained hashing loss, and the zoo's recipes through the trainer's
extra-loss hook (PlaceLoss) with the outputs the aggregators give in training mode."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vpr_ros.errors import ModelError
from vpr_ros.models import model_config_from_dict
from vpr_ros.models.aggregators.selavpr import SelaVPRAggregator
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.config import load_yaml
from vpr_ros.models.registry import build_component
from vpr_ros.train import losses_extra
from vpr_ros.train.config import load_train_config
from vpr_ros.train.losses import EXTRA_LOSSES, PlaceLoss, build_extra_loss
from vpr_ros.train.losses_extra import similarity_constrained_hashing_loss, similarity_gap

RECIPES = Path(__file__).resolve().parents[1] / "config" / "train"


def test_gap_term_by_hand() -> None:
    f = torch.tensor([[0.6, 0.8, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0, -1.0, -1.0], [1.0, 1.0, 1.0, -1.0], [1.0, -1.0, -1.0, 1.0]])
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    # pos: cos 0.8, codes (1+1-1+1)/4 = 0.5; neg: cos 0.6, codes (1-1+1-1)/4 = 0
    expected = ((0.8 - 0.5) ** 2 + (0.6 - 0.0) ** 2) / 2
    assert math.isclose(float(similarity_gap(f, b, pairs)), expected, rel_tol=1e-6)
    empty = (torch.tensor([], dtype=torch.long),) * 4
    assert float(similarity_gap(f, b, empty)) == 0.0


def clustered(places: int = 6, per_place: int = 4, dim: int = 32, noise: float = 0.6,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(places, dim, 2, 3, generator=g)
    labels = torch.arange(places).repeat_interleave(per_place)
    return centres[labels] + noise * torch.randn(len(labels), dim, 2, 3, generator=g), labels


def test_loss_is_ms_on_code_cosine_plus_weighted_gap() -> None:
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(24, 64), dim=1)
    codes = torch.where(z >= 0, 1.0, -1.0)
    labels = torch.arange(6).repeat_interleave(4)
    pairs = losses_extra.mine_ms_pairs(codes, labels, 0.1)
    assert len(pairs[0]) and len(pairs[2])

    def ms_by_hand(sim: torch.Tensor) -> torch.Tensor:
        """MS loss (alpha 1, beta 50, base 0) over the mined pairs, per anchor, averaged."""
        terms = []
        for a in range(len(labels)):
            pos = sim[a, pairs[1][pairs[0] == a]]
            neg = sim[a, pairs[3][pairs[2] == a]]
            t = torch.log1p(torch.exp(-pos).sum()) + torch.log1p(torch.exp(50 * neg).sum()) / 50
            terms.append(t)
        return torch.stack(terms).mean()

    cosine = codes @ codes.T / 64
    expected = ms_by_hand(cosine) + 0.1 * similarity_gap(z, codes, pairs)
    got = similarity_constrained_hashing_loss(codes, z, labels)
    torch.testing.assert_close(got, expected)
    # Continuous outputs that already are scaled codes leave no gap: only the MS term remains.
    exact = similarity_constrained_hashing_loss(codes, codes / 8.0, labels, gap_weight=5.0)
    torch.testing.assert_close(exact, ms_by_hand(cosine))


def test_training_the_hash_head_improves_hamming_retrieval() -> None:
    feats, labels = clustered()
    torch.manual_seed(1)
    agg = SelaVPRAggregator(in_channels=32, out_dim=16, hash_bits=32).train()
    loss_fn = build_extra_loss("selavpr_hashing", {"gap_weight": 0.1})
    opt = torch.optim.Adam(agg.parameters(), lr=3e-3)

    def hamming_top1() -> float:
        with torch.no_grad():
            codes = agg.forward_all(BackboneOutput(feats))["hash_codes"]
        sim = codes @ codes.T - 1e9 * torch.eye(len(codes))
        return float((labels[sim.argmax(1)] == labels).float().mean())

    before_acc = hamming_top1()
    history = []
    for _ in range(20):
        out = agg.forward_all(BackboneOutput(feats))
        loss = loss_fn(out, labels)
        opt.zero_grad()
        loss.backward()
        assert agg.linear4.weight.grad.abs().sum() > 0   # gradients pass the sign (STE)
        assert agg.linear2.weight.grad is None           # the float head is not touched
        opt.step()
        history.append(float(loss.detach()))
    assert history[-1] < 0.7 * history[0], history
    assert hamming_top1() >= max(before_acc, 0.9)


def test_missing_outputs_are_named() -> None:
    loss_fn = build_extra_loss("selavpr_hashing", {})
    with pytest.raises(ModelError, match="hash_codes"):
        loss_fn({"global": torch.randn(4, 8)}, torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize("recipe", ["selavpr_dinov2b.yaml", "cqvpr_dinov2l.yaml",
                                    "selavpr_effnetlite0_nordland.yaml",
                                    "cqvpr_effnetlite0_nordland.yaml"])
def test_recipes_validate_and_their_losses_run_on_training_outputs(recipe: str) -> None:
    cfg = load_train_config(RECIPES / recipe)
    assert {e.name for e in cfg.loss.extra} <= set(EXTRA_LOSSES)
    model_cfg = model_config_from_dict(load_yaml(cfg.resolve(cfg.model.config)))
    small = {"selavpr": {"in_channels": 2 * 48 if "dinov2" in recipe else 48},
             "cqvpr": {"in_channels": 48, "query_dim": 16, "num_heads": 4, "local_dim": 16,
                       "local_hidden": 24}}
    name = model_cfg.aggregator.name
    params = {**model_cfg.aggregator.params, **small[name]}
    in_channels = params.pop("in_channels")
    torch.manual_seed(0)
    agg = build_component("aggregator", name, params, in_channels=in_channels).train()
    feats = torch.randn(8, in_channels, 3, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = agg.forward_all(BackboneOutput(feats))
    loss, stats = PlaceLoss(cfg.loss, agg)(out, labels)
    assert torch.isfinite(loss)
    base = "triplet" if cfg.loss.name == "triplet" else "ms"
    assert set(stats) >= {"base", base, *(e.name for e in cfg.loss.extra)}
    loss.backward()
    assert all(p.grad is not None for p in agg.parameters() if p.requires_grad)
