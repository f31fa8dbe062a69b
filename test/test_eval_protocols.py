"""Standard evaluation protocols (`vpr eval recall --protocol ...`) and ground-truth files
(`--ground-truth FILE`), on small folders written by the tests in the real layouts, and against
VPR-Bench's own Nordland ground-truth file where that public file is present."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from vpr_ros.cli import main
from vpr_ros.datasets.image_sets import ImageSet, read_image_set
from vpr_ros.datasets.public_data import find_dataset, missing_reason
from vpr_ros.errors import InputError
from vpr_ros.eval.protocols import (heading_difference, msls_val, nordland_2760,
                                    read_ground_truth, read_query_list)
from vpr_ros.eval.tasks import eval_ground_truth


def fake_set(n: int) -> ImageSet:
    return ImageSet(Path("/nowhere"), "aligned", tuple(Path(f"{i}.png") for i in range(n)), None)


def vprbench_file(path: Path, positives: list) -> Path:
    """A ground_truth_new.npy as VPR-Bench writes it: object rows [query_index, [db ids]]."""
    arr = np.empty((len(positives), 2), dtype=object)
    for i, p in enumerate(positives):
        arr[i, 0], arr[i, 1] = i, [int(x) for x in p]
    np.save(path, arr, allow_pickle=True)
    return path


def test_nordland_2760_split_frames() -> None:
    pr = nordland_2760(fake_set(27592), fake_set(27592))
    assert len(pr.q) == 2760 and pr.q.paths[:3] == (Path("0.png"), Path("10.png"),
                                                    Path("20.png"))
    assert pr.positives[0].tolist() == [0, 1]
    assert pr.positives[1000].tolist() == [9999, 10000, 10001]
    assert pr.positives[-1].tolist() == [27589, 27590, 27591]
    same = nordland_2760(fake_set(27592), fake_set(2760))  # the split's own query folder
    assert all(np.array_equal(a, b) for a, b in zip(same.positives, pr.positives))
    with pytest.raises(InputError, match="must hold 2760 images"):
        nordland_2760(fake_set(27592), fake_set(100))


def test_nordland_2760_equals_vprbench_ground_truth_file() -> None:
    root = find_dataset("vpr_bench")
    path = root / "nordland_ground_truth_new.npy" if root else None
    if path is None or not path.is_file():
        pytest.skip(missing_reason("vpr_bench", "VPR-Bench (MubarizZaffar/VPR-Bench), "
                                   "datasets/Nordland/ground_truth_new.npy saved as "
                                   "nordland_ground_truth_new.npy"))
    theirs = read_ground_truth(path, 27592, 2760)
    ours = nordland_2760(fake_set(27592), fake_set(2760)).positives
    assert len(theirs) == len(ours) == 2760
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_ground_truth_files_both_layouts_and_their_errors(tmp_path: Path) -> None:
    pos = [[0, 1], [4], [], [9, 8]]
    assert [p.tolist() for p in read_ground_truth(vprbench_file(tmp_path / "a.npy", pos),
                                                  10, 4)] == [[0, 1], [4], [], [8, 9]]
    lists = np.empty(4, dtype=object)
    lists[:] = [np.array(p, dtype=np.int64) for p in pos]
    np.save(tmp_path / "b.npy", lists, allow_pickle=True)
    assert [p.tolist() for p in read_ground_truth(tmp_path / "b.npy", 10, 4)] == \
        [[0, 1], [4], [], [8, 9]]
    # a query missing from a VPR-Bench file has no positive (left out of the recall)
    arr = np.load(tmp_path / "a.npy", allow_pickle=True)[[0, 3]]
    np.save(tmp_path / "c.npy", arr, allow_pickle=True)
    assert [p.tolist() for p in read_ground_truth(tmp_path / "c.npy", 10, 4)] == \
        [[0, 1], [], [], [8, 9]]
    with pytest.raises(InputError, match=r"database index 9 is outside 0..8"):
        read_ground_truth(tmp_path / "a.npy", 9, 4)
    with pytest.raises(InputError, match="query index 3 is outside"):
        read_ground_truth(tmp_path / "a.npy", 10, 3)
    with pytest.raises(InputError, match="4 lists of positives for 5 query images"):
        read_ground_truth(tmp_path / "b.npy", 10, 5)
    np.save(tmp_path / "d.npy", np.concatenate([arr, arr[:1]]), allow_pickle=True)
    with pytest.raises(InputError, match="query 0 is listed twice"):
        read_ground_truth(tmp_path / "d.npy", 10, 4)
    (tmp_path / "e.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="not a readable .npy"):
        read_ground_truth(tmp_path / "e.npy", 10, 4)
    with pytest.raises(InputError, match="not found"):
        read_ground_truth(tmp_path / "missing.npy", 10, 4)


def test_heading_difference_wraps_around() -> None:
    assert heading_difference(np.array([350.0, 10.0, 180.0, 0.0]), 10.0).tolist() == \
        [20.0, 0.0, 170.0, 10.0]


def _jpg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)


def make_msls_val(root: Path, with_ca: bool = True) -> None:
    """cph and sf validation folders in the official layout. Database (offset m, heading deg):
    0:(0, 0) 1:(20, 30) 2:(20, 90) 3:(30, 0) 4:(5, 350, panorama) per city; queries
    q0 (0 m, 10 deg), q1 (300 m, 0 deg), q2 (0 m, 200 deg)."""
    for city, base in (("cph", 720000.0), ("sf", 550000.0)):
        for sub, rows in (("database", [(0, 0), (20, 30), (20, 90), (30, 0), (5, 350)]),
                          ("query", [(0, 10), (300, 0), (0, 200)])):
            d = root / "train_val" / city / sub
            (d / "images").mkdir(parents=True, exist_ok=True)
            with open(d / "postprocessed.csv", "w", newline="") as f, \
                    open(d / "raw.csv", "w", newline="") as g:
                pw, rw = csv.writer(f), csv.writer(g)
                pw.writerow(["", "key", "easting", "northing", "night", "view_direction"])
                rw.writerow(["", "key", "lon", "lat"] + (["ca"] if with_ca else [])
                            + ["captured_at", "pano"])
                for i, (off, ca) in enumerate(rows):
                    key = f"{city}{sub[0]}{i}"
                    pw.writerow([i, key, base + off, 4690000.0, False, "Forward"])
                    pano = sub == "database" and i == 4
                    rw.writerow([i, key, 12.5, 55.6] + ([ca] if with_ca else []) + [0, pano])
                    _jpg(d / "images" / f"{key}.jpg", i)


def test_msls_val_protocol_distance_heading_panoramas_and_query_list(tmp_path: Path) -> None:
    make_msls_val(tmp_path)
    pr = msls_val(tmp_path)
    assert len(pr.db) == 8 and len(pr.q) == 6  # the panorama is not a database image
    assert [p.stem for p in pr.q.paths[:3]] == ["cphq0", "cphq1", "cphq2"]
    # q0: db 0 (0 m, 10 deg off) and db 1 (20 m, 20 deg off); db 2 is 80 deg off, db 3 30 m away
    assert [p.tolist() for p in pr.positives] == [[0, 1], [], [], [4, 5], [], []]
    assert "within 25 m and 40 deg heading" in pr.label
    loose = msls_val(tmp_path, max_heading_deg=None)
    assert [p.tolist() for p in loose.positives] == [[0, 1, 2], [], [0, 1, 2], [4, 5, 6], [],
                                                     [4, 5, 6]]
    (tmp_path / "split.txt").write_text("# the validation subset\ntrain_val/sf/query/images/"
                                        "sfq0.jpg\ncphq2\n")
    sub = msls_val(tmp_path, tmp_path / "split.txt")
    assert [p.stem for p in sub.q.paths] == ["cphq2", "sfq0"]
    assert [p.tolist() for p in sub.positives] == [[], [4, 5]]
    np.save(tmp_path / "split.npy", np.array(["train_val/cph/query/images/cphq0.jpg"]))
    assert read_query_list(tmp_path / "split.npy") == ["cphq0"]
    (tmp_path / "bad.txt").write_text("cphq0\nlondonq7\n")
    with pytest.raises(InputError, match="1 of 2 listed queries are not"):
        msls_val(tmp_path, tmp_path / "bad.txt")


def test_msls_val_protocol_refuses_incomplete_data(tmp_path: Path) -> None:
    make_msls_val(tmp_path, with_ca=False)
    with pytest.raises(InputError, match="compass angle column 'ca'"):
        msls_val(tmp_path)
    assert len(msls_val(tmp_path, max_heading_deg=None).q) == 6
    import shutil

    shutil.rmtree(tmp_path / "train_val" / "sf")
    with pytest.raises(InputError, match="missing: sf"):
        msls_val(tmp_path)


def test_aligned_folders_are_read_in_natural_name_order(tmp_path: Path) -> None:
    for i in (0, 1, 2, 10, 11, 9):
        _jpg(tmp_path / f"{i}.jpg", i)
    assert [p.stem for p in read_image_set(tmp_path).paths] == ["0", "1", "2", "9", "10", "11"]


def test_protocol_options_conflict_with_one_line_errors(tmp_path: Path) -> None:
    make_msls_val(tmp_path / "msls")
    for kwargs, match in [
        ({"protocol": "nordland", "ground_truth": "x.npy"}, "either --protocol or"),
        ({"protocol": "msls-val", "tolerance": 1}, "do not apply"),
        ({"protocol": "kitti"}, "unknown protocol"),
    ]:
        with pytest.raises(InputError, match=match):
            eval_ground_truth(str(tmp_path / "msls"), None, **kwargs)
    with pytest.raises(InputError, match="--queries is required"):
        eval_ground_truth(str(tmp_path), None)
    q = str(tmp_path / "msls" / "train_val" / "cph" / "query")
    with pytest.raises(InputError, match="positioned"):
        eval_ground_truth(q, q, protocol="nordland-2760")


def _aligned_folder(folder: Path, images: list[np.ndarray], names: list[int]) -> None:
    folder.mkdir(parents=True)
    for img, n in zip(images, names):
        assert cv2.imwrite(str(folder / f"{n}.png"), img[:, :, ::-1])


def test_vpr_eval_recall_nordland_2760_and_its_ground_truth_file(
        effnet_gem_model_dir: Path, nordland_pairs: tuple, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    summer, winter = nordland_pairs  # 40 real places spread along the line, index-aligned
    _aligned_folder(tmp_path / "ref", winter, list(range(40)))  # 0.png .. 39.png
    _aligned_folder(tmp_path / "query", summer[::10], list(range(4)))  # frames 0, 10, 20, 30
    common = ["eval", "recall", "--model", str(effnet_gem_model_dir), "--database",
              str(tmp_path / "ref"), "--queries", str(tmp_path / "query"), "--k", "1,5",
              "--json", "--no-progress"]
    assert main(common + ["--protocol", "nordland-2760"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_queries"] == 4 and res["num_database"] == 40
    assert res["ground_truth"].startswith("Nordland 2760-query split")
    gt = vprbench_file(tmp_path / "ground_truth_new.npy",
                       [[0, 1], [9, 10, 11], [19, 20, 21], [29, 30, 31]])
    assert main(common + ["--ground-truth", str(gt)]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["recall"] == res["recall"]
    assert same["ground_truth"] == "ground-truth file ground_truth_new.npy"
    # a shifted ground truth (every query's place moved by 5 frames) is measurably worse:
    # the figures depend on the positives, not on the folders alone
    shifted = vprbench_file(tmp_path / "shifted.npy", [[5], [15], [25], [35]])
    assert main(common + ["--ground-truth", str(shifted)]) == 0
    assert json.loads(capsys.readouterr().out)["recall"]["R@1"] < res["recall"]["R@1"] or \
        res["recall"]["R@1"] == 0.0
    assert main(common + ["--ground-truth", str(tmp_path / "nope.npy")]) == 2
    assert "ground-truth file not found" in capsys.readouterr().err


def test_vpr_eval_recall_msls_val_protocol(effnet_gem_model_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    make_msls_val(tmp_path)
    (tmp_path / "split.txt").write_text("cphq0\nsfq0\nsfq1\n")
    assert main(["eval", "recall", "--model", str(effnet_gem_model_dir), "--protocol",
                 "msls-val", "--database", str(tmp_path), "--queries",
                 str(tmp_path / "split.txt"), "--k", "1,8", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_queries"] == 3 and res["num_database"] == 8
    assert res["queries_without_positives"] == 1  # sfq1 is 300 m from every database image
    assert res["ground_truth"] == "MSLS-val (3 queries): within 25 m and 40 deg heading"
    assert res["recall"]["R@8"] == 1.0  # every database image is among the first 8
