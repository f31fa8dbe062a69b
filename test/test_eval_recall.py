"""Recall@K: ground truth, the arithmetic, search through the map, and `vpr eval recall`."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from vpr_ros.cli import main
from vpr_ros.errors import InputError
from vpr_ros.eval.ground_truth import positives_by_distance, positives_by_tolerance
from vpr_ros.eval.recall import evaluate_descriptors, recall_at_k


def test_recall_at_k_arithmetic() -> None:
    ranked = np.array([[3, 1, 2], [0, 5, 4], [7, 8, 9], [1, 2, 3]])
    positives = [np.array([3]), np.array([4, 9]), np.array([0]), np.array([], dtype=int)]
    rec, first = recall_at_k(ranked, positives, ks=(1, 2, 3))
    assert first.tolist() == [0, 2, -1, -2]  # query 3 has no positive: left out
    assert rec == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(2 / 3)}
    with pytest.raises(InputError, match="no query has a correct database image"):
        recall_at_k(ranked[3:], positives[3:])


def test_positives_by_distance_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    db = rng.uniform(0, 300, (400, 2)) + [500000.0, 4e6]
    q = rng.uniform(0, 300, (50, 2)) + [500000.0, 4e6]
    fast = positives_by_distance(db, q, 25.0)
    d = np.linalg.norm(q[:, None] - db[None], axis=2)
    for i in range(len(q)):
        assert fast[i].tolist() == np.flatnonzero(d[i] <= 25.0).tolist()


def test_positives_by_tolerance() -> None:
    pos = positives_by_tolerance(5, 5, 1)
    assert [p.tolist() for p in pos] == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4]]
    with pytest.raises(InputError, match="as many database as query images"):
        positives_by_tolerance(5, 4, 1)


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivfpq", "binary"])
def test_search_goes_through_the_map_index(index: str) -> None:
    rng = np.random.default_rng(1)
    db = rng.standard_normal((300, 64)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[::3] + 0.05 * rng.standard_normal((100, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    positives = [np.array([i]) for i in range(0, 300, 3)]
    res = evaluate_descriptors(db, q, positives, "fp-test", ks=(1, 5), index=index)
    assert res.index == index and res.ranked_ids.shape == (100, 5)
    assert res.recalls[1] >= 0.95 and res.recalls[5] >= res.recalls[1]
    wrong = [np.array([(i + 1) % 300]) for i in range(0, 300, 3)]
    assert evaluate_descriptors(db, q, wrong, "fp-test", ks=(1,), index=index).recalls[1] < 0.1


def test_vpr_eval_recall_on_nordland(effnet_gem_model_dir: Path, nordland_root: Path,
                                     tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plots = tmp_path / "plots"
    rc = main(["eval", "recall", "--model", str(effnet_gem_model_dir),
               "--database", "nordland:summer", "--queries", "nordland:winter",
               "--tolerance", "1", "--subset", "0.6:0.61", "--k", "1,5,10", "--json",
               "--plot-dir", str(plots), "--no-progress", "--output", str(tmp_path / "r.json")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads((tmp_path / "r.json").read_text())
    n = round(0.61 * 3576) - round(0.6 * 3576)
    assert res["num_queries"] == res["num_database"] == n
    r = res["recall"]
    assert 0.0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1.0
    assert r["R@1"] > 3 * (3 / n)  # well above chance (3 correct database images of n)
    assert res["ground_truth"] == "index tolerance +-1" and res["index"] == "flat"
    assert res["model"]["fingerprint"] and res["timings_s"]["encode"] > 0
    for name in ("recall_at_k.png", "examples.png"):
        img = cv2.imread(str(plots / name))
        assert img is not None and img.shape[0] > 200 and img.shape[1] > 300


def _utm_set(folder: Path, images: list[np.ndarray], points: list[tuple[float, float]]) -> None:
    folder.mkdir(parents=True)
    for i, (img, (e, n)) in enumerate(zip(images, points)):
        cv2.imwrite(str(folder / f"@{e:.2f}@{n:.2f}@17@T@@@{i}@.jpg"), img[:, :, ::-1])


def test_vpr_eval_recall_on_utm_folders(effnet_gem_model_dir: Path, nordland_pairs: tuple,
                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summer, _ = nordland_pairs  # real frames far apart along the line, renamed with UTM fields
    spots = [(500000.0 + 60 * i, 4000000.0) for i in range(12)]
    _utm_set(tmp_path / "images" / "test" / "database", summer[:12], spots)
    darker = [np.clip(img.astype(int) * 0.8, 0, 255).astype(np.uint8) for img in summer[:12:2]]
    _utm_set(tmp_path / "images" / "test" / "queries", darker,
             [(e + 5.0, n - 3.0) for e, n in spots[::2]])
    root = tmp_path / "images" / "test"
    rc = main(["eval", "recall", "--model", str(effnet_gem_model_dir),
               "--database", str(root / "database"), "--queries", str(root / "queries"),
               "--index", "hnsw", "--json", "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ground_truth"] == "within 25 m" and res["index"] == "hnsw"
    assert res["num_queries"] == 6 and res["recall"]["R@1"] == 1.0  # same frames, dimmed
    # aligned folders need a tolerance; positioned sets cannot be --subset
    assert main(["eval", "recall", "--model", str(effnet_gem_model_dir), "--database",
                 str(root / "database"), "--queries", str(root / "queries"),
                 "--subset", "0:0.5"]) == 2
    assert "positioned sets" in capsys.readouterr().err
    plain = tmp_path / "plain"
    plain.mkdir()
    cv2.imwrite(str(plain / "a.png"), np.zeros((8, 8, 3), np.uint8))
    assert main(["eval", "recall", "--model", str(effnet_gem_model_dir), "--database",
                 str(plain), "--queries", str(plain)]) == 2
    assert "give an index tolerance" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "recall", "--model", "m", "--database", "d", "--queries", "q",
              "--tolerance", "1", "--threshold-m", "25"])
