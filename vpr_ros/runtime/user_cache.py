"""The user cache folder the runtime writes to: on-demand ONNX exports, OpenVINO's compiled
models, int8 quantisations and the ``auto`` backend decisions.

One root, ``$VPR_CACHE_DIR`` or ``$XDG_CACHE_HOME/vpr_ros`` (``~/.cache/vpr_ros``), so a robot's
deployment can point all of it at a persistent, writable volume with one variable.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vpr_ros.errors import BackendError


def cache_root() -> Path:
    base = os.environ.get("VPR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vpr_ros")
    return Path(base)


def writable_dir(path: Path, what: str) -> Path:
    """``path`` created if needed and proven writable, or a BackendError saying how to fix it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_probe_")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BackendError(f"{what} {path} is not writable ({exc.strerror or exc}); point "
                           "VPR_CACHE_DIR (or the backend's cache_dir option) at a writable "
                           "folder") from exc
    return path
