"""Image folders whose file names carry UTM coordinates: ``@<easting>@<northing>@...@.jpg``.

This is the layout of the common VPR evaluation sets as formatted by
gmberton/VPR-datasets-downloader (Pitts30k/250k, Tokyo 24/7, SF-XL, St Lucia, ...): an
evaluation set is a folder with ``database/`` and ``queries/`` (possibly under
``images/test/``), and a query's positives are the database images within 25 m. SF-XL's
training set uses the same names (more fields follow the northing; only the first two are read).

For training, images are grouped into places by a square UTM grid (``cell_m``, CosPlace uses
10 m cells): images in one cell show the same place. Cells are ordered row-major (northing,
then easting), so a contiguous split takes a band of the map, never interleaved frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vpr_ros.datasets.images import list_images
from vpr_ros.datasets.place_set import PlaceSet, concat_labels
from vpr_ros.errors import InputError


def parse_utm_name(path: str | Path) -> tuple[float, float]:
    """(easting, northing) from ``@easting@northing@...`` or InputError naming the file."""
    name = Path(path).name
    fields = name.split("@")
    if len(fields) < 3:
        raise InputError(f"{path}: file name does not follow the '@easting@northing@...@.jpg' "
                         "format of the VPR evaluation sets; rename the files or use an "
                         "index-aligned folder (--tolerance) instead")
    try:
        east, north = float(fields[1]), float(fields[2])
    except ValueError:
        raise InputError(f"{path}: UTM fields {fields[1]!r}, {fields[2]!r} are not numbers "
                         "(expected '@easting@northing@...')") from None
    if not (np.isfinite(east) and np.isfinite(north)):
        raise InputError(f"{path}: UTM coordinates are not finite")
    return east, north


def read_utm_images(folder: str | Path, recursive: bool = True) -> tuple[list[Path], np.ndarray]:
    """Image paths (sorted) and their (N, 2) UTM positions."""
    paths = list_images(folder, recursive=recursive)
    pos = np.array([parse_utm_name(p) for p in paths], dtype=np.float64).reshape(-1, 2)
    return paths, pos


def grid_places(positions: np.ndarray, cell_m: float, prefix: tuple = ()) -> list[tuple]:
    """One hashable place key per position: ``prefix + (row, col)`` of a ``cell_m`` grid."""
    if not cell_m > 0:
        raise InputError(f"cell_m={cell_m} must be a positive distance in metres")
    cells = np.floor(np.asarray(positions) / float(cell_m)).astype(np.int64)
    return [prefix + (int(n), int(e)) for e, n in cells]


def ordered_places(keys: list[tuple], labels: np.ndarray) -> np.ndarray:
    """Label ids sorted by their key (city, row, col): contiguous blocks of the map."""
    first: dict[int, tuple] = {}
    for k, lab in zip(keys, labels.tolist()):
        first.setdefault(lab, k)
    return np.array([lab for lab, _ in sorted(first.items(), key=lambda kv: kv[1])],
                    dtype=np.int64)


def read_utm_place_set(folder: str | Path, cell_m: float = 10.0, name: str = "utm_folder"
                       ) -> PlaceSet:
    """Training view of a UTM-named folder (recursive): places = ``cell_m`` grid cells."""
    paths, pos = read_utm_images(folder)
    keys = grid_places(pos, cell_m)
    labels, _ = concat_labels(keys)
    return PlaceSet(name=name, source=Path(folder), paths=tuple(paths), labels=labels,
                    place_order=ordered_places(keys, labels), positions=pos)


def find_eval_folders(root: str | Path) -> tuple[Path, Path]:
    """``database/`` and ``queries/`` of an evaluation set (directly or under images/test/)."""
    base = Path(root)
    for cand in (base, base / "images" / "test"):
        if (cand / "database").is_dir() and (cand / "queries").is_dir():
            return cand / "database", cand / "queries"
    raise InputError(f"{base}: not a VPR evaluation set (expected database/ and queries/ "
                     "folders, directly or under images/test/)")
