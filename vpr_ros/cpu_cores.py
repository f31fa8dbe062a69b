"""How many CPU cores this process may use: one answer for every thread pool in the package.

Why one helper: ONNX Runtime's intra-op team and the Hamming scan's shards both size themselves
to the cores the process can run on. On a robot the node is often
pinned (``taskset``, a container's cpuset), and ``os.cpu_count()`` would then oversubscribe the
few cores it has; the affinity mask says what is really there.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """CPU cores this process may run on (affinity/cgroup aware where Linux tells us)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
