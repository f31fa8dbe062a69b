"""``vpr eval slam`` on a shortened demo route, as a user runs it: the real ``vpr_node`` (loop
closure, live map, geometric verification with the bag's CameraInfo and depth) and
``vpr_pose_graph`` processes over DDS, fed by ``vpr bag play`` from a bag with drifting
odometry and a separate ground-truth topic. The pose graph must receive every
closure the node published, beat odometry alone on trajectory error (evo), accept no wrong
closure, and shrug off one planted wrong closure injected into a twin of the same run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")

from test_node_common import REPO, ros_env, vpr_command  # noqa: E402

from vpr_ros.demo.record import (DEPTH_TOPIC, GT_TOPIC, IMAGE_TOPIC, ODOM_TOPIC,  # noqa: E402
                                 record_scenario)
from vpr_ros.demo.scenario import Route  # noqa: E402
from slam_common import QUICK  # noqa: E402


@pytest.fixture(scope="module")
def quick_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_scenario(tmp_path_factory.mktemp("slam_bags"), QUICK).full


def _eval_slam(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*vpr_command(), "eval", "slam", *args], capture_output=True,
                          text=True, env=ros_env(), cwd=str(REPO), timeout=timeout)


def test_eval_slam_closures_from_a_real_vpr_node_straighten_the_trajectory(
        tmp_path: Path, quick_bag: Path, effnet_gem_model_dir: Path) -> None:
    lap_s = Route(QUICK).length / QUICK.lap1_speed_mps
    out = tmp_path / "slam"
    proc = _eval_slam(["--bag", str(quick_bag), "--image-topic", IMAGE_TOPIC, "--odom-topic",
                       ODOM_TOPIC, "--gt-topic", GT_TOPIC, "--model", str(effnet_gem_model_dir),
                       "--rate", "3", "--exclusion-window-s", f"{0.85 * lap_s:.1f}",
                       "--depth-topic", DEPTH_TOPIC, "--graph-param", "camera.mount_z=1.6",
                       "--plant-wrong-closure", "-o", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "odometry alone" in proc.stdout and "optimised pose graph" in proc.stdout
    r = json.loads((out / "slam.json").read_text())
    assert r["closures_published"] > 20, r
    assert r["closures_in_graph"] == r["closures_published"]          # every closure arrived
    assert r["closures_metric"] >= 0.8 * r["closures_published"]       # verified by PnP
    assert r["closures_wrong_accepted"] == 0, r
    odo, opt = r["ate_odometry"]["rmse_m"], r["ate_optimised"]["rmse_m"]
    assert odo > 1.0 and opt < 0.5 * odo, (odo, opt)
    planted = r["planted"]
    assert planted["distance_m"] > 20 and planted["accepted"] is False, planted
    assert abs(planted["ate_change"]) <= 0.10, planted
    assert (out / "trajectories.png").stat().st_size > 20_000


def test_eval_slam_refuses_a_missing_topic_in_one_line(tmp_path: Path, quick_bag: Path) -> None:
    proc = _eval_slam(["--bag", str(quick_bag), "--image-topic", IMAGE_TOPIC, "--odom-topic",
                       ODOM_TOPIC, "--gt-topic", "/no_such_truth", "-o", str(tmp_path)],
                      timeout=120)
    assert proc.returncode == 2
    assert "/no_such_truth" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
