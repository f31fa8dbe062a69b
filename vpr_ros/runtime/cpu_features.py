"""What the host CPU can do for reduced-precision inference.

Why: bf16 and int8 only pay where the CPU has instructions built for them. On an AVX2-only CPU
PyTorch's bf16 autocast is emulated (slower than fp32) and ONNX Runtime's int8 kernels saturate
intermediate sums, so those variants are offered only where the flags say the hardware exists:
bf16 with AMX (``amx_bf16``) or AVX512-BF16, int8 with VNNI (``avx512_vnni``, ``avx_vnni``) or
AMX int8. The same flags key the cached ``auto`` decision, so a map copied to another robot is
measured again there.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

#: Flags that change which reduced-precision kernels a CPU runs (and so the ``auto`` choice).
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16",
                  "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
                  "asimd", "sve", "bf16", "i8mm")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name and the flags of :data:`RELEVANT_FLAGS` it reports."""

    model: str
    flags: frozenset[str]

    @property
    def bf16(self) -> bool:
        """bf16 matrix instructions (AMX or AVX512-BF16)."""
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def int8(self) -> bool:
        """int8 dot-product instructions (VNNI or AMX int8)."""
        return any(f in self.flags for f in INT8_FLAGS)

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.flags

    def describe(self) -> str:
        shown = [f for f in RELEVANT_FLAGS if f in self.flags]
        return f"{self.model} ({' '.join(shown) or 'no AVX2/AVX-512/AMX flags'})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """:class:`CpuInfo` from the text of ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return CpuInfo(model=model or platform.processor() or platform.machine() or "unknown",
                   flags=frozenset(f for f in flags if f in RELEVANT_FLAGS))


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This host's CPU (read once per process)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read())
    except OSError:  # not Linux: no flags known, so no reduced-precision variant is offered
        return CpuInfo(model=platform.processor() or platform.machine() or "unknown",
                       flags=frozenset())
