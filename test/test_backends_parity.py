"""Same images, same descriptors: ONNX Runtime vs PyTorch on real images through the real
preprocessing (cosine >= 0.9999 per descriptor, identical top-1 retrieval), and CUDA fp16 vs
fp32 where a GPU exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vpr_ros.export.parity import FP16_MIN_COSINE, FP32_MIN_COSINE, encoder_parity, require
from vpr_ros.runtime.backend_select import cached_onnx
from vpr_ros.runtime.encoder import load_encoder

from backend_models import dino_qaa_model_dir, shared_dirs  # noqa: E402





@pytest.fixture(scope="module")
def dino_qaa_dir(tmp_path_factory) -> Path:
    return dino_qaa_model_dir(tmp_path_factory)


def _parity(model_dir: Path, onnx_path: Path, pairs) -> None:
    summer, winter = pairs
    ref = load_encoder(model_dir, backend="torch")
    got = load_encoder(onnx_path, backend="onnxruntime", expected_fingerprint=ref.fingerprint)
    assert got.backend == "onnxruntime-cpu" and got.dim == ref.dim
    report = encoder_parity(ref, got, summer, winter)
    assert report.images == 80
    require(report, FP32_MIN_COSINE, "onnxruntime vs torch", top1_agreement=1.0)
    assert report.min_cosine >= FP32_MIN_COSINE and report.top1_agreement == 1.0


def test_effnet_qaa_onnxruntime_matches_torch(effnet_qaa_model_dir, nordland_pairs,
                                              tmp_path_factory) -> None:
    onnx_path = cached_onnx(effnet_qaa_model_dir, shared_dirs(tmp_path_factory)[1])
    _parity(effnet_qaa_model_dir, onnx_path, nordland_pairs)


def test_dinov2_qaa_onnxruntime_matches_torch(dino_qaa_dir, nordland_pairs,
                                              tmp_path_factory) -> None:
    onnx_path = cached_onnx(dino_qaa_dir, shared_dirs(tmp_path_factory)[1])
    _parity(dino_qaa_dir, onnx_path, nordland_pairs)


def test_parity_tolerances_are_not_vacuous() -> None:
    """cosine 0.999 (an fp16-sized error) fails the fp32 bar; a swapped neighbour fails top-1."""
    from vpr_ros.errors import ExportError
    from vpr_ros.export.parity import compare

    rng = np.random.default_rng(0)
    db = rng.standard_normal((20, 64))
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    noisy = db + 0.045 * rng.standard_normal(db.shape) / 8
    rep = compare(db, noisy)
    assert 0.998 < rep.min_cosine < FP32_MIN_COSINE
    with pytest.raises(ExportError, match="below 0.9999"):
        require(rep, FP32_MIN_COSINE, "x")
    require(rep, 0.998, "x")                       # within a looser bar it passes
    q = db[:5] + 0.01
    swapped = db.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    with pytest.raises(ExportError, match="top-1 retrieval agrees"):
        require(compare(db, swapped, q, q), -1.0, "x")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU on this machine: fp16/CUDA-graph parity needs one "
                    "(CI has none; run on a GPU machine)")
def test_cuda_fp16_matches_fp32(dino_qaa_dir, effnet_qaa_model_dir, nordland_pairs) -> None:
    summer, winter = nordland_pairs
    for model_dir in (effnet_qaa_model_dir, dino_qaa_dir):
        cpu = load_encoder(model_dir, backend="torch", device="cpu")
        fp32 = load_encoder(model_dir, backend="torch", device="cuda", precision="fp32")
        fp16 = load_encoder(model_dir, backend="torch", device="cuda", precision="fp16")
        eager = load_encoder(model_dir, backend="torch", device="cuda", precision="fp16",
                             cuda_graphs=False)
        assert fp16.backend == "torch-cuda-fp16" and fp16.cuda_graphs
        require(encoder_parity(cpu, fp32, summer, winter), FP32_MIN_COSINE, "cuda fp32 vs cpu")
        require(encoder_parity(fp32, fp16, summer, winter), FP16_MIN_COSINE, "fp16 vs fp32",
                top1_agreement=0.95)
        np.testing.assert_allclose(fp16.encode(summer[:3]), eager.encode(summer[:3]),
                                   atol=2e-3)  # graph replay == eager, batch by batch
        x = torch.from_numpy(fp32.preprocess(summer[:2])).cuda()
        out = fp32.encode_tensor(x)          # device tensors in, device tensors out
        assert out.is_cuda and out.shape == (2, fp32.dim)
