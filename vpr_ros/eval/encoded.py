"""Every output an evaluation needs from a model, encoded once per image set.

Why a separate step: a model with extra heads is measured several ways (SelaVPR++ float, Hamming
only, Hamming + float re-rank; CQVPR with and without local re-ranking). Encoding is the
expensive part, so the database and the queries are encoded once with all the outputs the
search plan needs, and each variant is a search over the same arrays (``vpr eval zoo``), exactly
as one ``vpr eval recall`` run would do it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from vpr_ros.errors import BackendError


@dataclass
class EncodedSet:
    """Outputs of one image set: ``global`` (N, D) float32 always; ``binary`` (N, bytes) uint8
    packed hash codes and ``local`` (N, H, W, C) float32 features when asked for."""

    global_: np.ndarray
    binary: Optional[np.ndarray] = None
    local: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(len(self.global_))


def encode_set(encoder, paths: Sequence[Path], batch_size: int = 32, desc: str = "encoding",
               progress: bool = True, extras: Sequence[str] = ()) -> EncodedSet:
    """Encode image files; ``extras`` names the extra outputs to keep ("binary", "local").

    Without extras this is :func:`~vpr_ros.eval.recall.encode_paths` (``encoder.encode``), so
    plain models are encoded exactly as before.
    """
    from tqdm import tqdm

    from vpr_ros.datasets.images import read_rgb
    from vpr_ros.eval.recall import encode_paths

    if not extras:
        return EncodedSet(encode_paths(encoder, paths, batch_size, desc, progress))
    missing = [e for e in extras if e not in encoder.output_names]
    if missing:
        raise BackendError(f"the {encoder.backend} encoder has outputs {encoder.output_names}, "
                           f"not {missing}")

    def batches() -> Iterator[dict[str, np.ndarray]]:
        with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress,
                  leave=False) as bar:
            for s in range(0, len(paths), batch_size):
                chunk = paths[s:s + batch_size]
                yield encoder.encode_all([read_rgb(p) for p in chunk])
                bar.update(len(chunk))

    return collect_outputs(batches(), len(paths), encoder.dim, extras)


def collect_outputs(batches: Iterable[dict[str, np.ndarray]], n: int, dim: int,
                    extras: Sequence[str]) -> EncodedSet:
    """An EncodedSet from per-batch ``encode_all``-style outputs (in image order), keeping
    ``global`` and the ``extras``; shared by full encoding and cached-feature heads so both
    store the arrays the same way."""
    glob = np.empty((n, dim), dtype=np.float32)
    kept: dict[str, np.ndarray] = {}
    s = 0
    for out in batches:
        b = len(out["global"])
        glob[s:s + b] = out["global"]
        for name in extras:
            value = np.asarray(out[name])
            if name not in kept:
                kept[name] = np.empty((n, *value.shape[1:]), dtype=value.dtype)
            kept[name][s:s + b] = value
        s += b
    if s != n:
        raise BackendError(f"encoded {s} images, expected {n}")
    if "binary" in kept and kept["binary"].dtype != np.uint8:
        raise BackendError(f"the model's 'binary' output has dtype {kept['binary'].dtype}; "
                           "expected packed uint8 hash codes (re-export the model)")
    return EncodedSet(glob, kept.get("binary"), kept.get("local"))
