"""OpenVINO backend: the exported ONNX graph on Intel CPUs (and GPU/NPU by name).

Why OpenVINO: many robots without an NVIDIA GPU run Intel CPUs, and OpenVINO is the runtime
that ecosystem tunes for them. On a CPU with AMX or AVX512-BF16 its bf16 kernels run a ViT
several times faster than fp32 with descriptors still at cosine >= 0.999 (``vpr bench
encoder`` and ``vpr model info --backends`` measure it on the host).

What it reads is the same self-describing ``.onnx`` file ONNX Runtime runs (a model directory is
exported on demand, see :func:`~vpr_ros.runtime.backend_select.cached_onnx`): its
:class:`~vpr_ros.export.artifact.ArtifactMeta` gives the preprocessing, the fingerprint checked
against a map's, and the graph's names, checked against the compiled model. The precision is
always set explicitly (OpenVINO's CPU plugin would otherwise pick bf16 by itself on such a CPU,
and the backend's name would not say what runs). Compiled models go to OpenVINO's model cache
in the user cache folder, so the second start of the same model skips compilation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from vpr_ros.errors import BackendError
from vpr_ros.export.artifact import ArtifactMeta, read_onnx_metadata
from vpr_ros.runtime.onnx_encoder import HostArtifactEncoder, artifact_preprocessing
from vpr_ros.runtime.user_cache import cache_root, writable_dir

log = logging.getLogger(__name__)

#: The project's precision names -> OpenVINO's ``INFERENCE_PRECISION_HINT`` values.
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
#: OpenVINO's ``OPTIMIZATION_CAPABILITIES`` entry a device must list for each precision.
CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16"}
#: Virtual devices OpenVINO resolves itself (``AUTO:GPU,CPU`` and the like).
VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def default_cache_dir() -> Path:
    """OpenVINO's compiled-model cache: ``~/.cache/vpr_ros/openvino`` (``$VPR_CACHE_DIR``)."""
    return cache_root() / "openvino"


def normalise_precision(precision: str) -> str:
    """``f32``/``fp32`` -> ``fp32`` (and bf16, f16/fp16), or a BackendError."""
    p = str(precision).strip().lower()
    p = {"f32": "fp32", "f16": "fp16", "float32": "fp32", "float16": "fp16",
         "bfloat16": "bf16"}.get(p, p)
    if p not in PRECISIONS:
        raise BackendError(f"OpenVINO precision {precision!r} is not one of fp32 (f32), bf16, "
                           "fp16 (f16)")
    return p


def resolve_device(core: Any, device: Optional[str]) -> str:
    """``cpu`` -> ``CPU``; ``gpu``, ``gpu.1``, ``npu`` passed through (upper-cased) when
    OpenVINO lists such a device here, else a BackendError naming the ones it has."""
    name = (device or "CPU").strip()
    upper = name.upper()
    available = list(core.available_devices)
    if upper.split(":")[0] in VIRTUAL_DEVICES:
        return upper
    family = upper.split(".")[0]
    if upper in available or (upper == family and any(d.split(".")[0] == family
                                                      for d in available)):
        return upper
    raise BackendError(f"OpenVINO device {name!r} does not exist on this machine (OpenVINO "
                       f"sees {', '.join(available) or 'no device'}); use device 'cpu' or one "
                       "of those")


class OpenVinoEncoder(HostArtifactEncoder):
    """Runs an exported ``.onnx`` file with OpenVINO.

    Args:
        path: the ``.onnx`` file (``vpr export onnx``, or the runtime's on-demand export).
        device: ``cpu`` (default), or an OpenVINO device name passed through: ``GPU``,
            ``GPU.1``, ``NPU``, ``AUTO:GPU,CPU``.
        precision: ``fp32``/``f32``, ``bf16`` or ``fp16``/``f16`` (OpenVINO's inference
            precision hint, set explicitly and checked against the device's capabilities).
        threads: CPU inference threads (default: OpenVINO's, one per core).
        expected_fingerprint: refuse (MapMismatchError) a file of another model.
        cache_dir: OpenVINO's model cache (default :func:`default_cache_dir`; ``""`` or
            ``False`` disables it). A folder that cannot be written is a BackendError.
    """

    def __init__(self, path: Union[str, Path], device: str = "cpu", precision: str = "fp32",
                 threads: Optional[int] = None, expected_fingerprint: Optional[str] = None,
                 cache_dir: Union[str, Path, None, bool] = None) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendError("the openvino backend needs the 'openvino' package") from exc
        from vpr_ros.runtime.backend_select import check_expected_fingerprint

        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such ONNX file; export one with `vpr export "
                               "onnx MODEL -o FILE` or give the model directory")
        self.precision = normalise_precision(precision)
        self.meta: ArtifactMeta = read_onnx_metadata(self.path)
        check_expected_fingerprint(self.meta.fingerprint, expected_fingerprint, str(self.path))
        core = ov.Core()
        self.device = resolve_device(core, device)
        if cache_dir is None or cache_dir is True:
            cache_dir = default_cache_dir()
        # One folder per device x precision x threads: OpenVINO's cache key does not include
        # the precision hint (2026.4: a blob compiled for f32 was loaded under bf16 and gave
        # NaN; the bf16 blob was loaded for f32), so each configuration gets its own folder.
        self.cache_dir = (writable_dir(Path(cache_dir) / self._cache_subdir(threads),
                                       "OpenVINO model cache folder") if cache_dir else None)
        if self.cache_dir is not None:
            core.set_property({"CACHE_DIR": str(self.cache_dir)})
        self._check_capability(core)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISIONS[self.precision],
                                  "PERFORMANCE_HINT": "LATENCY"}
        if threads and self.device == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            # compile_model from the path (not a read model) lets a cache hit skip reading
            # and converting the ONNX graph, which is most of a start-up
            self.compiled = core.compile_model(str(self.path), self.device, config)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise BackendError(f"{self.path}: OpenVINO cannot compile it for {self.device} at "
                               f"{self.precision} ({first[-1] if first else exc}); re-export "
                               "the file with `vpr export onnx`, or use another device or "
                               "precision") from exc
        self._check_graph()
        self._request = self.compiled.create_infer_request()
        self.dim = self.meta.descriptor_dim
        self.input_size = self.meta.input_size
        self.fingerprint = self.meta.fingerprint
        self.backend = f"openvino-{self.device.lower()}-{self.precision}"
        self._prep = artifact_preprocessing(self.meta)

    def _cache_subdir(self, threads: Optional[int]) -> str:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.device.lower())
        return f"{safe}-{self.precision}" + (f"-t{int(threads)}" if threads else "")

    def _check_capability(self, core: Any) -> None:
        """A precision the device cannot run natively is refused, not silently replaced: the
        backend's name must say what runs (OpenVINO would fall back to f32 quietly)."""
        if self.precision == "fp32" or self.device.split(":")[0] in VIRTUAL_DEVICES:
            return
        try:
            caps = set(core.get_property(self.device, "OPTIMIZATION_CAPABILITIES"))
        except RuntimeError:
            return  # a plugin that does not report capabilities: let it decide
        if CAPABILITY[self.precision] not in caps:
            raise BackendError(f"OpenVINO device {self.device} has no {self.precision} support "
                               f"(it reports {', '.join(sorted(caps))}); use precision fp32 on "
                               "this machine")

    def _check_graph(self) -> None:
        """The compiled model's inputs/outputs must be what the metadata promises."""
        ins = [i.get_any_name() for i in self.compiled.inputs]
        outs = [o.get_any_name() for o in self.compiled.outputs]
        if ins != [self.meta.input_name]:
            raise BackendError(f"{self.path}: graph inputs {ins} do not match the metadata "
                               f"({self.meta.input_name!r}); re-export the file")
        if outs != list(self.meta.outputs):
            raise BackendError(f"{self.path}: graph outputs {outs} do not match the metadata's "
                               f"{list(self.meta.outputs)}; re-export the file")
        shape = self.compiled.inputs[0].get_partial_shape()
        h, w = self.meta.input_size
        dims = [d.get_length() if d.is_static else None for d in shape]
        if len(dims) != 4 or dims[1:] != [3, h, w]:
            raise BackendError(f"{self.path}: graph input shape {shape} does not match the "
                               f"metadata's (batch, 3, {h}, {w}); re-export the file")

    def _infer(self, names: Sequence[str], batch: np.ndarray) -> list[np.ndarray]:
        try:
            result = self._request.infer({0: np.ascontiguousarray(batch)})
        except RuntimeError as exc:
            raise BackendError(f"{self.backend}: inference failed on a {batch.shape} batch "
                               f"({exc})") from exc
        by_name = {port.get_any_name(): value for port, value in result.items()}
        # the request's buffers are reused by the next call: copy what is returned
        return [np.array(by_name[n], copy=True) for n in names]
