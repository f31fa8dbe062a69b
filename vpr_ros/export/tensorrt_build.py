"""``vpr export tensorrt``: an fp16 TensorRT engine (+ its sidecar) from a model or ONNX file.

The engine is built on the machine that will run it (TensorRT engines are tied to the TensorRT
version and GPU architecture; see :mod:`vpr_ros.export.engine_sidecar`). The build:

* parses the checked ONNX graph of :mod:`vpr_ros.export.onnx_export` (a model directory is
  exported first, to a temporary file);
* enables fp16 kernels (the ONNX graph keeps LayerNormalization as one op, which TensorRT runs
  with fp32 accumulation, so fp16 engines stay within cosine 0.999 of fp32);
* adds one optimisation profile for batch 1..N, tuned for batch 1 (the node's case);
* limits the builder's workspace, and reuses/updates a timing cache file so rebuilds (other
  batch limits, another model of the same family) take seconds instead of minutes;
* writes the engine atomically and its sidecar ``ENGINE.json`` beside it.

Written against TensorRT 10's documented Python API (``Builder``, ``OnnxParser``,
``IBuilderConfig.set_memory_pool_limit``, ``create_optimization_profile``,
``create_timing_cache``/``set_timing_cache``, ``build_serialized_network``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

from vpr_ros.errors import ExportError
from vpr_ros.export.artifact import read_onnx_metadata
from vpr_ros.export.engine_sidecar import (EngineSidecar, file_sha256, gpu_identity,
                                           write_sidecar)

log = logging.getLogger(__name__)


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError("building a TensorRT engine needs NVIDIA's 'tensorrt' Python package "
                          "and a CUDA GPU (the engine is built on the machine that runs it); "
                          "install TensorRT 10 there, or deploy the .onnx file with "
                          "onnxruntime") from exc
    return trt


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_engine(source: Union[str, Path], out: Union[str, Path], max_batch: int = 8,
                 opt_batch: int = 1, workspace_gb: float = 4.0,
                 timing_cache: Optional[Union[str, Path]] = None, fp16: bool = True,
                 size: Optional[int] = None, device_index: int = 0) -> EngineSidecar:
    """Build ``out`` (engine) and ``out.json`` (sidecar) from a model directory or ``.onnx``."""
    if max_batch < 1 or not 1 <= opt_batch <= max_batch:
        raise ExportError(f"need 1 <= opt batch ({opt_batch}) <= max batch ({max_batch})")
    if workspace_gb <= 0:
        raise ExportError(f"workspace must be > 0 GB, got {workspace_gb}")
    trt = _import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise ExportError("building a TensorRT engine needs a CUDA GPU; torch sees none")
    src = Path(source)
    with tempfile.TemporaryDirectory(prefix="vpr_trt_") as tmp:
        if src.is_dir():
            from vpr_ros.export.onnx_export import export_onnx

            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(src, onnx_path, size=size)
        else:
            if size is not None:
                raise ExportError("--size applies to a model directory; an .onnx file has its "
                                  "size fixed at export")
            onnx_path = src
        meta = read_onnx_metadata(onnx_path)
        serialized, cache_bytes = _build(trt, onnx_path, meta.input_name, meta.input_size,
                                         max_batch, opt_batch, workspace_gb, timing_cache, fp16,
                                         device_index)
        onnx_sha = file_sha256(onnx_path)
    out = Path(out)
    _atomic_bytes(out, serialized)
    if timing_cache is not None and cache_bytes:
        _atomic_bytes(Path(timing_cache), cache_bytes)
    name, cc = gpu_identity(device_index)
    sidecar = EngineSidecar(meta=meta, tensorrt_version=trt.__version__, gpu_name=name,
                            compute_capability=cc, min_batch=1, max_batch=max_batch,
                            precision="fp16" if fp16 else "fp32",
                            engine_sha256=file_sha256(out), onnx_sha256=onnx_sha,
                            workspace_gb=float(workspace_gb),
                            built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_sidecar(out, sidecar)
    return sidecar


def _build(trt, onnx_path: Path, input_name: str, hw: tuple[int, int], max_batch: int,
           opt_batch: int, workspace_gb: float, timing_cache: Optional[Union[str, Path]],
           fp16: bool, device_index: int) -> tuple[bytes, bytes]:
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    with torch.cuda.device(device_index):
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}: "
                              + "; ".join(errors[:5]))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        h, w = hw
        profile.set_shape(input_name, (1, 3, h, w), (opt_batch, 3, h, w), (max_batch, 3, h, w))
        config.add_optimization_profile(profile)
        cache_in = b""
        if timing_cache is not None and Path(timing_cache).is_file():
            cache_in = Path(timing_cache).read_bytes()
        cache = config.create_timing_cache(cache_in)
        config.set_timing_cache(cache, ignore_mismatch=False)
        log.info("building TensorRT engine from %s (batch 1..%d, %s, workspace %.1f GB)",
                 onnx_path, max_batch, "fp16" if fp16 else "fp32", workspace_gb)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError("TensorRT failed to build the engine (see its log above); try a "
                              "larger --workspace-gb or a smaller --max-batch")
        cache_out = bytes(config.get_timing_cache().serialize())
        return bytes(serialized), cache_out
