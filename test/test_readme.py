"""The README stays true: its two commands are the ones CI and users run, and its parameter
table lists exactly the node's declared parameters."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_the_two_commands_and_ci() -> None:
    quick = README.split("## Quick start", 1)[1].split("```", 2)[1]
    assert "make demo" in quick and "make test" in quick
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test\s*$", ci, re.M), "CI must run exactly the README's test command"


def test_parameter_table_matches_declared_parameters() -> None:
    from vpr_ros.ros.params import all_parameter_specs

    section = README.split("### Parameters", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", section, re.M))
    declared = {s.name for s in all_parameter_specs()}
    assert documented == declared, (sorted(declared - documented), sorted(documented - declared))
