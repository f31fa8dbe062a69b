"""The map's exact search on a GPU, where a GPU build of faiss sees one.

Why only the exact kinds: a flat scan of a million 4096-d descriptors reads 16 GB per query (about
0.8 s at the 20 GB/s of a CPU's BLAS), and a Hamming scan of a million 512-bit codes costs 7.5 ms
of CPU per query; both are bandwidth-bound scans that a GPU's memory does some 100x faster. HNSW
and IVF-PQ already touch a small part of the map and stay on the CPU.

Why the results are the CPU path's own: the GPU only proposes candidates. The flat kind asks it
for a few more than ``k`` (and for the excluded keyframes on top), then scores them exactly from
the stored descriptors as every other kind does, so the ids are those of the CPU scan (a GPU inner
product may differ from the CPU's in the last bits; a list is only trusted when what it left out
scores clearly below its ``k``-th candidate, otherwise a longer one is asked for; rows whose
exact scores differ only by float rounding, e.g. bit-identical descriptors, come in whatever order
the re-rank's rounding gives, as they do between the CPU's own matrix kernels). The
binary kind orders the GPU's Hamming candidates by (distance, id), which is the order of the CPU
scan, and only trusts a list whose last distance is past the cut (otherwise an equal-distance code
with a smaller id might have been left out); rows it cannot trust, and lists longer than the GPU
can select, are served by the CPU index. Classic faiss GPU indexes ignore an ``IDSelector``, so
exclusions are filtered here, never handed to the GPU.

Why a size threshold: below a few tens of thousands of keyframes the CPU scan takes well under a
millisecond and the GPU call would cost its launch and copies; the GPU also holds the encoder.

Why a fallback: GPU memory is shared with the encoder (and other processes). Any GPU error —
out of memory while copying the map, a failed search — releases the GPU copy, records a note that
the node shows in ``/diagnostics``, and the map is searched on the CPU from then on.

The GPU indexes are built by a :class:`GpuBackend`; :class:`FaissGpu` is the real one. Tests on
machines without a GPU hand in a backend whose indexes are faiss CPU indexes with the GPU's
interface, to exercise everything around the GPU call (threshold, copy, candidate handling,
fallback and notes).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional, Protocol

import numpy as np

from vpr_ros.mapdb.index.faiss_loader import load_faiss

log = logging.getLogger(__name__)

#: Index kinds searched on the GPU.
GPU_KINDS = ("flat", "binary")
#: Extra flat candidates first asked of the GPU beyond ``k`` (and the excluded keyframes).
FLAT_MARGIN = 8
#: How far a GPU inner product of unit vectors may be from the CPU's exact one. fp32 GEMM
#: differs in the last bits only; the bound also covers a GEMM run in TF32 (10-bit mantissa:
#: at most about 5e-4 for a sum of products whose magnitudes add up to 1).
GPU_SCORE_SLACK = 1e-3
#: Extra Hamming candidates asked beyond ``k``, so that ties at the cut are usually seen whole.
BINARY_MARGIN = 32
#: The classic faiss GPU k-selection limit (CUDA >= 9); cuVS builds allow more.
DEFAULT_MAX_K = 2048
#: Rows copied to the GPU per ``add`` call (bounds the host-side float32 copy of fp16 rows).
COPY_ROWS = 65536


class GpuBackend(Protocol):
    """Builds the GPU indexes (inner-product float and Hamming binary) on one device."""

    device: str

    def flat(self, dim: int) -> Any: ...

    def binary(self, bits: int) -> Any: ...

    def max_k(self) -> int: ...


def gpu_support() -> tuple[int, str]:
    """(GPUs faiss can use, why none when 0)."""
    faiss = load_faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        return 0, (f"faiss {getattr(faiss, '__version__', '?')} is a CPU build (a GPU build: "
                   "requirements-gpu.txt)")
    try:
        n = int(faiss.get_num_gpus())
    except Exception as exc:  # a broken CUDA install raises here
        return 0, f"faiss could not count GPUs ({_first_line(exc)})"
    return (n, "") if n > 0 else (0, "faiss sees no GPU")


class FaissGpu:
    """faiss's own GPU indexes (``GpuIndexFlatIP``, ``GpuIndexBinaryFlat``) on one device.

    A cuVS build of faiss (``faiss-gpu-cuvs``) sets ``use_cuvs`` in these configs by itself, so
    the same classes run on cuVS there."""

    def __init__(self, device: int = 0) -> None:
        self.faiss = load_faiss()
        self.index_device = int(device)
        self.device = f"cuda:{self.index_device}"
        self._res = None

    def _resources(self) -> Any:
        if self._res is None:
            self._res = self.faiss.StandardGpuResources()
        return self._res

    def flat(self, dim: int) -> Any:
        cfg = self.faiss.GpuIndexFlatConfig()
        cfg.device = self.index_device
        return self.faiss.GpuIndexFlatIP(self._resources(), int(dim), cfg)

    def binary(self, bits: int) -> Any:
        cfg = self.faiss.GpuIndexBinaryFlatConfig()
        cfg.device = self.index_device
        return self.faiss.GpuIndexBinaryFlat(self._resources(), int(bits), cfg)

    def max_k(self) -> int:
        getter = getattr(self.faiss, "getMaxKSelection", None)
        if getter is not None:
            for args in ((False,), ()):
                try:
                    return int(getter(*args))
                except TypeError:
                    continue
        return DEFAULT_MAX_K


def _first_line(exc: BaseException, width: int = 200) -> str:
    """The cause of an exception in one short line. faiss errors read "Error in FUNCTION at
    FILE:LINE: Error: 'CONDITION' failed: MESSAGE"; the message (the CUDA error, e.g. "out of
    memory") is what a user needs, and it comes last, so a long line keeps its end."""
    lines = str(exc).strip().splitlines()
    text = lines[-1] if lines else ""
    if " failed: " in text:
        text = text.split(" failed: ", 1)[1]
    if len(text) > width:
        text = "..." + text[-width:]
    return f"{type(exc).__name__}: {text}"


class GpuFailed(RuntimeError):
    """A GPU call failed; the mirror is released and the caller searches on the CPU."""


class GpuMirror:
    """A GPU copy of one index's rows (float descriptors or packed codes), kept in step lazily.

    ``min_rows``: the copy is made at the first search of a map holding at least this many rows
    (a live map that grows past it moves then). ``note`` says where searches run and why."""

    def __init__(self, kind: str, width: int, min_rows: int, backend: GpuBackend) -> None:
        if kind not in GPU_KINDS:
            raise ValueError(f"GPU search covers {GPU_KINDS}, not {kind!r}")
        self.kind = kind
        self.width = int(width)
        self.min_rows = max(1, int(min_rows))
        self.backend = backend
        self.index: Any = None
        self.rows = 0
        self.failure = ""
        self._max_k: Optional[int] = None
        self._n = 0

    @property
    def active(self) -> bool:
        return self.index is not None and not self.failure

    @property
    def max_k(self) -> int:
        if self._max_k is None:
            self._max_k = int(self.backend.max_k())
        return self._max_k

    def note(self, n: Optional[int] = None) -> str:
        """One line for logs and ``/diagnostics``."""
        n = self._n if n is None else n
        if self.failure:
            return f"cpu (GPU search off after an error: {self.failure})"
        if self.active:
            return f"{self.backend.device} ({self.kind}, {self.rows} rows on the GPU)"
        if n < self.min_rows:
            return (f"cpu (map of {n} keyframes below the GPU threshold of {self.min_rows}; "
                    f"{self.backend.device} from then on)")
        return f"cpu ({self.kind} index not yet copied to {self.backend.device})"

    def ready(self, n: int, rows_from: Callable[[int], Iterator[np.ndarray]]) -> bool:
        """Whether a search over ``n`` rows runs on the GPU now; copies the rows it lacks
        (``rows_from(start)`` yields the rows from ``start`` on, in blocks)."""
        self._n = n
        if self.failure or n < self.min_rows:
            return False
        try:
            if self.index is None:
                make = self.backend.flat if self.kind == "flat" else self.backend.binary
                self.index, self.rows = make(self.width), 0
                log.info("copying the %s index (%d rows) to %s", self.kind, n, self.backend.device)
            if self.rows < n:
                for block in rows_from(self.rows):
                    self.index.add(block)
                    self.rows += len(block)
            if self.rows != n or int(self.index.ntotal) != n:
                raise GpuFailed(f"the GPU copy holds {int(self.index.ntotal)} rows, the map {n}")
        except Exception as exc:
            self.fail("copying the map to the GPU", exc)
            return False
        return True

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids) of the GPU index; GpuFailed (after releasing it) on any error."""
        try:
            d, i = self.index.search(queries, int(k))
        except Exception as exc:
            self.fail("searching on the GPU", exc)
            raise GpuFailed(self.failure) from exc
        return np.asarray(d), np.asarray(i, dtype=np.int64)

    def fail(self, doing: str, exc: BaseException) -> None:
        self.failure = f"{doing}: {_first_line(exc)}"
        log.warning("map search falls back to the CPU: %s", self.failure)
        self.release()

    def reset(self) -> None:
        """Forget the copy (the rows were recomputed: learned codes retrained)."""
        self.release()

    def release(self) -> None:
        index, self.index, self.rows = self.index, None, 0
        if index is not None:
            try:
                index.reset()
            except Exception:  # freeing a broken context can fail too; drop the object anyway
                pass


def canonical_hamming(dist: np.ndarray, ids: np.ndarray, want: int, n_total: int,
                      allowed: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The first ``want`` allowed ids of each row in (distance, id) order, -1 padded, and per
    row whether the list is certain to equal a full scan's (the fetched list ran past the last
    kept distance, or held every code)."""
    b, m = ids.shape
    out = np.full((b, want), -1, np.int64)
    sure = np.zeros(b, dtype=bool)
    for r in range(b):
        valid = ids[r] >= 0
        d, i = dist[r][valid].astype(np.int64), ids[r][valid]
        order = np.lexsort((i, d))
        d, i = d[order], i[order]
        keep = np.ones(len(i), dtype=bool) if allowed is None else allowed[i]
        kd, ki = d[keep][:want], i[keep][:want]
        out[r, : len(ki)] = ki
        if m >= n_total:
            sure[r] = True
        elif len(ki) == want:
            sure[r] = bool(kd[-1] < d[-1])  # an unseen code is at least as far as the last seen
    return out, sure
