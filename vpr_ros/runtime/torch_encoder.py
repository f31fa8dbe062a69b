"""PyTorch backend: the reference every other backend is checked against.

Runs the model from its model directory on CPU (fp32) or CUDA (fp32/fp16). The input size is
fixed at load (DINOv2's positional embedding precomputed), the query banks are cached by the
aggregator, and inference runs under ``torch.inference_mode``.

On CUDA two things matter at batch 1, where a ViT-B step is a few milliseconds of GPU work
spread over hundreds of small kernels: the frame is preprocessed on the GPU (uint8 upload, the
:mod:`~vpr_ros.runtime.torch_preprocess` twin of the CPU resize), and the forward pass is
replayed from a CUDA graph captured once per batch size, so Python and kernel-launch overhead
stop dominating. (``torch.compile`` was not chosen: minutes of compilation at node start-up and
a cache keyed on the torch build, for less gain than graphs give at batch 1.)

On a CPU with bf16 matrix instructions (AMX or AVX512-BF16) ``precision="bf16"`` runs the
forward pass under ``torch.autocast``: the matrix products in bf16, normalisations and softmax
kept in fp32 by autocast's op lists, descriptors returned as float32. Elsewhere bf16 would be
emulated and slower than fp32, so it is refused there.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vpr_ros.errors import BackendError, InputError
from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.runtime.encoder import Encoder
from vpr_ros.runtime.preprocess import Preprocessing
from vpr_ros.runtime.torch_preprocess import GpuPreprocessed

log = logging.getLogger(__name__)

#: CUDA graphs kept (one per batch size seen); each holds its own static buffers.
MAX_GRAPHS = 4


def check_tensor_batch(batch: torch.Tensor, size: tuple[int, int], backend: str) -> None:
    """A preprocessed (B, 3, H, W) floating-point tensor of the model's size, or InputError."""
    h, w = size
    if not isinstance(batch, torch.Tensor):
        raise InputError(f"{backend}: expected a torch.Tensor batch, got {type(batch).__name__}")
    if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, h, w) or batch.shape[0] == 0:
        raise InputError(f"{backend}: expected a preprocessed (B, 3, {h}, {w}) batch, got shape "
                         f"{tuple(batch.shape)}; preprocess images with the encoder's "
                         "preprocessing first (or call encode() with RGB images)")
    if not batch.is_floating_point():
        raise InputError(f"{backend}: expected a floating-point normalised batch, got "
                         f"{batch.dtype}; raw uint8 images go through encode()")


class TorchEncoder(Encoder):
    """PyTorch inference of a loaded model.

    Args:
        model, meta: a loaded model and its :class:`~vpr_ros.models.model_dir.ModelMeta`.
        device: ``cpu`` or ``cuda[:N]``; precision: ``fp32``, ``fp16`` (CUDA only) or
            ``bf16`` (CPU autocast, where the CPU has bf16 instructions).
        threads: CPU threads for torch (default: torch's own choice).
        expected_fingerprint: refuse (MapMismatchError) another model than the map's.
        cuda_graphs: replay CUDA graphs (default on for CUDA); gpu_preprocess: preprocess on
            the GPU (default on for CUDA).
    """

    def __new__(cls, *args, **kwargs):
        """On CUDA (with GPU preprocessing) the instance is a :class:`CudaTorchEncoder`."""
        device = str(kwargs.get("device", args[2] if len(args) > 2 else "cpu"))
        if cls is TorchEncoder and device.startswith("cuda") and kwargs.get("gpu_preprocess",
                                                                              True):
            cls = CudaTorchEncoder
        return super().__new__(cls)

    def __init__(self, model, meta, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None, expected_fingerprint: Optional[str] = None,
                 cuda_graphs: Optional[bool] = None, gpu_preprocess: bool = True) -> None:
        from vpr_ros.runtime.backend_select import check_expected_fingerprint

        precision = {"f32": "fp32", "f16": "fp16"}.get(precision, precision)
        if precision not in ("fp32", "fp16", "bf16"):
            raise BackendError(f"torch precision must be fp32, fp16 (CUDA) or bf16 (CPU), got "
                               f"{precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"device {device!r} asked for, but torch sees no CUDA GPU; use "
                               "device cpu")
        if precision == "fp16" and not device.startswith("cuda"):
            raise BackendError("fp16 inference needs a CUDA device; use fp32 (or bf16 where "
                               "the CPU has it) on CPU")
        if precision == "bf16":
            from vpr_ros.runtime.cpu_features import cpu_info

            if device.startswith("cuda"):
                raise BackendError("torch bf16 is the CPU's reduced precision (autocast); on "
                                   "CUDA use fp16")
            if not cpu_info().bf16:
                raise BackendError(f"this CPU ({cpu_info().describe()}) has no bf16 matrix "
                                   "instructions (AMX or AVX512-BF16): bf16 would be emulated "
                                   "and slower than fp32; use precision fp32")
        check_expected_fingerprint(meta.fingerprint, expected_fingerprint, str(meta.path))
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.precision = precision
        self.model = model.eval().to(self.device, self.dtype)
        self.model.fix_input_size()
        self.meta = meta
        self.dim = int(meta.descriptor_dim)
        self.input_size = tuple(meta.config.input.size)
        self.fingerprint = meta.fingerprint
        self.backend = f"torch-{self.device.type}-{precision}"
        self._prep = Preprocessing.from_input_config(meta.config.input)
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs and on_cuda)
        self._graphs: OrderedDict[int, tuple] = OrderedDict()
        self._gpu_prep = None
        if on_cuda and gpu_preprocess:
            from vpr_ros.runtime.torch_preprocess import TorchPreprocessor

            self._gpu_prep = TorchPreprocessor(self._prep, self.device)  # CudaTorchEncoder

    @classmethod
    def from_model_dir(cls, path: str | Path, device: str = "cpu", precision: str = "fp32",
                       threads: int | None = None, **options) -> "TorchEncoder":
        from vpr_ros.models.model_dir import load_model_dir

        model, meta = load_model_dir(path, probe=False)  # load_encoder probes the encoder
        return cls(model, meta, device=device, precision=precision, threads=threads, **options)

    @property
    def preprocessing(self) -> Preprocessing:
        return self._prep

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("global", *self.model.extra_outputs)

    # -- tensors in, tensors out ----------------------------------------------------------
    def encode_tensor_all(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """All outputs for a preprocessed (B, 3, H, W) tensor (no host copy if it is already
        on the device); floating outputs are returned as float32."""
        check_tensor_batch(batch, self.input_size, self.backend)
        x = batch.to(self.device, self.dtype, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            out = self._graph_forward(x) if self.cuda_graphs else self.model.forward_all(x)
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}

    def encode_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Encode a preprocessed (B, 3, H, W) tensor already on the device (no host copy)."""
        return self.encode_tensor_all(batch)["global"]

    # -- the two halves of encode_all, for callers that cache backbone features ------------
    def backbone_features(self, images) -> BackboneOutput:
        """Backbone features of RGB images, preprocessed exactly as :meth:`encode_all` does
        (the runtime's resize and normalisation, on the GPU where this encoder does that).

        Why: models that share one frozen backbone differ only after it, so an evaluation of
        several of them (``vpr eval zoo``) computes these once and runs each model's head with
        :meth:`encode_features_all`."""
        gpu_prep = getattr(self, "_gpu_prep", None)
        batch = gpu_prep(images) if gpu_prep is not None else torch.from_numpy(
            self.preprocess(images))
        check_tensor_batch(batch, self.input_size, self.backend)
        with torch.inference_mode(), self._autocast():
            return self.model.backbone(batch.to(self.device, self.dtype))

    def encode_features_all(self, feats: BackboneOutput) -> dict[str, np.ndarray]:
        """:meth:`encode_all` from :meth:`backbone_features` output: the model's head, then the
        same float32 conversion and output checks, so the arrays equal full encoding's."""
        from vpr_ros.runtime.encoder import check_outputs

        tok = feats.cls_token
        x = BackboneOutput(feats.features.to(self.device, self.dtype),
                           None if tok is None else tok.to(self.device, self.dtype))
        with torch.inference_mode(), self._autocast():
            out = self.model.head_all(x)
        outs = {k: (v.float() if v.is_floating_point() else v).cpu().numpy()
                for k, v in out.items()}
        return check_outputs(outs, int(x.features.shape[0]), self.dim, self.backend)

    def _autocast(self):
        """bf16 autocast on CPU for ``precision="bf16"``, nothing otherwise."""
        if getattr(self, "precision", "fp32") != "bf16":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def _graph_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = int(x.shape[0])
        entry = self._graphs.get(b)
        if entry is None:
            try:
                entry = self._capture(x)
            except RuntimeError as exc:  # capture is best effort; eager is always correct
                log.warning("CUDA graph capture failed (%s); running eagerly", exc)
                self.cuda_graphs = False
                return self.model.forward_all(x)
            self._graphs[b] = entry
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(b)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return {k: v.clone() for k, v in static_out.items()}

    def _capture(self, x: torch.Tensor) -> tuple:
        static_in = x.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuDNN/cuBLAS plans and the query-bank cache
                self.model.forward_all(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.model.forward_all(static_in)
        return graph, static_in, static_out

    # -- the Encoder interface --------------------------------------------------------------
    def _encode_batch(self, batch: np.ndarray) -> np.ndarray:
        return self.encode_tensor(torch.from_numpy(batch)).cpu().numpy()

    def _encode_all_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in self.encode_tensor_all(
            torch.from_numpy(batch)).items()}


class CudaTorchEncoder(GpuPreprocessed, TorchEncoder):
    """:class:`TorchEncoder` on CUDA with frames preprocessed on the GPU (what
    ``TorchEncoder(..., device="cuda")`` gives unless ``gpu_preprocess=False``)."""
