"""Index-aligned traversals: folders whose N-th images (in sorted name order) are the same place.

The shared Nordland thumbnails are the example: ``summer/images-N.png`` and
``winter/images-N.png`` show the same spot. Places are frame indices (or blocks of
``place_size`` consecutive frames), ordered along the route, so a split by route position is a
contiguous stretch of track. ``nordland:<season>`` names a season folder of the shared archive
(extracted on first use), so commands and configs need no machine-specific path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from vpr_ros.datasets.images import list_images
from vpr_ros.datasets.place_set import PlaceSet
from vpr_ros.errors import InputError

NORDLAND_PREFIX = "nordland:"


def resolve_folder(spec: str | Path) -> Path:
    """A folder path, or ``nordland:<season>`` -> that season of the shared Nordland data."""
    s = str(spec)
    if s.startswith(NORDLAND_PREFIX):
        from vpr_ros.datasets.nordland import nordland_root

        season = s[len(NORDLAND_PREFIX):]
        folder = nordland_root() / season
        if not folder.is_dir():
            raise InputError(f"{spec}: the Nordland data has no season {season!r}; use "
                             "nordland:summer or nordland:winter")
        return folder
    return Path(spec)


def read_aligned(folders: Sequence[str | Path], place_size: int = 1, name: str = "aligned"
                 ) -> PlaceSet:
    """Every image of every folder; image j of each folder belongs to place ``j // place_size``."""
    if len(folders) < 1:
        raise InputError(f"{name}: 'folders' lists no traversal folder")
    if place_size < 1:
        raise InputError(f"{name}: place_size={place_size} must be >= 1")
    resolved = [resolve_folder(f) for f in folders]
    lists = [list_images(f) for f in resolved]
    counts = {str(f): len(files) for f, files in zip(resolved, lists)}
    if len(set(counts.values())) != 1:
        raise InputError(f"{name}: index-aligned folders must hold the same number of images "
                         f"(image N of each is the same place), got {counts}; remove the "
                         "unmatched images or use a positioned (UTM/MSLS) dataset instead")
    n = len(lists[0])
    labels = np.tile(np.arange(n, dtype=np.int64) // place_size, len(lists))
    paths = tuple(p for files in lists for p in files)
    return PlaceSet(name=name, source=resolved[0].parent, paths=paths, labels=labels,
                    place_order=np.unique(labels))
