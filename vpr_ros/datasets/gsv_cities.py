"""GSV-Cities (Ali-bey et al., Neurocomputing 2022): ``Dataframes/<city>.csv`` + ``Images/<city>/``.

Layout of the released dataset (as read by its authors' loaders in amaralibey/gsv-cities,
OpenVPRLab and Bag-of-Queries): one CSV per city with the columns
``place_id, year, month, northdeg, city_id, lat, lon, panoid``; each row is one image, stored as

    Images/<city_id>/<city_id>_<place_id:07d>_<year:04d>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg

where ``lat``/``lon`` are Python's ``str(float)`` of the CSV values. Because a float written by
one program and re-read by another may not print the same way, a row whose expected name is not
on disk is matched again by its (place_id, year, month, northdeg, panoid) against the city
folder's listing, which the name's other fields determine uniquely. place_id restarts at 0 in
every city, so places are keyed by (city, place_id).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterable

import numpy as np

from vpr_ros.datasets.place_set import PlaceSet, concat_labels
from vpr_ros.errors import InputError

log = logging.getLogger(__name__)

COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")


def image_name(city: str, place_id: int, year: int, month: int, northdeg: int, lat: str,
               lon: str, panoid: str) -> str:
    """The file name the dataset uses for one row."""
    return (f"{city}_{place_id:07d}_{year:04d}_{month:02d}_{northdeg:03d}_"
            f"{float(lat)}_{float(lon)}_{panoid}.jpg")


def _name_key(name: str) -> tuple[int, int, int, int, str] | None:
    """(place_id, year, month, northdeg, panoid) from a file name, or None if not one."""
    stem = name[:-4] if name.lower().endswith(".jpg") else None
    if stem is None:
        return None
    parts = stem.split("_")
    if len(parts) < 8:
        return None
    try:
        return (int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4]), "_".join(parts[7:]))
    except ValueError:
        return None


def _int(value: str, where: str, column: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        raise InputError(f"{where}: column {column!r} has {value!r}, expected a number; the CSV "
                         "is corrupt: restore it from the dataset archive") from None


def available_cities(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "Dataframes").glob("*.csv"))


def read_gsv_cities(root: str | Path, cities: Iterable[str] | str | None = None,
                    name: str = "gsv_cities") -> PlaceSet:
    """All images of the chosen cities (``None`` or ``"all"``: every CSV in Dataframes/)."""
    base = Path(root)
    frames = base / "Dataframes"
    if not frames.is_dir():
        raise InputError(f"{base}: not a GSV-Cities folder (no Dataframes/ sub-folder); point "
                         "path at the folder holding Dataframes/ and Images/")
    if cities is None or cities == "all":
        chosen = available_cities(base)
        if not chosen:
            raise InputError(f"{frames}: holds no <city>.csv file")
    else:
        chosen = [cities] if isinstance(cities, str) else list(cities)
        missing = [c for c in chosen if not (frames / f"{c}.csv").is_file()]
        if missing:
            raise InputError(f"{frames}: no dataframe for cit(y/ies) {missing}; available: "
                             f"{available_cities(base)}")
    paths: list[Path] = []
    keys: list[tuple[str, int]] = []
    for city in chosen:
        csv_path = frames / f"{city}.csv"
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            absent = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if absent:
                raise InputError(f"{csv_path}: missing column(s) {absent}; a GSV-Cities dataframe "
                                 f"has {list(COLUMNS)}")
            rows = list(reader)
        listing: dict[str, dict[tuple, str]] = {}
        for r_i, row in enumerate(rows):
            where = f"{csv_path}:{r_i + 2}"
            city_id = row["city_id"]
            pid = _int(row["place_id"], where, "place_id")
            year = _int(row["year"], where, "year")
            month = _int(row["month"], where, "month")
            north = _int(row["northdeg"], where, "northdeg")
            folder = base / "Images" / city_id
            try:
                fname = image_name(city_id, pid, year, month, north, row["lat"], row["lon"],
                                   row["panoid"])
            except ValueError:
                raise InputError(f"{where}: lat/lon {row['lat']!r}/{row['lon']!r} are not "
                                 "numbers; the CSV is corrupt") from None
            path = folder / fname
            if not path.is_file():
                if city_id not in listing:
                    listing[city_id] = ({k: n for n in (p.name for p in folder.glob("*.jpg"))
                                         if (k := _name_key(n)) is not None}
                                        if folder.is_dir() else {})
                alt = listing[city_id].get((pid, year, month, north, row["panoid"]))
                if alt is not None:
                    path = folder / alt
            paths.append(path)  # a still-missing file is reported by drop_bad_images
            keys.append((city, pid))
    labels, table = concat_labels(keys)
    order = np.array([table[k] for k in sorted(table)], dtype=np.int64)
    return PlaceSet(name=name, source=base, paths=tuple(paths), labels=labels, place_order=order)
