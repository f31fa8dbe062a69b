"""``vpr_pose_graph`` as a process over real DDS: declared parameters, the shipped params file
and launch file, and what it does with a drifting route's odometry and closures published the
way ``vpr_node`` publishes them (labels in any order, fields it does not know, one broken
message of each kind)."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

rclpy = pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")

from slam_common import QUICK, make_run  # noqa: E402
from test_node_common import (REPO, RosProbe, assert_declared, flatten_params,  # noqa: E402
                              ros_env, stop_process)
from vpr_ros.eval.trajectory import absolute_trajectory_error  # noqa: E402
from vpr_ros.ros.pose_graph_params import (CHOICES, PoseGraphNodeConfig,  # noqa: E402
                                           all_parameter_specs, settings_from_values)
from vpr_ros.slam import se3  # noqa: E402

CONFIG = REPO / "config" / "vpr_pose_graph.yaml"


def _pose_graph(args: list[str], log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vpr_ros.ros.pose_graph_main", *args]
    log = open(log_path, "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ros_env(),
                            cwd=str(REPO))


# ---------------------------------------------------------------------------- parameters

def test_parameters_are_declared_with_descriptions_ranges_and_choices() -> None:
    from vpr_ros.ros.params import descriptor_for

    specs = all_parameter_specs()
    assert_declared(specs, CHOICES)
    kernel = descriptor_for(next(s for s in specs if s.name == "robust_kernel"), CHOICES)
    assert "dcs" in kernel.additional_constraints


def test_params_file_holds_every_declared_default() -> None:
    doc = yaml.safe_load(CONFIG.read_text())
    assert list(doc) == ["vpr_pose_graph"]
    values = flatten_params(doc["vpr_pose_graph"]["ros__parameters"])
    specs = {s.name: s for s in all_parameter_specs()}
    assert set(values) == set(specs)
    for key, value in values.items():
        assert type(value) is specs[key].type, f"{key} = {value!r}"
        assert value == specs[key].default or math.isclose(value, specs[key].default), key
    node, graph = settings_from_values(values)
    assert isinstance(node, PoseGraphNodeConfig) and graph.robust_kernel == "dcs"


def test_launch_file_wires_the_params_file_and_both_inputs() -> None:
    path = REPO / "launch" / "vpr_pose_graph.launch.py"
    tree = ast.parse(path.read_text(), str(path))
    compile(tree, str(path), "exec")
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    assert {"vpr_pose_graph", "vpr_ros", "vpr_pose_graph.yaml", "odometry", "loop_closure",
            "odom_topic", "loop_closure_topic", "/vpr_node/loop_closure"} <= strings
    setup = (REPO / "setup.py").read_text()
    assert "vpr_pose_graph = vpr_ros.ros.pose_graph_main:main" in setup
    assert 'glob("launch/*.launch.py")' in setup and 'glob("config/*.yaml")' in setup


@pytest.mark.parametrize("given, says", [
    ("robust_kernel:=magic", "one of"),
    ("same_place_translation_sigma_m:=5000.0", "in [0.001, 1000.0]"),
    # rclpy refuses an integer for a double parameter; the error says how to write it
    ("same_place_translation_sigma_m:=1", "write 1.0"),
])
def test_a_refused_start_value_stops_the_node_with_one_line(tmp_path: Path, given: str,
                                                            says: str) -> None:
    proc = _pose_graph(["--ros-args", "--params-file", str(CONFIG), "-p", given],
                       tmp_path / "bad.log")
    assert proc.wait(timeout=120) == 2
    out = (tmp_path / "bad.log").read_text()
    lines = [ln for ln in out.splitlines() if ln.startswith("vpr_pose_graph: error:")]
    assert len(lines) == 1 and given.split(":=")[0] in lines[0] and says in lines[0], out
    assert "Traceback" not in out


# ---------------------------------------------------------------------------- over DDS

def _closure_msg(fields: dict[str, float]):
    from std_msgs.msg import Float64MultiArray, MultiArrayDimension, MultiArrayLayout

    names = list(fields)
    layout = MultiArrayLayout(dim=[MultiArrayDimension(label=",".join(names), size=len(names),
                                                       stride=len(names))], data_offset=0)
    return Float64MultiArray(layout=layout, data=[float(fields[n]) for n in names])


def _odometry_msg(stamp_ns: int, x: float, y: float, yaw: float):
    from nav_msgs.msg import Odometry

    msg = Odometry()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    msg.header.frame_id, msg.child_frame_id = "odom", "base_link"
    msg.pose.pose.position.x, msg.pose.pose.position.y = float(x), float(y)
    msg.pose.pose.orientation.z, msg.pose.pose.orientation.w = math.sin(yaw / 2), \
        math.cos(yaw / 2)
    return msg


def test_node_corrects_a_drifting_route_from_closures_over_dds(tmp_path: Path) -> None:
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped
    from nav_msgs.msg import Odometry, Path as PathMsg
    from std_msgs.msg import Float64MultiArray

    from vpr_ros.ros.pose_graph_collector import loop_factor_rows

    run = make_run(QUICK)
    matches = run.revisit_matches()
    proc = _pose_graph(["--ros-args", "--params-file", str(CONFIG), "-p",
                        "odometry_qos_reliability:=reliable", "-p", "path_period_s:=0.5",
                        "-r", "odometry:=/pg_test/odom", "-r",
                        "loop_closure:=/pg_test/loop_closure"], tmp_path / "pg.log")
    probe = RosProbe("/vpr_pose_graph")
    try:
        paths = probe.record("/vpr_pose_graph/path", PathMsg)
        corrections = probe.record("/vpr_pose_graph/map_to_odom", PoseStamped)
        corrected = probe.record("/vpr_pose_graph/odometry", Odometry)
        factors = probe.record("/vpr_pose_graph/loop_factors", Float64MultiArray)
        diags = probe.record("/diagnostics", DiagnosticArray)
        odom_pub = probe.publisher("/pg_test/odom", Odometry)
        loop_pub = probe.publisher("/pg_test/loop_closure", Float64MultiArray)
        assert probe.spin_until(lambda: odom_pub.get_subscription_count() > 0
                                and loop_pub.get_subscription_count() > 0, 120), \
            (tmp_path / "pg.log").read_text()[-2000:]
        probe.spin_for(0.5)
        sent = 0
        for k, stamp in enumerate(run.stamps):
            odom_pub.publish(_odometry_msg(int(stamp), run.ox[k], run.oy[k], run.oyaw[k]))
            if k == 40:  # a broken odometry message: counted, skipped
                odom_pub.publish(_odometry_msg(int(stamp) + 1000, math.nan, 0.0, 0.0))
            if k in matches:
                i = matches[k]
                # vpr_node's labels in another order, plus a field this consumer never heard of
                loop_pub.publish(_closure_msg({
                    "score": 0.9, "consistent_count": 3.0, "future_evidence": 42.0,
                    "match_stamp_s": int(run.stamps[i]) / 1e9,
                    "query_stamp_s": int(stamp) / 1e9, "match_keyframe_id": float(i)}))
                sent += 1
            if k == 200:  # a closure without a layout: counted, skipped
                loop_pub.publish(Float64MultiArray(data=[1.0, 2.0]))
            probe.spin_for(0.01)

        def status() -> dict[str, str]:
            from vpr_ros.ros.diagnostics import status_values

            for arr in reversed(diags):
                for st in arr.status:
                    if st.name.startswith("vpr_pose_graph:"):
                        return status_values(st)
            return {}

        def done() -> bool:
            s = status()
            return bool(s) and int(s["closures_received"]) == sent and bool(paths) and \
                len(paths[-1].poses) == int(s["keyframes"]) and bool(factors)
        assert probe.spin_until(done, 120), (status(), (tmp_path / "pg.log").read_text()[-3000:])
        probe.spin_for(1.0)
        s = status()
        assert proc.poll() is None                      # alive after the broken messages
        assert s["errors_bad_closure"] == "1" and s["errors_bad_pose"] == "1", s
        assert int(s["closures_added"]) == sent and int(s["closures_accepted"]) == sent, s
        path = paths[-1]
        assert path.header.frame_id == "map" and len(path.poses) > 50
        est = [(p.header.stamp.sec * 1_000_000_000 + p.header.stamp.nanosec,
                (p.pose.position.x, p.pose.position.y, p.pose.position.z),
                (p.pose.orientation.x, p.pose.orientation.y, p.pose.orientation.z,
                 p.pose.orientation.w)) for p in path.poses]
        odo = [(st, (run.ox[k], run.oy[k], 0.0), se3.yaw_quaternion(run.oyaw[k]))
               for k, st in enumerate(run.stamps) if int(st) in {e[0] for e in est}]
        gt = run.ground_truth
        ate_odo = absolute_trajectory_error(odo, gt).rmse
        ate_opt = absolute_trajectory_error(est, gt).rmse
        assert ate_opt * 3 < ate_odo, (ate_odo, ate_opt)
        rows = loop_factor_rows(factors[-1])
        assert len(rows) == sent and all(r["accepted"] == 1.0 for r in rows)
        assert len(corrected) >= len(run.stamps) - 5     # every odometry message, corrected
        assert corrected[-1].header.frame_id == "map"
        last = corrections[-1].pose.position
        assert math.hypot(last.x, last.y) > 0.3            # map -> odom is being corrected
        # ~/odometry of the last message is its optimised pose: close to ground truth
        c = corrected[-1].pose.pose.position
        truth = (run.x[-1], run.y[-1])
        raw = (run.ox[-1], run.oy[-1])
        assert math.hypot(c.x - truth[0], c.y - truth[1]) < \
            math.hypot(raw[0] - truth[0], raw[1] - truth[1])
    finally:
        probe.close()
        stop_process(proc)
    assert proc.returncode in (0, -2), (tmp_path / "pg.log").read_text()[-2000:]


def test_docs_parameter_table_lists_exactly_the_declared_parameters() -> None:
    import re

    text = (REPO / "docs" / "pose_graph.md").read_text()
    section = text.split("## Parameters", 1)[1]
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", section, re.M))
    assert documented == {s.name for s in all_parameter_specs()}
