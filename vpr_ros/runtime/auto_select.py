"""``backend: auto`` on the CPU: measure the backends x precisions on this host, keep the ones
whose descriptors match fp32, take the fastest, remember the decision.

Why measure: which backend is fastest depends on the CPU far more than on anything a fixed
order can know. On an AVX2-only CPU fp32 ONNX Runtime and PyTorch are within 20 %; on a CPU
with AMX, OpenVINO bf16 runs a ViT 3-4x faster than either. So at first use of a model on a
host :func:`decide` opens every candidate the CPU offers (:func:`cpu_candidates`), times each on
a few frames at the model's input size, checks its descriptors against fp32 on real images
(the shared Nordland data when present, else a built-in deterministic image set, and the
decision says which), and picks the fastest that passes:

* cosine >= :data:`MIN_COSINE` to the fp32 reference on every probe image, and
* no recorded Nordland R@1 loss beyond :data:`MAX_R1_LOSS_POINTS` (``vpr bench encoder
  --accuracy`` records those per model, :func:`record_accuracy`).

The decision is cached in the user cache (``backend_choice/``), keyed by the model's
fingerprint, the objective (``latency`` at batch 1 for the node, ``throughput`` at batch 8 for
map building and evaluation), the CPU model and flags, the usable cores and thread option, and
the library versions; a later start opens the chosen backend directly. The measurement is
bounded: a candidate more than :data:`CUT_FACTOR` times slower than the best so far after its
first timed frame is not timed further, and the whole timing stops at ``budget_s``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from vpr_ros.errors import BackendError, MapMismatchError, VPRError

log = logging.getLogger(__name__)

MIN_COSINE = 0.999
MAX_R1_LOSS_POINTS = 0.5
CUT_FACTOR = 2.5
PROBE_IMAGES = 8
DECISION_FORMAT = "vpr_ros.backend_choice/1"
OBJECTIVES = ("latency", "throughput")
#: The order candidates are measured in: references first, then the likely fastest, so slow
#: ones are cut early (the order never decides the winner; the timings do).
MEASURE_ORDER = ("torch:fp32", "onnxruntime:fp32", "openvino:fp32", "openvino:bf16",
                 "torch:bf16", "onnxruntime:int8", "openvino:fp16")


def choice_dir() -> Path:
    from vpr_ros.runtime.user_cache import cache_root

    return cache_root() / "backend_choice"


# -- candidates (a pure function of the host, tested with fabricated hosts) -------------------

def cpu_candidates(kind: str, cpu: Any, avail: Any, export_cache: bool = True) -> list[Any]:
    """Every backend x precision this CPU can run for a model directory or .onnx file, in
    :data:`MEASURE_ORDER`. Reduced precisions only where the hardware has instructions for
    them (``cpu``: :class:`~vpr_ros.runtime.cpu_features.CpuInfo`)."""
    from vpr_ros.runtime.backend_select import Choice

    onnx_ok = kind == "onnx" or (kind == "model_dir" and export_cache)
    ov_caps = set(avail.openvino_cpu or ())
    names = []
    if kind == "model_dir":
        names.append("torch:fp32")
        if cpu.bf16:
            names.append("torch:bf16")
    if onnx_ok and avail.onnxruntime:
        names.append("onnxruntime:fp32")
        if cpu.int8:
            names.append("onnxruntime:int8")
    if onnx_ok and avail.openvino_cpu is not None:
        names.append("openvino:fp32")
        if cpu.bf16 and "BF16" in ov_caps:
            names.append("openvino:bf16")
        if "FP16" in ov_caps:
            names.append("openvino:fp16")
    names.sort(key=MEASURE_ORDER.index)
    out = []
    for name in names:
        backend, precision = name.split(":")
        options = (("provider", "cpu"),) if backend == "onnxruntime" else ()
        out.append(Choice(backend, "cpu", options, precision=precision))
    return out


# -- probe images -------------------------------------------------------------------------

def builtin_images(count: int = PROBE_IMAGES, size: tuple[int, int] = (240, 320)
                   ) -> list[np.ndarray]:
    """Deterministic RGB images with structure at several scales (smooth fields, edges,
    blocks), for hosts without the shared data. Not real images: the decision says so."""
    rng = np.random.default_rng(20251206)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(count):
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            fx, fy = rng.uniform(0.5, 6, 2) * 2 * np.pi / np.array([w, h])
            img[..., c] = 0.5 + 0.3 * np.sin(fx * xx + rng.uniform(0, 6)) * np.cos(
                fy * yy + rng.uniform(0, 6))
        for _ in range(6 + i):
            y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
            y1, x1 = y0 + rng.integers(8, h // 2), x0 + rng.integers(8, w // 2)
            img[y0:y1, x0:x1] = rng.uniform(0, 1, 3)
        img += rng.normal(0, 0.03, img.shape).astype(np.float32)
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


def probe_images(count: int = PROBE_IMAGES) -> tuple[list[np.ndarray], str]:
    """(images, where they came from): real Nordland frames (summer and winter, spread along
    the route) when the shared data is present, else :func:`builtin_images`."""
    try:
        from vpr_ros.datasets.nordland import (frame_numbers, load_images, nordland_root,
                                               shared_data_dir)

        if shared_data_dir() is None:
            raise VPRError("the shared Nordland archive is not on this machine")
        root = nordland_root()
        frames = frame_numbers(root)
        picks = [frames[int(i)] for i in np.linspace(0, len(frames) - 1, count + 2)[1:-1]]
        half = count // 2
        images = (load_images(root, "summer", picks[:half])
                  + load_images(root, "winter", picks[half:]))
        return images, f"{len(images)} real Nordland images (summer and winter)"
    except (VPRError, OSError) as exc:
        return builtin_images(count), (f"{count} built-in deterministic images (no real images: "
                                       f"{exc})")


# -- the decision ---------------------------------------------------------------------------

@dataclass
class Row:
    """One candidate's measurement."""

    name: str
    status: str = "ok"            # ok | rejected | excluded | slower | unavailable | skipped
    load_s: Optional[float] = None
    latency_ms: Optional[float] = None      # batch 1, median
    batch_ms: Optional[float] = None        # per image at batch PROBE_IMAGES
    min_cosine: Optional[float] = None
    backend: str = ""                      # the encoder's own name
    note: str = ""

    def score(self, objective: str) -> Optional[float]:
        return self.latency_ms if objective == "latency" else self.batch_ms


@dataclass
class Decision:
    picked: str
    objective: str
    rows: list[Row]
    images: str
    key: str
    host: dict[str, Any]
    measured_at: str
    from_cache: bool = False
    cache_note: str = ""
    #: the host's 1/5/15-minute load average when it was measured (a shared or busy host
    #: distorts timings: re-measure with `vpr model info MODEL --backends --refresh`)
    load_average: list[float] = field(default_factory=list)
    _encoders: dict[str, Any] = field(default_factory=dict, repr=False)

    def ranking(self) -> list[Any]:
        """Accepted candidates, fastest first (the fallback order if the pick cannot open)."""
        from vpr_ros.runtime.backend_select import Choice

        ok = sorted((r for r in self.rows if r.status == "ok" and r.score(self.objective)),
                    key=lambda r: r.score(self.objective))
        out = []
        for r in ok:
            backend, precision = r.name.split(":")
            options = (("provider", "cpu"),) if backend == "onnxruntime" else ()
            out.append(Choice(backend, "cpu", options, precision=precision))
        return out

    def take_encoder(self, name: str) -> Any:
        """The encoder measured in this process for ``name`` (so it is not opened twice)."""
        return self._encoders.pop(name, None)

    def row(self, name: str) -> Optional[Row]:
        return next((r for r in self.rows if r.name == name), None)

    def summary(self) -> str:
        best = self.row(self.picked)
        ref = next((r for r in self.rows if r.note == "fp32 reference"), None)
        unit = "ms/frame at batch 1" if self.objective == "latency" else \
            f"ms/image at batch {PROBE_IMAGES}"
        text = f"auto: {self.picked}"
        if best is not None and best.score(self.objective):
            text += f" {best.score(self.objective):.1f} {unit}"
            if ref is not None and ref is not best and ref.score(self.objective):
                text += (f" vs {ref.name} {ref.score(self.objective):.1f} "
                         f"(x{ref.score(self.objective) / best.score(self.objective):.2f})")
        text += (f"; {sum(r.status == 'ok' for r in self.rows)} of {len(self.rows)} candidates "
                 f"passed cosine >= {MIN_COSINE} on {self.images}")
        text += "; cached decision" if self.from_cache else f"; measured {self.measured_at}"
        return text + (f"; {self.cache_note}" if self.cache_note else "")

    def to_dict(self) -> dict[str, Any]:
        return {"format": DECISION_FORMAT, "picked": self.picked, "objective": self.objective,
                "rows": [dataclasses.asdict(r) for r in self.rows], "images": self.images,
                "key": self.key, "host": self.host, "measured_at": self.measured_at,
                "load_average": self.load_average}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "Decision":
        if doc.get("format") != DECISION_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        return cls(picked=str(doc["picked"]), objective=str(doc["objective"]),
                   rows=[Row(**r) for r in doc["rows"]], images=str(doc["images"]),
                   key=str(doc["key"]), host=dict(doc["host"]),
                   measured_at=str(doc["measured_at"]), from_cache=True,
                   load_average=list(doc.get("load_average") or []))


def versions() -> dict[str, str]:
    import importlib.metadata as md

    from vpr_ros import __version__

    out = {"vpr_ros": __version__}
    for dist in ("torch", "onnxruntime", "openvino"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "absent"
    return out


def host_key(fingerprint: str, kind: str, objective: str, options: dict[str, Any],
             export_cache: bool) -> tuple[str, dict[str, Any]]:
    """(cache key, what it was made of): everything that can change the fastest backend."""
    from vpr_ros.cpu_cores import usable_cores
    from vpr_ros.runtime.cpu_features import cpu_info

    cpu = cpu_info()
    host = {"fingerprint": fingerprint, "artifact": kind, "objective": objective,
            "cpu": cpu.model, "flags": sorted(cpu.flags), "cores": usable_cores(),
            "threads": options.get("threads"), "export_cache": export_cache,
            "versions": versions()}
    digest = hashlib.sha256(json.dumps(host, sort_keys=True).encode()).hexdigest()[:20]
    return f"{fingerprint}-{objective}-{digest}", host


def artifact_fingerprint(path: Path, kind: str) -> str:
    if kind == "model_dir":
        from vpr_ros.models.model_dir import read_model_meta

        return read_model_meta(path).fingerprint
    from vpr_ros.export.artifact import read_onnx_metadata

    return read_onnx_metadata(path).fingerprint


def decide(path: Path, kind: str, objective: str = "latency", options: Optional[dict] = None,
           avail: Any = None, export_cache: bool = True, expected_fingerprint: Optional[str] = None,
           refresh: bool = False, budget_s: float = 60.0, cache: bool = True) -> Decision:
    """The cached decision for this model on this host, or a new measurement (see the module
    docstring). ``refresh`` measures again; ``cache=False`` neither reads nor writes it."""
    from vpr_ros.runtime.backend_select import check_expected_fingerprint, probe
    from vpr_ros.runtime.cpu_features import cpu_info

    if objective not in OBJECTIVES:
        raise BackendError(f"auto objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    options = dict(options or {})
    fingerprint = artifact_fingerprint(path, kind)
    check_expected_fingerprint(fingerprint, expected_fingerprint, str(path))
    key, host = host_key(fingerprint, kind, objective, options, export_cache)
    file = choice_dir() / f"{key}.json"
    if cache and not refresh and file.is_file():
        try:
            decision = Decision.from_dict(json.loads(file.read_text(encoding="utf-8")))
            if decision.key == key and decision.ranking():
                return decision
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            log.warning("auto backend: ignoring unreadable cached decision %s (%s)", file, exc)
    avail = avail or probe()
    candidates = cpu_candidates(kind, cpu_info(), avail, export_cache)
    if not candidates:
        raise BackendError(f"no CPU backend can run {path} here "
                           f"({'; '.join(avail.notes) or 'nothing installed'})")
    decision = measure(path, kind, candidates, objective, options, fingerprint, budget_s)
    decision.key, decision.host = key, host
    if cache:
        decision.cache_note = _save(file, decision)
    return decision


def _save(file: Path, decision: Decision) -> str:
    """Write the decision atomically; a cache that cannot be written is said, not fatal."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(decision.to_dict(), f, indent=2)
        os.replace(tmp, file)
        return ""
    except OSError as exc:
        log.warning("auto backend: cannot cache the decision in %s (%s); it will be measured "
                    "again at the next start", file.parent, exc)
        return f"not cached ({file.parent}: {exc.strerror or exc})"


# -- the measurement ------------------------------------------------------------------------

def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(path: Path, kind: str, candidates: Sequence[Any], objective: str,
            options: dict[str, Any], fingerprint: str, budget_s: float = 60.0,
            images: Optional[tuple[list[np.ndarray], str]] = None) -> Decision:
    """Open and time each candidate (see the module docstring); the first fp32 candidate is
    the reference the others' descriptors are compared with."""
    import cv2

    from vpr_ros.export.parity import row_cosines
    from vpr_ros.runtime.backend_select import _open

    raw, source = images or probe_images()
    excluded = accuracy_exclusions(fingerprint)
    rows: list[Row] = []
    encoders: dict[str, Any] = {}
    ref_desc: Optional[np.ndarray] = None
    best: Optional[float] = None          # best score (objective) so far
    best_latency: Optional[float] = None  # best batch-1 seconds so far (for the early cut)
    frames: Optional[list[np.ndarray]] = None
    t_start = time.monotonic()
    for choice in candidates:
        row = Row(choice.name)
        rows.append(row)
        if choice.name in excluded:
            row.status, row.note = "excluded", excluded[choice.name]
            continue
        is_ref = ref_desc is None
        if is_ref and choice.precision != "fp32":
            row.status, row.note = "skipped", "no fp32 reference could run to compare with"
            continue
        if not is_ref and time.monotonic() - t_start > budget_s:
            row.status, row.note = "skipped", f"time budget of {budget_s:.0f} s spent"
            continue
        t0 = time.perf_counter()
        try:
            enc = _open(path, kind, choice, None, dict(options), strict=False)
        except MapMismatchError:
            raise
        except VPRError as exc:
            row.status, row.note = "unavailable", str(exc).splitlines()[0][:300]
            continue
        row.load_s = round(time.perf_counter() - t0, 2)
        row.backend = enc.backend
        if frames is None:  # the probe images at the model's input size (timing = inference)
            h, w = enc.input_size
            frames = [cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR) for im in raw]
        try:
            for _ in range(2):                          # warm-up: lazy kernels, first shapes
                enc.encode(frames[:1])
            first = _timed(lambda: enc.encode(frames[:1]))
            if best_latency is not None and not is_ref and first > CUT_FACTOR * best_latency:
                row.latency_ms, row.status = round(first * 1e3, 2), "slower"
                row.note = f"first frame {first * 1e3:.1f} ms > {CUT_FACTOR}x the best so far"
                continue
            desc = enc.encode(frames)                   # batch: warm-up of that shape + output
            batch_t = _timed(lambda: enc.encode(frames))
            lat = [first]
            while len(lat) < 10 and (len(lat) < 3 or sum(lat) < 0.5):
                lat.append(_timed(lambda: enc.encode(frames[:1])))
        except VPRError as exc:
            row.status, row.note = "unavailable", str(exc).splitlines()[0][:300]
            continue
        row.latency_ms = round(float(np.median(lat)) * 1e3, 2)
        if best_latency is None or float(np.median(lat)) < best_latency:
            best_latency = float(np.median(lat))
        row.batch_ms = round(batch_t * 1e3 / len(frames), 2)
        if is_ref:
            ref_desc = desc
            row.min_cosine, row.note = 1.0, "fp32 reference"
        else:
            row.min_cosine = round(float(row_cosines(ref_desc, desc).min()), 6)
            if not row.min_cosine >= MIN_COSINE:
                row.status = "rejected"
                row.note = f"descriptor cosine {row.min_cosine:.5f} < {MIN_COSINE} to fp32"
                continue
        score = row.score(objective)
        if best is None or score < best:
            best = score
            encoders = {choice.name: enc}   # keep only the leader's instance open
    accepted = [r for r in rows if r.status == "ok" and r.score(objective)]
    if not accepted:
        raise BackendError("no backend could be measured: " + "; ".join(
            f"{r.name}: {r.note}" for r in rows))
    picked = min(accepted, key=lambda r: r.score(objective)).name
    decision = Decision(picked=picked, objective=objective, rows=rows, images=source, key="",
                        host={}, measured_at=time.strftime("%Y-%m-%d %H:%M:%S"),
                        load_average=[round(v, 2) for v in os.getloadavg()])
    decision._encoders = {k: v for k, v in encoders.items() if k == picked}
    log.info("auto backend measured in %.1f s: %s", time.monotonic() - t_start,
             decision.summary())
    return decision


# -- the accuracy gate (recorded by `vpr bench encoder --accuracy`) --------------------------

def accuracy_file() -> Path:
    return choice_dir() / "accuracy.json"


def read_accuracy() -> dict[str, dict[str, dict[str, Any]]]:
    try:
        doc = json.loads(accuracy_file().read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def record_accuracy(fingerprint: str, name: str, r1: float, fp32_r1: float,
                    **details: Any) -> None:
    """Record a backend x precision's Nordland R@1 next to fp32's for one model, so ``auto``
    never picks a reduced precision that loses more than :data:`MAX_R1_LOSS_POINTS`."""
    doc = read_accuracy()
    doc.setdefault(fingerprint, {})[name] = {"r1": r1, "fp32_r1": fp32_r1,
                                             "delta_points": round(r1 - fp32_r1, 3), **details}
    file = accuracy_file()
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".accuracy.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, file)


def accuracy_exclusions(fingerprint: str) -> dict[str, str]:
    """Reduced precisions recorded as losing more than the allowed R@1, with the reason."""
    out = {}
    for name, rec in read_accuracy().get(fingerprint, {}).items():
        try:
            delta = float(rec["r1"]) - float(rec["fp32_r1"])
        except (KeyError, TypeError, ValueError):
            continue
        if not name.endswith(":fp32") and delta < -MAX_R1_LOSS_POINTS:
            out[name] = (f"Nordland R@1 {rec['r1']:.1f} vs fp32 {rec['fp32_r1']:.1f} "
                         f"({delta:+.1f} points, more than {MAX_R1_LOSS_POINTS} lost; vpr bench "
                         "encoder --accuracy)")
    return out


def format_decision(decision: Decision) -> str:
    """The table ``vpr model info --backends`` prints."""
    unit = "batch 1" if decision.objective == "latency" else f"batch {PROBE_IMAGES}"
    lines = [f"| candidate | status | ms/frame batch 1 | ms/image batch {PROBE_IMAGES} | "
             f"min cosine to fp32 | load s | note |", "|---|---|---|---|---|---|---|"]
    for r in decision.rows:
        mark = " **picked**" if r.name == decision.picked else ""

        def num(v: Optional[float], fmt: str = ".1f") -> str:
            return "" if v is None else format(v, fmt)

        lines.append(f"| {r.name}{mark} | {r.status} | {num(r.latency_ms)} | "
                     f"{num(r.batch_ms)} | {num(r.min_cosine, '.5f')} | {num(r.load_s)} | "
                     f"{r.note} |")
    host = decision.host
    lines.append("")
    lines.append(f"objective: {decision.objective} ({unit}); probe images: {decision.images}")
    if host:
        lines.append(f"host: {host.get('cpu')} [{' '.join(host.get('flags', []))}], "
                     f"{host.get('cores')} cores; "
                     + ", ".join(f"{k} {v}" for k, v in host.get("versions", {}).items()))
    lines.append(("cached decision from " if decision.from_cache else "measured ")
                 + decision.measured_at
                 + (f" at load average {decision.load_average}" if decision.load_average else "")
                 + (f"; {decision.cache_note}" if decision.cache_note else ""))
    return "\n".join(lines)
