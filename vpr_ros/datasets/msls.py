"""Mapillary Street-Level Sequences (Warburg et al., CVPR 2020), train/val part.

Official layout: ``<root>/train_val/<city>/{database,query}/`` each with ``postprocessed.csv``
(``key, easting, northing, ...``: UTM metres), ``raw.csv`` (``key, lon, lat, ..., pano``) and
``images/<key>.jpg``. The official loader (mapillary_sls ``msls.py``) reads exactly these
columns and drops panoramas (``raw.csv`` ``pano == True``); so does this reader.

For training, the query and database images of a city are pooled and grouped into places by a
``cell_m`` UTM grid (the official loader counts database images within 10 m of a query as
positives, hence the 10 m default). Places are keyed by (city, row, col), so two cities never
share a place, and cells are ordered city by city, row-major, so splits are contiguous blocks.
For evaluation, a ``query/`` or ``database/`` folder is read as positioned images, and
:func:`val_folders` names the (database, query) folders of the validation cities, Copenhagen
and San Francisco, which validation uses together (each city's queries against both cities'
pooled database, positives from the query's own city).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable

import numpy as np

from vpr_ros.datasets.place_set import PlaceSet, concat_labels
from vpr_ros.datasets.utm_folder import grid_places, ordered_places
from vpr_ros.errors import InputError

TRAIN_CITIES = ("trondheim", "london", "boston", "melbourne", "amsterdam", "helsinki", "tokyo",
                "toronto", "saopaulo", "moscow", "zurich", "paris", "bangkok", "budapest",
                "austin", "berlin", "ottawa", "phoenix", "goa", "amman", "nairobi", "manila")
VAL_CITIES = ("cph", "sf")


def is_msls_folder(folder: str | Path) -> bool:
    return (Path(folder) / "postprocessed.csv").is_file()


def _read_csv(path: Path, needed: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise InputError(f"{path}: missing; an MSLS sub-folder holds postprocessed.csv, raw.csv "
                         "and images/")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        absent = [c for c in needed if c not in (reader.fieldnames or [])]
        if absent:
            raise InputError(f"{path}: missing column(s) {absent}; expected at least "
                             f"{list(needed)} (the official MSLS files)")
        return list(reader)


def read_msls_folder(folder: str | Path, exclude_panos: bool = True
                     ) -> tuple[list[Path], np.ndarray]:
    """Images of one ``query/`` or ``database/`` folder and their (N, 2) UTM positions."""
    paths, pos, _ = read_msls_folder_headings(folder, exclude_panos)
    return paths, pos


def read_msls_folder_headings(folder: str | Path, exclude_panos: bool = True
                              ) -> tuple[list[Path], np.ndarray, np.ndarray | None]:
    """:func:`read_msls_folder` plus each image's compass heading in degrees (``raw.csv``
    column ``ca``, the camera's absolute orientation), or None when ``raw.csv`` has no such
    column; the heading rule of the MSLS evaluation needs it."""
    d = Path(folder)
    rows = _read_csv(d / "postprocessed.csv", ("key", "easting", "northing"))
    panos: set[str] = set()
    compass: dict[str, str] | None = None
    if (d / "raw.csv").is_file():
        raw = _read_csv(d / "raw.csv", ("key", "pano"))
        if exclude_panos:
            panos = {r["key"] for r in raw if r["pano"].strip().lower() in ("true", "1")}
        if raw and "ca" in raw[0]:
            compass = {r["key"]: r["ca"] for r in raw}
    paths, pos, headings = [], [], []
    for i, r in enumerate(rows):
        if r["key"] in panos:
            continue
        try:
            e, n = float(r["easting"]), float(r["northing"])
        except ValueError:
            raise InputError(f"{d / 'postprocessed.csv'}:{i + 2}: easting/northing "
                             f"{r['easting']!r}/{r['northing']!r} are not numbers") from None
        if compass is not None:
            try:
                headings.append(float(compass[r["key"]]))
            except (KeyError, ValueError):
                raise InputError(f"{d / 'raw.csv'}: no numeric compass angle 'ca' for key "
                                 f"{r['key']!r}; the file does not match postprocessed.csv"
                                 ) from None
        paths.append(d / "images" / f"{r['key']}.jpg")
        pos.append((e, n))
    heading_array = np.array(headings, dtype=np.float64) if compass is not None else None
    return paths, np.array(pos, dtype=np.float64).reshape(-1, 2), heading_array


def _city_root(root: Path) -> Path:
    return root / "train_val" if (root / "train_val").is_dir() else root


def read_msls(root: str | Path, cities: Iterable[str] | str | None = None, cell_m: float = 10.0,
              name: str = "msls") -> PlaceSet:
    """MSLS train/val cities as a PlaceSet (``cities``: names, ``"train"``, ``"val"`` or None
    for every city folder present)."""
    base = _city_root(Path(root))
    if not base.is_dir():
        raise InputError(f"{root}: no such MSLS folder")
    present = sorted(p.name for p in base.iterdir() if (p / "database").is_dir())
    if cities is None or cities == "all":
        chosen = present
    elif cities == "train":
        chosen = [c for c in TRAIN_CITIES if c in present]
    elif cities == "val":
        chosen = [c for c in VAL_CITIES if c in present]
    else:
        chosen = [cities] if isinstance(cities, str) else list(cities)
        missing = [c for c in chosen if c not in present]
        if missing:
            raise InputError(f"{base}: no city folder(s) {missing}; present: {present}")
    if not chosen:
        raise InputError(f"{base}: no MSLS city folders (<city>/database/) found")
    paths: list[Path] = []
    keys: list[tuple] = []
    positions = []
    for city in chosen:
        for sub in ("database", "query"):
            p, pos = read_msls_folder(base / city / sub)
            paths += p
            positions.append(pos)
            keys += grid_places(pos, cell_m, prefix=(city,))
    labels, _ = concat_labels(keys)
    return PlaceSet(name=name, source=base, paths=tuple(paths), labels=labels,
                    place_order=ordered_places(keys, labels),
                    positions=np.concatenate(positions) if positions else None)


def val_folders(root: str | Path, cities: Iterable[str] = VAL_CITIES) -> list[tuple[Path, Path]]:
    """(database, query) folders of ``cities`` (default: MSLS-val's cph and sf), or InputError
    naming what is missing (a validation that silently drops a city measures something else)."""
    base = _city_root(Path(root))
    out, missing = [], []
    for city in cities:
        db, q = base / city / "database", base / city / "query"
        if is_msls_folder(db) and is_msls_folder(q):
            out.append((db, q))
        else:
            missing.append(city)
    if missing:
        raise InputError(f"{base}: MSLS city folder(s) {missing} lack database/ or query/ with "
                         "postprocessed.csv; download the MSLS train_val part (both validation "
                         "cities) or name the cities present")
    return out
