"""The top-level maps/ folder: its README documents commands that the `vpr` tool really accepts,
the README's map examples write there, only the README is versioned, and a node given a
relative map path that is not there says which absolute path it looked at."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAPS = REPO / "maps"


def _commands(markdown: str, program: str) -> list[list[str]]:
    """Command lines of ``program`` in the fenced code blocks (continuations joined, comments
    dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(program + " "):
                out.append(shlex.split(line)[1:])
    return out


def test_the_folder_and_its_readme_exist_and_only_the_readme_is_versioned() -> None:
    readme = (MAPS / "README.md").read_text()
    for heading in ("## Build", "## Inspect", "## Merge", "## Layout of a map directory",
                    "## Where the node looks"):
        assert heading in readme
    ignore = (MAPS / ".gitignore").read_text().splitlines()
    assert "*" in ignore and "!README.md" in ignore


def test_every_vpr_command_in_the_maps_readme_parses() -> None:
    from vpr_ros.cli import build_parser

    commands = _commands((MAPS / "README.md").read_text(), "vpr")
    assert {c[1] for c in commands if c[0] == "map"} >= {"build", "info", "merge", "plot"}
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)  # SystemExit (a test failure) on an unknown option
        if args.command == "map" and args.map_command in ("build", "merge"):
            assert args.output.startswith("maps/"), argv


def test_the_main_readme_writes_maps_into_maps() -> None:
    readme = (REPO / "README.md").read_text()
    builds = [c for c in _commands(readme, "vpr") if c[:2] == ["map", "build"]]
    assert builds and all(c[c.index("-o") + 1].startswith("maps/") for c in builds)
    assert "maps/README.md" in readme


def test_a_missing_relative_map_names_the_absolute_path(tmp_path: Path,
                                                       effnet_gem_model_dir: Path,
                                                       monkeypatch) -> None:
    pytest.importorskip("rclpy")
    from vpr_ros.errors import MapError
    from vpr_ros.ros.node import VprNode
    from vpr_ros.ros.params import NodeConfig

    monkeypatch.chdir(tmp_path)
    cfg = NodeConfig(mode="localization", model=str(effnet_gem_model_dir), map="maps/site")
    with pytest.raises(MapError, match=re.escape(str(tmp_path / "maps" / "site"))):
        VprNode._open_map(cfg, encoder=None, outputs=None)
