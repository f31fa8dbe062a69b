"""Numerical parity between backends: the promise that the backend is a deployment choice.

Two measures, because either alone can hide a broken export: the per-descriptor cosine (every
image must come out nearly identical, not just on average) and top-1 retrieval agreement (what
the map would answer must not change). PyTorch fp32 is the reference; tolerances are stated
where they are used (ONNX Runtime fp32 >= 0.9999, fp16 backends >= 0.999).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from vpr_ros.errors import ExportError

FP32_MIN_COSINE = 0.9999
FP16_MIN_COSINE = 0.999


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ExportError(f"cannot compare descriptors of shapes {a.shape} and {b.shape}")
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-30)


def top1(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Index of each query's nearest database row (inner product, descriptors L2-normalised)."""
    return np.argmax(np.asarray(queries) @ np.asarray(database).T, axis=1)


@dataclass(frozen=True)
class ParityReport:
    """How closely ``candidate`` reproduced ``reference``."""

    images: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    top1_agreement: Optional[float] = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(reference: np.ndarray, candidate: np.ndarray,
            ref_queries: Optional[np.ndarray] = None,
            cand_queries: Optional[np.ndarray] = None) -> ParityReport:
    """Cosine/abs-diff of two descriptor sets; with query sets, also top-1 agreement (queries of
    each backend searched against that backend's database)."""
    cos = row_cosines(reference, candidate)
    agree = None
    if ref_queries is not None and cand_queries is not None:
        cos = np.concatenate([cos, row_cosines(ref_queries, cand_queries)])
        agree = float((top1(ref_queries, reference) == top1(cand_queries, candidate)).mean())
    diff = float(np.abs(np.asarray(reference) - np.asarray(candidate)).max())
    if ref_queries is not None and cand_queries is not None:
        diff = max(diff, float(np.abs(ref_queries - cand_queries).max()))
    return ParityReport(images=int(cos.size), min_cosine=float(cos.min()),
                        mean_cosine=float(cos.mean()), max_abs_diff=diff, top1_agreement=agree)


def encoder_parity(reference, candidate, database: Sequence[np.ndarray],
                   queries: Optional[Sequence[np.ndarray]] = None) -> ParityReport:
    """Encode real images with two :class:`~vpr_ros.runtime.encoder.Encoder` s (each through its
    own preprocessing) and compare."""
    ref_db, cand_db = reference.encode(database), candidate.encode(database)
    if queries is None:
        return compare(ref_db, cand_db)
    return compare(ref_db, cand_db, reference.encode(queries), candidate.encode(queries))


def require(report: ParityReport, min_cosine: float, what: str,
            top1_agreement: Optional[float] = 1.0) -> ParityReport:
    """Raise ExportError unless ``report`` meets the tolerance."""
    if report.min_cosine < min_cosine:
        raise ExportError(f"{what}: descriptor cosine with PyTorch is {report.min_cosine:.6f} "
                          f"(min over {report.images} images), below {min_cosine}; the export "
                          "is numerically wrong, do not use it")
    if (top1_agreement is not None and report.top1_agreement is not None
            and report.top1_agreement < top1_agreement):
        raise ExportError(f"{what}: top-1 retrieval agrees with PyTorch on only "
                          f"{report.top1_agreement:.1%} of queries")
    return report


def _check_probe(session, meta, onnx_path: Union[str, Path]) -> None:
    """The degeneracy probe on the exported file: parity with PyTorch proves nothing when both
    give every image the same descriptor."""
    from vpr_ros.errors import ModelError
    from vpr_ros.models.degeneracy import check_distinct, probe_images

    mean = np.asarray(meta.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(meta.std, np.float32).reshape(1, 3, 1, 1)
    batch = np.stack(probe_images(meta.input_size)).transpose(0, 3, 1, 2)
    x = ((batch.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    desc = np.concatenate([session.run([meta.outputs[0]], {meta.input_name: x[i:i + 1]})[0]
                           for i in range(len(x))])
    try:
        check_distinct(desc, str(onnx_path))
    except ModelError as exc:
        raise ExportError(str(exc)) from None


def verify_onnx_export(model, onnx_path: Union[str, Path], batch: int = 2, seed: int = 0,
                       min_cosine: float = FP32_MIN_COSINE) -> ParityReport:
    """Run an exported file with ONNX Runtime (CPU) on random normalised images and compare
    every output with the PyTorch model it came from (run right after export).

    The file runs in a plain ONNX Runtime session, exactly as written (the runtime's own
    load-time rewrites, such as fused attention, are the runtime's to check), so the exporter
    needs nothing from :mod:`vpr_ros.runtime`."""
    import onnxruntime as ort
    import torch

    from vpr_ros.export.artifact import read_onnx_metadata

    meta = read_onnx_metadata(onnx_path)
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise ExportError(f"{onnx_path}: onnxruntime cannot load the exported file ({exc})"
                          ) from exc
    h, w = meta.input_size
    x = np.random.default_rng(seed).standard_normal((batch, 3, h, w)).astype(np.float32)
    try:
        got = dict(zip(meta.outputs, session.run(list(meta.outputs), {meta.input_name: x})))
    except Exception as exc:
        raise ExportError(f"{onnx_path}: onnxruntime failed to run the exported graph ({exc})"
                          ) from exc
    if not np.isfinite(got["global"]).all():
        raise ExportError(f"{onnx_path}: ONNX Runtime produced NaN/Inf descriptors; the export "
                          "is wrong")
    _check_probe(session, meta, onnx_path)
    with torch.no_grad():
        ref = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
               for k, v in model.forward_all(torch.from_numpy(x)).items()}
    report = require(compare(ref["global"], got["global"]), min_cosine,
                     f"{onnx_path} (onnxruntime vs torch)", top1_agreement=None)
    for name in meta.outputs[1:]:
        r, g = ref[name], got[name]
        if r.shape != g.shape or r.dtype != g.dtype:
            raise ExportError(f"{onnx_path}: output {name!r} is {g.shape} {g.dtype} in ONNX "
                              f"Runtime but {r.shape} {r.dtype} in PyTorch")
        if np.issubdtype(r.dtype, np.floating):
            ok = np.allclose(r, g, rtol=1e-3, atol=1e-4)
        else:  # packed hash codes: a sign flip on a near-zero projection is tolerated
            ok = float((r == g).mean()) >= 0.99
        if not ok:
            raise ExportError(f"{onnx_path}: output {name!r} differs between ONNX Runtime and "
                              "PyTorch beyond tolerance; the export is wrong")
    return report
