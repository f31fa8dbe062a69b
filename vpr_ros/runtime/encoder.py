"""The Encoder interface every backend implements, and the factory that picks one.

An encoder turns RGB images into L2-normalised float32 descriptors. Every consumer (the node, the
map builder, the evaluator, benchmarks) talks to this interface only, so the backend (PyTorch,
ONNX Runtime, TensorRT) is a deployment choice, not a code change.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from vpr_ros.errors import BackendError, InputError

ImageBatch = Union[np.ndarray, Sequence[np.ndarray]]


class Encoder(abc.ABC):
    """``encode(images) -> (B, D) float32``, rows L2-normalised.

    ``images`` are HxWx3 uint8 RGB arrays of any size (resized by the model's recorded
    preprocessing) or one (B, H, W, 3) uint8 array.
    """

    dim: int
    input_size: tuple[int, int]
    fingerprint: str
    backend: str

    @abc.abstractmethod
    def _encode_batch(self, batch: np.ndarray) -> np.ndarray:
        """Encode an already preprocessed (B, 3, H, W) float32 batch."""

    def preprocess(self, images: ImageBatch) -> np.ndarray:
        from vpr_ros.runtime.preprocess import preprocess_batch

        return preprocess_batch(images, self.preprocessing)

    def encode(self, images: ImageBatch) -> np.ndarray:
        batch = self.preprocess(images)
        out = np.asarray(self._encode_batch(batch), dtype=np.float32)
        return check_descriptors(out, batch.shape[0], self.dim, self.backend)

    @property
    @abc.abstractmethod
    def preprocessing(self):  # -> vpr_ros.runtime.preprocess.Preprocessing
        """The resize policy and normalisation recorded with the model."""


def check_descriptors(out: np.ndarray, batch: int, dim: int, backend: str) -> np.ndarray:
    """Refuse garbage: wrong shape or non-finite values never reach a map."""
    if out.shape != (batch, dim):
        raise BackendError(f"{backend} encoder returned shape {out.shape}, expected "
                           f"({batch}, {dim}); the model artifact does not match its metadata")
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).any(axis=1).sum())
        raise InputError(f"{backend} encoder produced NaN/Inf descriptors for {bad} of {batch} "
                         "images; the images or the weights are corrupt (re-export the model)")
    return out


def load_encoder(model: Union[str, Path], backend: str = "torch", device: str = "cpu",
                 **options) -> Encoder:
    """Open an encoder for a model directory (or an exported artifact, per backend)."""
    if backend in ("torch", "auto"):
        from vpr_ros.runtime.torch_encoder import TorchEncoder

        return TorchEncoder.from_model_dir(model, device=device, **options)
    raise BackendError(f"unknown backend {backend!r}; available: torch")
