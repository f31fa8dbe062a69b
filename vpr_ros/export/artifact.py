"""What an exported artifact says about itself: the model it came from, its descriptor space,
its preprocessing and its graph's names.

An exported file is only useful if it can say which model it came from: a map built with one
model must never be searched with descriptors of another, and a backend must preprocess images
exactly as the model was trained. So ``vpr export onnx`` writes an :class:`ArtifactMeta` into the
file's ``metadata_props`` (the TensorRT sidecar copies it), and every runtime backend reads it
back. The format lives here, with the exporter that writes it, so that export needs nothing from
the runtime; the runtime (which reads it) depends on this module, never the other way round.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vpr_ros.errors import BackendError

#: ``metadata_props`` format tag; bump when the keys change meaning.
META_FORMAT = "vpr_ros.artifact/1"
INPUT_NAME = "images"
GLOBAL_OUTPUT = "global"


@dataclass(frozen=True)
class ArtifactMeta:
    """What an exported model says about itself (ONNX ``metadata_props``, TensorRT sidecar).

    ``fingerprint`` identifies the *descriptor space*: it is the model directory's fingerprint
    when the artifact runs at the model's configured input size, and a derived one otherwise
    (descriptors of one model at two sizes must not share a map). ``model_fingerprint`` is
    always the model directory's.
    """

    fingerprint: str
    model_fingerprint: str
    model_name: str
    descriptor_dim: int
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str
    interpolation: str = "opencv"
    outputs: tuple[str, ...] = (GLOBAL_OUTPUT,)
    input_name: str = INPUT_NAME
    opset: int = 17
    vpr_ros_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": META_FORMAT, "fingerprint": self.fingerprint,
                "model_fingerprint": self.model_fingerprint, "model_name": self.model_name,
                "descriptor_dim": self.descriptor_dim, "input_size": list(self.input_size),
                "mean": list(self.mean), "std": list(self.std), "resize": self.resize,
                "interpolation": self.interpolation, "output_names": list(self.outputs), "input_name": self.input_name,
                "opset": self.opset, "vpr_ros_version": self.vpr_ros_version,
                "extra": dict(self.extra)}

    def to_props(self) -> dict[str, str]:
        """Flat string pairs for ONNX ``metadata_props`` (values JSON-encoded)."""
        return {k: json.dumps(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str) -> "ArtifactMeta":
        if doc.get("format") != META_FORMAT:
            raise BackendError(f"{source}: no vpr_ros metadata (format {doc.get('format')!r}, "
                               f"expected {META_FORMAT!r}); this file was not written by "
                               "`vpr export`, or by an incompatible version. Re-export it "
                               "from the model directory with `vpr export onnx MODEL -o FILE`")
        try:
            size = tuple(int(v) for v in doc["input_size"])
            meta = cls(fingerprint=str(doc["fingerprint"]),
                       model_fingerprint=str(doc["model_fingerprint"]),
                       model_name=str(doc.get("model_name", "")),
                       descriptor_dim=int(doc["descriptor_dim"]),
                       input_size=(size[0], size[1]),
                       mean=tuple(float(v) for v in doc["mean"]),  # type: ignore[arg-type]
                       std=tuple(float(v) for v in doc["std"]),  # type: ignore[arg-type]
                       resize=str(doc["resize"]),
                       # files exported before the field existed were all OpenCV-resized
                       interpolation=str(doc.get("interpolation", "opencv")),
                       outputs=tuple(str(v) for v in doc["output_names"]),
                       input_name=str(doc.get("input_name", INPUT_NAME)),
                       opset=int(doc.get("opset", 0)),
                       vpr_ros_version=str(doc.get("vpr_ros_version", "")),
                       extra=dict(doc.get("extra") or {}))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BackendError(f"{source}: vpr_ros metadata is incomplete or corrupt ({exc!r}); "
                               "re-export the file with `vpr export onnx`") from exc
        if len(meta.mean) != 3 or len(meta.std) != 3 or not meta.outputs \
                or meta.outputs[0] != GLOBAL_OUTPUT:
            raise BackendError(f"{source}: vpr_ros metadata has malformed mean/std/outputs; "
                               "re-export the file with `vpr export onnx`")
        from vpr_ros.models.config import INTERPOLATIONS, RESIZE_POLICIES

        if meta.resize not in RESIZE_POLICIES or meta.interpolation not in INTERPOLATIONS:
            raise BackendError(f"{source}: resize {meta.resize!r} / interpolation "
                               f"{meta.interpolation!r} is not one this vpr_ros implements "
                               f"({list(RESIZE_POLICIES)} / {list(INTERPOLATIONS)}); use the "
                               "vpr_ros that exported the file, or re-export it")
        return meta

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str) -> "ArtifactMeta":
        doc: dict[str, Any] = {}
        for k, v in props.items():
            try:
                doc[k] = json.loads(v)
            except (ValueError, TypeError, RecursionError):  # a plain string value
                doc[k] = v
        return cls.from_dict(doc, source)


def read_onnx_metadata(path: str | Path) -> ArtifactMeta:
    """The :class:`ArtifactMeta` of an exported ``.onnx`` file (weights are not loaded)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise BackendError(f"{p}: no such ONNX file; export one with `vpr export onnx MODEL -o "
                           f"{p}`")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError family
        raise BackendError(f"{p}: not a readable ONNX file ({exc}); re-export it") from exc
    return ArtifactMeta.from_props({e.key: e.value for e in model.metadata_props}, str(p))


def descriptor_fingerprint(model_fingerprint: str, size: tuple[int, int],
                           configured_size: tuple[int, int]) -> str:
    """The fingerprint of a model's descriptors at ``size``: the model's own at its configured
    size (so a map built with the PyTorch backend accepts the export), a derived one otherwise
    (descriptors of one model at two input sizes are not comparable)."""
    if tuple(size) == tuple(configured_size):
        return model_fingerprint
    tag = f"{model_fingerprint}@{size[0]}x{size[1]}"
    return hashlib.sha256(tag.encode()).hexdigest()[:24]
