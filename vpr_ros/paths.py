"""Checking an output path before slow work starts.

Why: ``vpr map build -o /etc/passwd/x`` used to read the whole bag and encode every keyframe,
then die in a ``NotADirectoryError`` traceback at the save. Every command that writes a file
or a directory checks its destination first, with this one function, and fails in one line
naming the path.
"""

from __future__ import annotations

import os
from pathlib import Path

from vpr_ros.errors import ConfigError, VPRError


def check_output_dir(directory: str | Path, what: str = "the output",
                     error: type[VPRError] = ConfigError) -> None:
    """``error`` unless ``directory`` is a writable directory or can be created as one (its
    nearest existing ancestor is a writable directory)."""
    d = Path(directory)
    if d.exists():
        if not d.is_dir():
            raise error(f"cannot write {what} to {d}: it is a file, expected a directory")
        if not os.access(d, os.W_OK | os.X_OK):
            raise error(f"cannot write {what} to {d}: the directory is not writable (check "
                        "its permissions)")
        return
    parent = d.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"cannot write {what} to {d}: {parent} is a file, not a directory; choose "
                    "another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"cannot write {what} to {d}: {parent} is not writable (check its "
                    "permissions, or choose another output path)")


def check_output_file(path: str | Path, what: str = "the output",
                      error: type[VPRError] = ConfigError) -> None:
    """``error`` unless the file ``path`` can be written: not a directory, and its folder is
    (or can be created as) a writable directory."""
    p = Path(path)
    if p.is_dir():
        raise error(f"cannot write {what} to {p}: it is a directory, expected a file path")
    check_output_dir(p.parent, what, error)
