"""Backend choice: the auto order as a pure function of what is installed, and the artifact
kinds load_encoder accepts, with clear refusals for impossible combinations."""

from __future__ import annotations

from pathlib import Path

import pytest

from vpr_ros.errors import BackendError, MapMismatchError
from vpr_ros.runtime.backend_select import (Availability, artifact_kind, check_expected_fingerprint,
                                            descriptor_fingerprint, parse_device, plan_backends,
                                            probe)

CPU_ONLY = Availability(torch_cuda=False, ort_providers=("CPUExecutionProvider",),
                        tensorrt=False, notes=("torch sees no CUDA GPU",))
GPU_FULL = Availability(torch_cuda=True, tensorrt=True,
                        ort_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                       "CPUExecutionProvider"))
GPU_TORCH_ONLY = Availability(torch_cuda=True, ort_providers=("CPUExecutionProvider",))


def _names(plan) -> list[str]:
    return [f"{c.backend}:{c.device}:{dict(c.options).get('provider', '')}"
            f"{dict(c.options).get('precision', '')}" for c in plan]


def test_auto_order_fastest_first() -> None:
    # engine: TensorRT only
    assert _names(plan_backends("engine", "auto", None, GPU_FULL)) == ["tensorrt:cuda:0:"]
    # ONNX file on a full GPU machine: ORT TensorRT EP > ORT CUDA EP > ORT CPU
    assert _names(plan_backends("onnx", "auto", None, GPU_FULL)) == [
        "onnxruntime:cuda:0:tensorrt", "onnxruntime:cuda:0:cuda", "onnxruntime:cpu:cpu"]
    # model dir: ORT GPU (through the export cache) > torch CUDA fp16 > ORT CPU > torch CPU
    assert _names(plan_backends("model_dir", "auto", None, GPU_FULL)) == [
        "onnxruntime:cuda:0:tensorrt", "onnxruntime:cuda:0:cuda", "torch:cuda:0:fp16",
        "onnxruntime:cpu:cpu", "torch:cpu:"]
    assert _names(plan_backends("model_dir", "auto", None, GPU_TORCH_ONLY)) == [
        "torch:cuda:0:fp16", "onnxruntime:cpu:cpu", "torch:cpu:"]
    # CPU-only machine: ORT CPU > torch CPU; without the export cache torch only
    assert _names(plan_backends("model_dir", "auto", None, CPU_ONLY)) == [
        "onnxruntime:cpu:cpu", "torch:cpu:"]
    assert _names(plan_backends("model_dir", "auto", None, CPU_ONLY, export_cache=False)) == [
        "torch:cpu:"]
    # an explicit device narrows auto to that device
    assert _names(plan_backends("model_dir", "auto", "cpu", GPU_FULL)) == [
        "onnxruntime:cpu:cpu", "torch:cpu:"]
    assert _names(plan_backends("onnx", "auto", "cuda:1", GPU_FULL))[0] == \
        "onnxruntime:cuda:1:tensorrt"


def test_impossible_choices_are_refused_with_the_way_out() -> None:
    with pytest.raises(BackendError, match="tensorrt package and a CUDA GPU.*onnx"):
        plan_backends("engine", "auto", None, CPU_ONLY)
    with pytest.raises(BackendError, match="runs model directories"):
        plan_backends("onnx", "torch", "cpu", CPU_ONLY)
    with pytest.raises(BackendError, match="cannot run a TensorRT engine"):
        plan_backends("engine", "onnxruntime", None, GPU_FULL)
    with pytest.raises(BackendError, match="vpr export tensorrt"):
        plan_backends("onnx", "tensorrt", None, GPU_FULL)
    with pytest.raises(BackendError, match="CUDA device"):
        plan_backends("engine", "tensorrt", "cpu", GPU_FULL)
    with pytest.raises(BackendError, match="unknown backend"):
        plan_backends("onnx", "tpu", None, GPU_FULL)
    with pytest.raises(BackendError, match="no backend can run"):
        plan_backends("onnx", "auto", "cuda", CPU_ONLY)
    with pytest.raises(BackendError, match="not one of cpu, cuda"):
        parse_device("npu")
    assert parse_device("cuda:2") == ("cuda", 2) and parse_device(None) == ("cpu", 0)


def test_artifact_kinds(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.json").write_text("{}")
    (tmp_path / "f.onnx").write_bytes(b"")
    (tmp_path / "f.plan").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.pt").write_bytes(b"")
    assert artifact_kind(tmp_path / "m") == "model_dir"
    assert artifact_kind(tmp_path / "f.onnx") == "onnx"
    assert artifact_kind(tmp_path / "f.plan") == "engine"
    with pytest.raises(BackendError, match="without model.json"):
        artifact_kind(tmp_path / "empty")
    with pytest.raises(BackendError, match="unknown model artifact"):
        artifact_kind(tmp_path / "x.pt")
    with pytest.raises(BackendError, match="no such"):
        artifact_kind(tmp_path / "missing.onnx")


def test_fingerprints() -> None:
    check_expected_fingerprint("abc", None, "x")
    check_expected_fingerprint("abc", "abc", "x")
    with pytest.raises(MapMismatchError, match="abc.*but def was expected"):
        check_expected_fingerprint("abc", "def", "x.onnx")
    fp = "0123456789abcdef01234567"
    assert descriptor_fingerprint(fp, (322, 322), (322, 322)) == fp
    other = descriptor_fingerprint(fp, (224, 224), (322, 322))
    assert other != fp and len(other) == 24
    assert descriptor_fingerprint(fp, (224, 224), (322, 322)) == other  # deterministic


def test_load_encoder_torch_model_dir_with_expected_fingerprint(effnet_gem_model_dir) -> None:
    from vpr_ros.models.model_dir import read_model_meta
    from vpr_ros.runtime.encoder import load_encoder

    fp = read_model_meta(effnet_gem_model_dir).fingerprint
    enc = load_encoder(effnet_gem_model_dir, backend="torch", expected_fingerprint=fp)
    assert enc.backend == "torch-cpu-fp32" and enc.fingerprint == fp
    # on the CPU preprocessing stays the shared numpy path (the node times it separately)
    from vpr_ros.runtime.encoder import Encoder

    assert type(enc).encode is Encoder.encode
    with pytest.raises(MapMismatchError, match="was expected"):
        load_encoder(effnet_gem_model_dir, backend="torch", expected_fingerprint="f" * 24)
    with pytest.raises(BackendError, match="runs model directories"):
        load_encoder(_write(effnet_gem_model_dir.parent / "x.onnx"), backend="torch")
    avail = probe()
    if not (avail.tensorrt and avail.torch_cuda):   # here: say why an engine cannot run
        with pytest.raises(BackendError, match="tensorrt package and a CUDA GPU"):
            load_encoder(_write(effnet_gem_model_dir.parent / "x.engine"), backend="auto")


def _write(p: Path) -> Path:
    p.write_bytes(b"not a model")
    return p
