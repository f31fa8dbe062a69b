"""What a model gives besides its global descriptor, and what a map therefore stores.

Why here: ``vpr map build`` and the node's live map both choose a map layout from the model
(index ``auto``: a binary index over the hash head's codes when the model has one, exact search
otherwise; a local-feature store when the model has a local head), and both must refuse a map
whose stored extras the model cannot supply. One small module keeps that choice identical in
both places.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from vpr_ros.errors import ConfigError

#: Index kinds a map may be asked for; ``auto`` is resolved from the model's outputs.
INDEX_CHOICES = ("auto", "flat", "hnsw", "ivfpq", "binary")


@dataclass(frozen=True)
class ModelOutputs:
    """Per-image shapes of a model's extra outputs (None where the model has no such head)."""

    code_bytes: int | None = None                   # "binary": packed hash code bytes
    local_grid: tuple[int, ...] | None = None       # "local": (H, W, C)

    @classmethod
    def from_batch(cls, outs: Mapping[str, np.ndarray]) -> "ModelOutputs":
        """From one ``Encoder.encode_all`` result (batch-first arrays)."""
        binary, local = outs.get("binary"), outs.get("local")
        code_bytes = None
        if binary is not None:
            arr = np.asarray(binary)
            # A hash head gives packed uint8 codes; unpacked sign values count 8 per byte.
            code_bytes = int(arr.shape[1]) if arr.dtype == np.uint8 else int(arr.shape[1]) // 8
        grid = tuple(int(v) for v in np.asarray(local).shape[1:]) if local is not None else None
        return cls(code_bytes, grid)

    @classmethod
    def probe(cls, encoder: Any) -> "ModelOutputs":
        """Encode one blank frame to learn the extra outputs' shapes (nothing is run for an
        encoder whose only output is the global descriptor)."""
        if not extra_output_names(encoder):
            return cls()
        if getattr(encoder, "probe_outputs", None) is not None:  # the load's probe ran one
            return cls.from_batch(encoder.probe_outputs)
        h, w = encoder.input_size
        return cls.from_batch(encoder.encode_all([np.zeros((int(h), int(w), 3), np.uint8)]))


def extra_output_names(encoder: Any) -> tuple[str, ...]:
    """The map-relevant extras (``binary``, ``local``) an encoder provides."""
    names = tuple(getattr(encoder, "output_names", ("global",)))
    return tuple(n for n in names if n in ("binary", "local"))


def index_spec_for(kind: str, outputs: ModelOutputs) -> str | dict[str, Any]:
    """The index spec of a new map: ``auto`` -> binary over the model's codes when it has a hash
    head, flat otherwise; ``binary`` uses the model's codes when there are any (else the map's
    own random projection); other kinds as named."""
    if kind not in INDEX_CHOICES:
        raise ConfigError(f"index {kind!r} is not one of {', '.join(INDEX_CHOICES)}")
    if kind == "auto":
        kind = "binary" if outputs.code_bytes else "flat"
    if kind == "binary" and outputs.code_bytes:
        return {"kind": "binary", "bits": 8 * outputs.code_bytes, "codes": "model"}
    return kind
