"""TensorRT: the sidecar and its refusal logic everywhere (fabricated sidecars), the engine
itself wherever `tensorrt` imports next to a CUDA GPU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.errors import BackendError, ExportError, MapMismatchError
from vpr_ros.runtime.onnx_encoder import ArtifactMeta
from vpr_ros.runtime.tensorrt_encoder import (EngineSidecar, TensorRTEncoder, check_engine_compat,
                                              file_sha256, read_sidecar, sidecar_path,
                                              write_sidecar)

FP = "c" * 24


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _sidecar(**kw) -> EngineSidecar:
    meta = ArtifactMeta(fingerprint=FP, model_fingerprint=FP, model_name="m", descriptor_dim=8,
                        input_size=(224, 224), mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225), resize="stretch")
    base = dict(meta=meta, tensorrt_version="10.3.0", gpu_name="NVIDIA Jetson AGX Orin",
                compute_capability="8.7", min_batch=1, max_batch=8, precision="fp16",
                engine_sha256="0" * 64)
    base.update(kw)
    return EngineSidecar(**base)


def test_compat_refuses_other_tensorrt_versions_and_gpu_architectures() -> None:
    side = _sidecar()
    assert check_engine_compat(side, "10.3.0", "NVIDIA Jetson AGX Orin", "8.7") == []
    with pytest.raises(BackendError, match=r"TensorRT 10\.3\.0 .* cannot run with TensorRT "
                                           r"10\.8\.0.*Rebuild"):
        check_engine_compat(side, "10.8.0", "NVIDIA Jetson AGX Orin", "8.7")
    with pytest.raises(BackendError, match=r"cannot run on NVIDIA H100 80GB HBM3 \(compute "
                                           r"capability 9\.0\)"):
        check_engine_compat(side, "10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
    # same architecture, another card: runs, with a warning to rebuild for latency
    warnings = check_engine_compat(_sidecar(gpu_name="NVIDIA RTX A6000", compute_capability="8.6"),
                                   "10.3.0", "NVIDIA GeForce RTX 3090", "8.6")
    assert len(warnings) == 1 and "rebuild here" in warnings[0]


def test_sidecar_round_trip_and_damage(tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine bytes")
    side = _sidecar(engine_sha256=file_sha256(engine))
    assert write_sidecar(engine, side) == sidecar_path(engine) == tmp_path / "m.engine.json"
    assert read_sidecar(engine) == side
    doc = json.loads(sidecar_path(engine).read_text())
    assert doc["model"]["fingerprint"] == FP and doc["tensorrt_version"] == "10.3.0"
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(BackendError, match="not valid JSON"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({**doc, "format": "other"}))
    with pytest.raises(BackendError, match="not a vpr_ros TensorRT sidecar"):
        read_sidecar(engine)
    del doc["max_batch"]
    sidecar_path(engine).write_text(json.dumps(doc))
    with pytest.raises(BackendError, match="incomplete"):
        read_sidecar(engine)
    sidecar_path(engine).unlink()
    with pytest.raises(BackendError, match="sidecar m.engine.json is missing"):
        read_sidecar(engine)


def test_encoder_refuses_before_touching_tensorrt(tmp_path: Path) -> None:
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"engine bytes")
    write_sidecar(engine, _sidecar(engine_sha256=file_sha256(engine)))
    with pytest.raises(MapMismatchError, match="was expected"):
        TensorRTEncoder(engine, expected_fingerprint="d" * 24)
    with pytest.raises(BackendError, match="CUDA device"):
        TensorRTEncoder(engine, device="cpu")
    engine.write_bytes(b"another engine")
    with pytest.raises(BackendError, match="does not match its sidecar"):
        TensorRTEncoder(engine)
    if not _has_tensorrt():
        write_sidecar(engine, _sidecar(engine_sha256=file_sha256(engine)))
        with pytest.raises(BackendError, match="tensorrt"):
            TensorRTEncoder(engine)


@pytest.mark.skipif(_has_tensorrt(), reason="tensorrt is installed: the real build runs below")
def test_build_without_tensorrt_says_what_is_needed(tmp_path: Path) -> None:
    from vpr_ros.export.tensorrt_build import build_engine

    with pytest.raises(ExportError, match="needs NVIDIA's 'tensorrt'.*onnxruntime"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")
    with pytest.raises(ExportError, match="opt batch"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", max_batch=2, opt_batch=4)


@pytest.mark.skipif(not _has_tensorrt(),
                    reason="TensorRT cannot be installed here (no tensorrt package / CUDA GPU); "
                    "the engine build and its parity run wherever both exist")
def test_engine_matches_onnxruntime_in_fp16(effnet_qaa_model_dir, nordland_pairs, tmp_path,
                                            tmp_path_factory) -> None:
    import tensorrt as trt
    import torch

    from vpr_ros.export.parity import FP16_MIN_COSINE, encoder_parity, require
    from vpr_ros.export.tensorrt_build import build_engine
    from vpr_ros.runtime.backend_select import cached_onnx
    from vpr_ros.runtime.encoder import load_encoder

    onnx_path = cached_onnx(effnet_qaa_model_dir,
                            tmp_path_factory.getbasetemp() / "vpr_backends" / "exports")
    engine = tmp_path / "m.engine"
    side = build_engine(onnx_path, engine, max_batch=8, workspace_gb=2,
                        timing_cache=tmp_path / "timing.cache")
    assert side.tensorrt_version == trt.__version__ and (tmp_path / "timing.cache").is_file()
    trt_enc = load_encoder(engine, backend="auto")
    ort_enc = load_encoder(onnx_path, backend="onnxruntime", device="cpu")
    assert trt_enc.backend == "tensorrt-fp16" and trt_enc.fingerprint == ort_enc.fingerprint
    summer, winter = nordland_pairs
    require(encoder_parity(ort_enc, trt_enc, summer, winter), FP16_MIN_COSINE,
            "tensorrt fp16 vs onnxruntime", top1_agreement=0.95)
    x = torch.from_numpy(ort_enc.preprocess(summer[:12])).cuda()   # > max batch: chunked
    out = trt_enc.encode_tensor(x)
    assert out.is_cuda and out.shape == (12, trt_enc.dim)
    # an engine said to come from another TensorRT version is refused
    doc = dataclasses.replace(side, tensorrt_version="0.0.1")
    write_sidecar(engine, doc)
    with pytest.raises(BackendError, match="tied to the TensorRT version"):
        load_encoder(engine, backend="tensorrt")
    assert np.isfinite(out.cpu().numpy()).all()
