"""``vpr export onnx``: the whole model (backbone + aggregator) as one checked ONNX graph.

What the graph must be, and why:

* **static image size, dynamic batch**: TensorRT and ONNX Runtime plan kernels for a fixed
  spatial size; the batch stays free for map building. DINOv2's positional embedding is
  precomputed for the size (``VPRModel.fix_input_size``), so the graph holds it as a constant
  and has no bicubic ``Resize`` (checked).
* **image-independent work folded away**: QAA's two query banks (self-attention over learned
  queries) depend on parameters only. The aggregator caches them in eval mode without
  autograd; the export warms that cache and traces with the model left in eval mode
  (``TrainingMode.PRESERVE``: the default would call ``train(False)``, which drops the cache),
  so the banks enter the graph as constants. :func:`constant_only_nodes` proves it: no compute
  node may depend on constants alone.
* **an op set TensorRT's ONNX parser accepts**: opset 17 (native ``LayerNormalization``), only
  ops in :data:`TENSORRT_OPS`, default domain only. Shape plumbing that depends on constants
  only (e.g. ``Mod``, which older TensorRT parsers lack) is folded here.
* **self-describing**: :class:`~vpr_ros.export.artifact.ArtifactMeta` in
  ``metadata_props``.

Exporter choice: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``). In torch
2.14 the dynamo exporter cannot trace the QAA bank cache (its key reads ``data_ptr()``, which
fake tensors refuse) and emits opset >= 18 only; the TorchScript exporter handles timm's ViT
blocks (``scaled_dot_product_attention`` becomes MatMul/Softmax) and ``nn.MultiheadAttention``
once PyTorch's fused MHA fast path (``aten::_native_multi_head_attention``, which has no ONNX
symbolic) is switched off for the duration of the export.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from vpr_ros import __version__
from vpr_ros.errors import ExportError
from vpr_ros.export.artifact import (GLOBAL_OUTPUT, INPUT_NAME, ArtifactMeta,
                                     descriptor_fingerprint)
from vpr_ros.export.onnx_graph import drop_dead_nodes

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
#: Opsets the TorchScript exporter writes and TensorRT 10's parser reads (9..20); 17 is the
#: first with LayerNormalization, which keeps fp16 engines accurate.
OPSET_RANGE = (14, 20)

#: ONNX ops TensorRT 10's ONNX parser supports that CNN/ViT/attention exports produce. An op
#: outside this set is refused at export time rather than at engine-build time on the robot.
TENSORRT_OPS = frozenset("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant
ConstantOfShape Conv ConvTranspose Cos CumSum DepthToSpace Div Einsum Elu Equal Erf Exp Expand
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater
GreaterOrEqual HardSigmoid HardSwish Identity InstanceNormalization LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax LpNormalization MatMul Max MaxPool Mean Min Mul Neg Not Or Pad
Pow PRelu Range Reciprocal ReduceL1 ReduceL2 ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Round Shape Sigmoid Sign Sin Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose
Unsqueeze Where Xor
""".split())

#: Ops that do real arithmetic on tensors: one of these depending on constants only means
#: image-independent work was left in the graph (e.g. QAA's query self-attention).
COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Softmax", "LayerNormalization", "Conv", "Einsum",
                         "ReduceL2", "ReduceMean", "ReduceSum", "Erf", "Exp", "Sqrt", "Pow",
                         "Gelu", "Tanh", "Sigmoid"})

#: Resizing ops: with the positional embedding precomputed, none may remain.
RESIZE_OPS = frozenset({"Resize", "Upsample"})

#: Above this many bytes a single ONNX protobuf cannot be written (2 GiB limit): weights go to
#: an external ``FILE.data`` (DINOv2-G).
EXTERNAL_DATA_BYTES = 1_800_000_000


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """PyTorch's fused MHA kernel has no ONNX symbolic; trace the plain ops instead."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


class _ExportGraph(nn.Module):
    """The model as the graph sees it: images -> (global, *extras) in a fixed order."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.forward_all(images)
        return tuple(out[n] for n in self.names)


# -- graph analysis ----------------------------------------------------------------------------

def constant_only_nodes(graph) -> list:
    """Nodes (other than ``Constant``) whose inputs are all initializers or constants,
    transitively: work a runtime would redo on every image for nothing."""
    const = {i.name for i in graph.initializer}
    found = []
    for node in graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant":
            const.update(node.output)
        elif all(i in const for i in ins):
            found.append(node)
            const.update(node.output)
    return found


def _drop_identities(graph) -> None:
    """Forward ``Identity`` nodes to their input (the exporter aliases shared weights so)."""
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if node.op_type == "Identity" and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _fold_constant_plumbing(model) -> int:
    """Evaluate constant-only nodes that are not compute ops (shape arithmetic) once, with the
    ONNX reference evaluator, and store their results as initializers."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    avail = {i.name for i in graph.initializer}
    avail |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    foldable = []
    for node in constant_only_nodes(graph):  # topological order; skip what compute feeds
        if node.op_type not in COMPUTE_OPS and all(i in avail for i in node.input if i):
            foldable.append(node)
            avail.update(node.output)
    if not foldable:
        return 0
    produced = {o for n in foldable for o in n.output}
    folded_ids = {id(n) for n in foldable}
    consumers = {i for n in graph.node if id(n) not in folded_ids for i in n.input}
    consumers |= {o.name for o in graph.output}
    wanted = sorted(produced & consumers)
    if not wanted:
        return 0
    needed_inputs = {i for n in foldable for i in n.input if i}
    consts = [n for n in graph.node if n.op_type == "Constant"
              and set(n.output) & needed_inputs]
    inits = [t for t in graph.initializer if t.name in needed_inputs]
    sub = helper.make_model(
        helper.make_graph(consts + foldable, "fold", [],
                          [helper.make_value_info(n, onnx.TypeProto()) for n in wanted],
                          initializer=inits),
        opset_imports=model.opset_import)
    values = ReferenceEvaluator(sub).run(None, {})
    for name, value in zip(wanted, values):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    keep = [n for n in graph.node if id(n) not in folded_ids]
    del graph.node[:]
    graph.node.extend(keep)
    return len(foldable)


@dataclass(frozen=True)
class GraphReport:
    """What :func:`check_onnx_graph` found (all checks passed if it returned)."""

    op_counts: dict[str, int]
    opset: int
    parameters: int
    constant_only: int


def check_onnx_graph(model, meta: Optional[ArtifactMeta] = None) -> GraphReport:
    """Every property :mod:`vpr_ros.export.onnx_export` promises, or an ExportError naming the
    one that fails: ONNX checker, opset, TensorRT op set, no resize, no constant-only compute,
    static image size with a dynamic batch, outputs as in the metadata."""
    import onnx

    try:
        # Beyond the 2 GiB protobuf limit the checker needs the saved file (export_model_onnx
        # checks it after writing); everything below works on the proto either way.
        if model.ByteSize() <= EXTERNAL_DATA_BYTES:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph fails the ONNX checker: {exc}") from exc
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ExportError(f"opset {opset} is outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]}, the "
                          "range both the exporter and TensorRT's parser handle; use 17")
    counts = Counter(n.op_type for n in graph.node)
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.node
                      if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(f"the graph uses non-standard ops {foreign}; TensorRT cannot parse "
                          "them")
    resize = sorted(set(counts) & RESIZE_OPS)
    if resize:
        raise ExportError(f"the graph resizes tensors ({resize}); the positional embedding "
                          "was not precomputed (call model.fix_input_size(size) before export)")
    idle = constant_only_nodes(graph)
    heavy = sorted({n.op_type for n in idle if n.op_type in COMPUTE_OPS})
    if heavy:
        names = [n.name for n in idle if n.op_type in COMPUTE_OPS][:5]
        raise ExportError(f"the graph computes image-independent values at run time ({heavy} "
                          f"on constants only, e.g. {names}): the query banks were not folded "
                          "into constants; export in eval mode without autograd with the "
                          "aggregator's cache warm")
    unsupported = sorted(set(counts) - TENSORRT_OPS)
    if unsupported:
        raise ExportError(f"ops {unsupported} are not in TensorRT's supported ONNX op set; "
                          "change the model code that produces them (or the opset)")
    if len(graph.input) != 1:
        raise ExportError(f"the graph has inputs {[i.name for i in graph.input]}; expected one "
                          f"({INPUT_NAME!r}); were initializers exported as inputs?")
    dims = graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_param or d.dim_value for d in dims]
    if len(shape) != 4 or not dims[0].dim_param or any(d.dim_param for d in dims[1:]):
        raise ExportError(f"input shape {shape}: expected (batch, 3, H, W) with only the batch "
                          "dynamic")
    if meta is not None:
        if graph.input[0].name != meta.input_name or shape[1:] != [3, *meta.input_size]:
            raise ExportError(f"input {graph.input[0].name} {shape} does not match the metadata "
                              f"({meta.input_name}, 3x{meta.input_size[0]}x{meta.input_size[1]})")
        outs = [o.name for o in graph.output]
        if outs != list(meta.outputs):
            raise ExportError(f"graph outputs {outs} differ from the metadata's "
                              f"{list(meta.outputs)}")
    for out in graph.output:
        odims = out.type.tensor_type.shape.dim
        if not odims or not odims[0].dim_param:
            raise ExportError(f"output {out.name!r} has no dynamic batch axis")
    params = int(sum(int(np.prod(t.dims)) for t in graph.initializer))
    return GraphReport(op_counts=dict(counts), opset=opset, parameters=params,
                       constant_only=len(idle))


# -- export ------------------------------------------------------------------------------------

def _norm_size(size: Union[int, Sequence[int], None], default: tuple[int, int]
               ) -> tuple[int, int]:
    if size is None:
        return (int(default[0]), int(default[1]))
    if isinstance(size, int):
        return (size, size)
    vals = tuple(int(s) for s in size)
    if len(vals) != 2:
        raise ExportError(f"size must be one number or (height, width), got {size!r}")
    return (vals[0], vals[1])


def _save(model, out: Path) -> None:
    """Atomic write; weights go to ``FILE.data`` beyond the 2 GiB protobuf limit."""
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if model.ByteSize() > EXTERNAL_DATA_BYTES:
            onnx.save(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=out.name + ".data")
        else:
            onnx.save(model, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_model_onnx(model: nn.Module, out: Union[str, Path], *, model_fingerprint: str,
                      size: Union[int, Sequence[int], None] = None, opset: int = DEFAULT_OPSET,
                      verify: bool = True, source: str = "") -> ArtifactMeta:
    """Export a loaded :class:`~vpr_ros.models.VPRModel` (see the module docstring).

    ``verify`` runs the file with ONNX Runtime on random images and requires cosine >= 0.9999
    with PyTorch (:func:`vpr_ros.export.parity.verify_onnx_export`).
    """
    import onnx

    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ExportError(f"--opset {opset} is outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]}; "
                          "TensorRT's parser and the exporter agree on those (17 recommended)")
    out = Path(out)
    cfg = model.config
    hw = _norm_size(size, cfg.input.size)
    model.backbone.check_input_size(hw)
    model = model.float().eval()
    model.fix_input_size(hw)
    names = (GLOBAL_OUTPUT, *model.extra_outputs)
    graph_module = _ExportGraph(model, names).eval()
    dummy = torch.randn(2, 3, *hw)  # batch 2: a batch of 1 invites the tracer to specialise it
    dynamic = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with torch.no_grad(), mha_fastpath_disabled(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about int(shape): sizes are static
        graph_module(dummy[:1])  # warms the aggregator's caches (query banks) for the trace
        out.parent.mkdir(parents=True, exist_ok=True)
        # A folder, not a file: beyond 2 GiB the exporter writes one data file per tensor.
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".vpr_export_") as tmpdir:
            tmp = os.path.join(tmpdir, "model.onnx")
            try:
                torch.onnx.export(graph_module, (dummy,), tmp, dynamo=False,
                                  opset_version=opset, input_names=[INPUT_NAME],
                                  output_names=list(names), dynamic_axes=dynamic,
                                  do_constant_folding=True,
                                  training=torch.onnx.TrainingMode.PRESERVE)
                proto = onnx.load(tmp)  # external data, if any, is read into the proto here
            except Exception as exc:
                raise ExportError(f"torch.onnx.export failed for {cfg.name}: {exc}") from exc
    _drop_identities(proto.graph)
    folded = _fold_constant_plumbing(proto)
    drop_dead_nodes(proto.graph)
    meta = ArtifactMeta(
        fingerprint=descriptor_fingerprint(model_fingerprint, hw, cfg.input.size),
        model_fingerprint=model_fingerprint, model_name=cfg.name,
        descriptor_dim=int(model.descriptor_dim), input_size=hw, mean=tuple(cfg.input.mean),
        std=tuple(cfg.input.std), resize=cfg.input.resize,
        interpolation=cfg.input.interpolation, outputs=names, opset=opset,
        vpr_ros_version=__version__,
        extra={"exporter": f"torch.onnx TorchScript (torch {torch.__version__})",
               "source": source})
    proto.producer_name = "vpr_ros"
    proto.producer_version = __version__
    proto.doc_string = (f"{cfg.name}: images (B, 3, {hw[0]}, {hw[1]}) normalised RGB -> "
                        f"{', '.join(names)}")
    del proto.metadata_props[:]
    for k, v in meta.to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    report = check_onnx_graph(proto, meta)
    log.info("exported %s at %dx%d: %d nodes, %d parameters, %d constant nodes folded",
             cfg.name, hw[0], hw[1], sum(report.op_counts.values()), report.parameters, folded)
    _save(proto, out)
    if proto.ByteSize() > EXTERNAL_DATA_BYTES:
        try:
            onnx.checker.check_model(str(out))
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{out} fails the ONNX checker: {exc}") from exc
    if verify:
        from vpr_ros.export.parity import verify_onnx_export

        verify_onnx_export(model, out)
    return meta


def export_onnx(model_dir: Union[str, Path], out: Union[str, Path],
                size: Union[int, Sequence[int], None] = None, opset: int = DEFAULT_OPSET,
                verify: bool = True) -> ArtifactMeta:
    """``vpr export onnx MODEL -o FILE``: a model directory -> a checked, self-describing
    ``.onnx`` file (see the module docstring)."""
    from vpr_ros.models.model_dir import load_model_dir

    model, meta = load_model_dir(model_dir)
    return export_model_onnx(model, out, model_fingerprint=meta.fingerprint, size=size,
                             opset=opset, verify=verify, source=str(Path(model_dir)))
