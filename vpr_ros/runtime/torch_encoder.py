"""PyTorch backend: the reference every other backend is checked against.

Runs the model from its model directory on CPU (fp32) or CUDA (fp32/fp16). The input size is
fixed at load (DINOv2's positional embedding precomputed), the query banks are cached by the
aggregator, and inference runs under ``torch.inference_mode``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vpr_ros.errors import BackendError
from vpr_ros.runtime.encoder import Encoder
from vpr_ros.runtime.preprocess import Preprocessing


class TorchEncoder(Encoder):
    def __init__(self, model, meta, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None) -> None:
        if precision not in ("fp32", "fp16"):
            raise BackendError(f"precision must be fp32 or fp16, got {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"device {device!r} asked for, but torch sees no CUDA GPU; use "
                               "device cpu")
        if precision == "fp16" and not device.startswith("cuda"):
            raise BackendError("fp16 inference needs a CUDA device; use fp32 on CPU")
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = model.eval().to(self.device, self.dtype)
        self.model.fix_input_size()
        self.meta = meta
        self.dim = int(meta.descriptor_dim)
        self.input_size = tuple(meta.config.input.size)
        self.fingerprint = meta.fingerprint
        self.backend = f"torch-{self.device.type}-{precision}"
        self._prep = Preprocessing.from_input_config(meta.config.input)

    @classmethod
    def from_model_dir(cls, path: str | Path, device: str = "cpu", precision: str = "fp32",
                       threads: int | None = None) -> "TorchEncoder":
        from vpr_ros.models.model_dir import load_model_dir

        model, meta = load_model_dir(path)
        return cls(model, meta, device=device, precision=precision, threads=threads)

    @property
    def preprocessing(self) -> Preprocessing:
        return self._prep

    def encode_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Encode a preprocessed (B, 3, H, W) tensor already on the device (no host copy)."""
        with torch.inference_mode():
            out = self.model(batch.to(self.device, self.dtype, non_blocking=True))
        return out.float()

    def _encode_batch(self, batch: np.ndarray) -> np.ndarray:
        return self.encode_tensor(torch.from_numpy(batch)).cpu().numpy()
