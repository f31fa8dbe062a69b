"""Loop-closure evaluation through the node's detector and a growing map; `vpr eval loop`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from vpr_ros.cli import main
from vpr_ros.errors import ConfigError, InputError
from vpr_ros.eval.loop import LoopSequence, evaluate_sequence, loop_config, read_sequence
from vpr_ros.localization.loop_closure import LoopClosureConfig

LAP = 40  # frames per lap; the second lap revisits the first one's positions


def _two_laps() -> LoopSequence:
    n = 2 * LAP
    pos = np.zeros((n, 3))
    pos[:, 0] = 10.0 * (np.arange(n) % LAP)
    stamps = (np.arange(n) * 1e9).astype(np.int64)
    return LoopSequence(Path("synthetic"), tuple(Path(f"f{i}.png") for i in range(n)), stamps,
                        pos)


def _descriptors(noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    places = rng.standard_normal((LAP, 32))
    d = np.concatenate([places, places]) + noise * rng.standard_normal((2 * LAP, 32))
    return (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)


CFG = LoopClosureConfig(exclusion_window_s=10.0, exclusion_recent_keyframes=5,
                        consistency_k=2, consistency_n=3, consistency_stamp_window_s=3.0)


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_revisits_are_found_with_good_descriptors(index: str) -> None:
    seq = _two_laps()
    good = evaluate_sequence(_descriptors(0.1), seq, "fp", CFG, gt_distance_m=5.0, index=index)
    assert good.num_positives == LAP and good.num_queries == 2 * LAP
    # every second-lap frame after the first (consistency needs two agreeing queries)
    assert good.recall_at_100_precision >= (LAP - 2) / LAP
    assert good.auc >= 0.9
    noise = evaluate_sequence(_descriptors(0.1, seed=1)[np.random.default_rng(2).permutation(
        2 * LAP)], seq, "fp", CFG, gt_distance_m=5.0, index=index)
    assert noise.recall_at_100_precision < 0.2 and noise.auc < good.auc


def _nordland_sequence(root: Path, tmp: Path) -> Path:
    """Summer lap over 30 spots 10 m apart, then the same spots in winter."""
    frames = list(range(20000, 20300, 10))
    path = tmp / "seq.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "stamp_s", "x", "y"])
        for lap, season in enumerate(("summer", "winter")):
            for i, n in enumerate(frames):
                w.writerow([root / season / f"images-{n:05d}.png", 100.0 * lap + i, 10.0 * i, 0])
    return path


def test_vpr_eval_loop_on_a_nordland_revisit(effnet_gem_model_dir: Path, nordland_root: Path,
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    seq = _nordland_sequence(nordland_root, tmp_path)
    rc = main(["eval", "loop", "--model", str(effnet_gem_model_dir), "--sequence", str(seq),
               "--gt-distance-m", "12", "--param", "exclusion_window_s=20",
               "--param", "consistency_k=2", "--param", "consistency_n=3",
               "--json", "--plot-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_positives"] == 30 and res["num_queries"] == 60
    assert 0.0 <= res["recall_at_100_precision"] <= max(res["curve"]["recall"]) <= 1.0
    assert 0.0 <= res["auc"] <= 1.0
    assert res["config"]["consistency_k"] == 2 and res["index"] == "flat"
    png = cv2.imread(str(tmp_path / "pr_curve.png"))
    assert png is not None and png.shape[1] > 300


def test_bad_sequences_and_configs(tmp_path: Path) -> None:
    p = tmp_path / "s.csv"
    p.write_text("image,x,y\na.png,0,0\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['stamp_ns'\]"):
        read_sequence(p)
    p.write_text("image,stamp_ns,x,y\na.png,5,0,0\nb.png,3,0,0\n")
    with pytest.raises(InputError, match="must be in time order"):
        read_sequence(p)
    with pytest.raises(ConfigError, match="no parameter"):
        loop_config(None, ["min_scroe=0.5"])
    (tmp_path / "lc.yaml").write_text("loop_closure: {min_score: 0.6, consistency_k: 1}\n")
    assert loop_config(tmp_path / "lc.yaml", ["consistency_n=2"]).consistency_n == 2
