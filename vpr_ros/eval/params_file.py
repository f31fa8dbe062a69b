"""Calibrated decision settings written as a ``vpr_node`` params file.

A calibration (``vpr eval loop|recall --calibrate -o site.yaml``) ends in a file the node loads
as it is (``vpr_node --ros-args --params-file config/vpr_loop_closure.yaml --params-file
site.yaml``: later files override earlier ones): the decision sections only, every tunable
with its description and range as in ``config/*.yaml``, and a header saying where the values
came from and what they gave there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from vpr_ros.localization.params import parameter_specs, render_section


def write_params_file(path: str | Path, sections: Sequence[tuple[str, Any]],
                      header: Sequence[str]) -> Path:
    """Write ``vpr_node: ros__parameters:`` with one section per ``(name, config)`` (a
    dataclass config whose every field is written); ``header``: comment lines."""
    out = Path(path)
    lines = [f"# {h}" if h else "#" for h in header]
    lines += ["vpr_node:", "  ros__parameters:"]
    for name, config in sections:
        values = {f: getattr(config, f) for f in config.__dataclass_fields__}
        lines += render_section(name, parameter_specs(type(config)), values)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out
