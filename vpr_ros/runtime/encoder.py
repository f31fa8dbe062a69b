"""The Encoder interface every backend implements, and the factory that picks one.

An encoder turns RGB images into L2-normalised float32 descriptors. Every consumer (the node, the
map builder, the evaluator, benchmarks) talks to this interface only, so the backend (PyTorch,
ONNX Runtime, TensorRT) is a deployment choice, not a code change.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from vpr_ros.errors import BackendError, InputError, ModelError

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
    #: Every output for the degeneracy probe's images (set by :func:`probe_encoder`), so
    #: callers needing one forward pass's shapes need not run another.
    probe_outputs: Optional[dict[str, np.ndarray]] = None

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
    def output_names(self) -> tuple[str, ...]:
        """``("global", *extras)``: what :meth:`encode_all` returns (extras such as
        ``"binary"`` hash codes or ``"local"`` features come from the model's heads)."""
        return ("global",)

    def encode_all(self, images: ImageBatch) -> dict[str, np.ndarray]:
        """Every output of the model, ``{"global": (B, D) float32, **extras}``, checked like
        :meth:`encode` (extras: batch-first, finite where floating point)."""
        batch = self.preprocess(images)
        return check_outputs(self._encode_all_batch(batch), batch.shape[0], self.dim,
                             self.backend)

    def _encode_all_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Backends with extra outputs override this; the default has the global one only."""
        return {"global": self._encode_batch(batch)}

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


def check_outputs(outs: dict[str, np.ndarray], batch: int, dim: int, backend: str
                  ) -> dict[str, np.ndarray]:
    """:func:`check_descriptors` for the global output, and the same refusal of garbage for
    the extras: one row per image, no NaN/Inf in floating-point outputs."""
    if "global" not in outs:
        raise BackendError(f"{backend} encoder returned {sorted(outs)} without 'global'")
    checked = {"global": check_descriptors(np.asarray(outs["global"], dtype=np.float32), batch,
                                           dim, backend)}
    for name, value in outs.items():
        if name == "global":
            continue
        arr = np.asarray(value)
        if arr.ndim == 0 or arr.shape[0] != batch:
            raise BackendError(f"{backend} encoder returned output {name!r} of shape "
                               f"{arr.shape} for {batch} images; the artifact does not match "
                               "its metadata")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise InputError(f"{backend} encoder produced NaN/Inf in output {name!r}; the "
                             "images or the weights are corrupt (re-export the model)")
        checked[name] = arr
    return checked


def probe_encoder(encoder: Encoder, source: str) -> Encoder:
    """Run the degeneracy probe (:mod:`vpr_ros.models.degeneracy`) on a freshly opened
    encoder: ModelError unless two images that share nothing give distinct, finite descriptors.
    Keeps the outputs in ``encoder.probe_outputs``. Cost: two single-image forward passes."""
    from vpr_ros.models.degeneracy import check_distinct, probe_images

    where = f"model {source} ({encoder.backend})"
    try:
        outs = [encoder.encode_all([img]) for img in probe_images(encoder.input_size)]
    except InputError as exc:  # NaN/Inf out of a fixed, valid image: the weights
        raise ModelError(f"{where}: {exc}") from None
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        # A valid image the model's own size cannot run: the model (its config or weights)
        # is broken, whatever the framework says. The cause stays chained for debugging.
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
        raise ModelError(f"{where}: fails on a valid {encoder.input_size[0]}x"
                         f"{encoder.input_size[1]} image ({type(exc).__name__}: "
                         f"{first[:200]}); the model directory is inconsistent: re-create "
                         "it") from exc
    merged = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    check_distinct(merged["global"], where)
    encoder.probe_outputs = merged
    return encoder


def load_encoder(model: Union[str, Path], backend: str = "torch", device: str = "cpu",
                 objective: str = "latency", **options) -> Encoder:
    """Open an encoder for a model directory, an ``.onnx`` file or a TensorRT engine.

    ``backend``: ``torch``, ``onnxruntime``, ``openvino``, ``tensorrt``, each optionally with a
    precision (``openvino:bf16``, ``torch:bf16``, ``onnxruntime:int8``, ...), or ``auto``: on
    the CPU the fastest backend x precision measured on this host whose descriptors match fp32
    (:mod:`vpr_ros.runtime.auto_select`; ``objective`` ``latency`` = batch 1 for the node,
    ``throughput`` = batches for map building and evaluation), with a GPU the fixed GPU-first
    order (:mod:`vpr_ros.runtime.backend_select`). The encoder's ``backend`` string says what
    runs, ``backend_choice`` the named choice and ``backend_note`` why ``auto`` took it.
    ``expected_fingerprint=`` (e.g. a map's) refuses another model with
    :class:`~vpr_ros.errors.MapMismatchError`; other options go to the backend.
    Every encoder is opened through the degeneracy probe (:func:`probe_encoder`).
    """
    from vpr_ros.runtime.backend_select import open_encoder

    encoder = open_encoder(model, backend=backend, device=device, objective=objective,
                           **options)
    return probe_encoder(encoder, str(model))
