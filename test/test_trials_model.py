"""Adversarial trials on model directories and weight files: edited model.json fields, damaged
weights, pickles, weights that make every image alike, oversized inputs. Each trial asserts a
clear error or a model that loads as a different model (its fingerprint changes, so no map built
with the original accepts it); see ``trials.py``. Counts are seeded and bounded."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vpr_ros.cli import main
from vpr_ros.errors import CheckpointError, ConfigError, ExportError, ModelError, VPRError
from vpr_ros.models.config import MAX_INPUT_SIDE
from vpr_ros.models.model_dir import CONFIG_FILE, WEIGHTS_FILE, read_model_meta
from vpr_ros.models.checkpoints import read_state_dict
from vpr_ros.runtime.encoder import load_encoder

from trials import REMOVE, assert_clear, count, rng, set_field  # noqa: E402


@pytest.fixture()
def model(effnet_gem_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of a real model directory (EfficientNet-Lite0 + GeM)."""
    return Path(shutil.copytree(effnet_gem_model_dir, tmp_path / "model"))


def edit_json(path: Path, edit) -> None:
    doc = json.loads((path / CONFIG_FILE).read_text())
    edit(doc)
    (path / CONFIG_FILE).write_text(json.dumps(doc))


def edit_weights(path: Path, edit) -> None:
    state = load_file(str(path / WEIGHTS_FILE))
    edit(state)
    save_file(state, str(path / WEIGHTS_FILE))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def assert_cli_one_line(rc: int, err: str, what: str) -> None:
    assert rc == 2, f"{what}: exit code {rc}: {err}"
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, f"{what}: {err}"


def load_outcome(path: Path, original_fp: str, what: str) -> str:
    """'error' (clear) or 'other' (loads, as a model with another fingerprint)."""
    try:
        enc = load_encoder(path, backend="torch")
    except VPRError as exc:
        assert_clear(exc, what)
        return "error"
    assert enc.fingerprint != original_fp, f"{what}: loads with the original's fingerprint"
    return "other"


# -- model.json --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000, "\xff\xfe{}", "",
                                  "null", "[1]"])
def test_pathological_model_json(model: Path, text: str, capsys) -> None:
    (model / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        read_model_meta(model)
    assert_clear(err.value, f"model.json of {len(text)} chars")
    assert_cli_one_line(*run_cli(capsys, "model", "info", str(model)), "vpr model info")


def _fields(doc: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in doc.items():
        out.append(prefix + key)
        if isinstance(value, dict):
            out += _fields(value, prefix + key + ".")
    return out


_VALUES = [REMOVE, None, "x", [1], {"a": 1}, -1, 0, 0.5, True, 10 ** 12, [10 ** 12, 10 ** 12]]


def test_model_json_field_edits(model: Path) -> None:
    """Seeded edits of every model.json field (another type, a bad value, removed): each is a
    clear error, or loads as another model (the fingerprint of both files changes)."""
    original = read_model_meta(model).fingerprint
    pristine = (model / CONFIG_FILE).read_text()
    doc = json.loads(pristine)
    g = rng("model.json")
    trials = [(f, _VALUES[i]) for f in _fields(doc)
              for i in g.choice(len(_VALUES), size=2, replace=False)]
    picked = [trials[i] for i in g.choice(len(trials), size=min(len(trials), count(14)),
                                          replace=False)]
    outcomes = []
    for field, value in picked:
        edited = json.loads(pristine)
        set_field(edited, field, value)
        (model / CONFIG_FILE).write_text(json.dumps(edited))
        what = f"model.json {field} = {'removed' if value is REMOVE else repr(value)}"
        outcomes.append(load_outcome(model, original, what))
    assert "error" in outcomes


def test_extra_must_be_a_mapping(model: Path, capsys) -> None:
    """The reported case: ``"extra": [1]`` gave a TypeError traceback."""
    edit_json(model, lambda d: d.update(extra=[1]))
    with pytest.raises(ConfigError, match=r"model.json: 'extra' is \[1\], expected a mapping"):
        read_model_meta(model)
    assert_cli_one_line(*run_cli(capsys, "model", "info", str(model)), "vpr model info")


def test_input_size_has_a_documented_bound(model: Path, tmp_path: Path, capsys) -> None:
    """The reported case: ``input.size: [30000, 30000]`` made an export grow to 17.7 GB."""
    edit_json(model, lambda d: d["input"].update(size=[30000, 30000]))
    with pytest.raises(ConfigError, match=f"largest input side, {MAX_INPUT_SIDE} px"):
        read_model_meta(model)
    rc, err = run_cli(capsys, "export", "onnx", str(model), "-o", str(tmp_path / "m.onnx"))
    assert_cli_one_line(rc, err, "vpr export onnx")
    edit_json(model, lambda d: d["input"].update(size=[224, 224]))
    rc, err = run_cli(capsys, "export", "onnx", str(model), "-o", str(tmp_path / "m.onnx"),
                      "--size", "30000")
    assert_cli_one_line(rc, err, "vpr export onnx --size 30000")
    assert "1024" in err and not (tmp_path / "m.onnx").exists()


# -- weight files ------------------------------------------------------------------------------


def test_weight_file_damage(model: Path) -> None:
    """Seeded byte flips and cuts of model.safetensors (header and data): a clear error or a
    model with another fingerprint, never a traceback."""
    original = read_model_meta(model).fingerprint
    weights = model / WEIGHTS_FILE
    pristine = weights.read_bytes()
    header = 8 + int.from_bytes(pristine[:8], "little")
    g = rng("weights")
    for offset in [*g.integers(0, header, count(4)), *g.integers(header, len(pristine),
                                                                 count(3))]:
        data = bytearray(pristine)
        data[int(offset)] ^= int(g.integers(1, 256))
        weights.write_bytes(bytes(data))
        load_outcome(model, original, f"model.safetensors byte {offset} flipped")
    for keep in [0, 4, 8, header - 1, *g.integers(header, len(pristine), count(2))]:
        weights.write_bytes(pristine[:int(keep)])
        assert load_outcome(model, original, f"model.safetensors cut to {keep}") == "error"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vpr_trial_pickle_ran",))


def test_pickled_pth_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    """The reported case: the refusal quoted torch's advice to retry with weights_only=False."""
    marker = Path("/tmp/vpr_trial_pickle_ran")
    marker.unlink(missing_ok=True)
    pth = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _RunsCode()}, pth)
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(_RunsCode()))
    for path in (pth, raw):
        with pytest.raises(CheckpointError) as err:
            read_state_dict(path)
        assert_clear(err.value, str(path))
        assert "never loaded" in str(err.value) and "weights_only=False" not in str(err.value)
        rc, out = run_cli(capsys, "model", "import", "dinov2", str(path), "--config",
                          "config/models/dinov2s_gem.yaml", "-o", str(tmp_path / "m"))
        assert_cli_one_line(rc, out, "vpr model import dinov2 <pickle>")
    assert not marker.exists()


def _gem_key(state: dict) -> str:
    return next(k for k in state if k.startswith("aggregator.") and k.endswith(".p")
                or k == "aggregator.p")


def test_non_finite_weights_are_refused_everywhere(model: Path, tmp_path: Path,
                                                   capsys) -> None:
    """The reported case: ``aggregator.p = +Inf`` made every image's descriptor alike and
    passed every check, the export's parity run included."""
    edit_weights(model, lambda s: s[_gem_key(s)].fill_(float("inf")))
    with pytest.raises(CheckpointError, match=r"aggregator\.p.* hold NaN or Inf"):
        load_encoder(model, backend="torch")
    for argv in (["model", "info", str(model)],
                 ["export", "onnx", str(model), "-o", str(tmp_path / "m.onnx")]):
        assert_cli_one_line(*run_cli(capsys, *argv), " ".join(argv[:2]))
    assert not (tmp_path / "m.onnx").exists()


def test_collapsed_weights_fail_the_degeneracy_probe(model: Path, tmp_path: Path,
                                                     capsys) -> None:
    """Finite weights that map every image to the same descriptor (the last BatchNorm's scale
    zeroed): refused at load (load_encoder probes whatever backend it opens: the node's
    configure, map building, evaluation) and at export, verified or not."""
    def collapse(state: dict) -> None:
        state["backbone.net.bn2.weight"].zero_()
        state["backbone.net.bn2.bias"].fill_(1.0)

    edit_weights(model, collapse)
    with pytest.raises(ModelError, match="same descriptor for images that share nothing"):
        load_encoder(model, backend="torch")
    rc, err = run_cli(capsys, "export", "onnx", str(model), "-o", str(tmp_path / "m.onnx"),
                      "--no-verify")
    assert_cli_one_line(rc, err, "vpr export onnx --no-verify")


def test_probe_passes_healthy_models_and_costs_two_forward_passes(model: Path) -> None:
    """The probe keeps its outputs: the map layout probe (ModelOutputs) reuses them instead of
    encoding again."""
    from vpr_ros.mapdb.model_outputs import ModelOutputs
    from vpr_ros.models.degeneracy import MAX_PROBE_COSINE, probe_cosine

    enc = load_encoder(model, backend="torch")
    assert enc.probe_outputs is not None and enc.probe_outputs["global"].shape == (2, enc.dim)
    assert probe_cosine(enc.probe_outputs["global"]) < MAX_PROBE_COSINE - 0.05
    calls = []
    original = enc.encode_all
    enc.encode_all = lambda images: calls.append(1) or original(images)
    ModelOutputs.probe(enc)
    assert calls == []


def _tiny_onnx(path: Path, weights: np.ndarray, bias: np.ndarray) -> None:
    """images (N, 3, 16, 16) -> channel means (N, 3) -> x @ weights + bias: a real ONNX graph,
    small enough to build in the test."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["m"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["p"]),
         helper.make_node("Add", ["p", "b"], ["global"])],
        "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("global", TensorProto.FLOAT, ["N", weights.shape[1]])],
        [numpy_helper.from_array(weights.astype(np.float32), "w"),
         numpy_helper.from_array(bias.astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_export_parity_run_refuses_a_degenerate_file(tmp_path: Path) -> None:
    """The export's own verification probes the ONNX file (a degenerate graph agrees with a
    degenerate PyTorch model, so parity alone proves nothing): a graph whose output ignores
    the image is refused, one that depends on it passes."""
    from types import SimpleNamespace

    import onnxruntime as ort

    from vpr_ros.export.parity import _check_probe

    meta = SimpleNamespace(input_size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                           outputs=("global",), input_name="images")
    w = np.random.default_rng(0).standard_normal((3, 8))
    for name, weights, bias, degenerate in (("healthy", w, np.zeros(8), False),
                                            ("constant", 0 * w, np.ones(8), True)):
        path = tmp_path / f"{name}.onnx"
        _tiny_onnx(path, weights, bias)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        if degenerate:
            with pytest.raises(ExportError, match="same descriptor"):
                _check_probe(session, meta, path)
        else:
            _check_probe(session, meta, path)
