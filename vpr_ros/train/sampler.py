"""Place-balanced batches: P places x K images each, the batch shape metric-learning VPR needs.

Why a batch sampler and not a "place dataset" returning K stacked images (GSV-Cities' loader):
the sampler keeps the dataset a plain image-level map (so the same dataset class serves images
or cached backbone features) and owns every random choice, seeded per epoch, so a resumed run
and every DDP rank draw reproducible batches. Under DDP each rank takes every world_size-th
batch of the same epoch permutation: ranks never see the same place in the same step.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from vpr_ros.errors import InputError


class PlaceBatchSampler(Sampler[list[int]]):
    """Yields index lists of ``places_per_batch * images_per_place`` images, place-major.

    Each epoch visits every place at most once (a fresh permutation), picks ``images_per_place``
    distinct images of each, and drops the last incomplete batch. ``batches_per_epoch`` instead
    fixes the epoch length (places are re-permuted whenever they run out), which small datasets
    and multi-dataset training with a step budget want.
    """

    def __init__(self, labels: np.ndarray, places_per_batch: int, images_per_place: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 batches_per_epoch: int | None = None, source: str = "dataset") -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if places_per_batch < 2:
            raise InputError(f"{source}: places_per_batch={places_per_batch} must be >= 2 "
                             "(a batch needs negatives)")
        if images_per_place < 2:
            raise InputError(f"{source}: images_per_place={images_per_place} must be >= 2 (a "
                             "batch needs positives)")
        ids, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(ids)))[:-1]
        self._members = np.split(order, bounds) if len(ids) else []
        small = [int(ids[i]) for i, m in enumerate(self._members) if len(m) < images_per_place]
        if small:
            raise InputError(f"{source}: {len(small)} place(s) have fewer than "
                             f"images_per_place={images_per_place} images (e.g. {small[:5]}); "
                             "filter them first (PlaceSet.require_images_per_place)")
        per_rank_places = places_per_batch * world_size
        if len(ids) < places_per_batch:
            raise InputError(f"{source}: {len(ids)} place(s) but places_per_batch="
                             f"{places_per_batch}; lower places_per_batch or use more data")
        if batches_per_epoch is None and len(ids) < per_rank_places:
            raise InputError(f"{source}: {len(ids)} places cannot fill one batch of "
                             f"{places_per_batch} places on each of {world_size} processes; "
                             "lower places_per_batch or set batches_per_epoch")
        self.places_per_batch = places_per_batch
        self.images_per_place = images_per_place
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self._explicit_epoch = False

    @property
    def num_places(self) -> int:
        return len(self._members)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start; makes the batches a function of the epoch."""
        self.epoch = int(epoch)
        self._explicit_epoch = True

    def __len__(self) -> int:
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        return self.num_places // self.places_per_batch // self.world_size

    def _global_batches(self, rng: np.random.Generator, count: int) -> list[np.ndarray]:
        p = self.places_per_batch
        out: list[np.ndarray] = []
        while len(out) < count:
            perm = rng.permutation(self.num_places)
            out += [perm[i:i + p] for i in range(0, len(perm) - p + 1, p)]
        return out[:count]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n_local = len(self)
        batches = self._global_batches(rng, n_local * self.world_size)
        if not self._explicit_epoch:
            self.epoch += 1  # plain PyTorch use: a new permutation each pass
        for places in batches[self.rank::self.world_size][:n_local]:
            idx: list[int] = []
            for place in places:
                members = self._members[place]
                idx += rng.choice(members, self.images_per_place, replace=False).tolist()
            yield idx
