"""QAA aggregator: the paper's parameter count, the formula, and the query-bank cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vpr_ros.models.aggregators.qaa import QAAAggregator
from vpr_ros.models.backbones.base import BackboneOutput


def test_parameter_count_matches_paper_for_dinov2_b() -> None:
    agg = QAAAggregator(in_channels=768)  # defaults: 256 queries, 16 heads, 64 x 128
    n = sum(p.numel() for p in agg.parameters())
    assert abs(n - 5.07e6) / 5.07e6 < 0.01, n
    assert agg.out_dim == 8192


@pytest.mark.parametrize("clusters,dim,expected", [(64, 128, 8192), (32, 128, 4096),
                                                   (16, 128, 2048), (16, 64, 1024)])
def test_variant_dims(clusters: int, dim: int, expected: int) -> None:
    agg = QAAAggregator(in_channels=64, num_queries=8, num_clusters=clusters, cluster_dim=dim,
                        feature_heads=4, score_heads=4).eval()
    x = BackboneOutput(torch.randn(2, 64, 3, 4))
    with torch.no_grad():
        out = agg(x)
    assert out.shape == (2, expected)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def reference_qaa(agg: QAAAggregator, x: BackboneOutput) -> torch.Tensor:
    """Independent, loop-based evaluation of the QAA formula (no batched matmul tricks)."""
    def refine(bank) -> torch.Tensor:
        q = bank.queries[0]
        attn = bank.self_attn
        d = q.shape[1]
        heads = attn.num_heads
        w_q, w_k, w_v = attn.in_proj_weight.split(d)
        b_q, b_k, b_v = attn.in_proj_bias.split(d)
        qq, kk, vv = q @ w_q.T + b_q, q @ w_k.T + b_k, q @ w_v.T + b_v
        hd = d // heads
        outs = []
        for h in range(heads):
            s = slice(h * hd, (h + 1) * hd)
            a = torch.softmax(qq[:, s] @ kk[:, s].T / hd ** 0.5, dim=-1)
            outs.append(a @ vv[:, s])
        q = q + torch.cat(outs, dim=1) @ attn.out_proj.weight.T + attn.out_proj.bias
        return F.layer_norm(q, (d,), bank.norm_q.weight, bank.norm_q.bias)

    ref_q = refine(agg.queries_feature)         # (Q, cluster_dim)
    score_q = refine(agg.queries_score)         # (Q, C)
    results = []
    for b in range(x.features.shape[0]):
        tokens = x.features[b].flatten(1).T     # (N, C)
        attn = agg.score.cross_attn
        c = tokens.shape[1]
        w_q, w_k, w_v = attn.in_proj_weight.split(c)
        b_q, b_k, b_v = attn.in_proj_bias.split(c)
        qq, kk, vv = score_q @ w_q.T + b_q, tokens @ w_k.T + b_k, tokens @ w_v.T + b_v
        hd = c // attn.num_heads
        heads = []
        for h in range(attn.num_heads):
            s = slice(h * hd, (h + 1) * hd)
            heads.append(torch.softmax(qq[:, s] @ kk[:, s].T / hd ** 0.5, -1) @ vv[:, s])
        out = torch.cat(heads, 1) @ attn.out_proj.weight.T + attn.out_proj.bias
        out = F.layer_norm(out, (c,), agg.score.norm_out.weight, agg.score.norm_out.bias)
        conv = agg.score.conv
        p = torch.stack([conv.weight[:, :, 0] @ out[i] + conv.bias
                         for i in range(out.shape[0])])   # (Q, K) per-query projection
        num_q, k = p.shape
        v = torch.zeros(agg.cluster_dim, k)
        for d in range(agg.cluster_dim):
            for j in range(k):
                v[d, j] = sum(ref_q[q, d] * p[q, j] for q in range(num_q))
        v = v / v.norm(dim=0, keepdim=True)
        flat = v.flatten()
        results.append(flat / flat.norm())
    return torch.stack(results)


def test_fast_formula_matches_loop_reference() -> None:
    torch.manual_seed(0)
    agg = QAAAggregator(in_channels=32, num_queries=6, num_clusters=5, cluster_dim=8,
                        feature_heads=2, score_heads=4).eval()
    x = BackboneOutput(torch.randn(3, 32, 4, 5))
    with torch.no_grad():
        fast = agg(x)
        ref = reference_qaa(agg, x)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)


def test_query_banks_cached_in_inference_and_invalidated_on_change() -> None:
    torch.manual_seed(0)
    agg = QAAAggregator(in_channels=32, num_queries=6, num_clusters=5, cluster_dim=8,
                        feature_heads=2, score_heads=4).eval()
    x = BackboneOutput(torch.randn(2, 32, 3, 3))
    with torch.no_grad():
        first = agg(x)
        banks = agg.query_banks()
        assert agg.query_banks()[0] is banks[0]          # reused, not recomputed
        agg.queries_feature.queries.add_(0.5)            # in-place update bumps the version
        assert agg.query_banks()[0] is not banks[0]
        second = agg(x)
    assert not torch.allclose(first, second)
    agg.train()
    out = agg(x)                                         # training: no cache, grads flow
    out.sum().backward()
    assert agg.queries_feature.queries.grad is not None
    assert agg._bank_cache is None


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="score_heads"):
        QAAAggregator(in_channels=30, score_heads=16)
    with pytest.raises(ValueError, match="num_clusters"):
        QAAAggregator(in_channels=32, num_clusters=0, score_heads=4)
