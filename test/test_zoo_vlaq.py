"""VLAQ aggregator (DC-VLAQ): the query-residual formula against a loop-based reference,
descriptor sizes, and the model configs (checked on the meta device: shapes, no weights)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vpr_ros.models import build_model, model_config_from_dict
from vpr_ros.models.aggregators.vlaq import VLAQAggregator
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.backbones.dinov2_clip_fusion import bilinear_matrix
from vpr_ros.models.config import load_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "config" / "models"


def reference_vlaq(agg: VLAQAggregator, feats: torch.Tensor) -> torch.Tensor:
    """sum_i softmax_i(q_k . z_i / sqrt(d)) (z_i - q_k) per query, written as explicit loops."""
    results = []
    for b in range(feats.shape[0]):
        x = feats[b].flatten(1).T                                   # (N, C)
        parts: list[float] = []
        for blk in agg.blocks:
            z = x if isinstance(blk.proj, torch.nn.Identity) else \
                x @ blk.proj.weight.T + blk.proj.bias
            d = z.shape[1]
            for q in blk.queries:
                scores = [float(q @ z[i]) / math.sqrt(d) for i in range(z.shape[0])]
                top = max(scores)
                e = [math.exp(s - top) for s in scores]
                total = sum(e)
                v = sum((e[i] / total) * (z[i] - q) for i in range(z.shape[0]))
                if agg.intra_norm:
                    v = v / v.norm()
                parts.extend(v.tolist())
        flat = torch.tensor(parts)
        results.append(flat / flat.norm())
    return torch.stack(results)


@pytest.mark.parametrize("dim,intra_norm", [(5, False), (None, False), (6, True)])
def test_formula_matches_loop_reference(dim, intra_norm) -> None:
    torch.manual_seed(0)
    agg = VLAQAggregator(in_channels=7, num_blocks=2, num_queries=3, dim=dim,
                         intra_norm=intra_norm)
    with torch.no_grad():
        for blk in agg.blocks:                       # queries that do not start orthonormal
            blk.queries.mul_(torch.rand(blk.queries.shape[0], 1) * 3)
    feats = torch.randn(2, 7, 3, 4) * 2
    with torch.no_grad():
        out = agg(BackboneOutput(feats))
    width = 7 if dim is None else dim
    assert out.shape == (2, 2 * 3 * width) and agg.out_dim == 2 * 3 * width
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out, reference_vlaq(agg, feats), atol=1e-5, rtol=1e-4)


def test_residual_is_relative_to_each_query() -> None:
    """One token only: the softmax weight is 1, so each query's vector is exactly z - q."""
    agg = VLAQAggregator(in_channels=4, num_blocks=1, num_queries=2, dim=None)
    z = torch.tensor([1.0, -2.0, 0.5, 3.0])
    with torch.no_grad():
        out = agg(BackboneOutput(z.view(1, 4, 1, 1)))
    expected = torch.cat([z - agg.blocks[0].queries[0], z - agg.blocks[0].queries[1]]).detach()
    torch.testing.assert_close(out[0], expected / expected.norm())


def test_gradients_reach_queries_and_projections() -> None:
    agg = VLAQAggregator(in_channels=8, num_blocks=2, num_queries=4, dim=3)
    agg(BackboneOutput(torch.randn(3, 8, 2, 2))).pow(2).sum().backward()
    for blk in agg.blocks:
        assert blk.queries.grad is not None and blk.queries.grad.abs().sum() > 0
        assert blk.proj.weight.grad is not None


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="num_queries"):
        VLAQAggregator(in_channels=8, num_queries=0)
    with pytest.raises(ValueError, match="dim"):
        VLAQAggregator(in_channels=8, dim=-3)


def _meta_model(name: str):
    with torch.device("meta"):
        return build_model(model_config_from_dict(load_yaml(CONFIGS / name), source=name))


def test_dcvlaq_dinov2b_config() -> None:
    """DINOv2-B + frozen CLIP ViT-B/16 on DINOv2's 23x23 grid at 322 px, VLAQ 2 x 64 x 64."""
    model = _meta_model("dcvlaq_dinov2b.yaml")
    assert model.descriptor_dim == 8192
    bb = model.backbone
    assert not any(p.requires_grad for p in bb.clip.parameters())
    assert sum(p.numel() for p in bb.clip.parameters()) == 85_799_424     # CLIP ViT-B/16 visual
    assert sum(p.numel() for p in model.aggregator.parameters()) == 2 * (768 * 64 + 64 + 64 * 64)
    trainable = {n.split(".")[1] + "." + n.split(".")[2] for n, p in bb.named_parameters()
                 if p.requires_grad and n.startswith("dino.blocks.")}
    assert trainable == {"blocks.10", "blocks.11"}
    assert bb.fusion.weight.requires_grad
    with torch.device("meta"):
        x = torch.empty(2, 3, 322, 322)
        assert bb.clip_tokens(x, (23, 23)).shape == (2, 23 * 23, 768)   # CLIP fed 368 px
        assert model(x).shape == (2, 8192)


def test_small_cpu_config() -> None:
    model = _meta_model("vlaq_effnetlite0.yaml")
    assert model.descriptor_dim == 1024
    assert not any(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("size,out", [((322, 308), (368, 352)), ((56, 70), (64, 80)),
                                      ((64, 48), (56, 42))])
def test_precomputed_resize_equals_bilinear_interpolation(size, out) -> None:
    """The fixed-size CLIP resize (two constant matrices, no Resize op in an exported graph)
    is F.interpolate's bilinear resize, up- and downsampling (up to float32 rounding of the
    interpolation weights, which F.interpolate computes in single precision)."""
    x = torch.randn(2, 3, *size)
    ref = F.interpolate(x, size=out, mode="bilinear", align_corners=False)
    got = bilinear_matrix(size[0], out[0]) @ x @ bilinear_matrix(size[1], out[1]).T
    torch.testing.assert_close(got, ref, atol=5e-5, rtol=1e-5)
