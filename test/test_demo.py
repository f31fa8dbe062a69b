"""The main job cannot silently break: the scenario generator, and a shortened `vpr demo`
(smaller route, same code path: rosbags, `vpr map build`, the real vpr_node over DDS fed by
`vpr bag play`, messages collected from the wire, vpr_pose_graph beside it)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.demo.scenario import Route, ScenarioConfig, World, drive, render


def test_route_is_a_closed_loop_with_continuous_poses() -> None:
    route = Route(ScenarioConfig())
    pts = np.array([route.pose(s)[:2] for s in np.linspace(0, route.length, 2000)])
    steps = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    assert steps.max() < 2 * route.length / 2000          # no jumps between pieces
    assert np.allclose(route.pose(0)[:2], route.pose(route.length - 1e-9)[:2], atol=1e-6)
    # the lateral offset moves to the right of travel (heading +x at s=0 -> -y)
    x, y, _ = route.pose(1.0, lateral=0.8)
    assert math.isclose(y, -0.8, abs_tol=1e-9)


def test_frames_show_structure_that_identifies_places() -> None:
    cfg = ScenarioConfig()
    world, route = World(cfg), Route(cfg)

    def img(s: float, lap: int, lateral: float = 0.0) -> np.ndarray:
        x, y, yaw = route.pose(s, lateral)
        return render(world, cfg, x, y, yaw, lap).astype(np.float32)

    a, a_near, far = img(20.0, 1), img(20.8, 1), img(120.0, 1)
    assert a.shape == (480, 640, 3) and a.std() > 20       # textured, not flat
    near_diff, far_diff = np.abs(a - a_near).mean(), np.abs(a - far).mean()
    assert near_diff < 0.6 * far_diff                       # nearby views look alike
    dusk = img(20.0, 2, 0.8)
    assert dusk.mean() < 0.85 * a.mean()                    # lap 2 is darker
    assert np.abs(dusk - a).mean() > near_diff              # and really changed


def test_drive_gives_two_timed_laps() -> None:
    cfg = ScenarioConfig(block_length_m=30.0, block_width_m=20.0)
    frames = list(drive(cfg))
    laps = [f.lap for f in frames]
    assert laps == sorted(laps) and set(laps) == {1, 2}
    stamps = np.array([f.stamp_ns for f in frames])
    assert (np.diff(stamps) == int(1e9 / cfg.rate_hz)).all()
    lap1 = [f for f in frames if f.lap == 1]
    step = math.hypot(lap1[1].x - lap1[0].x, lap1[1].y - lap1[0].y)
    assert math.isclose(step, cfg.lap1_speed_mps / cfg.rate_hz, rel_tol=1e-6)


def test_shortened_demo_end_to_end(tmp_path: Path, effnet_gem_model_dir: Path) -> None:
    if shutil.which("vpr_node") is None:
        pytest.skip("console scripts not installed (pip install -e .)")
    from vpr_ros.demo.run import DemoOptions, run_demo

    lines: list[str] = []
    report = run_demo(DemoOptions(out=tmp_path / "demo", model=effnet_gem_model_dir, rate=3.0,
                                  quick=True, log=lines.append))
    rl, lc = report["relocalization"], report["loop_closure"]
    assert report["map_keyframes"] > 30
    assert rl["frames_processed"] > 50 and rl["errors"] == 0
    assert rl["relocalizations"] > 10
    assert rl["within_radius"] >= 0.6, rl
    assert lc["loop_closures"] > 5 and lc["precision"] >= 0.8, lc
    # the rear camera too: front + rear merged relocalize at least as well as the front alone
    both = report["relocalization_two_cameras"]
    assert both["cameras"] == ["/camera/image_raw", "/camera_rear/image_raw"]
    assert both["frames_processed"] > 50 and both["within_radius"] >= 0.6, both
    assert both["top1_within_radius"] >= rl["top1_within_radius"] - 0.05, (both, rl)
    assert sum(both["matches_found_per_camera"].values()) > 0
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["map_keyframes"] \
        == report["map_keyframes"]
    slam = report["slam"]  # vpr_pose_graph beside the node, over the drifting odometry
    assert slam["closures_in_graph"] == lc["loop_closures"]
    assert slam["closures_wrong_accepted"] == 0, slam
    assert slam["ate_optimised"]["rmse_m"] < 0.5 * slam["ate_odometry"]["rmse_m"], slam
    assert abs(slam["planted"]["ate_change"]) <= 0.10 and not slam["planted"]["accepted"]
    for p in report["plots"]:
        assert Path(p).stat().st_size > 10_000
    assert any("== vpr demo report ==" in line for line in lines)
    assert any("two cameras" in line for line in lines)
