"""Which encoder backend runs a model on this machine, and the checks every backend shares.

``load_encoder(path, backend="auto")`` should give the fastest backend the machine can run
without the caller knowing what is installed: a TensorRT engine, else ONNX Runtime on CUDA
(through its TensorRT or CUDA provider), else PyTorch on CUDA, else ONNX Runtime on CPU, else
PyTorch on CPU. The choice is a pure function of the artifact kind, the requested device and
what was found installed (:func:`plan_backends`), so it is tested without the hardware; the
opening then walks the plan and, in ``auto`` mode only, falls through to the next candidate when
one cannot start (an onnxruntime build that lists a GPU provider whose libraries are missing).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from vpr_ros.errors import BackendError, MapMismatchError
from vpr_ros.export.artifact import descriptor_fingerprint  # noqa: F401 (callers import it here)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
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
    return Availability(torch_cuda=cuda, ort_providers=providers, tensorrt=trt,
                        notes=tuple(notes))


# -- the choice ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """One way to open the artifact: backend + device + backend-specific options."""

    backend: str
    device: str
    options: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.backend} on {self.device}" + (f" ({opts})" if opts else "")


def plan_backends(kind: str, backend: str, device: Optional[str], avail: Availability,
                  export_cache: bool = True) -> list[Choice]:
    """Candidates to try, fastest first. ``device`` None means any device (``auto``)."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    dev = None if device in (None, "auto") else parse_device(device)
    gpu_ok = dev is None or dev[0] == "cuda"
    cpu_ok = dev is None or dev[0] == "cpu"
    gpu = f"cuda:{dev[1]}" if dev is not None and dev[0] == "cuda" else "cuda:0"
    ort_trt = "TensorrtExecutionProvider" in avail.ort_providers and avail.tensorrt
    ort_cuda = "CUDAExecutionProvider" in avail.ort_providers
    if backend != "auto":
        return _explicit(kind, backend, dev, gpu, avail, ort_trt)
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


def _explicit(kind: str, backend: str, dev: Optional[tuple[str, int]], gpu: str,
              avail: Availability, ort_trt: bool) -> list[Choice]:
    device = f"{dev[0]}:{dev[1]}" if dev and dev[0] == "cuda" else (dev[0] if dev else None)
    if backend == "torch":
        if kind != "model_dir":
            raise BackendError(f"the torch backend runs model directories, not an {kind} file; "
                               "use backend 'onnxruntime' (.onnx), 'tensorrt' (.engine) or "
                               "'auto'")
        return [Choice("torch", device or "cpu")]
    if backend == "onnxruntime":
        if kind == "engine":
            raise BackendError("onnxruntime cannot run a TensorRT engine; give the .onnx file "
                               "or use backend 'tensorrt'")
        target = device or "cpu"
        if target == "cpu":
            return [Choice("onnxruntime", "cpu", (("provider", "cpu"),))]
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
    base = os.environ.get("VPR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vpr_ros")
    return Path(base) / "exports"


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


def _open(path: Path, kind: str, choice: Choice, expected: Optional[str], options: dict,
          strict: bool):
    if choice.backend == "torch":
        from vpr_ros.runtime.torch_encoder import TorchEncoder

        opts = {**dict(choice.options), **options}
        known = set(_accepted(TorchEncoder.__init__, opts, strict, "torch"))
        return TorchEncoder.from_model_dir(path, device=choice.device,
                                           expected_fingerprint=expected,
                                           **{k: opts[k] for k in known})
    if choice.backend == "onnxruntime":
        from vpr_ros.runtime.onnx_encoder import OnnxEncoder

        opts = _accepted(OnnxEncoder.__init__, {**dict(choice.options), **options}, strict,
                         "onnxruntime")
        onnx_path = cached_onnx(path) if kind == "model_dir" else path
        return OnnxEncoder(onnx_path, device=choice.device, expected_fingerprint=expected,
                           **opts)
    from vpr_ros.runtime.tensorrt_encoder import TensorRTEncoder

    opts = _accepted(TensorRTEncoder.__init__, {**dict(choice.options), **options}, strict,
                     "tensorrt")
    return TensorRTEncoder(path, device=choice.device, expected_fingerprint=expected, **opts)


def open_encoder(path: Union[str, Path], backend: str = "torch", device: Optional[str] = None,
                 expected_fingerprint: Optional[str] = None, export_cache: bool = True,
                 **options: Any):
    """See :func:`vpr_ros.runtime.encoder.load_encoder`."""
    p = Path(path)
    kind = artifact_kind(p)
    plan = plan_backends(kind, backend, device, probe(), export_cache=export_cache)
    errors: list[str] = []
    for choice in plan:
        try:
            enc = _open(p, kind, choice, expected_fingerprint, dict(options),
                        strict=backend != "auto")
        except MapMismatchError:
            raise
        except BackendError as exc:
            if backend != "auto":
                raise
            log.warning("backend %s unavailable: %s", choice.describe(), exc)
            errors.append(f"{choice.describe()}: {exc}")
            continue
        if backend == "auto":
            log.info("auto backend: %s (%s)", enc.backend, choice.describe())
        return enc
    raise BackendError("no backend could open " + str(p) + ": " + " | ".join(errors))
