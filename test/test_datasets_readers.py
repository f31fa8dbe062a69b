"""Dataset readers on tiny synthetic copies of the real layouts, plus the shared Nordland data."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from vpr_ros.datasets.gsv_cities import image_name, read_gsv_cities
from vpr_ros.datasets.image_sets import read_image_set
from vpr_ros.datasets.msls import read_msls
from vpr_ros.datasets.place_set import split_by_route
from vpr_ros.datasets.traversals import read_aligned
from vpr_ros.datasets.utm_folder import find_eval_folders, parse_utm_name, read_utm_place_set
from vpr_ros.errors import InputError


def _jpg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def make_gsv(root: Path, cities: dict[str, list[tuple[int, int]]]) -> None:
    """cities: name -> [(place_id, n_images)]; names exactly as the dataset writes them."""
    (root / "Dataframes").mkdir(parents=True)
    seed = 0
    for city, places in cities.items():
        with open(root / "Dataframes" / f"{city}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["place_id", "year", "month", "northdeg", "city_id", "lat", "lon",
                        "panoid"])
            for pid, n in places:
                for j in range(n):
                    lat, lon = f"{45.5 + pid * 1e-3:.5f}0", f"{-73.6 - j * 1e-4}"
                    row = [pid, 2015 + j, 3 + j, 90 * j, city, lat, lon, f"pano_{pid}-{j}x"]
                    w.writerow(row)
                    name = image_name(city, pid, 2015 + j, 3 + j, 90 * j, lat, lon, row[7])
                    _jpg(root / "Images" / city / name, seed)
                    seed += 1


def test_gsv_cities_layout_names_and_places(tmp_path: Path) -> None:
    make_gsv(tmp_path, {"Boston": [(0, 4), (1, 4), (7, 5)], "PRS": [(0, 4), (3, 2)]})
    # The dataset's own naming: city_placeid(7)_year(4)_month(2)_northdeg(3)_lat_lon_panoid.jpg
    assert image_name("PRS", 12, 2019, 4, 5, "48.8", "2.35", "a_b") == \
        "PRS_0000012_2019_04_005_48.8_2.35_a_b.jpg"
    ps = read_gsv_cities(tmp_path)
    assert len(ps) == 19 and ps.num_places == 5  # place_id 0 of Boston != place_id 0 of PRS
    assert all(p.is_file() for p in ps.paths)
    only = read_gsv_cities(tmp_path, cities=["PRS"])
    assert len(only) == 6 and only.num_places == 2
    k4 = ps.require_images_per_place  # places with < K images are dropped with a warning
    with pytest.warns(UserWarning, match="fewer than images_per_place=4"):
        kept = k4(4)
    assert kept.num_places == 4 and len(kept) == 17


def test_gsv_cities_float_spelling_falls_back_to_listing(tmp_path: Path) -> None:
    make_gsv(tmp_path, {"Rome": [(2, 3)]})
    # A float printed by another parser one ulp away: the name on disk no longer equals
    # str(float(csv value)); the row is matched by its other fields instead.
    folder = tmp_path / "Images" / "Rome"
    for p in list(folder.glob("*_45.502_*.jpg"))[:2]:
        p.rename(folder / p.name.replace("_45.502_", "_45.50200000000001_"))
    ps = read_gsv_cities(tmp_path)
    assert len(ps) == 3 and all(p.is_file() for p in ps.paths)
    assert sum("45.50200000000001" in p.name for p in ps.paths) == 2


def test_gsv_cities_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no Dataframes"):
        read_gsv_cities(tmp_path)
    make_gsv(tmp_path, {"Boston": [(0, 4)]})
    with pytest.raises(InputError, match=r"Madrid.*available: \['Boston'\]"):
        read_gsv_cities(tmp_path, cities=["Madrid"])
    missing = next((tmp_path / "Images" / "Boston").glob("*.jpg"))
    missing.unlink()
    ps = read_gsv_cities(tmp_path)
    with pytest.raises(InputError, match=rf"{missing.name}.*on_bad_image: skip"):
        ps.drop_bad_images("error")
    with pytest.warns(UserWarning, match="skipping 1 missing"):
        assert len(ps.drop_bad_images("skip")) == 3
    (tmp_path / "Dataframes" / "Bad.csv").write_text("place_id,year\n1,2\n")
    with pytest.raises(InputError, match=r"Bad.csv: missing column"):
        read_gsv_cities(tmp_path, cities=["Bad"])


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    make_gsv(tmp_path, {"Boston": [(0, 4)]})
    broken = next((tmp_path / "Images" / "Boston").glob("*.jpg"))
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    ps = read_gsv_cities(tmp_path)
    assert len(ps.drop_bad_images("error", decode=False)) == 4  # exists: found only by decoding
    with pytest.raises(InputError, match=rf"{broken.name} \(unreadable\)"):
        ps.drop_bad_images("error", decode=True)


def _utm(folder: Path, east: float, north: float, i: int) -> Path:
    return _jpg(folder / f"@{east:.2f}@{north:.2f}@17@T@045.0@-073.0@pano{i}@@@@@@@@.jpg", i)


def test_utm_folders_positions_and_grid_places(tmp_path: Path) -> None:
    pts = [(500000.0, 4000000.0), (500003.0, 4000004.0), (500100.0, 4000000.0),
           (500104.0, 4000002.0), (500000.0, 4000200.0)]
    for i, (e, n) in enumerate(pts):
        _utm(tmp_path / "train" / "sub", e, n, i)
    assert parse_utm_name("@0543256.96@4178749.25@10@S@.jpg") == (543256.96, 4178749.25)
    with pytest.raises(InputError, match="@easting@northing"):
        parse_utm_name("image_001.jpg")
    ps = read_utm_place_set(tmp_path / "train", cell_m=10.0)
    assert len(ps) == 5 and ps.num_places == 3  # two cells of 2 images, one of 1
    assert ps.positions is not None and ps.positions.shape == (5, 2)
    # Cells ordered by (row, col): the two southern cells first, west to east.
    first = split_by_route(ps, 0.0, 0.34)
    assert sorted(first.positions[:, 0].tolist()) == [500000.0, 500003.0]

    for i, (e, n) in enumerate(pts[:3]):
        _utm(tmp_path / "ev" / "images" / "test" / "database", e, n, 10 + i)
    _utm(tmp_path / "ev" / "images" / "test" / "queries", 500001.0, 4000001.0, 20)
    db_dir, q_dir = find_eval_folders(tmp_path / "ev")
    db = read_image_set(db_dir)
    assert db.kind == "utm" and len(db) == 3 and db.positions is not None


def make_msls(root: Path) -> None:
    for city, base in (("boston", 330000.0), ("cph", 720000.0)):
        for sub, offs in (("database", (0.0, 4.0, 50.0, 53.0)), ("query", (1.0, 51.0, 300.0))):
            d = root / "train_val" / city / sub
            (d / "images").mkdir(parents=True)
            with open(d / "postprocessed.csv", "w", newline="") as f, \
                    open(d / "raw.csv", "w", newline="") as g:
                pw, rw = csv.writer(f), csv.writer(g)
                pw.writerow(["", "key", "easting", "northing", "night", "view_direction"])
                rw.writerow(["", "key", "lon", "lat", "ca", "captured_at", "pano"])
                for i, o in enumerate(offs):
                    key = f"{city}{sub}{i}"
                    pw.writerow([i, key, base + o, 4690000.0, False, "Forward"])
                    rw.writerow([i, key, -71.0, 42.3, 0, 0, sub == "query" and i == 2])
                    _jpg(d / "images" / f"{key}.jpg", i)


def test_msls_places_panos_and_eval_folder(tmp_path: Path) -> None:
    make_msls(tmp_path)
    ps = read_msls(tmp_path, cities=["boston"], cell_m=10.0)
    # database 0,4 + query 1 share a cell; 50,53 + query 51 share one; the pano is dropped
    assert len(ps) == 6 and ps.num_places == 2
    both = read_msls(tmp_path)
    assert both.num_places == 4  # same coordinates in two cities are still different places
    assert read_msls(tmp_path, cities="val").num_places == 2
    q = read_image_set(tmp_path / "train_val" / "cph" / "query")
    assert q.kind == "msls" and len(q) == 2 and q.positions is not None
    with pytest.raises(InputError, match=r"no city folder\(s\) \['paris'\]"):
        read_msls(tmp_path, cities=["paris"])


def test_aligned_traversals_and_route_split(tmp_path: Path) -> None:
    for season in ("a", "b"):
        for i in range(10):
            _jpg(tmp_path / season / f"img-{i:03d}.jpg", i)
    ps = read_aligned([tmp_path / "a", tmp_path / "b"], place_size=2)
    assert len(ps) == 20 and ps.num_places == 5
    assert ps.labels[3] == ps.labels[2] == ps.labels[12] == 1
    head = split_by_route(ps, 0.0, 0.6)
    tail = split_by_route(ps, 0.6, 1.0)
    assert set(head.labels) == {0, 1, 2} and set(tail.labels) == {3, 4}  # contiguous blocks
    with pytest.raises(InputError, match="split .* is empty"):
        split_by_route(ps, 0.0, 0.05)
    _jpg(tmp_path / "b" / "img-999.jpg", 99)
    with pytest.raises(InputError, match="same number of images"):
        read_aligned([tmp_path / "a", tmp_path / "b"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="contains no images"):
        read_aligned([tmp_path / "empty"])


def test_nordland_as_aligned_traversals(nordland_root: Path) -> None:
    ps = read_aligned([nordland_root / "summer", nordland_root / "winter"], name="nordland")
    assert len(ps) == 2 * 3576 and ps.num_places == 3576
    held_out = split_by_route(ps, 0.6, 1.0)
    assert held_out.num_places == 3576 - round(0.6 * 3576)
    first = min(held_out.labels)
    assert held_out.paths[0].name == f"images-{(first + 1) * 10:05d}.png"
