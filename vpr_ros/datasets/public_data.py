"""Where public real data sets (beyond the shared Nordland archive) are found on this machine.

Real sequences used by tests, evaluations and the README's measured tables (EuRoC frames, a day/
night walk, ...) are public data that this repository never copies in. A user or a test machine
puts each one in a folder named after it; this module looks for that folder in the usual places,
so every reader asks one question and a test that cannot find its data skips saying where it
looked.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]


def data_search_path() -> list[Path]:
    """Folders searched, in order: ``$VPR_DATA_DIR``, ``<repo>/../shared/data``,
    ``<repo>/../data``, ``~/.cache/vpr_ros/data``."""
    env = os.environ.get("VPR_DATA_DIR")
    roots = [Path(env)] if env else []
    roots += [_REPO.parent / "shared" / "data", _REPO.parent / "data",
              Path.home() / ".cache" / "vpr_ros" / "data"]
    return roots


def find_dataset(name: str) -> Path | None:
    """The first existing ``<root>/<name>`` folder on :func:`data_search_path`, else ``None``."""
    return next((root / name for root in data_search_path() if (root / name).is_dir()), None)


def missing_reason(name: str, source: str) -> str:
    """A one-line reason for a skip or an error: which folder was looked for, where, and where
    the data comes from."""
    where = ", ".join(str(r) for r in data_search_path())
    return f"public data set '{name}' not found (looked in {where}); it comes from {source}"
