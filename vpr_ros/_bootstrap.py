"""Make a venv-installed ROS 2 (ros-kilted-* wheels) loadable without the user exporting anything.

The wheels put their shared libraries in ``<venv>/lib``; the dynamic loader only reads
``LD_LIBRARY_PATH`` when a process starts, so the entry points re-execute themselves once with
it set. On a machine with a system ROS install (sourced setup.bash) nothing happens.
"""

from __future__ import annotations

import glob
import os
import sys

_GUARD = "VPR_ROS_LD_BOOTSTRAPPED"


def ros_lib_dir() -> str | None:
    """``<venv>/lib`` if this interpreter's prefix holds the ROS wheels' libraries."""
    lib = os.path.join(sys.prefix, "lib")
    return lib if glob.glob(os.path.join(lib, "librcl*.so*")) else None


def env_with_ros_libs(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` whose LD_LIBRARY_PATH includes the venv's ROS libraries (for
    subprocesses started by tests, the demo and benchmarks)."""
    env = dict(os.environ if env is None else env)
    lib = ros_lib_dir()
    if lib:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        if lib not in parts:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([lib, *parts])
    return env


def ensure_ros_libs() -> None:
    """Re-execute the current program with LD_LIBRARY_PATH set, at most once."""
    lib = ros_lib_dir()
    if not lib or os.environ.get(_GUARD):
        return
    if lib in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        return
    env = env_with_ros_libs()
    env[_GUARD] = "1"
    # orig_argv keeps interpreter options and -c/-m forms intact.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
