"""faiss, imported so that its OpenMP threads sleep instead of spinning while they wait.

Why: faiss splits even one query over an OpenMP team, and libgomp's default is to busy-wait at
every barrier. When the cores are shared (a robot computer running SLAM, drivers and the encoder;
CI; this project's 2-core development machines) a spinning team member that has been descheduled
stalls the others: on the shared 2-core machine a 1M-code Hamming scan took 265 ms with spinning
threads against 39 ms with sleeping ones, and IVF-PQ training 15 s against 0.7 s. faiss's wheel
carries its own libgomp, which reads ``OMP_WAIT_POLICY`` once, when faiss is first imported; the
variable is set for that moment only (unless the user set it), so libraries loaded later (torch)
keep their own defaults. Imported lazily: ``vpr --help`` and map metadata never load faiss.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

_WAIT_POLICY = "OMP_WAIT_POLICY"


def load_faiss() -> ModuleType:
    loaded = sys.modules.get("faiss")
    if loaded is not None:
        return loaded
    preset = os.environ.get(_WAIT_POLICY)
    if preset is None:
        os.environ[_WAIT_POLICY] = "PASSIVE"
    try:
        import faiss
    finally:
        if preset is None:
            os.environ.pop(_WAIT_POLICY, None)
    return faiss
