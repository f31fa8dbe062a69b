"""Which encoder backend runs a model on this machine, and the checks every backend shares.

A backend is named ``BACKEND[:PRECISION]``: ``torch`` (fp32; ``torch:fp16`` on CUDA,
``torch:bf16`` on a CPU with bf16 instructions), ``onnxruntime`` (``onnxruntime:int8`` where the
CPU has VNNI/AMX int8), ``openvino`` (``openvino:bf16``, ``openvino:fp16``), ``tensorrt`` (an
engine's own precision), or ``auto``.

``auto`` on the CPU chooses by measurement (:mod:`vpr_ros.runtime.auto_select`): at first use
on a host it times every backend x precision this CPU offers on a few real frames, keeps those
whose descriptors match fp32, picks the fastest and caches the decision. With a CUDA GPU in
reach (``device`` left to ``auto``/None or ``cuda``) it keeps the fixed GPU-first order of
:func:`plan_backends`: a TensorRT engine, else ONNX Runtime on CUDA (TensorRT or CUDA provider),
else PyTorch CUDA fp16. That plan is a pure function of the artifact kind, the requested device
and what was found installed, so it is tested without the hardware; the opening walks it and,
in ``auto`` mode only, falls through to the next candidate when one cannot start, saying why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from vpr_ros.errors import BackendError, MapMismatchError
from vpr_ros.export.artifact import descriptor_fingerprint  # noqa: F401 (callers import it here)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
#: Precisions each backend can be named with (the first is the default).
PRECISIONS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "fp16", "bf16"), "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "fp16"), "tensorrt": ()}
PRECISION_ALIASES = {"f32": "fp32", "float32": "fp32", "f16": "fp16", "float16": "fp16",
                     "half": "fp16", "bfloat16": "bf16", "i8": "int8"}


def backend_names() -> str:
    """``auto, torch[:fp32|fp16|bf16], ...`` for messages and --help."""
    return ", ".join(b + (f"[:{'|'.join(PRECISIONS[b])}]" if PRECISIONS.get(b) else "")
                     for b in BACKENDS)


def parse_backend(name: str) -> tuple[str, Optional[str]]:
    """``openvino:bf16`` -> ("openvino", "bf16"); ``torch`` -> ("torch", None); aliases
    (``f32``, ``f16``) normalised; anything else a BackendError listing the names."""
    text = (name or "").strip().lower()
    backend, _, precision = text.partition(":")
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; available: {backend_names()}")
    if not precision:
        return backend, None
    precision = PRECISION_ALIASES.get(precision, precision)
    if precision not in PRECISIONS.get(backend, ()):
        have = PRECISIONS.get(backend) or ()
        raise BackendError(f"backend {backend!r} has no precision {precision!r}"
                           + (f" (it has {', '.join(have)})" if have else
                              " (it runs at the precision it was built/chosen with)"))
    return backend, precision
ENGINE_SUFFIXES = (".engine", ".plan")


# -- shared checks ---------------------------------------------------------------------------

def parse_device(device: Optional[str]) -> tuple[str, int]:
    """``cpu`` / ``cuda`` / ``cuda:N`` -> (type, index)."""
    d = (device or "cpu").strip().lower()
    if d == "cpu":
        return "cpu", 0
    if d == "cuda" or d == "gpu":
        return "cuda", 0
    if d.startswith("cuda:") and d[5:].isdigit():
        return "cuda", int(d[5:])
    raise BackendError(f"device {device!r} is not one of cpu, cuda, cuda:N")


def check_expected_fingerprint(actual: str, expected: Optional[str], artifact: str) -> None:
    """Refuse an artifact of another model than the one a map (or caller) was built with."""
    if expected and actual != expected:
        raise MapMismatchError(
            f"{artifact} encodes with model fingerprint {actual}, but {expected} was expected "
            "(the map was built with another model, or at another input size). Use the "
            "model/export the map was built with, or rebuild the map with this model "
            "(`vpr map build ... --model ...`)")


def artifact_kind(path: Union[str, Path]) -> str:
    """``model_dir``, ``onnx`` or ``engine``, or a BackendError naming what was expected."""
    p = Path(path)
    if p.is_dir():
        if (p / "model.json").is_file():
            return "model_dir"
        raise BackendError(f"{p}: a directory without model.json is not a model directory; "
                           "give a model directory (`vpr model init`), an .onnx file or a "
                           "TensorRT .engine/.plan file")
    if not p.exists():
        raise BackendError(f"{p}: no such model directory or file")
    if p.suffix.lower() == ".onnx":
        return "onnx"
    if p.suffix.lower() in ENGINE_SUFFIXES:
        return "engine"
    raise BackendError(f"{p}: unknown model artifact (expected a model directory, an .onnx "
                       f"file or a TensorRT {'/'.join(ENGINE_SUFFIXES)} file)")


# -- what is installed -----------------------------------------------------------------------

@dataclass(frozen=True)
class Availability:
    """What this machine can run (probed once per :func:`open_encoder` call)."""

    torch_cuda: bool = False
    ort_providers: tuple[str, ...] = ()
    tensorrt: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: OpenVINO's CPU ``OPTIMIZATION_CAPABILITIES`` (FP32, BF16, FP16, INT8, ...); None when
    #: openvino is not installed.
    openvino_cpu: Optional[tuple[str, ...]] = None

    @property
    def onnxruntime(self) -> bool:
        return "CPUExecutionProvider" in self.ort_providers


def probe() -> Availability:
    notes: list[str] = []
    try:
        import torch

        cuda = bool(torch.cuda.is_available())
    except ImportError:
        cuda = False
    if not cuda:
        notes.append("torch sees no CUDA GPU")
    try:
        import onnxruntime as ort

        providers = tuple(ort.get_available_providers())
    except ImportError:
        providers = ()
        notes.append("onnxruntime is not installed")
    try:
        import tensorrt  # noqa: F401

        trt = True
    except ImportError:
        trt = False
        notes.append("tensorrt is not installed")
    ov_caps: Optional[tuple[str, ...]] = None
    try:
        import openvino as ov

        ov_caps = tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except ImportError:
        notes.append("openvino is not installed")
    except RuntimeError as exc:  # installed, but its CPU plugin cannot start here
        notes.append(f"openvino's CPU plugin is unavailable ({exc})")
    return Availability(torch_cuda=cuda, ort_providers=providers, tensorrt=trt,
                        notes=tuple(notes), openvino_cpu=ov_caps)


# -- the choice ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """One way to open the artifact: backend + device + backend-specific options."""

    backend: str
    device: str
    options: tuple[tuple[str, Any], ...] = ()
    precision: Optional[str] = None

    @property
    def name(self) -> str:
        """The backend's user-facing name, e.g. ``openvino:bf16`` or ``torch:fp32``."""
        precision = self.precision or dict(self.options).get("precision")
        if precision is None and self.backend != "tensorrt":
            precision = "fp32"
        return self.backend + (f":{precision}" if precision else "")

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.name} on {self.device}" + (f" ({opts})" if opts else "")


def plan_backends(kind: str, backend: str, device: Optional[str], avail: Availability,
                  export_cache: bool = True) -> list[Choice]:
    """Candidates to try, fastest first. ``device`` None means any device (``auto``).

    For ``auto`` this is the fixed order (GPU first); on the CPU, :func:`open_encoder` measures
    instead and uses this plan only as the last fallback."""
    backend, precision = parse_backend(backend)
    if backend == "openvino":
        return _explicit_openvino(kind, device, precision)
    dev = None if device in (None, "auto") else parse_device(device)
    gpu_ok = dev is None or dev[0] == "cuda"
    cpu_ok = dev is None or dev[0] == "cpu"
    gpu = f"cuda:{dev[1]}" if dev is not None and dev[0] == "cuda" else "cuda:0"
    ort_trt = "TensorrtExecutionProvider" in avail.ort_providers and avail.tensorrt
    ort_cuda = "CUDAExecutionProvider" in avail.ort_providers
    if backend != "auto":
        return _explicit(kind, backend, precision, dev, gpu, avail, ort_trt)
    plan: list[Choice] = []
    if kind == "engine":
        if gpu_ok and avail.tensorrt and avail.torch_cuda:
            plan.append(Choice("tensorrt", gpu))
        if not plan:
            raise BackendError("a TensorRT engine needs the tensorrt package and a CUDA GPU "
                               f"(here: {'; '.join(avail.notes) or 'device ' + str(device)}); "
                               "on this machine use the .onnx file or the model directory")
        return plan
    onnx_ok = kind == "onnx" or (kind == "model_dir" and export_cache)
    if gpu_ok and onnx_ok and ort_trt:
        plan.append(Choice("onnxruntime", gpu, (("provider", "tensorrt"),)))
    if gpu_ok and onnx_ok and ort_cuda:
        plan.append(Choice("onnxruntime", gpu, (("provider", "cuda"),)))
    if gpu_ok and kind == "model_dir" and avail.torch_cuda:
        plan.append(Choice("torch", gpu, (("precision", "fp16"),)))
    if cpu_ok and onnx_ok and avail.onnxruntime:
        plan.append(Choice("onnxruntime", "cpu", (("provider", "cpu"),)))
    if cpu_ok and kind == "model_dir":
        plan.append(Choice("torch", "cpu"))
    if not plan:
        raise BackendError(f"no backend can run a {kind} on device {device!r} here "
                           f"({'; '.join(avail.notes) or 'nothing suitable installed'})")
    return plan


def _explicit_openvino(kind: str, device: Optional[str], precision: Optional[str]
                       ) -> list[Choice]:
    """OpenVINO takes its own device names (CPU, GPU, GPU.1, NPU), checked when it opens."""
    if kind == "engine":
        raise BackendError("openvino cannot run a TensorRT engine; give the .onnx file or the "
                           "model directory")
    return [Choice("openvino", device if device not in (None, "auto") else "cpu",
                   precision=precision or "fp32")]


def _explicit(kind: str, backend: str, precision: Optional[str],
              dev: Optional[tuple[str, int]], gpu: str, avail: Availability, ort_trt: bool
              ) -> list[Choice]:
    device = f"{dev[0]}:{dev[1]}" if dev and dev[0] == "cuda" else (dev[0] if dev else None)
    if backend == "torch":
        if kind != "model_dir":
            raise BackendError(f"the torch backend runs model directories, not an {kind} file; "
                               "use backend 'onnxruntime' or 'openvino' (.onnx), 'tensorrt' "
                               "(.engine) or 'auto'")
        return [Choice("torch", device or "cpu", precision=precision)]
    if backend == "onnxruntime":
        if kind == "engine":
            raise BackendError("onnxruntime cannot run a TensorRT engine; give the .onnx file "
                               "or use backend 'tensorrt'")
        target = device or "cpu"
        if target == "cpu":
            return [Choice("onnxruntime", "cpu", (("provider", "cpu"),), precision=precision)]
        if precision == "int8":
            raise BackendError("onnxruntime int8 runs on the CPU; use device cpu")
        provider = "tensorrt" if ort_trt else "cuda"
        return [Choice("onnxruntime", target, (("provider", provider),))]
    # tensorrt
    if kind != "engine":
        raise BackendError("the tensorrt backend runs a serialized engine; build one with "
                           "`vpr export tensorrt MODEL -o model.engine` (on the GPU that will "
                           "run it) and pass that file")
    if dev is not None and dev[0] != "cuda":
        raise BackendError("TensorRT engines run on a CUDA device, not on the CPU")
    return [Choice("tensorrt", device or gpu)]


# -- opening ---------------------------------------------------------------------------------

def export_cache_dir() -> Path:
    from vpr_ros.runtime.user_cache import cache_root

    return cache_root() / "exports"


def cached_onnx(model_dir: Union[str, Path], cache_dir: Optional[Path] = None) -> Path:
    """An ONNX export of ``model_dir`` at its configured size, made once and reused (keyed by
    the model's fingerprint, so a changed model is re-exported, never mixed up)."""
    from vpr_ros.models.model_dir import read_model_meta

    meta = read_model_meta(model_dir)
    out = Path(cache_dir or export_cache_dir()) / f"{meta.fingerprint}.onnx"
    if not out.is_file():
        from vpr_ros.export.onnx_export import export_onnx

        log.info("exporting %s to %s for onnxruntime (once; later runs reuse it)", model_dir,
                 out)
        out.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(model_dir, out, verify=False)
    return out


def _accepted(cls_init: Any, opts: dict, strict: bool, backend: str) -> dict:
    """Options the backend's constructor takes. In ``auto`` mode the others (meant for
    another candidate, e.g. ``precision`` for torch) are dropped; named explicitly they are an
    error, so a typo never passes silently."""
    import inspect

    params = inspect.signature(cls_init).parameters
    unknown = sorted(k for k in opts if k not in params)
    if unknown and strict:
        raise BackendError(f"backend {backend!r} does not take option(s) {unknown}; it takes "
                           f"{sorted(p for p in params if p not in ('self', 'cls'))}")
    return {k: v for k, v in opts.items() if k in params}


def _with_precision(choice: Choice, options: dict, strict: bool) -> dict:
    """The options with the choice's precision; a ``precision=`` option must agree with the
    name (``torch:bf16`` with ``precision="fp32"`` is a contradiction, refused)."""
    opts = {**dict(choice.options), **options}
    given = opts.get("precision")
    if given is not None:
        given = PRECISION_ALIASES.get(str(given).lower(), str(given).lower())
        if choice.backend in PRECISIONS and PRECISIONS[choice.backend]:
            parse_backend(f"{choice.backend}:{given}")  # refuses a precision it does not have
        if choice.precision is not None and given != choice.precision and strict:
            raise BackendError(f"backend {choice.name} was asked for with precision={given!r}; "
                               "name the precision once (e.g. backend 'openvino:bf16')")
        opts["precision"] = given
    if choice.precision is not None:
        opts["precision"] = choice.precision
    return opts


def _open(path: Path, kind: str, choice: Choice, expected: Optional[str], options: dict,
          strict: bool):
    opts = _with_precision(choice, options, strict)
    if choice.backend == "torch":
        from vpr_ros.runtime.torch_encoder import TorchEncoder

        known = set(_accepted(TorchEncoder.__init__, opts, strict, "torch"))
        return TorchEncoder.from_model_dir(path, device=choice.device,
                                           expected_fingerprint=expected,
                                           **{k: opts[k] for k in known})
    if choice.backend == "onnxruntime":
        from vpr_ros.runtime.onnx_encoder import OnnxEncoder

        opts = _accepted(OnnxEncoder.__init__, opts, strict, "onnxruntime")
        onnx_path = _onnx_for(path, kind, expected)
        return OnnxEncoder(onnx_path, device=choice.device, expected_fingerprint=expected,
                           **opts)
    if choice.backend == "openvino":
        from vpr_ros.runtime.openvino_encoder import OpenVinoEncoder

        opts = _accepted(OpenVinoEncoder.__init__, opts, strict, "openvino")
        onnx_path = _onnx_for(path, kind, expected)
        return OpenVinoEncoder(onnx_path, device=choice.device, expected_fingerprint=expected,
                               **opts)
    from vpr_ros.runtime.tensorrt_encoder import TensorRTEncoder

    opts = _accepted(TensorRTEncoder.__init__, opts, strict, "tensorrt")
    return TensorRTEncoder(path, device=choice.device, expected_fingerprint=expected, **opts)


def _onnx_for(path: Path, kind: str, expected: Optional[str]) -> Path:
    """The .onnx an ONNX-based backend runs: the file itself, or the model directory's export
    (a model of another fingerprint is refused before the export is made)."""
    if kind != "model_dir":
        return path
    if expected:
        from vpr_ros.models.model_dir import read_model_meta

        check_expected_fingerprint(read_model_meta(path).fingerprint, expected, str(path))
    return cached_onnx(path)


def measured_auto_applies(kind: str, plan: list[Choice]) -> bool:
    """``auto`` measures on the CPU: for a model directory or an .onnx file whose fixed plan
    starts on the CPU (no GPU candidate ahead of it)."""
    return kind in ("model_dir", "onnx") and bool(plan) and plan[0].device == "cpu"


def open_encoder(path: Union[str, Path], backend: str = "torch", device: Optional[str] = None,
                 expected_fingerprint: Optional[str] = None, export_cache: bool = True,
                 objective: str = "latency", **options: Any):
    """See :func:`vpr_ros.runtime.encoder.load_encoder`."""
    p = Path(path)
    kind = artifact_kind(p)
    name, _ = parse_backend(backend)
    auto = name == "auto"
    avail = probe()
    plan = plan_backends(kind, backend, device, avail, export_cache=export_cache)
    if not auto:
        choice = plan[0]
        enc = _open(p, kind, choice, expected_fingerprint, dict(options), strict=True)
        _label(enc, choice.name, "")
        return enc
    options = {k: v for k, v in options.items() if k != "precision"}  # auto picks precisions
    errors: list[str] = []
    ranked: list[Choice] = []
    decision = None
    if measured_auto_applies(kind, plan):
        from vpr_ros.runtime.auto_select import decide

        try:
            decision = decide(p, kind, objective=objective, options=options, avail=avail,
                              export_cache=export_cache,
                              expected_fingerprint=expected_fingerprint)
        except MapMismatchError:
            raise
        except BackendError as exc:
            log.warning("auto backend: measurement failed (%s); using the fixed order", exc)
            errors.append(f"measurement: {exc}")
        if decision is not None:
            ranked = decision.ranking()
    ranked += [c for c in plan if c.name not in {r.name for r in ranked}
               or c.device != "cpu"]
    for choice in ranked:
        enc = decision.take_encoder(choice.name) if decision is not None else None
        try:
            if enc is None:
                enc = _open(p, kind, choice, expected_fingerprint, dict(options),
                            strict=False)
        except MapMismatchError:
            raise
        except BackendError as exc:
            log.warning("auto backend: %s unavailable: %s", choice.describe(), exc)
            errors.append(f"{choice.name}: {exc}")
            continue
        note = decision.summary() if decision is not None else "fixed order"
        if errors:
            note += "; fell back past " + "; ".join(errors)
        _label(enc, choice.name, note)
        log.info("auto backend: %s (%s)", choice.name, note)
        return enc
    raise BackendError("no backend could open " + str(p) + ": " + " | ".join(errors))


def _label(enc: Any, choice: str, note: str) -> None:
    """What /diagnostics shows: the named choice (``openvino:bf16``) and, for ``auto``, why."""
    enc.backend_choice = choice
    enc.backend_note = note
