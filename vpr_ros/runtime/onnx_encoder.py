"""ONNX Runtime backend.

:class:`OnnxEncoder` reads the :class:`~vpr_ros.export.artifact.ArtifactMeta` that ``vpr export
onnx`` wrote into the file, checks the graph against it and refuses a file whose fingerprint is
not the one expected.

CPU session options (:func:`cpu_session_options`; before/after figures in
``docs/bench_encoder.md``): every graph optimisation (ONNX Runtime fuses the bias+GELU of the
ViT MLPs, scaled MatMuls and the patch-embedding convolution's layout on load), one intra-op
thread per core this process may use (affinity-aware, so a robot's pinned or containerised node
neither oversubscribes nor idles cores), a single inter-op thread with sequential execution (one model, nothing to run
side by side), idle threads sleeping instead of spinning (the CPU is shared with the rest of
the robot) and denormals flushed to zero (values below 1e-38 change no descriptor, but cost x86
cores microcode assists). Fusing the ViT attention into ``com.microsoft.Attention`` was
tried and measured no faster on CPU: 86% of the time is in the projection/MLP GEMMs.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from vpr_ros.cpu_cores import usable_cores
from vpr_ros.errors import BackendError, InputError
# The artifact format is the exporter's; these names stay importable from here for callers.
from vpr_ros.export.artifact import (GLOBAL_OUTPUT, INPUT_NAME, META_FORMAT,  # noqa: F401
                                     ArtifactMeta, read_onnx_metadata)
from vpr_ros.export.onnx_graph import drop_dead_nodes
from vpr_ros.runtime.encoder import Encoder, check_outputs
from vpr_ros.runtime.preprocess import Preprocessing

log = logging.getLogger(__name__)


def artifact_preprocessing(meta: ArtifactMeta) -> Preprocessing:
    """The preprocessing an exported artifact records (size, mean/std, resize policy)."""
    return Preprocessing(size=meta.input_size, mean=meta.mean, std=meta.std, resize=meta.resize,
                         interpolation=meta.interpolation)


def cpu_session_options(threads: Optional[int] = None, optimization: str = "all",
                        spin: bool = False) -> Any:
    """The tuned CPU :class:`onnxruntime.SessionOptions` (see the module docstring).

    ``spin``: let idle intra-op threads busy-wait for the next op. Off by default: on a CPU
    shared with other nodes spinning threads take cores the rest of the robot (and the
    encoder's own descheduled threads) need; measured equal or better throughput without it
    on the shared 2-core benchmark machine, for less CPU time per image.
    """
    import onnxruntime as ort

    levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise BackendError(f"onnxruntime optimization {optimization!r} is not one of "
                           f"{sorted(levels)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.intra_op_num_threads = int(threads) if threads else usable_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    return so


def _single_consumer(consumers: dict, name: str, op: str):
    users = consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != op:
        raise LookupError(name)
    return users[0]


def _producer(producers: dict, name: str, op: str):
    node = producers.get(name)
    if node is None or node.op_type != op:
        raise LookupError(name)
    return node


def fuse_vit_attention(model) -> int:
    """Rewrite each ViT self-attention of an exported graph into one ONNX Runtime
    ``com.microsoft.Attention`` node (in memory, for ONNX Runtime only: the file on disk stays
    plain ONNX for TensorRT). Returns the number of blocks fused.

    The pattern is what the TorchScript exporter makes of timm's attention: qkv MatMul + bias,
    Reshape (B, N, 3, H, d), Transpose, Split, the decomposed scaled_dot_product_attention
    (q and k^T each scaled by sqrt(scale), MatMul, Softmax, MatMul), Transpose, Reshape. The
    fused op does the projection and attention per (image, head), so the (B, H, N, N) score
    tensor is never materialised: measured 5-8% less CPU time for DINOv2 on 2 cores.
    Anything that does not match exactly is left alone.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    values = {t.name: t for t in graph.initializer}
    values.update({n.output[0]: n.attribute[0].t for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})

    def const(name: str):
        return numpy_helper.to_array(values[name]) if name in values else None

    def perm(node) -> list:
        return next((list(helper.get_attribute_value(a)) for a in node.attribute
                     if a.name == "perm"), [])

    fused: dict[str, Any] = {}
    for sm in [n for n in graph.node if n.op_type == "Softmax"]:
        try:
            m1 = _producer(producers, sm.input[0], "MatMul")
            m2 = _single_consumer(consumers, sm.output[0], "MatMul")
            t2 = _single_consumer(consumers, m2.output[0], "Transpose")
            r1 = _single_consumer(consumers, t2.output[0], "Reshape")
            mq = _producer(producers, m1.input[0], "Mul")
            mk = _producer(producers, m1.input[1], "Mul")
            tk = _producer(producers, mk.input[0], "Transpose")
            sq = [_producer(producers, mq.input[0], "Squeeze"),
                  _producer(producers, tk.input[0], "Squeeze"),
                  _producer(producers, m2.input[1], "Squeeze")]
            split = _producer(producers, sq[0].input[0], "Split")
            t0 = _producer(producers, split.input[0], "Transpose")
            r0 = _producer(producers, t0.input[0], "Reshape")
            shape = _producer(producers, r0.input[1], "Concat")
            add = _producer(producers, r0.input[0], "Add")
        except (LookupError, IndexError):
            continue
        if (perm(t2) != [0, 2, 1, 3] or perm(tk) != [0, 1, 3, 2]
                or perm(t0) != [2, 0, 3, 1, 4] or m2.input[0] != sm.output[0]
                or [q.input[0] for q in sq] != list(split.output) or len(shape.input) != 5):
            continue
        dims = [const(i) for i in shape.input[2:]]
        bias_in = [i for i in add.input if const(i) is not None]
        proj_in = [i for i in add.input if const(i) is None]
        if any(d is None for d in dims) or len(bias_in) != 1 or len(proj_in) != 1:
            continue
        three, heads, head_dim = (int(np.asarray(d).reshape(-1)[0]) for d in dims)
        mm = producers.get(proj_in[0])
        if three != 3 or mm is None or mm.op_type != "MatMul" or const(mm.input[1]) is None:
            continue
        weight, bias = const(mm.input[1]), const(bias_in[0])
        if weight.shape != (heads * head_dim, 3 * heads * head_dim) or bias.shape != (
                3 * heads * head_dim,):
            continue
        sq_scale, sk_scale = const(mq.input[1]), const(mk.input[1])
        if (sq_scale is None) != (sk_scale is None):
            continue
        # Constant multipliers carry an explicit scale; shape-derived ones are SDPA's default.
        scale = (float(np.asarray(sq_scale).reshape(-1)[0] * np.asarray(sk_scale).reshape(-1)[0])
                 if sq_scale is not None else 1.0 / float(np.sqrt(head_dim)))
        name = f"{sm.name or r1.output[0]}/fused_attention"
        graph.initializer.extend([
            numpy_helper.from_array(weight.astype(np.float32), f"{name}/weight"),
            numpy_helper.from_array(bias.astype(np.float32), f"{name}/bias")])
        fused[r1.output[0]] = helper.make_node(
            "Attention", [mm.input[0], f"{name}/weight", f"{name}/bias"], [r1.output[0]],
            name=name, domain="com.microsoft", num_heads=heads, scale=scale)
    if not fused:
        return 0
    nodes = [fused.get(n.output[0], n) if n.output else n for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    drop_dead_nodes(graph)  # what only fed the replaced sub-graphs
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


def provider_chain(provider: str, device_id: int, cache_dir: Optional[Path]
                   ) -> list[Any]:
    """ONNX Runtime providers for ``provider``, each falling back to the next."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if provider == "cuda":
        return [cuda, "CPUExecutionProvider"]
    if provider == "tensorrt":
        opts: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": True}
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                        trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
        return [("TensorrtExecutionProvider", opts), cuda, "CPUExecutionProvider"]
    raise BackendError(f"onnxruntime provider {provider!r} is not one of {sorted(PROVIDERS)}")


def _with_fused_attention(path: Path) -> tuple[Any, int]:
    """(model bytes with fused attention, count), or (path, 0) when nothing fused or the file
    is too large to rewrite in memory (external weights beyond the 2 GiB protobuf limit)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable: let InferenceSession report it with its own message
        return str(path), 0
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return str(path), 0
    count = fuse_vit_attention(model)
    return (model.SerializeToString(), count) if count else (str(path), 0)


class ArtifactEncoder(Encoder):
    """An encoder of an exported artifact (ONNX file, TensorRT engine): its preprocessing and
    output names are the ones the artifact's metadata records (``self.meta``, with
    ``self._prep`` built from it by :func:`artifact_preprocessing`), so every backend running
    such a file answers them the same way."""

    meta: ArtifactMeta
    _prep: Preprocessing

    @property
    def preprocessing(self) -> Preprocessing:
        return self._prep

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.meta.outputs


class HostArtifactEncoder(ArtifactEncoder):
    """An artifact encoder whose runtime takes host numpy batches (ONNX Runtime, OpenVINO):
    the batch is checked against the artifact's input once, here, and the backend only runs
    :meth:`_infer`."""

    @abc.abstractmethod
    def _infer(self, names: Sequence[str], batch: np.ndarray) -> list[np.ndarray]:
        """The named outputs of a checked, preprocessed (B, 3, H, W) float32 batch, or
        BackendError when the runtime fails."""

    def _run(self, names: Sequence[str], batch: np.ndarray) -> list[np.ndarray]:
        h, w = self.input_size
        if batch.dtype != np.float32 or batch.ndim != 4 or batch.shape[1:] != (3, h, w):
            raise InputError(f"{self.backend}: expected a preprocessed (B, 3, {h}, {w}) float32 "
                             f"batch, got {batch.shape} {batch.dtype}")
        return self._infer(names, batch)

    def _encode_batch(self, batch: np.ndarray) -> np.ndarray:
        return self._run([GLOBAL_OUTPUT], batch)[0]

    def _encode_all_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.meta.outputs, self._run(self.meta.outputs, batch)))

    def encode_preprocessed(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs of an already preprocessed (B, 3, H, W) float32 batch, checked."""
        return check_outputs(self._encode_all_batch(batch), batch.shape[0], self.dim,
                             self.backend)


class OnnxEncoder(HostArtifactEncoder):
    """Runs an exported ``.onnx`` file with ONNX Runtime.

    Args:
        path: the ``.onnx`` file written by ``vpr export onnx``.
        device: ``cpu`` or ``cuda[:N]``.
        provider: ``cpu``, ``cuda`` or ``tensorrt`` (ONNX Runtime's TensorRT execution
            provider); default: ``cuda`` on a CUDA device, else ``cpu``.
        threads: intra-op threads on CPU (default: every usable core).
        expected_fingerprint: refuse (MapMismatchError) a file of another model, e.g. the
            fingerprint recorded in the map this encoder will search.
        optimization: ONNX Runtime graph optimisation level (``none|basic|extended|all``).
        trt_cache_dir: engine cache of the TensorRT provider (default: beside the file).
        tuned: False gives ONNX Runtime's default session options (the benchmark's "before").
        spin: busy-waiting intra-op threads (see :func:`cpu_session_options`).
        fuse_attention: on CPU, run ViT attention as ONNX Runtime's fused Attention op
            (:func:`fuse_vit_attention`; the file itself is not changed).
        precision: ``fp32`` (the file as exported) or ``int8`` (CPU only, where the CPU has
            VNNI/AMX int8: the weight MatMuls quantised, see :mod:`~vpr_ros.runtime.onnx_int8`).
    """

    def __init__(self, path: str | Path, device: str = "cpu", provider: Optional[str] = None,
                 threads: Optional[int] = None, expected_fingerprint: Optional[str] = None,
                 optimization: str = "all", trt_cache_dir: Optional[str | Path] = None,
                 tuned: bool = True, spin: bool = False, fuse_attention: bool = True,
                 precision: str = "fp32") -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("the onnxruntime backend needs the 'onnxruntime' package "
                               "(or 'onnxruntime-gpu' for CUDA)") from exc
        from vpr_ros.runtime.backend_select import check_expected_fingerprint, parse_device

        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such ONNX file; export one with `vpr export "
                               "onnx MODEL -o FILE`")
        dev_type, dev_id = parse_device(device)
        provider = provider or ("cuda" if dev_type == "cuda" else "cpu")
        if provider != "cpu" and dev_type != "cuda":
            raise BackendError(f"onnxruntime provider {provider!r} needs a CUDA device; pass "
                               "device='cuda' (or provider='cpu')")
        wanted = PROVIDERS.get(provider)
        if wanted is None:
            raise BackendError(f"onnxruntime provider {provider!r} is not one of "
                               f"{sorted(PROVIDERS)}")
        available = ort.get_available_providers()
        if wanted not in available:
            raise BackendError(f"onnxruntime provider {wanted} is not available in this "
                               f"install (available: {available}); install onnxruntime-gpu "
                               "for CUDA/TensorRT, or use provider='cpu'")
        precision = {"f32": "fp32"}.get(precision, precision)
        if precision not in ("fp32", "int8"):
            raise BackendError(f"onnxruntime precision must be fp32 or int8, got {precision!r}")
        if precision == "int8":
            from vpr_ros.runtime.cpu_features import cpu_info

            if provider != "cpu":
                raise BackendError("onnxruntime int8 runs on the CPU provider only")
            if not cpu_info().int8:
                raise BackendError(f"this CPU ({cpu_info().describe()}) has no int8 dot-product "
                                   "instructions (VNNI or AMX): ONNX Runtime's int8 kernels "
                                   "would saturate and gain little; use precision fp32")
        so = cpu_session_options(threads, optimization, spin) if tuned else ort.SessionOptions()
        cache = Path(trt_cache_dir) if trt_cache_dir else self.path.parent / ".ort_trt_cache"
        chain = provider_chain(provider, dev_id, cache if provider == "tensorrt" else None)
        self.precision = precision
        run_path = self.path
        if precision == "int8":
            from vpr_ros.runtime.onnx_int8 import int8_onnx

            run_path = int8_onnx(self.path)
        source: Any = str(run_path)
        self.fused_attention = 0
        if provider == "cpu" and tuned and fuse_attention and precision == "fp32":
            source, self.fused_attention = _with_fused_attention(run_path)
        try:
            self.session = ort.InferenceSession(source, so, providers=chain)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise BackendError(f"{self.path}: onnxruntime cannot load it ({exc}); the file is "
                               "corrupt or not an ONNX model: re-export it with `vpr export "
                               "onnx`") from exc
        active = self.session.get_providers()
        if wanted not in active:
            raise BackendError(f"onnxruntime did not enable {wanted} for {self.path} (active: "
                               f"{active}); check the CUDA/TensorRT libraries onnxruntime-gpu "
                               "needs, or use provider='cpu'")
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta = ArtifactMeta.from_props(props, str(self.path))
        check_expected_fingerprint(self.meta.fingerprint, expected_fingerprint, str(self.path))
        self._check_graph()
        self.dim = self.meta.descriptor_dim
        self.input_size = self.meta.input_size
        self.fingerprint = self.meta.fingerprint
        self.provider = provider
        self.backend = f"onnxruntime-{provider}" + ("" if tuned else "-untuned") + (
            "-spin" if spin and tuned else "") + ("-int8" if precision == "int8" else "")
        self._prep = artifact_preprocessing(self.meta)

    def _check_graph(self) -> None:
        """The graph's inputs/outputs must be what the metadata promises."""
        ins = self.session.get_inputs()
        outs = [o.name for o in self.session.get_outputs()]
        h, w = self.meta.input_size
        if len(ins) != 1 or ins[0].name != self.meta.input_name:
            raise BackendError(f"{self.path}: graph inputs {[i.name for i in ins]} do not match "
                               f"the metadata ({self.meta.input_name!r}); re-export the file")
        shape = list(ins[0].shape)
        if len(shape) != 4 or shape[1:] != [3, h, w]:
            raise BackendError(f"{self.path}: graph input shape {shape} does not match the "
                               f"metadata's (batch, 3, {h}, {w}); re-export the file")
        if outs != list(self.meta.outputs):
            raise BackendError(f"{self.path}: graph outputs {outs} do not match the metadata's "
                               f"{list(self.meta.outputs)}; re-export the file")
        gshape = self.session.get_outputs()[0].shape
        if len(gshape) != 2 or gshape[1] != self.meta.descriptor_dim:
            raise BackendError(f"{self.path}: output 'global' has shape {gshape}, the metadata "
                               f"says {self.meta.descriptor_dim}-D; re-export the file")

    def _infer(self, names: Sequence[str], batch: np.ndarray) -> list[np.ndarray]:
        try:
            return self.session.run(list(names), {self.meta.input_name:
                                                  np.ascontiguousarray(batch)})
        except Exception as exc:
            raise BackendError(f"{self.backend}: inference failed on a {batch.shape} batch "
                               f"({exc})") from exc
