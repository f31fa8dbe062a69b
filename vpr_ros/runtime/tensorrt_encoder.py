"""TensorRT backend: a serialized fp16 engine, run asynchronously on a CUDA stream.

A TensorRT engine is specific to the TensorRT version that built it and to the GPU
architecture it was tuned for; loading it elsewhere fails deep inside TensorRT with an
unhelpful message, or worse, runs with tactics chosen for another GPU. So every engine has a
sidecar, ``ENGINE.json`` (``model.engine`` -> ``model.engine.json``), with the model's
:class:`~vpr_ros.export.artifact.ArtifactMeta`, the TensorRT version, the GPU name and
compute capability, the batch range and the engine's SHA-256. :func:`check_engine_compat` (a
pure function, tested with fabricated sidecars) decides before TensorRT is touched.

Written against TensorRT 10's documented Python API (``trt.Runtime``,
``deserialize_cuda_engine``, ``create_execution_context``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``). CUDA memory, streams and pinned host buffers come
from torch, which the project already depends on, so no pycuda/cuda-python is needed and torch
CUDA tensors are consumed in place (their device pointer is handed to TensorRT).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from vpr_ros.errors import BackendError, InputError
from vpr_ros.export.artifact import ArtifactMeta
# The sidecar format is the engine builder's; these names stay importable from here.
from vpr_ros.export.engine_sidecar import (SIDECAR_FORMAT, EngineSidecar,  # noqa: F401
                                           file_sha256, gpu_identity, read_sidecar,
                                           sidecar_path, write_sidecar)
from vpr_ros.runtime.onnx_encoder import ArtifactEncoder, artifact_preprocessing
from vpr_ros.runtime.torch_preprocess import GpuPreprocessed

log = logging.getLogger(__name__)


def check_engine_compat(sidecar: EngineSidecar, tensorrt_version: str, gpu_name: str,
                        compute_capability: str) -> list[str]:
    """Refuse an engine this machine must not run; return warnings for what is merely odd.

    * another TensorRT version: refused (serialized engines are not portable across versions
      unless built version-compatible, which these are not);
    * another compute capability: refused (kernels and tactics are per architecture);
    * same capability, another GPU model: allowed with a warning (it runs; tactics were timed
      on the other card, so rebuild for best latency).
    """
    src = f"engine built with TensorRT {sidecar.tensorrt_version} on {sidecar.gpu_name} " \
          f"(compute capability {sidecar.compute_capability})"
    if sidecar.tensorrt_version != tensorrt_version:
        raise BackendError(f"{src} cannot run with TensorRT {tensorrt_version}: engines are "
                           "tied to the TensorRT version that built them. Rebuild it here with "
                           "`vpr export tensorrt MODEL_OR_ONNX -o ENGINE`")
    if sidecar.compute_capability != compute_capability:
        raise BackendError(f"{src} cannot run on {gpu_name} (compute capability "
                           f"{compute_capability}): engines are built for one GPU "
                           "architecture. Rebuild it on this GPU with `vpr export tensorrt`")
    warnings = []
    if sidecar.gpu_name != gpu_name:
        warnings.append(f"{src} runs on {gpu_name}: same architecture, but its kernels were "
                        "timed on the other GPU; rebuild here for the best latency")
    return warnings


class TensorRTEncoder(GpuPreprocessed, ArtifactEncoder):
    """Runs a serialized TensorRT engine (built by ``vpr export tensorrt``).

    ``encode(images)`` preprocesses on the GPU when the torch twin is available, copies through
    pinned host buffers otherwise, and synchronises once per call; ``encode_tensor(batch)``
    takes a preprocessed torch CUDA tensor and returns CUDA tensors without a host round trip.
    Batches above the engine's maximum are run in chunks.
    """

    def __init__(self, path: str | Path, device: str = "cuda",
                 expected_fingerprint: Optional[str] = None, gpu_preprocess: bool = True,
                 threads: Optional[int] = None) -> None:
        from vpr_ros.runtime.backend_select import check_expected_fingerprint, parse_device

        del threads  # accepted for a uniform load_encoder(); the GPU does the work
        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such engine file; build one with `vpr export "
                               "tensorrt MODEL -o ENGINE`")
        self.sidecar = read_sidecar(self.path)
        check_expected_fingerprint(self.sidecar.meta.fingerprint, expected_fingerprint,
                                   str(self.path))
        if file_sha256(self.path) != self.sidecar.engine_sha256:
            raise BackendError(f"{self.path} does not match its sidecar (SHA-256 differs): the "
                               "engine or the .json was replaced; rebuild the pair")
        dev_type, dev_index = parse_device(device)
        if dev_type != "cuda":
            raise BackendError("TensorRT engines run on a CUDA device; pass device='cuda'")
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendError("the tensorrt backend needs NVIDIA's 'tensorrt' Python package "
                               "(and a CUDA GPU); on this machine use the .onnx file with "
                               "backend 'onnxruntime'") from exc
        import torch

        if not torch.cuda.is_available():
            raise BackendError("the tensorrt backend needs a CUDA GPU, and torch sees none")
        self.device = torch.device("cuda", dev_index)
        name, cc = gpu_identity(dev_index)
        for w in check_engine_compat(self.sidecar, trt.__version__, name, cc):
            log.warning("%s: %s", self.path, w)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise BackendError(f"{self.path}: TensorRT could not deserialize the engine "
                                   "(see its log above); rebuild it on this machine")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise BackendError(f"{self.path}: TensorRT could not create an execution "
                                   "context (out of GPU memory?)")
            self._stream = torch.cuda.Stream(self.device)
        meta = self.sidecar.meta
        self._bind_names(meta)
        self.meta = meta
        self.dim = meta.descriptor_dim
        self.input_size = meta.input_size
        self.fingerprint = meta.fingerprint
        self.backend = f"tensorrt-{self.sidecar.precision}"
        self._prep = artifact_preprocessing(meta)
        self._host_in: Optional[torch.Tensor] = None
        self._gpu_prep = None
        if gpu_preprocess:
            from vpr_ros.runtime.torch_preprocess import TorchPreprocessor

            self._gpu_prep = TorchPreprocessor(self._prep, self.device)

    def _bind_names(self, meta: ArtifactMeta) -> None:
        """Check the engine's I/O tensors against the sidecar; learn dtypes and batch range."""
        import torch

        trt = self._trt
        eng = self._engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [meta.input_name] or sorted(outputs) != sorted(meta.outputs):
            raise BackendError(f"{self.path}: engine tensors (inputs {inputs}, outputs "
                               f"{outputs}) do not match the sidecar ({meta.input_name}, "
                               f"{list(meta.outputs)}); rebuild the pair")
        lo, _, hi = eng.get_tensor_profile_shape(meta.input_name, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self._dtypes = {n: torch.from_numpy(np.empty(0, trt.nptype(eng.get_tensor_dtype(n))))
                        .dtype for n in names}
        if self._dtypes[meta.input_name] != torch.float32:
            raise BackendError(f"{self.path}: engine input is {self._dtypes[meta.input_name]}, "
                               "expected float32; rebuild with `vpr export tensorrt`")

    # -- GPU path --------------------------------------------------------------------------
    def _execute(self, x) -> dict:
        """Enqueue one chunk (x on the device, contiguous float32) on the engine's stream and
        return its output tensors (filled once the stream gets there)."""
        import torch

        ctx = self._context
        if not ctx.set_input_shape(self.meta.input_name, tuple(x.shape)):
            raise InputError(f"{self.backend}: batch shape {tuple(x.shape)} is outside the "
                             f"engine's profile (batch {self.min_batch}..{self.max_batch})")
        ctx.set_tensor_address(self.meta.input_name, x.data_ptr())
        outs = {}
        for name in self.meta.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            ctx.set_tensor_address(name, outs[name].data_ptr())
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise BackendError(f"{self.backend}: TensorRT failed to enqueue inference (see its "
                               "log)")
        return outs

    def encode_tensor_all(self, batch) -> dict:
        """All outputs for a preprocessed (B, 3, H, W) torch tensor; a contiguous float32 CUDA
        tensor on the engine's device is read in place. Returns CUDA tensors, ready on the
        caller's current stream."""
        import torch

        from vpr_ros.runtime.torch_encoder import check_tensor_batch

        check_tensor_batch(batch, self.input_size, self.backend)
        x = batch.to(self.device, torch.float32, non_blocking=True).contiguous()
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)  # x was produced on the caller's stream
        results: dict[str, list] = {n: [] for n in self.meta.outputs}
        with torch.cuda.device(self.device):
            for start in range(0, x.shape[0], self.max_batch):
                outs = self._execute(x[start:start + self.max_batch])
                for name, t in outs.items():
                    t.record_stream(self._stream)
                    results[name].append(t)
            x.record_stream(self._stream)
        caller.wait_stream(self._stream)
        return {n: (ts[0] if len(ts) == 1 else torch.cat(ts)) for n, ts in results.items()}

    def encode_tensor(self, batch):
        """(B, D) float32 CUDA tensor of global descriptors, checked for NaN/Inf on the GPU."""
        import torch

        out = self.encode_tensor_all(batch)["global"].float()
        if out.shape != (batch.shape[0], self.dim):
            raise BackendError(f"{self.backend} returned {tuple(out.shape)}, expected "
                               f"({batch.shape[0]}, {self.dim})")
        if not bool(torch.isfinite(out).all()):
            raise InputError(f"{self.backend} encoder produced NaN/Inf descriptors; the images "
                             "or the engine are corrupt (rebuild the engine)")
        return out

    # -- host path ---------------------------------------------------------------------------
    def _encode_all_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """numpy batch -> pinned host buffer -> device (async) -> engine -> host."""
        import torch

        b = batch.shape[0]
        if self._host_in is None or self._host_in.shape[0] < b:
            self._host_in = torch.empty((max(b, self.max_batch), 3, *self.input_size),
                                        dtype=torch.float32, pin_memory=True)
        host = self._host_in[:b]
        host.numpy()[...] = batch
        with torch.cuda.stream(self._stream):
            x = host.to(self.device, non_blocking=True)
        outs = self.encode_tensor_all(x)  # same stream: the copy is ordered before inference
        pinned = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                  for n, t in outs.items()}
        for n, t in outs.items():
            pinned[n].copy_(t, non_blocking=True)
        # One synchronisation per call; it also frees the pinned input for the next call.
        torch.cuda.current_stream(self.device).synchronize()
        return {n: t.numpy() for n, t in pinned.items()}

    def _encode_batch(self, batch: np.ndarray) -> np.ndarray:
        return self._encode_all_batch(batch)["global"]
