"""BoQ aggregator: the parameter count the literature quotes, the released arithmetic restated
independently, the query cache, the model configs, and ONNX export with onnxruntime parity."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpr_ros.models import build_model, model_config_from_dict
from vpr_ros.models.aggregators.boq import BoQAggregator
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.config import load_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "config" / "models"


def _meta_model(name: str):
    with torch.device("meta"):
        return build_model(model_config_from_dict(load_yaml(CONFIGS / name), source=name))


def test_dinov2_b_config_has_the_published_size() -> None:
    """QAA's comparison table lists BoQ (DINOv2-B) at 8.6M parameters; the release's
    configuration (3x3 projection 768->384, 2 blocks x 64 queries, row dim 32) gives 8.63M
    and a 12288-D descriptor (the release is named dinov2_12288)."""
    model = _meta_model("boq_dinov2b.yaml")
    n = sum(p.numel() for p in model.aggregator.parameters())
    assert abs(n - 8.6e6) / 8.6e6 < 0.01, n
    assert n == 8_626_080
    assert model.descriptor_dim == 12288
    assert model.backbone.final_norm is False            # the release skips DINOv2's last norm
    heads = {blk.cross_attn.num_heads for blk in model.aggregator.boqs}
    assert heads == {6}                                   # proj_channels // 64


def test_small_cpu_config_builds_at_1024_d() -> None:
    model = _meta_model("boq_effnetlite0.yaml")
    assert model.descriptor_dim == 1024
    assert not any(p.requires_grad for p in model.backbone.parameters())


def _ln(x: torch.Tensor, mod: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def _mha(q: torch.Tensor, kv: torch.Tensor, attn: torch.nn.MultiheadAttention) -> torch.Tensor:
    """Multi-head attention of one sample, head by head, from the module's raw weights."""
    d = q.shape[-1]
    w_q, w_k, w_v = attn.in_proj_weight.split(d)
    b_q, b_k, b_v = attn.in_proj_bias.split(d)
    qq, kk, vv = q @ w_q.T + b_q, kv @ w_k.T + b_k, kv @ w_v.T + b_v
    hd = d // attn.num_heads
    heads = []
    for h in range(attn.num_heads):
        s = slice(h * hd, (h + 1) * hd)
        heads.append(torch.softmax(qq[:, s] @ kk[:, s].T / hd ** 0.5, dim=-1) @ vv[:, s])
    return torch.cat(heads, dim=1) @ attn.out_proj.weight.T + attn.out_proj.bias


def reference_boq(agg: BoQAggregator, x: torch.Tensor) -> torch.Tensor:
    """The released BoQ forward written out per sample (post-norm encoder, ReLU, 4x MLP)."""
    feats = F.conv2d(x, agg.proj_c.weight, agg.proj_c.bias, padding=agg.proj_c.padding)
    results = []
    for b in range(x.shape[0]):
        tokens = _ln(feats[b].flatten(1).T, agg.norm_input)           # (N, P)
        outs = []
        for blk in agg.boqs:
            enc = blk.encoder
            tokens = _ln(tokens + _mha(tokens, tokens, enc.self_attn), enc.norm1)
            hidden = torch.relu(tokens @ enc.linear1.weight.T + enc.linear1.bias)
            tokens = _ln(tokens + hidden @ enc.linear2.weight.T + enc.linear2.bias, enc.norm2)
            q = blk.queries[0]
            q = _ln(q + _mha(q, q, blk.self_attn), blk.norm_q)
            outs.append(_ln(_mha(q, tokens, blk.cross_attn), blk.norm_out))
        o = torch.cat(outs, dim=0)                                     # (L*Q, P)
        rows = torch.stack([o.T @ agg.fc.weight[r] + agg.fc.bias[r]
                            for r in range(agg.fc.out_features)], dim=1)  # (P, row_dim)
        flat = rows.flatten()                                          # channel-major
        results.append(flat / flat.norm())
    return torch.stack(results)


def _tiny(**kw) -> BoQAggregator:
    params = dict(proj_channels=32, num_queries=5, num_layers=2, row_dim=3, num_heads=4)
    params.update(kw)
    return BoQAggregator(in_channels=24, **params)


def test_fast_path_matches_the_restated_release_forward() -> None:
    torch.manual_seed(0)
    agg = _tiny().eval()
    x = torch.randn(3, 24, 4, 5)
    with torch.no_grad():
        fast = agg(BackboneOutput(x))
        ref = reference_boq(agg, x)
    assert fast.shape == (3, 32 * 3) and agg.out_dim == 96
    torch.testing.assert_close(fast.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)
    agg.train()                                   # the training path computes the same function
    torch.testing.assert_close(agg(BackboneOutput(x)).detach(), ref, atol=2e-5, rtol=1e-4)


def test_query_cache_reused_invalidated_and_off_in_training() -> None:
    torch.manual_seed(0)
    agg = _tiny().eval()
    x = BackboneOutput(torch.randn(2, 24, 3, 3))
    with torch.no_grad():
        first = agg(x)
        cached = agg.block_queries()
        assert agg.block_queries()[1] is cached[1]           # reused, not recomputed
        agg.boqs[1].norm_q.bias.add_(0.3)                    # in-place update: stale cache
        assert agg.block_queries()[1] is not cached[1]
        second = agg(x)
    assert not torch.allclose(first, second)
    agg.train()
    agg(x).sum().backward()
    assert agg.boqs[0].queries.grad is not None and agg.boqs[0].self_attn.in_proj_weight.grad \
        is not None
    assert agg._query_cache is None


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        BoQAggregator(in_channels=8, proj_channels=30, num_heads=4)
    with pytest.raises(ValueError, match="proj_kernel"):
        BoQAggregator(in_channels=8, proj_channels=64, proj_kernel=2)
    with pytest.raises(ValueError, match="num_heads explicitly"):
        BoQAggregator(in_channels=8, proj_channels=32)      # 32 // 64 = 0 heads
    with pytest.raises(ValueError, match="row_dim"):
        BoQAggregator(in_channels=8, proj_channels=64, row_dim=0)


class _OnFeatures(torch.nn.Module):
    """The aggregator alone, fed a backbone feature map (the backbones have their own export
    tests; this keeps the check about BoQ's own operators)."""

    def __init__(self, agg: BoQAggregator) -> None:
        super().__init__()
        self.agg = agg

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.agg(BackboneOutput(feats))


def test_onnx_export_matches_torch_in_onnxruntime() -> None:
    """Exported like ``vpr export onnx`` does it (TorchScript exporter, eval mode preserved,
    query cache warm): the refined queries enter the graph as constants, no attention over
    constants is left to run per image, and onnxruntime matches torch on another batch size.
    The fused attention kernels are switched off while tracing, and switched back after."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _OnFeatures(_tiny(num_queries=6)).eval()
    x, batch = torch.randn(2, 24, 5, 6), torch.randn(3, 24, 5, 6)
    buf = io.BytesIO()
    with torch.no_grad():
        model(x)                                               # warms the query cache
        torch.onnx.export(model, (x,), buf, input_names=["features"], output_names=["global"],
                          dynamic_axes={"features": {0: "batch"}, "global": {0: "batch"}},
                          opset_version=17, dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE)
        ref = model(batch).numpy()
    assert torch.backends.mha.get_fastpath_enabled()
    proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(buf.getvalue()),
                                              data_prop=True)
    graph = proto.graph
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param and out_dims[1].dim_value == 96   # (batch, static out_dim)
    const = {i.name for i in graph.initializer}
    idle = []
    for node in graph.node:                                    # nodes fed by constants only
        if node.op_type == "Constant" or all(i in const for i in node.input if i):
            const.update(node.output)
            if node.op_type != "Constant":
                idle.append(node.op_type)
    assert not set(idle) & {"MatMul", "Gemm", "Softmax", "LayerNormalization"}, idle
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"features": batch.numpy()})[0]
    assert out.shape == ref.shape == (3, 96)
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(out, ref, atol=1e-5)
