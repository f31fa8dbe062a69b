"""Adversarial trials on vpr_node's parameters: values of the wrong type, out of range or not
among the choices, for a seeded sample of every declared parameter; params files rcl cannot
use; misspelt names; bad values set at run time and rules checked at configure. At start each is
one ``vpr_node: error:`` line and exit code 2 (never a traceback); a misspelt name is a warning
naming it; at run time the set is refused with the reason; at configure the transition fails
with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.ros.params import CHOICES, all_parameter_specs

from trials import assert_clear, count, rng  # noqa: E402


def _bad_values(spec) -> list[str]:
    """Command-line texts (``-p NAME:=TEXT``) that the declaration must refuse."""
    out = []
    if spec.type is bool:
        out += ["maybe", "3"]
    elif spec.type in (int, float):
        out += ["abc", "[1, 2]"]
        if spec.type is int:
            out.append("2.5")
        if spec.low is not None:
            out.append(repr(type(spec.low)(spec.low) - 1 if spec.type is int
                            else float(spec.low) - 1.0))
        if spec.high is not None:
            out.append(repr(spec.high + 1 if spec.type is int else float(spec.high) * 2 + 1))
    elif spec.type is str:
        out += ["7", "true"]
        if spec.name in CHOICES:
            out.append("no_such_choice")
    return out


def _construct(args: list[str]):
    import rclpy

    from vpr_ros.ros.node import VprNode

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = VprNode(context=context, cli_args=["--ros-args", *args])
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def test_bad_start_values_of_declared_parameters() -> None:
    """A seeded sample over every declared parameter (new ones included automatically)."""
    cases = [(spec, text) for spec in all_parameter_specs() for text in _bad_values(spec)]
    g = rng("params")
    picked = [cases[i] for i in g.choice(len(cases), size=min(len(cases), count(24)),
                                         replace=False)]
    for spec, text in picked:
        what = f"-p {spec.name}:={text}"
        with pytest.raises(ConfigError) as err:
            _construct(["-p", f"{spec.name}:={text}"])
        assert_clear(err.value, what)
        assert spec.name in str(err.value), what


def test_an_integer_for_a_floating_point_parameter_says_how_to_write_it() -> None:
    """rclpy refuses ``-p x:=0`` for a double parameter (no conversion); the one line says
    to write 0.0 instead of only that a number was expected."""
    floats = [s for s in all_parameter_specs() if s.type is float and s.low is not None
              and s.low <= 2 and (s.high is None or s.high >= 2)]
    assert floats
    spec = floats[int(rng("int-for-float").integers(len(floats)))]
    with pytest.raises(ConfigError) as err:
        _construct(["-p", f"{spec.name}:=2"])
    assert_clear(err.value, spec.name)
    assert f"{spec.name} = 2 is invalid" in str(err.value) and "write 2.0" in str(err.value)


def test_good_start_values_pass() -> None:
    _construct(["-p", "top_k:=7", "-p", "mode:=loop_closure", "-p", "pose_buffer_s:=2.5"])


def test_run_time_sets_and_configure_rules(tmp_path: Path, capfd) -> None:
    """``ros2 param set`` of a value outside the declaration is refused when made; a rule
    across parameters (checked at configure) fails the transition with one line."""
    import rclpy
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from vpr_ros.ros.node import VprNode

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = VprNode(context=context)
        for name, value in (("mode", "foo"), ("top_k", 0), ("image_transport", "h264")):
            result = node.set_parameters([Parameter(name, value=value)])[0]
            assert not result.successful and name in result.reason, (name, result.reason)
        ok = node.set_parameters([Parameter("relocalization.min_sigma_m", value=50.0),
                                  Parameter("relocalization.max_sigma_m", value=1.0)])
        assert all(r.successful for r in ok)
        assert node.trigger_configure() != TransitionCallbackReturn.SUCCESS
        err = capfd.readouterr().err
        lines = [ln for ln in err.splitlines() if "configure failed" in ln]
        assert len(lines) == 1 and "sigma" in lines[0] and "Traceback" not in err, err
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def test_configure_refuses_a_degenerate_model(effnet_gem_model_dir: Path, tmp_path: Path,
                                              capfd) -> None:
    """Weights that give every image one descriptor: configure fails, in either mode, saying
    so (in localization mode the refusal used to blame a model/map mismatch)."""
    import shutil

    import rclpy
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter
    from safetensors.torch import load_file, save_file

    from vpr_ros.ros.node import VprNode

    model = Path(shutil.copytree(effnet_gem_model_dir, tmp_path / "model"))
    state = load_file(str(model / "model.safetensors"))
    state["backbone.net.bn2.weight"].zero_()
    state["backbone.net.bn2.bias"].fill_(1.0)
    save_file(state, str(model / "model.safetensors"))
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = VprNode(context=context, parameter_overrides=[
            Parameter("mode", value="loop_closure"), Parameter("model", value=str(model)),
            Parameter("backend", value="torch"), Parameter("verification.enabled", value=False)])
        assert node.trigger_configure() != TransitionCallbackReturn.SUCCESS
        err = capfd.readouterr().err
        lines = [ln for ln in err.splitlines() if "configure failed" in ln]
        assert len(lines) == 1 and "same descriptor for images that share nothing" in lines[0], err
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


# -- the process -------------------------------------------------------------------------------


def _node(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vpr_ros.ros.node_main", "--ros-args", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_exit_2(proc: subprocess.Popen, what: str) -> str:
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, f"{what}: exit code {proc.returncode}: {err[-2000:]}"
    assert "Traceback" not in err, f"{what}: {err[-2000:]}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vpr_node: error:"), f"{what}: {err}"
    return lines[0]


@pytest.mark.parametrize("case", ["bad-value", "missing-file", "deep-yaml"])
def test_vpr_node_process_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    """The reported case: 14 of 26 bad-parameter starts ended in a Python traceback, exit 1."""
    params = tmp_path / "params.yaml"
    args = {"bad-value": ["-p", "top_k:=abc"],
            "missing-file": ["--params-file", str(tmp_path / "none.yaml")]}.get(
        case, ["--params-file", str(params)])
    params.write_text("[" * 1_100)
    line = _assert_exit_2(_node(*args), case)
    assert ("top_k" if case == "bad-value" else str(tmp_path)) in line, line


@pytest.mark.parametrize("text", ["vpr_node: {ros__parameters: [top_k: 5", "- 1\n- 2\n",
                                  "\xff\xfe", "[" * 1_100])
def test_params_files_rcl_cannot_use(tmp_path: Path, text: str) -> None:
    """What the process checks before rcl parses its arguments (the process cases above run
    the same check end to end)."""
    from vpr_ros.ros.node_main import check_params_files

    params = tmp_path / "params.yaml"
    params.write_bytes(text.encode("latin-1"))
    problem = check_params_files(["--ros-args", "--params-file", str(params)])
    assert problem and str(params) in problem and "\n" not in problem, problem


def test_misspelt_parameter_in_a_params_file_is_warned_about(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("vpr_node:\n  ros__parameters:\n    top_kk: 9\n    mode: localization\n"
                      "other_node:\n  ros__parameters:\n    anything: 1\n")
    proc = _node("--params-file", str(params), "-p", "autostart:=false")
    seen = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "unknown parameter" in line:
                break
        text = "".join(seen)
        assert "unknown parameter(s) for vpr_node: top_kk (did you mean top_k?)" in text, text
        assert "anything" not in text  # another node's section is not ours to judge
        assert proc.poll() is None  # a warning, not a failure
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
