"""``vpr export onnx|tensorrt``: deployable artifacts of a model directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX or a TensorRT engine")
    esub = p.add_subparsers(dest="export_command", metavar="FORMAT")
    esub.required = True

    onnx = esub.add_parser(
        "onnx", help="the whole model as one checked ONNX graph (static size, dynamic batch)",
        description="Export backbone + aggregator as one ONNX graph with a static image size, "
        "a dynamic batch axis, image-independent parts folded into constants, an op set "
        "TensorRT parses, and the model's fingerprint and preprocessing in its metadata. The "
        "file is checked and run once with ONNX Runtime against PyTorch.")
    onnx.add_argument("model", help="model directory")
    onnx.add_argument("-o", "--output", required=True, help=".onnx file to write")
    onnx.add_argument("--size", type=int, help="input size in px (default: the model's own; "
                      "another size gives descriptors incompatible with maps of the model)")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    onnx.add_argument("--no-verify", action="store_true",
                      help="skip the ONNX Runtime vs PyTorch parity run")
    onnx.add_argument("--json", action="store_true", help="print the metadata as JSON")
    onnx.set_defaults(func=_onnx)

    trt = esub.add_parser(
        "tensorrt", help="an fp16 TensorRT engine (+ ENGINE.json), built on this GPU",
        description="Build an fp16 TensorRT engine with a batch 1..N profile from a model "
        "directory or an exported .onnx file. Run it on the machine that will use the engine: "
        "engines are tied to the TensorRT version and GPU architecture (the sidecar "
        "ENGINE.json records both, and the runtime refuses a mismatch).")
    trt.add_argument("source", help="model directory or .onnx file")
    trt.add_argument("-o", "--output", required=True, help="engine file (.engine or .plan)")
    trt.add_argument("--max-batch", type=int, default=8, help="largest batch (default 8)")
    trt.add_argument("--opt-batch", type=int, default=1,
                     help="batch the kernels are tuned for (default 1: the node)")
    trt.add_argument("--workspace-gb", type=float, default=4.0,
                     help="builder workspace limit in GiB (default 4)")
    trt.add_argument("--timing-cache", help="timing cache file to reuse and update")
    trt.add_argument("--size", type=int, help="(model directory) input size in px")
    trt.add_argument("--fp32", action="store_true", help="fp32 engine instead of fp16")
    trt.add_argument("--json", action="store_true", help="print the sidecar as JSON")
    trt.set_defaults(func=_tensorrt)


def _onnx(args: argparse.Namespace) -> int:
    from vpr_ros.errors import ExportError
    from vpr_ros.export.onnx_export import export_onnx
    from vpr_ros.paths import check_output_file

    check_output_file(args.output, "the ONNX file", ExportError)
    meta = export_onnx(args.model, args.output, size=args.size, opset=args.opset,
                       verify=not args.no_verify)
    if args.json:
        print(json.dumps(meta.to_dict(), indent=2))
        return 0
    h, w = meta.input_size
    size_mb = Path(args.output).stat().st_size / 1e6
    print(f"wrote {args.output} ({size_mb:.1f} MB): {meta.model_name}, {h}x{w} input, "
          f"{meta.descriptor_dim}-D, outputs {', '.join(meta.outputs)}, opset {meta.opset}, "
          f"fingerprint {meta.fingerprint}"
          + ("" if args.no_verify else "; parity with PyTorch checked"))
    return 0


def _tensorrt(args: argparse.Namespace) -> int:
    from vpr_ros.errors import ExportError
    from vpr_ros.export.tensorrt_build import build_engine
    from vpr_ros.runtime.backend_select import ENGINE_SUFFIXES

    if Path(args.output).suffix.lower() not in ENGINE_SUFFIXES:
        raise ExportError(f"--output should end in {' or '.join(ENGINE_SUFFIXES)} so "
                          "load_encoder recognises it")
    from vpr_ros.paths import check_output_file

    check_output_file(args.output, "the engine", ExportError)
    side = build_engine(args.source, args.output, max_batch=args.max_batch,
                        opt_batch=args.opt_batch, workspace_gb=args.workspace_gb,
                        timing_cache=args.timing_cache, fp16=not args.fp32, size=args.size)
    if args.json:
        print(json.dumps(side.to_dict(), indent=2))
        return 0
    print(f"wrote {args.output} (+ .json): {side.meta.model_name} {side.precision}, batch "
          f"1..{side.max_batch}, TensorRT {side.tensorrt_version} on {side.gpu_name} "
          f"(sm {side.compute_capability}), fingerprint {side.meta.fingerprint}")
    return 0
