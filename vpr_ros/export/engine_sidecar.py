"""The sidecar of a TensorRT engine (``model.engine`` -> ``model.engine.json``).

A serialized engine is tied to the TensorRT version that built it and to the GPU architecture
it was tuned for, and says nothing about the model it came from. ``vpr export tensorrt`` writes
this sidecar beside it: the model's :class:`~vpr_ros.export.artifact.ArtifactMeta`, the TensorRT
version, the GPU name and compute capability, the batch range and the engine's SHA-256. The
runtime's TensorRT backend reads it back and decides from it whether the engine may run here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from vpr_ros.errors import BackendError
from vpr_ros.export.artifact import ArtifactMeta
from vpr_ros.plain_data import read_json

SIDECAR_FORMAT = "vpr_ros.tensorrt/1"


def sidecar_path(engine: str | Path) -> Path:
    p = Path(engine)
    return p.with_name(p.name + ".json")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class EngineSidecar:
    """Everything known about an engine besides its bytes."""

    meta: ArtifactMeta
    tensorrt_version: str
    gpu_name: str
    compute_capability: str          # "8.6", "9.0", ...
    min_batch: int
    max_batch: int
    precision: str
    engine_sha256: str
    onnx_sha256: str = ""
    workspace_gb: float = 0.0
    built: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": SIDECAR_FORMAT, "model": self.meta.to_dict(),
                "tensorrt_version": self.tensorrt_version, "gpu_name": self.gpu_name,
                "compute_capability": self.compute_capability, "min_batch": self.min_batch,
                "max_batch": self.max_batch, "precision": self.precision,
                "engine_sha256": self.engine_sha256, "onnx_sha256": self.onnx_sha256,
                "workspace_gb": self.workspace_gb, "built": self.built}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str) -> "EngineSidecar":
        if not isinstance(doc, Mapping) or doc.get("format") != SIDECAR_FORMAT:
            raise BackendError(f"{source}: not a vpr_ros TensorRT sidecar (format "
                               f"{doc.get('format') if isinstance(doc, Mapping) else None!r}); "
                               "rebuild the engine with `vpr export tensorrt`")
        try:
            return cls(meta=ArtifactMeta.from_dict(doc["model"], source),
                       tensorrt_version=str(doc["tensorrt_version"]),
                       gpu_name=str(doc["gpu_name"]),
                       compute_capability=str(doc["compute_capability"]),
                       min_batch=int(doc["min_batch"]), max_batch=int(doc["max_batch"]),
                       precision=str(doc["precision"]),
                       engine_sha256=str(doc["engine_sha256"]),
                       onnx_sha256=str(doc.get("onnx_sha256", "")),
                       workspace_gb=float(doc.get("workspace_gb", 0.0)),
                       built=str(doc.get("built", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"{source}: sidecar is incomplete ({exc!r}); rebuild the engine "
                               "with `vpr export tensorrt`") from exc


def read_sidecar(engine: str | Path) -> EngineSidecar:
    side = sidecar_path(engine)
    if not side.is_file():
        raise BackendError(f"{engine}: its sidecar {side.name} is missing, so the engine's "
                           "model, preprocessing and build machine are unknown; keep the two "
                           "files together or rebuild with `vpr export tensorrt`")
    doc = read_json(side, BackendError, "rebuild the engine")
    return EngineSidecar.from_dict(doc, str(side))


def write_sidecar(engine: str | Path, sidecar: EngineSidecar) -> Path:
    side = sidecar_path(engine)
    fd, tmp = tempfile.mkstemp(dir=side.parent, prefix=f".{side.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(sidecar.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(tmp, side)
    return side


def gpu_identity(device_index: int = 0) -> tuple[str, str]:
    """(name, "major.minor") of a CUDA device, as torch reports them."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    return str(props.name), f"{props.major}.{props.minor}"
