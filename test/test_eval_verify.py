"""`vpr eval recall --verify` and `vpr eval loop --verify` on rendered street images (a daylight
lap and a dusk revisit in the other lane, with calibration and camera poses): the verifier
replayed offline raises recall at 100 % precision where look-alikes cost the unverified
decision its precision, and the relative pose of verified closures is checked against the
rendered ground truth."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from rgbd_street import Street

from vpr_ros.eval.verify_eval import recall_at_full_precision
from vpr_ros.mapdb.transforms import matrix_to_quat, pose7_to_matrix


def test_recall_at_full_precision() -> None:
    conf = np.array([0.9, 0.8, 0.7, np.nan, 0.6])
    ok = np.array([True, True, False, False, True])
    assert recall_at_full_precision(conf, ok, 5) == pytest.approx(2 / 5)
    assert recall_at_full_precision(conf, np.ones(5, bool), 5) == pytest.approx(4 / 5)
    assert recall_at_full_precision(np.full(3, np.nan), np.ones(3, bool), 3) == 0.0


def _camera_pose(street: Street, x: float, y: float, yaw: float) -> tuple:
    t = np.eye(4)
    t[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
    t[:2, 3] = (x, y)
    cam = t @ pose7_to_matrix(street.mount)
    return tuple(cam[:3, 3]), matrix_to_quat(cam[:3, :3])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    street = Street((480, 640))
    root = tmp_path_factory.mktemp("rendered")
    (root / "db").mkdir()
    (root / "q").mkdir()
    (root / "seq").mkdir()
    rows = []
    stamp = 1_000_000_000
    drive = [(s, 1, 0.0) for s in np.arange(4.0, 17.0, 1.0)] + \
        [(s, 2, 0.8) for s in np.arange(4.5, 16.0, 1.3)]
    for s, lap, lane in drive:
        rgb, _, (x, y, yaw) = street.view(float(s), lap, lane)
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        # UTM-style names (@easting@northing@): positions for the retrieval ground truth
        folder = root / ("db" if lap == 1 else "q")
        cv2.imwrite(str(folder / f"@{x:.3f}@{y:.3f}@{s:.1f}.png"), bgr)
        name = f"seq/{stamp}.png"
        cv2.imwrite(str(root / name), bgr)
        (cx, cy, cz), q = _camera_pose(street, x, y, yaw)
        rows.append([name, stamp, cx, cy, cz, *q])
        stamp += 500_000_000
    with open(root / "seq.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "stamp_ns", "x", "y", "z", "qx", "qy", "qz", "qw"])
        w.writerows(rows)
    (root / "camera.yaml").write_text(json.dumps(
        {"width": 640, "height": 480, "k": list(street.k), "distortion_model": "none"}))
    return {"root": root}


def test_eval_recall_verify(rendered, effnet_gem_model_dir: Path,
                            capsys: pytest.CaptureFixture) -> None:
    from vpr_ros.cli import main

    root = rendered["root"]
    assert main(["eval", "recall", "--model", str(effnet_gem_model_dir), "--database",
                 str(root / "db"), "--queries", str(root / "q"), "--threshold-m", "3",
                 "--verify", "--camera", str(root / "camera.yaml"), "--json",
                 "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    v = res["verification"]
    assert v["verifier"]["calibrated"] and v["verifier"]["pairs"] >= len(list(
        (root / "q").iterdir()))
    assert v["precision"]["with"] == 1.0  # every verified decision is the right place
    assert v["recall_at_100_precision"]["with"] >= v["recall_at_100_precision"]["without"]
    assert v["recall_at_100_precision"]["with"] >= 0.5


def test_eval_loop_verify_with_relative_pose_error(rendered, effnet_gem_model_dir: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from vpr_ros.cli import main

    root = rendered["root"]
    # single-frame decisions without the relative score: the replay verifies the search's
    # candidates before the decision stages (a lone verified candidate has no rival to lead)
    params = ["exclusion_window_s=6.0", "exclusion_recent_keyframes=2", "consistency_k=1",
              "consistency_n=1", "min_margin=0"]
    assert main(["eval", "loop", "--model", str(effnet_gem_model_dir), "--sequence",
                 str(root / "seq.csv"), "--gt-distance-m", "3", "--verify", "--camera",
                 str(root / "camera.yaml"), "--json", "--no-progress",
                 *[a for p in params for a in ("--param", p)]]) == 0
    res = json.loads(capsys.readouterr().out)
    v = res["verification"]
    assert v["candidates_verified"] > 0 and v["candidates_rejected"] > 0
    assert v["recall_at_100_precision"]["with"] >= v["recall_at_100_precision"]["without"]
    rpe = v["relative_pose_error"]
    assert rpe is not None and rpe["pairs"] >= 3
    assert rpe["rotation_deg_median"] < 1.0 and rpe["direction_deg_median"] < 10.0
