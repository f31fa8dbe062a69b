"""``vpr eval recall|loop|euroc|zoo|slam``: retrieval Recall@K, loop-closure precision/recall,
the verifier on EuRoC, the model zoo, and trajectory error of the pose graph fed by the loop
closures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: K values must be >= 1")
    return ks


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: Recall@K, loop-closure PR")
    esub = p.add_subparsers(dest="eval_command", metavar="KIND")
    esub.required = True

    r = esub.add_parser("recall", help="Recall@K of queries against a database",
                        description="Encode database and query images with the model, search "
                        "them through a map of the chosen index kind (what the node does), and "
                        "report Recall@K. Folders: UTM-named images (@east@north@...), MSLS "
                        "query/database folders, or index-aligned folders (Nordland; "
                        "nordland:summer names the shared data).")
    r.add_argument("--model", required=True, help="model directory")
    r.add_argument("--database", required=True, help="database folder")
    r.add_argument("--queries", help="query folder (--protocol msls-val: an optional list of "
                   "query keys, .txt or .npy, e.g. the 740-query split)")
    r.add_argument("--protocol", choices=["msls-val", "nordland-2760", "nordland"],
                   help="a published evaluation protocol: msls-val (--database = MSLS root; "
                        "cph + sf, 25 m and 40 deg heading), nordland-2760 (VPR-Bench split: "
                        "query i = database frame 10*i, +-1 frame), nordland (whole aligned "
                        "traversals, +-10 frames); docs/eval_protocols.md")
    r.add_argument("--ground-truth", metavar="FILE",
                   help="positives from a file: VPR-Bench ground_truth_new.npy (rows "
                        "[query_index, [database indices]]) or one list of database indices "
                        "per query; indices into the folders' images in name order")
    gt = r.add_mutually_exclusive_group()
    gt.add_argument("--threshold-m", type=float,
                    help="positioned images: a result within this many metres is correct "
                         "(default 25)")
    gt.add_argument("--tolerance", type=int,
                    help="index-aligned folders: database image i+-N is correct for query i")
    r.add_argument("--subset", metavar="START:END",
                   help="index-aligned folders: evaluate only this block of the route "
                        "(fractions, e.g. 0.6:1.0 for the last 40%%)")
    r.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivfpq", "binary"],
                   help="map index kind to search through (default flat = exact); binary with a "
                        "hash-head model (SelaVPR++) searches the model's own codes, else "
                        "SimHash codes of the float descriptor")
    r.add_argument("--rerank", type=int, metavar="N",
                   help="--index binary: Hamming candidates re-ranked by exact float "
                        "descriptors (default 100; 0 = Hamming ranking only)")
    r.add_argument("--local-rerank", action="store_true",
                   help="models with a local-feature head (CQVPR): re-rank the global top N by "
                        "mutual-nearest-neighbour local matches, as the node does")
    r.add_argument("--local-rerank-top", type=int, default=100, metavar="N",
                   help="candidates re-ranked by --local-rerank (default 100)")
    r.add_argument("--k", type=_ks, default=[1, 5, 10, 20], help="K values (default 1,5,10,20)")
    r.add_argument("--sequence-length", type=_ks, metavar="L[,L...]",
                   help="rank by sequence evidence: queries in folder order, query i decided "
                   "with queries i-L+1..i (the node's sequence matcher over each query's top "
                   "max(K) shortlist); 1 = single frame. Several lengths: the first is the "
                   "headline (and the relocalization figures'), all are listed by length")
    r.add_argument("--period-s", type=float, default=1.0,
                   help="seconds between consecutive images of each folder (default 1)")
    r.add_argument("--relocalization", action="store_true",
                   help="also replay the node's relocalizer over the queries in order and "
                   "report its recall at 100%% precision, AUC, precision and recall")
    r.add_argument("--decision-config", metavar="YAML",
                   help="relocalization/sequence settings: a vpr_node params file "
                   "(config/vpr_localization.yaml, a calibrated site.yaml) or its sections")
    r.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override one setting (repeatable): relocalization names plain "
                   "(min_consistent=2), sequence ones prefixed (sequence.speed_max=1.2)")
    r.add_argument("--calibrate", action="store_true",
                   help="choose the relocalization settings with the most recall at 100%% "
                   "precision on these queries (a validation part; figures are in-sample)")
    r.add_argument("-o", "--params-out", metavar="SITE_YAML",
                   help="with --calibrate: write the chosen settings as a vpr_node params file")
    r.add_argument("--plot-dir", help="write recall_at_k.png and examples.png here")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--backend", default="auto",
                   help="encoder backend: auto (default: the fastest measured on this host for "
                   "batches, whose descriptors match fp32), torch (the PyTorch reference), "
                   "onnxruntime, openvino, tensorrt, optionally with a precision")
    r.add_argument("--verify", action="store_true",
                   help="also verify each query's top candidates geometrically (the node's "
                   "verifier: SIFT, poselib) and report recall at 100%% precision without and "
                   "with it")
    r.add_argument("--camera", help="with --verify: calibration of the images (YAML/JSON with "
                   "width, height, k[, distortion_model, d]); without: fundamental matrix")
    r.add_argument("--output", help="also write the JSON result to this file")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_recall)

    lp = esub.add_parser("loop", help="loop-closure precision/recall on a sequence",
                         description="Replay the node's loop-closure decisions over a sequence "
                         "with ground-truth positions (CSV image,stamp_ns,x,y[,z][,odom_x,"
                         "odom_y[,odom_z,odom_yaw]], or a folder of UTM-named images in time "
                         "order) at many thresholds, stage by stage: single frame, + sequence "
                         "matching, + calibration; report recall at 100%% precision, precision "
                         "and recall at the given settings, the PR AUC and curves, without "
                         "odometry and, where the CSV has odometry columns, with it.")
    lp.add_argument("--model", required=True, help="model directory")
    lp.add_argument("--sequence", required=True, help="sequence CSV or UTM-named image folder")
    lp.add_argument("--gt-distance-m", type=float, default=25.0,
                    help="a closure is correct within this distance (default 25)")
    lp.add_argument("--loop-config", help="YAML with the decision settings: a vpr_node params "
                    "file (config/vpr_loop_closure.yaml, a calibrated site.yaml), a file with "
                    "'loop_closure'/'sequence' sections, or bare LoopClosureConfig values")
    lp.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="override one setting (repeatable): loop-closure names plain "
                    "(min_score=0.7), sequence ones prefixed (sequence.reverse=true)")
    lp.add_argument("--sequence-length", type=int, metavar="L",
                    help="frames of sequence evidence (sequence.length; 1 = single frame)")
    lp.add_argument("--use-poses", action="store_true",
                    help="without odometry columns in the CSV, give the detector the "
                    "ground-truth positions as odometry (the JSON's 'odometry' says so)")
    lp.add_argument("--calibrate", action="store_true",
                    help="choose the settings with the most recall at 100%% precision on this "
                    "sequence (a validation run; the figures are in-sample)")
    lp.add_argument("-o", "--params-out", metavar="SITE_YAML",
                    help="with --calibrate: write the chosen settings as a vpr_node params "
                    "file (load it after the mode's config with --params-file)")
    lp.add_argument("--period-s", type=float, default=1.0,
                    help="image folders: seconds between frames (default 1)")
    lp.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivfpq", "binary"])
    lp.add_argument("--k", type=int, default=10, help="candidates per query (default 10)")
    lp.add_argument("--thresholds", type=int, default=50, help="thresholds swept (default 50)")
    lp.add_argument("--plot-dir", help="write pr_curve.png here")
    lp.add_argument("--batch-size", type=int, default=32)
    lp.add_argument("--device", default="cpu")
    lp.add_argument("--backend", default="auto",
                    help="encoder backend (default auto, as vpr eval recall)")
    lp.add_argument("--verify", action="store_true",
                    help="again with the node's geometric verification: recall at 100%% "
                    "precision without and with it, and the relative-pose error of verified "
                    "closures where the CSV has qx,qy,qz,qw and --camera is given")
    lp.add_argument("--camera", help="with --verify: calibration of the images (YAML/JSON with "
                    "width, height, k[, distortion_model, d])")
    lp.add_argument("--output", help="also write the JSON result to this file")
    lp.add_argument("--json", action="store_true", help="print the result as JSON")
    lp.add_argument("--no-progress", action="store_true")
    lp.set_defaults(func=_loop)

    eu = esub.add_parser("euroc", help="the geometric verifier's pose accuracy on EuRoC frames",
                         description="Essential-matrix rotation and translation-direction "
                         "error, the covariance's calibration and stereo PnP error of the "
                         "node's verifier on the EuRoC V1_01_easy stereo frames with ground "
                         "truth (public data: find_dataset 'euroc_micro').")
    eu.add_argument("--kinds", default="sift", help="keypoint kinds (default sift)")
    eu.add_argument("--estimators", default="poselib,opencv",
                    help="estimators (default poselib,opencv)")
    eu.add_argument("--step", type=int, default=8, help="frames sampled every STEP (default 8)")
    eu.add_argument("--sift-contrast", type=float, default=0.02,
                    help="SIFT contrast threshold (default 0.02, the node's; OpenCV's own: 0.04)")
    eu.add_argument("--equalize", action="store_true",
                    help="CLAHE before extraction (off in the node: see docs/verification.md)")
    eu.add_argument("--extract-scale", type=float, default=1.0,
                    help="shrink the query frames by this factor before extraction, keyframes "
                    "at full resolution (the node's verification.extract_scale; default 1)")
    eu.add_argument("--json", action="store_true", help="print the result as JSON")
    eu.add_argument("--output", help="also write the JSON result to this file")
    eu.set_defaults(func=_euroc)

    st = esub.add_parser("stream", help="a loop-closure sequence CSV from index-aligned "
                         "traversals", description="Write the traversals of a route (index-"
                         "aligned folders: Nordland seasons, a walk by day and by night) one "
                         "after the other as a `vpr eval loop --sequence` CSV: image j of each "
                         "at position j * spacing on a line, one frame every --period-s.")
    st.add_argument("folders", nargs="+", help="traversal folders (nordland:summer ...)")
    st.add_argument("-o", "--output", required=True, help="CSV to write")
    st.add_argument("--subset", metavar="START:END",
                    help="only this block of the route (fractions, e.g. 0.6:1.0)")
    st.add_argument("--period-s", type=float, default=1.0, help="seconds per frame (1)")
    st.add_argument("--spacing-m", type=float, default=1.0,
                    help="metres between consecutive places (1)")
    st.add_argument("--gap-s", type=float, default=0.0,
                    help="seconds between the traversals (0)")
    st.set_defaults(func=_stream)

    from vpr_ros.cli.slam_cmd import register_slam
    from vpr_ros.cli.zoo_cmd import register_zoo

    register_zoo(esub)
    register_slam(esub)


def _stream(args: argparse.Namespace) -> int:
    from vpr_ros.eval.loop import write_aligned_stream
    from vpr_ros.eval.tasks import _subset

    path = write_aligned_stream(args.folders, args.output, _subset(args.subset), args.period_s,
                                args.spacing_m, args.gap_s)
    print(f"wrote {path}")
    return 0


def _emit(result: dict, args: argparse.Namespace, text: str) -> None:
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else text)


def _recall(args: argparse.Namespace) -> int:
    from vpr_ros.errors import InputError
    from vpr_ros.eval.sequence_eval import reloc_configs, with_length
    from vpr_ros.eval.tasks import DecisionOptions, recall_eval

    if args.params_out and not args.calibrate:
        raise InputError("-o/--params-out writes the calibrated settings: add --calibrate")
    decisions = None
    wanted = (args.sequence_length is not None or args.relocalization or args.calibrate
              or args.decision_config or args.param)
    if wanted:
        reloc, seq = reloc_configs(args.decision_config, args.param)
        lengths = args.sequence_length or [None]
        decisions = DecisionOptions(
            sequence=with_length(seq, lengths[0]), more_lengths=tuple(lengths[1:]),
            relocalizer=reloc if (args.relocalization or args.calibrate) else None,
            calibrate=args.calibrate, params_out=args.params_out, period_s=args.period_s)
    res = recall_eval(args.model, args.database, args.queries, threshold_m=args.threshold_m,
                      tolerance=args.tolerance, index=args.index, ks=args.k,
                      subset=args.subset, plot_dir=args.plot_dir, batch_size=args.batch_size,
                      device=args.device, backend=args.backend,
                      progress=not args.no_progress, rerank=args.rerank,
                      local_rerank=args.local_rerank, local_rerank_top=args.local_rerank_top,
                      protocol=args.protocol, ground_truth=args.ground_truth,
                      verify=args.verify, camera=args.camera, decisions=decisions)
    figures = "  ".join(f"{k} {100 * v:.2f}" for k, v in res["recall"].items())
    text = (f"{figures}   ({res['num_queries']} queries, {res['num_database']} database images, "
            f"{res['ground_truth']}, {describe_search(res['search'])})")
    if res.get("verification"):
        v = res["verification"]
        text += (f"\nrecall@100%precision without verification "
                 f"{100 * v['recall_at_100_precision']['without']:.2f}, with "
                 f"{100 * v['recall_at_100_precision']['with']:.2f} ({v['candidates_verified']} "
                 f"candidates verified, {v['candidates_rejected']} rejected, "
                 f"{v['verifier']['ms_per_pair']} ms per pair)")
    if res.get("sequence_length", 1) > 1:
        single = "  ".join(f"{k} {100 * v:.2f}" for k, v in res["single_frame_recall"].items())
        text += (f"\nsequence of {res['sequence_length']} frames above; single frame: "
                 f"{single}")
    for length, rec in (res.get("recall_by_sequence_length") or {}).items():
        text += f"\nL = {length:>3s}: " + "  ".join(f"{k} {100 * v:.2f}" for k, v in rec.items())
    for name, st in (res.get("relocalization") or {}).get("stages", {}).items():
        text += (f"\nrelocalization {name:12s} recall@100%precision "
                 f"{st['recall_at_100_precision']:.3f}  AUC {st['auc']:.3f}  at the settings: "
                 f"precision {st['precision']:.3f} recall {st['recall']:.3f}")
    if res.get("params_file"):
        text += f"\ncalibrated settings written to {res['params_file']}"
    if res.get("plots"):
        text += "\nplots: " + ", ".join(res["plots"])
    _emit(res, args, text)
    return 0


def describe_search(search: dict) -> str:
    """One line saying which index, codes and re-ranking produced the figures."""
    parts = [f"index {search['index']}"]
    b = search.get("binary")
    if b:
        parts.append(f"{b['bits']}-bit {b['codes']} codes, "
                     + ("Hamming order only" if b["rerank"] == 0
                        else f"top {b['rerank']} re-ranked by float"))
    if search.get("local_rerank"):
        parts.append(f"local mutual-NN re-rank of top {search['local_rerank']['top_n']}")
    parts.append(f"{search['descriptor_bytes']['total']} B/image")
    return ", ".join(parts)


def _loop(args: argparse.Namespace) -> int:
    from vpr_ros.eval.tasks import loop_eval

    res = loop_eval(args.model, args.sequence, gt_distance_m=args.gt_distance_m,
                    loop_config_path=args.loop_config, params=args.param, index=args.index,
                    k=args.k, use_poses=args.use_poses, period_s=args.period_s,
                    num_thresholds=args.thresholds, plot_dir=args.plot_dir,
                    batch_size=args.batch_size, device=args.device, backend=args.backend,
                    progress=not args.no_progress, verify=args.verify, camera=args.camera,
                    sequence_length=args.sequence_length, calibrate=args.calibrate,
                    params_out=args.params_out)
    lines = [f"{res['num_positives']} revisits in {res['num_queries']} frames; odometry: "
             f"{res['odometry']}"]
    for label, stages in (("camera only", res["stages"]),
                          ("with odometry", res["stages_with_odometry"])):
        for name, st in (stages or {}).items():
            at = ("" if st["precision"] is None else
                  f"  at the settings: precision {st['precision']:.3f} recall "
                  f"{st['recall']:.3f}")
            lines.append(f"{label:13s} {name:13s} recall@100%precision "
                         f"{st['recall_at_100_precision']:.3f}  AUC {st['auc']:.3f}{at}")
    if res.get("params_file"):
        lines.append(f"calibrated settings written to {res['params_file']}")
    if res.get("verification"):
        v = res["verification"]
        lines.append(f"with verification (single frames): recall@100%precision "
                     f"{v['recall_at_100_precision']['with']:.3f}  AUC {v['auc']['with']:.3f}  "
                     f"({v['candidates_verified']} candidates verified, "
                     f"{v['candidates_rejected']} rejected)")
        rpe = v.get("relative_pose_error")
        if rpe:
            lines.append(f"relative pose of {rpe['pairs']} verified true closures: rotation "
                         f"median {rpe['rotation_deg_median']:.2f} deg, direction median "
                         f"{rpe['direction_deg_median']:.1f} deg")
    text = "\n".join(lines)
    if res.get("plots"):
        text += "\nplots: " + ", ".join(res["plots"])
    _emit(res, args, text)
    return 0


def _euroc(args: argparse.Namespace) -> int:
    from vpr_ros.eval.euroc_eval import evaluate_euroc, format_table
    from vpr_ros.errors import ConfigError

    if args.step < 1:
        raise ConfigError("--step must be >= 1")
    if not 0.1 <= args.extract_scale <= 1.0:
        raise ConfigError("--extract-scale must be in [0.1, 1]")
    res = evaluate_euroc([k for k in args.kinds.split(",") if k],
                         [e for e in args.estimators.split(",") if e], args.step,
                         sift_contrast=args.sift_contrast, equalize=args.equalize,
                         extract_scale=args.extract_scale)
    _emit(res, args, format_table(res))
    return 0
