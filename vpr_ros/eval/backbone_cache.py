"""Held-out backbone features, computed once for every zoo model on the same frozen backbone.

Why: the ``vpr eval zoo`` recipes all train a head on one frozen ImageNet backbone, so encoding
the held-out split once per model repeats the expensive part (about 100 ms of CPU per image)
eight times. The backbone features are computed once, stored under the runs folder, and each
model whose backbone is the same runs only its head on them
(:meth:`~vpr_ros.runtime.torch_encoder.TorchEncoder.encode_features_all`, the same code path and
output conversion as full encoding), so its rows equal ``vpr eval recall``'s.

The cache key says everything the features depend on: the backbone's weights and buffers
(state hash, as the training cache), its class and config, the runtime preprocessing (size,
resize policy, normalisation), the encoder backend (device and precision), and the image lists.
A fine-tuned backbone, another input size or another split never reuses an entry. Features are
stored as float32 (the training cache's float16 would move descriptors by ~1e-3).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from vpr_ros.errors import InputError
from vpr_ros.eval.encoded import EncodedSet, collect_outputs
from vpr_ros.models.backbones.base import BackboneOutput

log = logging.getLogger(__name__)

#: Bump when what is stored changes, so old entries are never read as new ones.
CACHE_VERSION = "eval-backbone-features-v1"

SetFeatures = tuple[torch.Tensor, Optional[torch.Tensor]]   # (N, C, h, w) [+ (N, C) tokens]


def backbone_key(encoder: Any, sets: Sequence[Sequence[Path]]) -> list[str]:
    """The cache key of ``encoder``'s backbone features of the image ``sets`` (see module doc)."""
    from vpr_ros.train.data import state_hash

    model = encoder.model
    lists = hashlib.sha256("\n\n".join("\n".join(map(str, s)) for s in sets).encode())
    return [CACHE_VERSION, state_hash(model.backbone), type(model.backbone).__qualname__,
            repr(model.config.backbone), json.dumps(encoder.preprocessing.to_dict()),
            f"{type(encoder).__name__}:{encoder.backend}", lists.hexdigest()]


def key_digest(key: Sequence[str]) -> str:
    from vpr_ros.train.data import cache_key

    return cache_key(list(key))


class HeldOutFeatures:
    """Backbone features of fixed image sets (database, queries), per backbone key, on disk
    (``cache_dir/heldout-<digest>.pt``) and in memory.

    Each set is batched from its own start with ``batch_size``, as full encoding batches it,
    so a head sees exactly the batches an encoder would have run."""

    def __init__(self, cache_dir: Path, sets: Sequence[Sequence[Path]], batch_size: int = 32,
                 progress: bool = True) -> None:
        self.cache_dir = Path(cache_dir)
        self.sets = [tuple(s) for s in sets]
        self.batch_size = int(batch_size)
        self.progress = progress
        self._mem: dict[str, list[SetFeatures]] = {}
        #: digest -> {"file", "reused" (found on disk), "compute_s", "compute_cpu_s"}
        self.entries: dict[str, dict[str, Any]] = {}

    def file(self, key: Sequence[str]) -> Path:
        return self.cache_dir / f"heldout-{key_digest(key)}.pt"

    def has(self, key: Sequence[str]) -> bool:
        """Whether features of ``key`` are already computed (this run, or on disk)."""
        return key_digest(key) in self._mem or self.file(key).is_file()

    def features(self, encoder: Any, key: Sequence[str]) -> list[SetFeatures]:
        """The features of every set: from memory, else from disk, else computed with
        ``encoder`` (whose :func:`backbone_key` must be ``key``) and stored atomically."""
        digest = key_digest(key)
        if digest in self._mem:
            return self._mem[digest]
        path = self.file(key)
        feats = self._load(path, key)
        entry: dict[str, Any] = {"file": str(path), "reused": feats is not None}
        if feats is None:
            t0, cpu0 = time.time(), time.process_time()
            feats = [self._compute(encoder, paths, f"backbone features {i + 1}/{len(self.sets)}")
                     for i, paths in enumerate(self.sets)]
            entry.update(compute_s=round(time.time() - t0, 2),
                         compute_cpu_s=round(time.process_time() - cpu0, 2))
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"key": list(key), "sets": [{"features": f, "tokens": t}
                                                   for f, t in feats]}, tmp)
            os.replace(tmp, path)
        self._mem[digest] = feats
        self.entries[digest] = entry
        return feats

    def _load(self, path: Path, key: Sequence[str]) -> Optional[list[SetFeatures]]:
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated file is recomputed, not fatal
            log.warning("held-out feature cache %s unreadable (%s); recomputing", path, exc)
            return None
        sets = blob.get("sets") or []
        if blob.get("key") != list(key) or [len(s["features"]) for s in sets] != \
                [len(s) for s in self.sets]:
            log.warning("held-out feature cache %s holds another key; recomputing", path)
            return None
        return [(s["features"], s.get("tokens")) for s in sets]

    def _compute(self, encoder: Any, paths: Sequence[Path], desc: str) -> SetFeatures:
        from tqdm import tqdm

        from vpr_ros.datasets.images import read_rgb

        feats: Optional[torch.Tensor] = None
        tokens: Optional[torch.Tensor] = None
        n = len(paths)
        with tqdm(total=n, desc=desc, unit="img", disable=not self.progress,
                  leave=False) as bar:
            for s in range(0, n, self.batch_size):
                chunk = paths[s:s + self.batch_size]
                out = encoder.backbone_features([read_rgb(p) for p in chunk])
                f = out.features.detach().to("cpu")
                if feats is None:
                    feats = torch.empty((n, *f.shape[1:]), dtype=f.dtype)
                    if out.cls_token is not None:
                        tokens = torch.empty((n, *out.cls_token.shape[1:]), dtype=f.dtype)
                feats[s:s + len(chunk)] = f
                if tokens is not None:
                    tokens[s:s + len(chunk)] = out.cls_token.detach().to("cpu")
                bar.update(len(chunk))
        if feats is None:
            raise InputError("no images to compute backbone features of")
        return feats, tokens

    def encode_fn(self, encoder: Any, key: Sequence[str], extras: Sequence[str] = ()):
        """An ``encode_fn`` for :func:`~vpr_ros.eval.tasks.encode_eval`: the model's head on
        the cached features of the set whose paths it is called with."""
        def encode(paths: Sequence[Path], desc: str) -> EncodedSet:
            try:
                i = self.sets.index(tuple(paths))
            except ValueError:
                raise InputError(f"{desc}: not one of the image sets whose backbone features "
                                 "are cached") from None
            feats, tokens = self.features(encoder, key)[i]
            bs = self.batch_size

            def batches():
                for s in range(0, len(paths), bs):
                    yield encoder.encode_features_all(BackboneOutput(
                        feats[s:s + bs], None if tokens is None else tokens[s:s + bs]))

            return collect_outputs(batches(), len(paths), encoder.dim, extras)

        return encode

