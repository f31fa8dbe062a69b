"""`vpr bench ...`: one sub-parser per benchmark (search now; encoder and node join here), each
a thin layer over a module of ``vpr_ros.bench`` that returns plain figures, printed as a Markdown
table or, with ``--json``, as JSON for scripts."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vpr_ros.bench import int_list as _int_list
from vpr_ros.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (search, ...)",
                                  description="Measure a piece of vpr_ros on this machine.")
    sub = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    sub.required = True
    register_search(sub)
    register_encoder(sub)
    register_verify(sub)
    from vpr_ros.bench.node_bench import register as register_node
    from vpr_ros.bench.sequence_bench import register as register_sequence

    register_node(sub)
    register_sequence(sub)


def register_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="map search: build time, memory, latency, throughput, agreement",
        description="Build a map per index kind and measure build time, memory, single-query "
        "p50/p99 latency, batch throughput and R@1/R@10 agreement with exact search. With "
        "--descriptors, real descriptors are grown to N with distractors (the target case); "
        "otherwise synthetic clustered data is used.")
    p.add_argument("--dim", type=int, default=4096, help="descriptor dim (default 4096)")
    p.add_argument("--n", type=_int_list, default=[100_000], metavar="N[,N...]",
                   help="map sizes (default 100000); sizes that do not fit in memory are "
                   "reported as skipped")
    p.add_argument("--index", dest="indexes", default="flat:float32,flat:float16,"
                   "binary:float16,hnsw:float32,ivfpq:float32", metavar="KIND[:DTYPE[:K=V+...]],...",
                   help="index kinds, storage dtypes and parameters to measure, e.g. "
                   "binary:float16:rerank=300+bits=512 (default: %(default)s)")
    p.add_argument("--queries", type=int, default=200,
                   help="queries for agreement and throughput (default 200)")
    p.add_argument("--latency-queries", type=int, default=50,
                   help="single queries timed for p50/p99 (default 50)")
    p.add_argument("--batch", type=int, default=64, help="batch size for throughput")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--descriptors", type=Path, metavar="FILE.npy",
                   help="real L2-normalised descriptors (N, D) of map images")
    p.add_argument("--queries-file", type=Path, metavar="FILE.npy",
                   help="real query descriptors (default: rows held out of --descriptors)")
    p.add_argument("--workdir", type=Path, help="where saved maps go (default: system temp)")
    p.add_argument("--no-save-load", action="store_true",
                   help="search the map as built in memory instead of saved and re-loaded")
    p.add_argument("--blas-threads", type=int, default=0, metavar="N",
                   help="cap numpy's BLAS threads (0: library default). The node runs with "
                   "blas_threads 1 (config/vpr_*.yaml): pass 1 to measure what it sees")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_search)


def run_search(args: argparse.Namespace) -> int:
    from vpr_ros.bench.search_bench import (SearchBenchConfig, format_table, run_search_bench,
                                            to_json)

    if args.queries_file is not None and args.descriptors is None:
        raise ConfigError("--queries-file needs --descriptors (the map's real descriptors)")
    for name in ("queries", "latency_queries", "batch", "k"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.blas_threads < 0:
        raise ConfigError("--blas-threads must be >= 0 (0: library default)")

    tty = sys.stderr.isatty()
    last = [0.0]

    def progress(msg: str) -> None:
        """A one-line live status on a terminal; throttled plain lines in a log."""
        if tty:
            print(f"\r\033[K{msg}", end="", file=sys.stderr, flush=True)
        elif "built" not in msg or time.monotonic() - last[0] > 30:
            print(msg, file=sys.stderr, flush=True)
            last[0] = time.monotonic()

    cfg = SearchBenchConfig(
        dim=args.dim, sizes=args.n, indexes=[s for s in args.indexes.split(",") if s],
        queries=args.queries, latency_queries=args.latency_queries, batch=args.batch, k=args.k,
        descriptors=args.descriptors, query_file=args.queries_file, workdir=args.workdir,
        seed=args.seed, save_load=not args.no_save_load, blas_threads=args.blas_threads,
        progress=progress)
    report = run_search_bench(cfg)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(to_json(report) if args.json else format_table(report))
    return 0


def register_encoder(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encoder", help="encoder backends x precisions: latency, throughput, peak memory "
        "(--accuracy: Nordland R@1)",
        description="Per backend x precision x model x input size: p50/p95 latency at batch "
        "1, throughput at larger batches and peak memory, each cell in a fresh process, with "
        "the ratio to PyTorch fp32 from the same run. Models are config/models/*.yaml with "
        "random weights (speed does not depend on them). --accuracy instead reports each "
        "backend x precision's Recall@1 on the model-zoo comparison's held-out Nordland split "
        "next to fp32's, and records it for backend auto.")
    p.add_argument("--backends", help="comma-separated, from torch-cpu, torch-cpu-bf16, "
                   "onnxruntime-cpu, onnxruntime-cpu-int8, onnxruntime-cpu-untuned, "
                   "openvino-cpu-fp32, openvino-cpu-bf16, openvino-cpu-fp16, torch-cuda, "
                   "torch-cuda-fp16, onnxruntime-cuda, onnxruntime-tensorrt, tensorrt "
                   "(default: all this machine can run)")
    p.add_argument("--accuracy", action="store_true",
                   help="Nordland held-out R@1 per backend x precision next to fp32's (the "
                   "zoo table's split); recorded so auto never picks a precision losing more "
                   "than 0.5 point")
    p.add_argument("--accuracy-models", default="zoo-gem",
                   help="with --accuracy: comma-separated model directories or configs "
                   "(default zoo-gem: the zoo's pretrained EfficientNet-Lite0 + GeM at 112x224)")
    p.add_argument("--accuracy-subset", default="0.6:1.0",
                   help="with --accuracy: the route block evaluated (default the zoo's "
                   "held-out 0.6:1.0)")
    p.add_argument("--models", default="dinov2s_gem,qaa_dinov2b_8192",
                   help="model configs (names in config/models or YAML paths; default "
                   "%(default)s)")
    p.add_argument("--sizes", type=_int_list, help="input sizes in px (default: each model's)")
    p.add_argument("--batches", type=_int_list, default=[8, 32],
                   help="throughput batch sizes (default 8,32)")
    p.add_argument("--latency-iters", type=int, default=30, help="batch-1 runs timed")
    p.add_argument("--min-time", type=float, default=3.0,
                   help="seconds of runs per throughput figure (default 3)")
    p.add_argument("--threads", type=int, help="CPU threads (default: every usable core)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of all "
                   "cells, medians reported (use 3+ on a shared machine)")
    p.add_argument("--workdir", type=Path, help="where models/exports/engines are kept")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_encoder)


def run_encoder(args: argparse.Namespace) -> int:
    import json

    from vpr_ros.bench.encoder_bench import (EncoderBenchConfig, default_backends,
                                             format_table, run_encoder_bench)

    if args.accuracy:
        from vpr_ros.bench.encoder_accuracy import format_accuracy, run_accuracy

        workdir = args.workdir or EncoderBenchConfig().workdir
        result = run_accuracy(
            [m for m in args.accuracy_models.split(",") if m],
            args.backends.split(",") if args.backends else default_backends(), workdir,
            subset=args.accuracy_subset,
            progress=lambda m: print(m, file=sys.stderr, flush=True))
        print(json.dumps(result, indent=2) if args.json else format_accuracy(result))
        return 0

    cfg = EncoderBenchConfig(
        backends=args.backends.split(",") if args.backends else default_backends(),
        models=[m for m in args.models.split(",") if m], sizes=args.sizes or [None],
        batches=tuple(args.batches), latency_iters=args.latency_iters,
        min_time_s=args.min_time, threads=args.threads, rounds=args.rounds)
    if args.workdir:
        cfg.workdir = args.workdir
    if args.latency_iters < 1:
        raise ConfigError("--latency-iters must be >= 1")
    report = run_encoder_bench(cfg, progress=lambda m: print(
        f"\r\033[K{m}", end="", file=sys.stderr, flush=True) if sys.stderr.isatty() else None)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            w, h = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected WIDTHxHEIGHT, e.g. 640x480")
        if w < 32 or h < 32:
            raise argparse.ArgumentTypeError(f"{item!r}: at least 32x32")
        out.append((w, h))
    return out


def _numbers(text: str, kind: type, flag: str) -> list:
    """A comma-separated list of numbers; ConfigError naming ``flag`` otherwise."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated numbers")
    if not values:
        raise ConfigError(f"{flag} is empty")
    return values


def register_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help="geometric verification: cost per candidate and per frame (one core)",
        description="Time keypoint extraction, matching and robust estimation of the node's "
        "verifier on one thread: per true and per wrong candidate, and per frame of up to "
        "--candidates candidates (stopping at the first verified), p50/p95. Sources: the "
        "demo's rendered street (RGB-D, PnP) and real EuRoC stereo frames (find_dataset "
        "'euroc_micro').")
    p.add_argument("--sources", default="street,euroc", help="street, euroc (default both)")
    p.add_argument("--sizes", type=_sizes, default=[(640, 480)], metavar="WxH[,WxH...]",
                   help="frame sizes (default 640x480; e.g. 640x480,752x480,320x240)")
    p.add_argument("--kinds", default="sift,orb", help="keypoint kinds (default sift,orb)")
    p.add_argument("--estimators", default="poselib,opencv",
                   help="estimators (default poselib,opencv)")
    p.add_argument("--candidates", type=int, default=5, help="candidates per frame (default 5)")
    p.add_argument("--pairs", type=int, default=6, help="query frames per source (default 6)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each frame (default 3)")
    p.add_argument("--max-features", type=int, default=1000,
                   help="keypoints per image (default 1000, as the node)")
    p.add_argument("--extract-scales", default="1", metavar="S[,S...]",
                   help="query frame shrink factors before keypoint extraction, each in "
                   "[0.1, 1] (default 1; e.g. 1,0.5)")
    p.add_argument("--min-iterations", default="20", metavar="N[,N...]",
                   help="RANSAC minimum iterations to compare (default 20, the node's; e.g. "
                   "100,20)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    import json

    from vpr_ros.bench.verify_bench import VerifyBenchConfig, format_table, run_verify_bench

    cfg = VerifyBenchConfig(
        sources=[s for s in args.sources.split(",") if s], sizes=args.sizes,
        kinds=[k for k in args.kinds.split(",") if k],
        estimators=[e for e in args.estimators.split(",") if e], candidates=args.candidates,
        pairs=args.pairs, repeats=args.repeats, max_features=args.max_features,
        extract_scales=_numbers(args.extract_scales, float, "--extract-scales"),
        min_iterations=_numbers(args.min_iterations, int, "--min-iterations"),
        progress=lambda m: print(m, file=sys.stderr, flush=True))
    report = run_verify_bench(cfg)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
