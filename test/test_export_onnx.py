"""`vpr export onnx`: one checked graph per model, with the promised properties.

Real models (EfficientNet-Lite0 + QAA, DINOv2-S/14 + QAA at 112 px) are exported once per
session into a shared folder (the parity tests reuse the files); properties that need odd
models (extra outputs, NaN weights) use a tiny registered CNN so they cost a second each."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from vpr_ros.errors import ExportError
from vpr_ros.export.onnx_export import (TENSORRT_OPS, check_onnx_graph, constant_only_nodes,
                                        export_model_onnx, export_onnx, mha_fastpath_disabled)
from vpr_ros.models.backbones.base import Backbone, BackboneOutput
from vpr_ros.models.registry import AGGREGATORS, BACKBONES, register_aggregator, \
    register_backbone
from vpr_ros.runtime.backend_select import cached_onnx
from vpr_ros.runtime.onnx_encoder import OnnxEncoder, read_onnx_metadata

from backend_models import dino_qaa_model_dir, shared_dirs  # noqa: E402



# -- shared real exports (same folders as test_backends_parity.py) -----------------------------



def dino_qaa_dir(factory: pytest.TempPathFactory) -> Path:
    return dino_qaa_model_dir(factory)


@pytest.fixture(scope="module")
def effnet_qaa_onnx(effnet_qaa_model_dir, tmp_path_factory) -> Path:
    return cached_onnx(effnet_qaa_model_dir, shared_dirs(tmp_path_factory)[1])


@pytest.fixture(scope="module")
def dino_qaa_onnx(tmp_path_factory) -> Path:
    return cached_onnx(dino_qaa_dir(tmp_path_factory), shared_dirs(tmp_path_factory)[1])


# -- a tiny model with extra outputs ------------------------------------------------------------

class TinyCNN(Backbone):
    """Two strided convolutions: enough structure for an export test, milliseconds to run."""

    stride = 4

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.out_channels = width
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, 2, 1))

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        return BackboneOutput(features=self.net(images))


class TwoHeads(nn.Module):
    """Global descriptor + packed sign bits ("binary", uint8) + dense features ("local")."""

    def __init__(self, in_channels: int, dim: int = 24, bits: int = 16) -> None:
        super().__init__()
        self.out_dim = dim
        self.glob = nn.Linear(in_channels, dim)
        self.hash = nn.Linear(in_channels, bits)
        self.local = nn.Conv2d(in_channels, 8, 1)
        self.extra_outputs = ("binary", "local")
        self.register_buffer("bit_weights", 2 ** torch.arange(7, -1, -1, dtype=torch.int32))

    def forward(self, x: BackboneOutput) -> torch.Tensor:
        return F.normalize(self.glob(x.features.mean(dim=(2, 3))), dim=-1)

    def forward_all(self, x: BackboneOutput) -> dict[str, torch.Tensor]:
        z = self.hash(x.features.mean(dim=(2, 3)))
        bits = (z > 0).to(torch.int32).reshape(z.shape[0], -1, 8)
        packed = (bits * self.bit_weights).sum(-1).to(torch.uint8)
        local = self.local(x.features).permute(0, 2, 3, 1)
        return {"global": self.forward(x), "binary": packed, "local": local}


if "test_tiny_cnn" not in BACKBONES:
    register_backbone("test_tiny_cnn")(TinyCNN)
if "test_two_heads" not in AGGREGATORS:
    register_aggregator("test_two_heads")(TwoHeads)


def tiny_model(size: int = 48, seed: int = 0):
    from vpr_ros.models.config import model_config_from_dict
    from vpr_ros.models.vpr_model import build_model

    cfg = model_config_from_dict({"name": "tiny", "backbone": {"name": "test_tiny_cnn"},
                                  "aggregator": {"name": "test_two_heads"},
                                  "input": {"size": [size, size]}})
    torch.manual_seed(seed)
    return build_model(cfg)


@pytest.fixture()
def tiny_model_dir(tmp_path: Path) -> Path:
    from vpr_ros.models.model_dir import save_model_dir

    save_model_dir(tiny_model(), tmp_path / "tiny")
    return tmp_path / "tiny"


# -- the real graphs ----------------------------------------------------------------------------

def _run(path: Path, batch: int) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = read_onnx_metadata(path)
    x = np.random.default_rng(batch).standard_normal((batch, 3, *meta.input_size))
    return sess.run(None, {"images": x.astype(np.float32)})


def test_effnet_qaa_graph(effnet_qaa_onnx: Path, effnet_qaa_model_dir: Path) -> None:
    from vpr_ros.models.model_dir import read_model_meta

    model = onnx.load(str(effnet_qaa_onnx))
    report = check_onnx_graph(model, read_onnx_metadata(effnet_qaa_onnx))
    assert report.opset == 17 and report.constant_only == 0
    ops = Counter(n.op_type for n in model.graph.node)
    assert set(ops) <= TENSORRT_OPS and not {"Resize", "Upsample"} & set(ops)
    # Three attention blocks in QAA, two of them image-independent: one Softmax is left.
    assert ops["Softmax"] == 1
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    fp = read_model_meta(effnet_qaa_model_dir).fingerprint
    assert props["fingerprint"] == props["model_fingerprint"] == fp
    assert props["descriptor_dim"] == 1024 and props["input_size"] == [224, 224]
    assert props["mean"] == [0.485, 0.456, 0.406] and props["std"] == [0.229, 0.224, 0.225]
    assert props["resize"] == "stretch" and props["output_names"] == ["global"]
    assert props["interpolation"] == "opencv"
    assert props["vpr_ros_version"] and props["opset"] == 17
    for batch in (1, 3):  # dynamic batch axis
        (glob,) = _run(effnet_qaa_onnx, batch)
        assert glob.shape == (batch, 1024)
        np.testing.assert_allclose(np.linalg.norm(glob, axis=1), 1.0, atol=1e-5)


def test_dinov2_qaa_graph(dino_qaa_onnx: Path) -> None:
    model = onnx.load(str(dino_qaa_onnx))
    report = check_onnx_graph(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert not {"Resize", "Upsample"} & set(ops) and report.constant_only == 0
    assert ops["Softmax"] == 12 + 1                 # 12 ViT blocks + QAA's cross-attention
    assert ops["LayerNormalization"] == 2 * 12 + 1 + 1
    shapes = [tuple(t.dims) for t in model.graph.initializer] + [
        tuple(n.attribute[0].t.dims) for n in model.graph.node if n.op_type == "Constant"]
    assert (1, 1 + 8 * 8, 384) in shapes            # positional embedding for 112 px (8x8)
    assert not any(1 + 37 * 37 in s for s in shapes)  # the 518 px one is not in the graph
    assert (1, 32, 384) in shapes                   # the refined score queries, a constant
    assert _run(dino_qaa_onnx, 2)[0].shape == (2, 256)


# -- the checks can fail ------------------------------------------------------------------------

def _graph(nodes, inits=(), batch="batch", opset=17, out_shape=("batch", 4)):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("global", TensorProto.FLOAT, list(out_shape))
    g = helper.make_graph(nodes, "g", [x], [y], initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _pool_to_global(extra_nodes=(), src="images"):
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", [src], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["global"])]
    return list(extra_nodes) + nodes, [w]


def test_graph_checks_refuse_what_they_promise_to() -> None:
    nodes, inits = _pool_to_global()
    check_onnx_graph(_graph(nodes, inits))          # the plain graph passes
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    resize = helper.make_node("Resize", ["images", "", "scales"], ["r"], mode="linear")
    nodes, inits = _pool_to_global([resize], src="r")
    with pytest.raises(ExportError, match="resizes tensors"):
        check_onnx_graph(_graph(nodes, inits + [scales]))
    q = numpy_helper.from_array(np.ones((4, 4), np.float32), "q")
    idle = [helper.make_node("MatMul", ["q", "q"], ["qq"]),
            helper.make_node("Softmax", ["qq"], ["att"])]
    nodes, inits = _pool_to_global(idle)
    nodes[-1] = helper.make_node("MatMul", ["f", "att"], ["m"])
    nodes.append(helper.make_node("MatMul", ["m", "att"], ["global"]))
    with pytest.raises(ExportError, match="image-independent"):
        check_onnx_graph(_graph(nodes, [q]))
    nodes, inits = _pool_to_global([helper.make_node("Hardmax", ["images"], ["h"])], src="h")
    with pytest.raises(ExportError, match=r"\['Hardmax'\].*TensorRT"):
        check_onnx_graph(_graph(nodes, inits))
    nodes, inits = _pool_to_global()
    with pytest.raises(ExportError, match="only the batch"):
        check_onnx_graph(_graph(nodes, inits, batch=2, out_shape=(2, 4)))
    with pytest.raises(ExportError, match="opset 12"):
        check_onnx_graph(_graph(nodes, inits, opset=12))


def test_unfolded_query_bank_is_detected() -> None:
    """A real QAA query bank traced without the cache: the check names the leftover work."""
    from vpr_ros.models.aggregators.qaa import QueryBank

    class AddsBank(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bank = QueryBank(8, 4, 2)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images.mean(dim=(2, 3)).repeat(1, 3)[:, :8] + self.bank()[0].sum(0)

    path = Path(__import__("tempfile").mkdtemp()) / "bank.onnx"
    with torch.no_grad(), mha_fastpath_disabled():
        torch.onnx.export(AddsBank().eval(), (torch.randn(2, 3, 8, 8),), str(path), dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["global"],
                          dynamic_axes={"images": {0: "batch"}, "global": {0: "batch"}},
                          do_constant_folding=False)
    model = onnx.load(str(path))
    assert any(n.op_type == "Softmax" for n in constant_only_nodes(model.graph))
    with pytest.raises(ExportError, match="query banks were not folded"):
        check_onnx_graph(model)


# -- extra outputs, sizes, CLI ------------------------------------------------------------------

def test_extra_outputs_become_named_graph_outputs(tiny_model_dir: Path,
                                                  nordland_pairs) -> None:
    from vpr_ros.runtime.torch_encoder import TorchEncoder

    out = tiny_model_dir.parent / "tiny.onnx"
    meta = export_onnx(tiny_model_dir, out)            # verify=True: parity of every output
    assert meta.outputs == ("global", "binary", "local")
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == ["global", "binary", "local"]
    assert model.graph.output[1].type.tensor_type.elem_type == TensorProto.UINT8
    ort_enc = OnnxEncoder(out)
    torch_enc = TorchEncoder.from_model_dir(tiny_model_dir)
    images = nordland_pairs[0][:6]
    got, ref = ort_enc.encode_all(images), torch_enc.encode_all(images)
    assert set(got) == set(ref) == {"global", "binary", "local"}
    assert got["binary"].dtype == np.uint8 and got["binary"].shape == (6, 2)
    assert got["local"].shape == (6, 12, 12, 8)
    np.testing.assert_allclose(got["global"], ref["global"], atol=1e-5)
    np.testing.assert_array_equal(got["binary"], ref["binary"])
    np.testing.assert_allclose(got["local"], ref["local"], atol=1e-4)


def test_export_parity_refuses_a_file_that_does_not_reproduce_its_model(
        tiny_model_dir: Path) -> None:
    """The exporter's own parity run (plain ONNX Runtime against PyTorch, nothing from the
    runtime package) accepts the file it wrote and refuses it for a model whose weights
    changed since."""
    from vpr_ros.export.parity import verify_onnx_export
    from vpr_ros.models.model_dir import load_model_dir

    out = tiny_model_dir.parent / "tiny_parity.onnx"
    export_onnx(tiny_model_dir, out, verify=False)
    model, _ = load_model_dir(tiny_model_dir)
    model.fix_input_size()
    report = verify_onnx_export(model.eval(), out)
    assert report.min_cosine >= 0.9999 and report.images == 2
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    with pytest.raises(ExportError, match="cosine with PyTorch|differs between"):
        verify_onnx_export(model, out)


def test_other_size_gets_its_own_fingerprint(tiny_model_dir: Path) -> None:
    from vpr_ros.models.model_dir import read_model_meta

    fp = read_model_meta(tiny_model_dir).fingerprint
    meta = export_onnx(tiny_model_dir, tiny_model_dir.parent / "t64.onnx", size=64,
                       verify=False)
    assert meta.input_size == (64, 64) and meta.model_fingerprint == fp
    assert meta.fingerprint != fp
    assert export_onnx(tiny_model_dir, tiny_model_dir.parent / "t48.onnx",
                       verify=False).fingerprint == fp
    with pytest.raises(Exception, match="multiples of 14"):
        export_model_onnx(_dino_like(), tiny_model_dir.parent / "x.onnx",
                          model_fingerprint=fp, size=100)


def _dino_like():
    from vpr_ros.models.config import model_config_from_dict
    from vpr_ros.models.vpr_model import build_model

    return build_model(model_config_from_dict({
        "backbone": {"name": "dinov2", "params": {"arch": "vits14"}},
        "aggregator": {"name": "gem"}, "input": {"size": [56, 56]}}))


def test_cli_export_onnx(tiny_model_dir: Path, capsys) -> None:
    from vpr_ros.cli import main

    out = tiny_model_dir.parent / "cli.onnx"
    assert main(["export", "onnx", str(tiny_model_dir), "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["output_names"] == ["global", "binary", "local"] and out.is_file()
    assert main(["export", "onnx", str(tiny_model_dir), "-o", str(out), "--opset", "11"]) == 2
    assert "opset 11" in capsys.readouterr().err


def test_fused_attention_for_onnxruntime_matches_the_plain_graph(dino_qaa_onnx: Path) -> None:
    """ONNX Runtime runs the 12 ViT attentions as fused ops (in memory; the file stays plain
    ONNX for TensorRT) with the same descriptors. The test model has trained-like layer scales,
    so attention really shapes its output."""
    fused, plain = OnnxEncoder(dino_qaa_onnx), OnnxEncoder(dino_qaa_onnx, fuse_attention=False)
    assert fused.fused_attention == 12 and plain.fused_attention == 0
    assert not any(n.domain for n in onnx.load(str(dino_qaa_onnx)).graph.node)
    x = np.random.default_rng(0).standard_normal((3, 3, 112, 112)).astype(np.float32)
    a, b = fused.encode_preprocessed(x)["global"], plain.encode_preprocessed(x)["global"]
    np.testing.assert_allclose(a, b, atol=2e-5)
    # attention shapes this model's output: the same fused graph with a wrong softmax scale
    # is far outside the tolerance used above
    import onnxruntime as ort

    from vpr_ros.runtime.onnx_encoder import fuse_vit_attention

    model = onnx.load(str(dino_qaa_onnx))
    assert fuse_vit_attention(model) == 12
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Attention" and attr.name == "scale":
                attr.f *= 4
    wrong = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    c = wrong.run(None, {"images": x})[0]
    assert np.abs(c - b).max() > 1e-3
