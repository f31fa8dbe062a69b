"""PlaceSet: images with place labels, the one shape every training reader produces.

Why one shape: the sampler (P places x K images), the splitters and the feature cache only need
"image i is a view of place labels[i]", plus an order of the places along the route or the map
so that splits take contiguous blocks. GSV-Cities, MSLS, UTM-named folders and index-aligned
traversals differ only in how they derive those labels, so each reader is a small function that
returns a PlaceSet and nothing downstream knows which dataset it came from.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from vpr_ros.datasets.images import find_bad_images, handle_bad_images
from vpr_ros.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlaceSet:
    """``paths[i]`` shows place ``labels[i]``; ``place_rank[label]`` orders places for splits.

    Attributes:
        name: what the user called the dataset (used in every message).
        source: the file or folder it was read from (named in every message).
        paths: image files.
        labels: (N,) int64 place id per image (any integers; not necessarily contiguous).
        place_order: unique place ids sorted by route/map position; contiguous slices of it are
            contiguous blocks of the route (aligned traversals) or of the map (UTM grid cells).
        positions: optional (N, 2) UTM easting/northing in metres.
    """

    name: str
    source: Path
    paths: tuple[Path, ...]
    labels: np.ndarray
    place_order: np.ndarray
    positions: np.ndarray | None = None
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "place_order", np.asarray(self.place_order, dtype=np.int64))
        if len(self.paths) != len(labels):
            raise InputError(f"{self.source}: {len(self.paths)} images but {len(labels)} labels")
        if self.positions is not None and np.asarray(self.positions).shape != (len(labels), 2):
            raise InputError(f"{self.source}: positions must be ({len(labels)}, 2)")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_places(self) -> int:
        return int(len(np.unique(self.labels)))

    def images_per_place(self) -> dict[int, int]:
        ids, counts = np.unique(self.labels, return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts)}

    def subset(self, keep: np.ndarray, note: str = "") -> "PlaceSet":
        """The images where ``keep`` (bool mask) is true; place order restricted accordingly."""
        keep = np.asarray(keep, dtype=bool)
        labels = self.labels[keep]
        present = np.isin(self.place_order, labels)
        return PlaceSet(name=self.name, source=self.source,
                        paths=tuple(p for p, k in zip(self.paths, keep) if k), labels=labels,
                        place_order=self.place_order[present],
                        positions=None if self.positions is None else self.positions[keep],
                        notes=self.notes + ((note,) if note else ()))

    def drop_bad_images(self, policy: str = "error", decode: bool = False) -> "PlaceSet":
        """Check every file exists (and, with ``decode``, decodes); apply ``on_bad_image``."""
        bad = find_bad_images(self.paths, decode)
        handle_bad_images(f"{self.name} ({self.source})", bad, policy)
        if not bad:
            return self
        bad_set = {p for p, _ in bad}
        keep = np.array([p not in bad_set for p in self.paths])
        return self.subset(keep, note=f"{len(bad)} bad images skipped")

    def require_images_per_place(self, k: int) -> "PlaceSet":
        """Drop places with fewer than ``k`` images (warning that names how many and the fix);
        an error if none are left, so training never silently runs on nothing."""
        counts = self.images_per_place()
        small = [pid for pid, c in counts.items() if c < k]
        if small:
            msg = (f"{self.name} ({self.source}): {len(small)} of {len(counts)} places have fewer "
                   f"than images_per_place={k} images and are not used for training; lower "
                   "images_per_place or add images of those places to use them")
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
        out = self.subset(~np.isin(self.labels, small),
                          note=f"{len(small)} small places dropped" if small else "")
        if out.num_places == 0:
            raise InputError(f"{self.name} ({self.source}): no place has at least "
                             f"images_per_place={k} images ({len(counts)} places, "
                             f"{len(self)} images); nothing to train on. Lower images_per_place "
                             "or check that the dataset's place labels are right.")
        return out

    def require_nonempty(self, what: str = "dataset") -> "PlaceSet":
        if len(self) == 0:
            raise InputError(f"{self.name} ({self.source}): the {what} is empty (0 images); "
                             "check the path, the city/season selection and the split range")
        return self


def split_by_route(ps: PlaceSet, start: float, end: float) -> PlaceSet:
    """The places whose rank in ``place_order`` lies in ``[start, end)`` (fractions of the
    number of places): a contiguous block of the route/map, never random frames, so no place
    (and no near-duplicate neighbour of a place, except across the one block boundary) lands in
    two splits."""
    if not (0.0 <= start < end <= 1.0):
        raise InputError(f"{ps.name}: split [{start}, {end}] must satisfy 0 <= start < end <= 1 "
                         "(fractions of the places along the route)")
    n = len(ps.place_order)
    lo, hi = int(round(start * n)), int(round(end * n))
    chosen = ps.place_order[lo:hi]
    out = ps.subset(np.isin(ps.labels, chosen), note=f"split [{start}, {end})")
    if len(out) == 0:
        raise InputError(f"{ps.name} ({ps.source}): split [{start}, {end}) of {n} places is "
                         "empty; widen the split range")
    return out


def concat_labels(groups: Sequence[tuple[object, ...]]) -> tuple[np.ndarray, dict]:
    """Dense int labels for hashable group keys, in first-seen order, and the key table."""
    table: dict = {}
    labels = np.empty(len(groups), dtype=np.int64)
    for i, key in enumerate(groups):
        labels[i] = table.setdefault(key, len(table))
    return labels, table
