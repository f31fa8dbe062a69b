"""From a recipe's ``data.train`` entries to torch datasets and place-balanced loaders.

Images are prepared the way the runtime prepares them (``runtime.preprocess.resize_image``, or
``runtime.float_resize`` for a model that records a release's float interpolation: the same
resize policy and interpolation), then RandAugmented, then normalised with the model's mean/std, so a model sees at training time what the node will feed it (only the size differs
when the recipe trains smaller than it tests, as DINOv2 recipes do: 224 train, 322 test).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vpr_ros.datasets.gsv_cities import read_gsv_cities
from vpr_ros.datasets.images import read_rgb
from vpr_ros.datasets.msls import read_msls
from vpr_ros.datasets.place_set import PlaceSet, split_by_route
from vpr_ros.datasets.traversals import read_aligned
from vpr_ros.datasets.utm_folder import read_utm_place_set
from vpr_ros.errors import InputError
from vpr_ros.models.config import InputConfig
from vpr_ros.runtime.preprocess import Preprocessing, resize_image
from vpr_ros.train.config import AugmentConfig, DatasetConfig, TrainConfig
from vpr_ros.train.sampler import PlaceBatchSampler

log = logging.getLogger(__name__)


def read_place_set(d: DatasetConfig, cfg: TrainConfig) -> PlaceSet:
    """Read one ``data.train`` entry, check its images, apply its split and the K filter."""
    if d.kind == "gsv_cities":
        ps = read_gsv_cities(cfg.resolve(d.path), d.cities, name=d.name)
    elif d.kind == "msls":
        ps = read_msls(cfg.resolve(d.path), d.cities, cell_m=d.cell_m, name=d.name)
    elif d.kind == "utm_folder":
        ps = read_utm_place_set(cfg.resolve(d.path), cell_m=d.cell_m, name=d.name)
    elif d.kind == "aligned":
        folders = [f if f.startswith("nordland:") else cfg.resolve(f) for f in d.folders]
        ps = read_aligned(folders, place_size=d.place_size, name=d.name)
    elif d.kind == "nordland":
        ps = read_aligned([f"nordland:{s}" for s in d.seasons], place_size=d.place_size,
                          name=d.name)
    else:  # the config parser already refuses other kinds
        raise InputError(f"{d.name}: unknown dataset kind {d.kind!r}")
    ps = ps.require_nonempty()
    if d.split != (0.0, 1.0):
        ps = split_by_route(ps, *d.split)
    ps = ps.drop_bad_images(d.on_bad_image, decode=d.verify_images).require_nonempty(
        "dataset after removing bad images")
    ps = ps.require_images_per_place(d.images_per_place)
    if ps.num_places < d.places_per_batch:
        raise InputError(f"{d.name} ({ps.source}): {ps.num_places} usable places, fewer than "
                         f"places_per_batch={d.places_per_batch}; lower places_per_batch or "
                         "widen the split")
    log.info("%s: %d images of %d places (%s)", d.name, len(ps), ps.num_places,
             ", ".join(ps.notes) or "all used")
    return ps


def make_randaugment(cfg: AugmentConfig) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """torchvision RandAugment on uint8 CHW tensors (bilinear, as QAA's recipe), or None."""
    if cfg.randaugment is None or cfg.randaugment.num_ops == 0:
        return None
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2

    return v2.RandAugment(num_ops=cfg.randaugment.num_ops,
                          magnitude=cfg.randaugment.magnitude,
                          interpolation=InterpolationMode.BILINEAR)


class ImageTransform:
    """RGB uint8 HxWx3 -> normalised float CHW at ``size``, with optional augmentation."""

    def __init__(self, inp: InputConfig, size: tuple[int, int],
                 augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.prep = Preprocessing(size=tuple(size), mean=tuple(inp.mean), std=tuple(inp.std),
                                  resize=inp.resize, interpolation=inp.interpolation)
        self.augment = augment
        self.mean = torch.tensor(inp.mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(inp.std, dtype=torch.float32).view(3, 1, 1) * 255.0)

    def __call__(self, rgb: np.ndarray, augment: bool = True) -> torch.Tensor:
        if self.prep.interpolation != "opencv":
            return self._float(rgb, augment)
        img = torch.from_numpy(np.ascontiguousarray(resize_image(rgb, self.prep))).permute(2, 0, 1)
        if augment and self.augment is not None:
            img = self.augment(img)
        return (img.float() - self.mean) * self.inv_std

    def _float(self, rgb: np.ndarray, augment: bool) -> torch.Tensor:
        """The release transform: resized as float in [0, 1] (runtime.float_resize),
        RandAugmented as a float image (torchvision v2 takes [0, 1] floats), normalised."""
        from vpr_ros.runtime import float_resize

        frame = torch.from_numpy(np.ascontiguousarray(rgb))
        img = float_resize.resize_unit(frame[None], self.prep)
        if augment and self.augment is not None:
            img = self.augment(img[0])[None]
        return float_resize.normalise(img.clone(), self.prep)[0]


class PlaceImageDataset(Dataset):
    """Image i of a PlaceSet, transformed, with its place label."""

    def __init__(self, ps: PlaceSet, transform: ImageTransform) -> None:
        self.ps = ps
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ps)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_rgb(self.ps.paths[i])), int(self.ps.labels[i])


class CachedFeatureDataset(Dataset):
    """Backbone features of image i (one of its cached views, chosen at random) + its label."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray,
                 cls_tokens: Optional[torch.Tensor] = None) -> None:
        self.features = features  # (N, V, C, h, w), float16
        self.cls_tokens = cls_tokens  # (N, V, C) or None
        self.labels = labels

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, i: int):
        v = int(torch.randint(self.features.shape[1], (1,)))
        feats = self.features[i, v].float()
        if self.cls_tokens is None:
            return feats, int(self.labels[i])
        return feats, self.cls_tokens[i, v].float(), int(self.labels[i])


@dataclass
class TrainSet:
    """A dataset ready for the loop: its config, its places and the torch dataset."""

    cfg: DatasetConfig
    places: PlaceSet
    dataset: Dataset

    def loader(self, seed: int, rank: int, world_size: int, num_workers: int,
               batches_per_epoch: Optional[int]) -> DataLoader:
        sampler = PlaceBatchSampler(self.places.labels, self.cfg.places_per_batch,
                                    self.cfg.images_per_place, seed=seed, rank=rank,
                                    world_size=world_size, batches_per_epoch=batches_per_epoch,
                                    source=f"{self.cfg.name} ({self.places.source})")
        cached = isinstance(self.dataset, CachedFeatureDataset)
        workers = 0 if cached else num_workers
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())


def state_hash(module: torch.nn.Module) -> str:
    """A short hash of a module's weights and buffers: the part of a feature-cache key that
    says which backbone computed the features (a fine-tuned one never matches)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(parts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@torch.no_grad()
def compute_features(backbone: torch.nn.Module, paths: tuple[Path, ...], transform: ImageTransform,
                     variants: int, seed: int, batch_size: int, device: torch.device,
                     desc: str, progress: bool = True
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Backbone features of every image: view 0 un-augmented, views 1.. RandAugmented (seeded
    per view so a cache is reproducible). Returns float16 (N, V, C, h, w) [+ (N, V, C) tokens]."""
    from tqdm import tqdm

    backbone.eval()
    feats: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = None
    n = len(paths)
    bar = tqdm(total=n * variants, desc=desc, unit="view", disable=not progress, leave=False)
    saved_rng = torch.random.get_rng_state()
    try:
        for start in range(0, n, batch_size):
            rgbs = [read_rgb(p) for p in paths[start:start + batch_size]]
            for v in range(variants):
                torch.manual_seed((seed * 1_000_003 + start * 257 + v) % 2**31)  # reproducible
                batch = torch.stack([transform(rgb, augment=v > 0) for rgb in rgbs])
                out = backbone(batch.to(device))
                f = out.features.to("cpu", torch.float16)
                if feats is None:
                    feats = torch.empty((n, variants, *f.shape[1:]), dtype=torch.float16)
                    if out.cls_token is not None:
                        tokens = torch.empty((n, variants, out.cls_token.shape[-1]),
                                             dtype=torch.float16)
                feats[start:start + len(rgbs), v] = f
                if tokens is not None:
                    tokens[start:start + len(rgbs), v] = out.cls_token.to("cpu", torch.float16)
                bar.update(len(rgbs))
    finally:
        torch.random.set_rng_state(saved_rng)
    bar.close()
    assert feats is not None
    return feats, tokens


def load_or_compute_features(cache_dir: Path, key_parts: list[str], **kwargs
                             ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Features from ``cache_dir`` if an entry with the same key exists, else computed and
    stored atomically (so a resumed run, or another run of the same recipe, reuses them)."""
    import os

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"features-{cache_key(key_parts)}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            log.info("feature cache hit: %s", path)
            return blob["features"], blob.get("tokens")
        except Exception as exc:  # a truncated cache file is recomputed, not fatal
            log.warning("feature cache %s unreadable (%s); recomputing", path, exc)
    feats, tokens = compute_features(**kwargs)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"features": feats, "tokens": tokens, "key": key_parts}, tmp)
    os.replace(tmp, path)
    return feats, tokens
