"""The README and docs/ stay true: the README's two commands are the ones CI and users run, the
full parameter table in docs/parameters.md lists exactly the node's declared parameters with
their declared defaults, ranges and descriptions (and the README's summary names only declared
ones, with their defaults), and every relative link in the README and docs/ points at a file
that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
PARAMETERS = REPO / "docs" / "parameters.md"

#: A markdown link or image: [text](target) / ![alt](target), target up to a space or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: A table row naming a parameter in its first cell.
PARAM_ROW = re.compile(r"^\| `([a-z_.]+)` \|", re.M)
#: The same row with its second cell (the default).
PARAM_DEFAULT = re.compile(r"^\| `([a-z_.]+)` \| ([^|]*) \|", re.M)


def _declared() -> set[str]:
    from vpr_ros.ros.params import all_parameter_specs

    return {s.name for s in all_parameter_specs()}


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
            *sorted(REPO.glob("*/README.md"))]


def test_the_two_commands_and_ci() -> None:
    quick = README.split("## Quick start", 1)[1].split("```", 2)[1]
    assert "make demo" in quick and "make test" in quick
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test\s*$", ci, re.M), "CI must run exactly the README's test command"


def test_parameter_table_matches_declared_parameters() -> None:
    documented = set(PARAM_ROW.findall(PARAMETERS.read_text(encoding="utf-8")))
    declared = _declared()
    assert documented == declared, (sorted(declared - documented), sorted(documented - declared))


def _spec_row(spec) -> str:
    """The docs/parameters.md row of one declared parameter."""
    default = '""' if spec.default == "" else str(spec.default)
    bounded = spec.type not in (bool, str) and (spec.low is not None or spec.high is not None)
    span = f"[{spec.low}, {spec.high}]" if bounded else ""
    return f"| `{spec.name}` | {default} | {span} | {spec.description} |"


def test_parameter_table_rows_say_what_the_declarations_say() -> None:
    """Default, range and description in docs/parameters.md are the declared ones, so the table
    cannot drift from the code (the expected row is printed for pasting)."""
    from vpr_ros.ros.params import all_parameter_specs

    rows = {m.group(1): m.group(0) for m in
            re.finditer(r"^\| `([a-z_.]+)` \|.*\|$", PARAMETERS.read_text(encoding="utf-8"), re.M)}
    stale = [_spec_row(s) for s in all_parameter_specs()
             if s.name in rows and rows[s.name] != _spec_row(s)]
    assert not stale, "docs/parameters.md rows differ from the declarations; expected:\n" + \
        "\n".join(stale)


def test_the_readme_summarises_declared_parameters_and_links_the_full_table() -> None:
    section = README.split("### Parameters", 1)[1].split("\n## ", 1)[0]
    summarised = set(PARAM_ROW.findall(section))
    assert summarised, "the README's parameter summary table is missing"
    assert summarised <= _declared(), sorted(summarised - _declared())
    assert "(docs/parameters.md)" in section, "the summary must link the full table"
    full = dict(PARAM_DEFAULT.findall(PARAMETERS.read_text(encoding="utf-8")))
    stale = {name: (default, full[name]) for name, default in PARAM_DEFAULT.findall(section)
             if default.strip() != full[name].strip()}
    assert not stale, f"README summary defaults differ from docs/parameters.md: {stale}"


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_existing_files(doc: Path) -> None:
    missing = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL or an anchor within the page
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(REPO)} links to files that do not exist: {missing}"
