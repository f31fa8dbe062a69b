"""What each decision stage buys, measured: `vpr eval loop` stages and odometry columns,
calibration into a params file the node loads, `vpr eval recall --sequence-length` and the
relocalization figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from vpr_ros.cli import main
from vpr_ros.errors import InputError
from vpr_ros.eval.loop import (LoopSequence, decision_configs, evaluate_stages, odometry_for,
                               read_sequence)
from vpr_ros.eval.sequence_eval import ranking, relocalization_figures, sequence_hypotheses
from vpr_ros.localization import LoopClosureConfig, RelocalizerConfig, SequenceConfig

LAP = 60


def _route(n: int, dim: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n + 6, dim))
    p = np.stack([np.convolve(raw[:, j], np.ones(7), mode="valid") for j in range(dim)], 1)
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def _noisy(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    y = x + level * rng.normal(size=x.shape) / np.sqrt(x.shape[1])
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


def _two_laps(noise: float = 1.6, seed: int = 1) -> tuple[LoopSequence, np.ndarray]:
    """A 60-place loop driven twice (1 m and 1 s per frame); the second lap is much noisier,
    so single frames alias and sequences do not."""
    rng = np.random.default_rng(seed)
    places = _route(LAP)
    desc = np.concatenate([_noisy(places, 0.3, rng), _noisy(places, noise, rng)])
    x = np.tile(np.arange(LAP, dtype=float), 2)
    gt = np.stack([x, np.zeros(2 * LAP), np.zeros(2 * LAP)], 1)
    odom = gt + np.array([0.5, -0.3, 0.0])  # an offset odometry frame: never ground truth
    seq = LoopSequence(Path("two_laps"), tuple(Path(f"f{i}.png") for i in range(2 * LAP)),
                       (np.arange(2 * LAP) * 1e9).astype(np.int64), gt, odom)
    return seq, desc


CFG = LoopClosureConfig(min_score=0.0, exclusion_window_s=20.0, exclusion_recent_keyframes=10,
                        consistency_k=1, consistency_n=1, consistency_radius_m=2.0,
                        consistency_stamp_window_s=2.0)


def test_stages_show_what_sequence_matching_and_calibration_buy() -> None:
    seq, desc = _two_laps()
    run = evaluate_stages(desc, seq, "fp", CFG, SequenceConfig(length=8), 2.0, k=5,
                          calibrate=True, num_thresholds=30)
    single, sequence, calib = (run.stages[s] for s in ("single_frame", "sequence",
                                                         "calibrated"))
    assert sequence["recall_at_100_precision"] > single["recall_at_100_precision"] + 0.2
    assert sequence["auc"] > single["auc"]
    assert calib["in_sample"] and calib["reached_full_precision"]
    assert calib["precision"] == 1.0 and calib["recall"] >= sequence["recall_at_100_precision"] - 1e-9
    assert set(calib["values"]) >= {"min_sequence_score", "min_margin", "consistency_k"}
    assert run.calibration is not None and run.calibration.point.false_positives == 0


def test_odometry_columns_are_used_and_ground_truth_only_on_request(tmp_path: Path) -> None:
    p = tmp_path / "s.csv"
    p.write_text("image,stamp_s,x,y,odom_x,odom_y,odom_yaw\na.png,0,0,0,0.1,0.2,0.0\n"
                 "b.png,1,1,0,1.2,0.1,0.1\n")
    seq = read_sequence(p)
    assert seq.odometry is not None and seq.odometry[1].tolist() == [1.2, 0.1, 0.0]
    assert seq.odometry_yaw is not None
    odom, source = odometry_for(seq, use_poses=False)
    assert odom is seq.odometry and "odom_x" in source
    p.write_text("image,stamp_s,x,y\na.png,0,0,0\n")
    bare = read_sequence(p)
    assert odometry_for(bare, False) == (None, "none")
    gt, source = odometry_for(bare, True)
    assert gt is bare.positions and "ground truth" in source
    p.write_text("image,stamp_s,x,y,odom_x\na.png,0,0,0,1\n")
    with pytest.raises(InputError, match="odom_x and odom_y"):
        read_sequence(p)
    p.write_text("image,stamp_s,x,y,odom_x,odom_y\na.png,0,0,0,1,nan\n")
    with pytest.raises(InputError, match="finite"):
        read_sequence(p)


def test_decision_configs_read_node_params_files() -> None:
    repo = Path(__file__).resolve().parents[1]
    loop, seq = decision_configs(repo / "config" / "vpr_loop_closure.yaml",
                                 ["min_score=0.5", "sequence.length=12"])
    assert loop.min_score == 0.5 and seq.length == 12
    assert loop.exclusion_window_s == LoopClosureConfig().exclusion_window_s


def _params(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    return doc["vpr_node"]["ros__parameters"]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_calibrated_params_file_is_a_valid_node_params_file(tmp_path: Path) -> None:
    from vpr_ros.eval.params_file import write_params_file
    from vpr_ros.ros.params import all_parameter_specs, settings_from_values

    seq, desc = _two_laps()
    run = evaluate_stages(desc, seq, "fp", CFG, SequenceConfig(length=8), 2.0, k=5,
                          calibrate=True, num_thresholds=20)
    assert run.calibration is not None
    out = write_params_file(tmp_path / "site.yaml", [("loop_closure", run.calibration.config),
                                                     ("sequence", SequenceConfig(length=8))],
                            ["test header"])
    values = _flat(_params(out))
    specs = {s.name: s for s in all_parameter_specs()}
    for key, value in values.items():
        assert key in specs and type(value) is specs[key].type, key  # ROS is strict on types
    settings = settings_from_values({"mode": "loop_closure", **values})
    assert settings.loop_closure.min_sequence_score == pytest.approx(
        run.calibration.values["min_sequence_score"])
    assert settings.sequence.length == 8
    assert out.read_text().startswith("# test header")
    # rclpy reads it as vpr_node's --params-file: every value typed as the node declares it
    rclpy_parameter = pytest.importorskip("rclpy.parameter")
    from rclpy.parameter import Parameter

    parsed = rclpy_parameter.parameter_dict_from_yaml_file(str(out), target_nodes=["vpr_node"])
    kinds = {bool: Parameter.Type.BOOL, int: Parameter.Type.INTEGER,
             float: Parameter.Type.DOUBLE, str: Parameter.Type.STRING}
    assert set(parsed) == set(values)
    for name, msg in parsed.items():
        assert Parameter.from_parameter_msg(msg).type_ == kinds[specs[name].type], name


def test_sequence_ranking_and_relocalization_figures() -> None:
    rng = np.random.default_rng(4)
    places = _route(200)
    db = _noisy(places, 0.3, rng)
    q = _noisy(places[20:180], 2.2, rng)
    positives = [np.arange(max(0, i - 1), i + 2) for i in range(20, 180)]
    sims = q @ db.T
    ids = np.argsort(-sims, axis=1)[:, :10]
    scores = np.take_along_axis(sims, ids, 1)
    single = sequence_hypotheses(db, q, ids, scores, SequenceConfig(length=1))
    seq = sequence_hypotheses(db, q, ids, scores, SequenceConfig(length=10))

    def r1(hyps: list) -> float:
        top, _ = ranking(hyps, 1)
        return float(np.mean([t in p for t, p in zip(top[:, 0], positives)]))

    assert r1(seq) > r1(single) + 0.1, (r1(single), r1(seq))
    cfg = RelocalizerConfig(min_score=0.0, min_consistent=1, min_sequence_score=0.0,
                            min_margin=0.0)
    fig_single, _, _ = relocalization_figures(single, positives, cfg, 1)
    fig_seq, _, calib = relocalization_figures(seq, positives, cfg, 10, calibrate=True)
    assert fig_seq["recall_at_100_precision"] > fig_single["recall_at_100_precision"]
    assert calib is not None and calib.reached and fig_seq["calibrated"]["precision"] == 1.0


def test_vpr_eval_recall_with_sequences_on_nordland(effnet_gem_model_dir: Path,
                                                     nordland_root: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A real held-out stretch of the route: sequences of 10 winter frames beat single
    frames against the summer traversal, and the calibrated file loads as node parameters."""
    site = tmp_path / "site.yaml"
    rc = main(["eval", "recall", "--model", str(effnet_gem_model_dir),
               "--database", "nordland:summer", "--queries", "nordland:winter",
               "--tolerance", "1", "--subset", "0.80:0.84", "--sequence-length", "10",
               "--relocalization", "--calibrate", "-o", str(site), "--json", "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sequence_length"] == 10 and res["num_queries"] == 143
    assert res["recall"]["R@1"] > res["single_frame_recall"]["R@1"]
    stages = res["relocalization"]["stages"]
    assert set(stages) == {"single_frame", "sequence"}
    assert "calibrated" in stages["sequence"] and site.is_file()
    values = _flat(_params(site))
    assert "relocalization.min_sequence_score" in values and values["sequence.length"] == 10


def test_vpr_eval_loop_reports_stages_with_and_without_odometry(
        effnet_gem_model_dir: Path, nordland_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    frames = list(range(20000, 20400, 10))
    path = tmp_path / "seq.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "stamp_s", "x", "y", "odom_x", "odom_y"])
        for lap, season in enumerate(("summer", "winter")):
            for i, n in enumerate(frames):
                w.writerow([nordland_root / season / f"images-{n:05d}.png", 100.0 * lap + i,
                            10.0 * i, 0, 10.0 * i + 1.0, 0.5 * lap])
    rc = main(["eval", "loop", "--model", str(effnet_gem_model_dir), "--sequence", str(path),
               "--gt-distance-m", "12", "--sequence-length", "8",
               "--param", "exclusion_window_s=20", "--param", "min_score=0.0",
               "--param", "consistency_k=1", "--param", "consistency_n=1",
               "--calibrate", "-o", str(tmp_path / "site.yaml"),
               "--json", "--plot-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert "odom_x" in res["odometry"] and res["sequence_length"] == 8
    for stages in (res["stages"], res["stages_with_odometry"]):
        assert {"single_frame", "sequence"} <= set(stages)
        for st in stages.values():
            assert 0.0 <= st["recall_at_100_precision"] <= 1.0 and 0.0 <= st["auc"] <= 1.0
    assert "calibrated" in res["stages_with_odometry"]
    assert res["calibration"]["in_sample"] and Path(res["params_file"]).is_file()
    assert (tmp_path / "pr_curve.png").is_file()


def test_bad_decision_files_and_overrides_are_one_line_errors(tmp_path: Path) -> None:
    from vpr_ros.errors import ConfigError
    from vpr_ros.eval.sequence_eval import reloc_configs

    bad = tmp_path / "bad.yaml"
    bad.write_text("vpr_node:\n  ros__parameters:\n    loop_closure: [1, 2]\n")
    with pytest.raises(InputError, match="section 'loop_closure' must be a mapping"):
        decision_configs(bad, [])
    with pytest.raises(ConfigError, match="sequence.length|length"):
        decision_configs(None, ["sequence.length=0"])
    with pytest.raises(ConfigError, match="no parameter"):
        reloc_configs(None, ["sequence.lenght=3"])
    with pytest.raises(InputError, match="NAME=VALUE"):
        reloc_configs(None, ["min_score"])
