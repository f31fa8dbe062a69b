"""Bad input never becomes silent garbage: wrong model, wrong file, wrong images, NaN outputs.

ONNX cases use small hand-built graphs carrying real vpr_ros metadata, so each test runs the
real OnnxEncoder in milliseconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from vpr_ros.errors import BackendError, InputError, MapMismatchError
from vpr_ros.runtime.encoder import check_outputs, load_encoder
from vpr_ros.runtime.onnx_encoder import ArtifactMeta, OnnxEncoder

FP = "a" * 24
SIZE = (16, 16)


def _meta(**kw) -> ArtifactMeta:
    base = dict(fingerprint=FP, model_fingerprint=FP, model_name="pool", descriptor_dim=4,
                input_size=SIZE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                resize="stretch")
    base.update(kw)
    return ArtifactMeta(**base)


def write_pool_model(path: Path, meta: ArtifactMeta | None = _meta(), nan: bool = False,
                     hw: tuple[int, int] = SIZE, dim: int = 4) -> Path:
    """images (B, 3, H, W) -> mean colour @ W (3 x dim) -> L2-normalised 'global'."""
    w = np.arange(1, 3 * dim + 1, dtype=np.float32).reshape(3, dim) / 10
    if nan:
        w[0, 0] = np.nan
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["m"]),
             helper.make_node("LpNormalization", ["m"], ["global"], axis=1, p=2)]
    graph = helper.make_graph(
        nodes, "pool",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, *hw])],
        [helper.make_tensor_value_info("global", TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if meta is not None:
        for k, v in meta.to_props().items():
            e = model.metadata_props.add()
            e.key, e.value = k, v
    onnx.save(model, str(path))
    return path


def test_the_fixture_graph_works(tmp_path: Path) -> None:
    enc = OnnxEncoder(write_pool_model(tmp_path / "ok.onnx"))
    out = enc.encode([np.full((30, 40, 3), 200, np.uint8), np.zeros((8, 8, 3), np.uint8)])
    assert out.shape == (2, 4) and enc.backend == "onnxruntime-cpu" and enc.fingerprint == FP
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_onnx_of_another_model_than_the_map_is_refused(tmp_path: Path) -> None:
    path = write_pool_model(tmp_path / "m.onnx")
    assert load_encoder(path, backend="onnxruntime", expected_fingerprint=FP).fingerprint == FP
    with pytest.raises(MapMismatchError, match=f"{FP}.*but {'b' * 24} was expected"):
        load_encoder(path, backend="auto", expected_fingerprint="b" * 24)


def test_options_for_another_backend(tmp_path: Path) -> None:
    """Named explicitly, a backend refuses options it does not take; auto drops those meant
    for other candidates (the same call must work whichever backend wins)."""
    path = write_pool_model(tmp_path / "m.onnx")
    with pytest.raises(BackendError, match=r"has no precision 'fp16' \(it has fp32, int8\)"):
        load_encoder(path, backend="onnxruntime", precision="fp16")
    with pytest.raises(BackendError, match=r"does not take option\(s\) \['spin'\]"):
        load_encoder(path, backend="openvino", spin=True)
    with pytest.raises(BackendError, match=r"asked for with precision='fp32'"):
        load_encoder(path, backend="openvino:bf16", precision="fp32")
    enc = load_encoder(path, backend="auto", device="cpu", precision="fp16", spin=False,
                       threads=1)
    assert enc.backend_choice.split(":")[0] in ("onnxruntime", "openvino")
    assert enc.backend_note.startswith("auto: ")


def test_files_that_are_not_our_exports(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="no vpr_ros metadata"):
        OnnxEncoder(write_pool_model(tmp_path / "plain.onnx", meta=None))
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BackendError, match="cannot load it"):
        OnnxEncoder(tmp_path / "junk.onnx")
    with pytest.raises(BackendError, match="input shape"):   # metadata says 16x16, graph 20x20
        OnnxEncoder(write_pool_model(tmp_path / "size.onnx", hw=(20, 20)))
    with pytest.raises(BackendError, match="'global' has shape"):
        OnnxEncoder(write_pool_model(tmp_path / "dim.onnx", meta=_meta(descriptor_dim=8)))
    with pytest.raises(BackendError, match="do not match the metadata"):
        OnnxEncoder(write_pool_model(tmp_path / "outs.onnx",
                                     meta=_meta(outputs=("global", "binary"))))
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():  # CPU-only build
        with pytest.raises(BackendError, match="TensorrtExecutionProvider is not available"):
            OnnxEncoder(write_pool_model(tmp_path / "p.onnx"), device="cuda",
                        provider="tensorrt")


def test_images_of_the_wrong_shape_or_dtype(tmp_path: Path) -> None:
    enc = OnnxEncoder(write_pool_model(tmp_path / "m.onnx"))
    with pytest.raises(InputError, match="dtype uint8"):
        enc.encode([np.zeros((16, 16, 3), np.float32)])
    with pytest.raises(InputError, match=r"shape \(H, W, 3\)"):
        enc.encode([np.zeros((16, 16, 4), np.uint8)])
    with pytest.raises(InputError, match=r"\(B, H, W, 3\) array"):
        enc.encode(np.zeros((16, 16, 3), np.uint8))    # one image without the batch axis
    with pytest.raises(InputError, match=r"preprocessed \(B, 3, 16, 16\) float32"):
        enc.encode_preprocessed(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"preprocessed \(B, 3, 16, 16\) float32"):
        enc.encode_preprocessed(np.zeros((2, 3, 16, 16), np.float64))


def test_nan_outputs_are_refused_on_every_path(tmp_path: Path, effnet_gem_model_dir) -> None:
    enc = OnnxEncoder(write_pool_model(tmp_path / "nan.onnx", nan=True))
    img = [np.full((16, 16, 3), 100, np.uint8)]
    with pytest.raises(InputError, match="NaN/Inf descriptors"):
        enc.encode(img)
    with pytest.raises(InputError, match="NaN/Inf descriptors"):
        enc.encode_all(img)
    # the PyTorch backend with a corrupted weight
    from vpr_ros.models.model_dir import load_model_dir
    from vpr_ros.runtime.torch_encoder import TorchEncoder

    model, meta = load_model_dir(effnet_gem_model_dir)
    with torch.no_grad():
        model.aggregator.p.fill_(float("nan"))
    with pytest.raises(InputError, match="NaN/Inf descriptors"):
        TorchEncoder(model, meta).encode(img)
    # extra outputs are held to the same standard
    good = np.eye(2, 4, dtype=np.float32)
    with pytest.raises(InputError, match="NaN/Inf in output 'local'"):
        check_outputs({"global": good, "local": np.full((2, 3), np.nan, np.float32)}, 2, 4, "x")
    with pytest.raises(BackendError, match="output 'binary' of shape"):
        check_outputs({"global": good, "binary": np.zeros((3, 2), np.uint8)}, 2, 4, "x")
    assert check_outputs({"global": good, "binary": np.zeros((2, 2), np.uint8)}, 2, 4,
                         "x")["binary"].dtype == np.uint8


def test_torch_tensor_batches_are_checked(effnet_gem_model_dir) -> None:
    enc = load_encoder(effnet_gem_model_dir, backend="torch")
    with pytest.raises(InputError, match=r"preprocessed \(B, 3, 224, 224\)"):
        enc.encode_tensor(torch.zeros(1, 3, 100, 100))
    with pytest.raises(InputError, match="floating-point"):
        enc.encode_tensor(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
