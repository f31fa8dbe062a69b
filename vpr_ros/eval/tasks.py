"""The two evaluations behind ``vpr eval``, as library calls that return JSON-ready dicts.

Both load the model through :func:`~vpr_ros.runtime.encoder.load_encoder` (so any model
directory the node can run is evaluated the same way), time the encoding, and optionally write
PNG plots next to the figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vpr_ros.errors import InputError
from vpr_ros.eval.ground_truth import ground_truth_for
from vpr_ros.eval.encoded import EncodedSet, encode_set
from vpr_ros.eval.recall import DEFAULT_KS, check_ks, encode_paths, evaluate_ranking
from vpr_ros.eval.search_plan import SearchPlan, plan_search, search_encoded
from vpr_ros.models.rerank import DEFAULT_TOP_N


def one_blas_thread() -> Any:
    """A context in which BLAS runs on one thread: the decision replays do thousands of small
    matrix products (a frame's L x U similarities), for which a thread team only adds wake-ups
    (on a loaded 2-core machine, 50x slower); the node runs the same way (``blas_threads``)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with the pinned requirements
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def open_encoder(model: str | Path, backend: str, device: str):
    """The reference PyTorch encoder for ``torch``; any other backend through the runtime's
    :func:`~vpr_ros.runtime.encoder.load_encoder` (``auto``: the fastest measured on this host
    for batches, as map building uses; ONNX Runtime, OpenVINO, TensorRT, ...)."""
    if backend == "torch":
        from vpr_ros.runtime.encoder import probe_encoder
        from vpr_ros.runtime.torch_encoder import TorchEncoder

        return probe_encoder(TorchEncoder.from_model_dir(model, device=device), str(model))
    from vpr_ros.runtime.encoder import load_encoder

    return load_encoder(model, backend=backend, device=device, objective="throughput")


def _subset(spec: Optional[str]) -> Optional[tuple[float, float]]:
    if not spec:
        return None
    try:
        a, b = (float(x) for x in spec.split(":"))
    except ValueError:
        raise InputError(f"--subset {spec!r}: expected START:END fractions, e.g. 0.6:1.0") from None
    return a, b


@dataclass
class EncodedEval:
    """Database and queries of one evaluation, encoded once (several plans may search them)."""

    model: str
    encoder: Any
    db: Any          # ImageSet
    q: Any           # ImageSet
    positives: list
    gt_label: str
    subset: Optional[tuple[float, float]]
    db_enc: EncodedSet
    q_enc: EncodedSet
    timings: dict[str, float]


def eval_image_sets(database: str, queries: str, subset: Optional[str] = None
                    ) -> tuple[Any, Any]:
    """The database and query ImageSets of an evaluation, ``subset`` applied."""
    from vpr_ros.datasets.image_sets import read_image_set

    db, q = read_image_set(database), read_image_set(queries)
    rng = _subset(subset)
    if rng is not None:
        if db.kind != "aligned" or q.kind != "aligned":
            raise InputError("--subset selects a block of index-aligned folders; positioned "
                             "sets (UTM/MSLS) are evaluated whole")
        db, q = db.select(*rng), q.select(*rng)
    return db, q


def eval_ground_truth(database: str, queries: Optional[str], *,
                      threshold_m: Optional[float] = None, tolerance: Optional[int] = None,
                      subset: Optional[str] = None, protocol: Optional[str] = None,
                      ground_truth: Optional[str] = None) -> tuple[Any, Any, list, str]:
    """(database ImageSet, query ImageSet, positives per query, label) of an evaluation: a
    named protocol (:mod:`vpr_ros.eval.protocols`), a ground-truth file, or the folders' own
    rule (positions within ``threshold_m``, or an index ``tolerance``)."""
    from vpr_ros.eval import protocols as P

    if threshold_m is not None and tolerance is not None:
        raise InputError("give either --threshold-m (positioned images) or --tolerance "
                         "(index-aligned folders), not both")
    if protocol is not None and protocol not in P.PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(P.PROTOCOLS)}")
    if protocol is not None and ground_truth is not None:
        raise InputError("give either --protocol or --ground-truth: both define which database "
                         "images are correct")
    if protocol == "msls-val":
        if tolerance is not None or subset:
            raise InputError("--protocol msls-val takes the MSLS root as --database and "
                             "optionally a query list as --queries; --tolerance and --subset "
                             "do not apply")
        pr = P.msls_val(database, queries,
                        P.MSLS_THRESHOLD_M if threshold_m is None else threshold_m)
        return pr.db, pr.q, pr.positives, pr.label
    if queries is None:
        raise InputError("--queries is required (only --protocol msls-val reads the queries "
                         "from the MSLS root)")
    db, q = eval_image_sets(database, queries, subset)
    if protocol in ("nordland-2760", "nordland") or ground_truth is not None:
        if db.kind != "aligned" or q.kind != "aligned":
            what = f"--protocol {protocol}" if protocol else "--ground-truth"
            raise InputError(f"{what} indexes the images of plain (index-aligned) folders in "
                             f"name order; {db.source} / {q.source} are positioned (UTM or "
                             "MSLS) folders")
        if threshold_m is not None:
            raise InputError("--threshold-m applies to positioned folders, not to "
                             f"{'--protocol ' + protocol if protocol else '--ground-truth'}")
    if protocol == "nordland-2760":
        if subset or tolerance is not None:
            raise InputError("--protocol nordland-2760 fixes the queries and the tolerance; "
                             "--subset and --tolerance do not apply")
        pr = P.nordland_2760(db, q)
        return pr.db, pr.q, pr.positives, pr.label
    if protocol == "nordland":
        tol = P.NORDLAND_TOLERANCE if tolerance is None else tolerance
        positives, label = ground_truth_for(db, q, None, tol)
        return db, q, positives, f"Nordland ({label})"
    if ground_truth is not None:
        if subset or tolerance is not None:
            raise InputError("--ground-truth lists the positives of every query; --subset and "
                             "--tolerance do not apply")
        positives = P.read_ground_truth(ground_truth, len(db), len(q))
        return db, q, positives, f"ground-truth file {Path(ground_truth).name}"
    positives, label = ground_truth_for(db, q, threshold_m, tolerance)
    return db, q, positives, label


#: ``encode_fn(paths, desc) -> EncodedSet``: how :func:`encode_eval` encodes one image set.
EncodeFn = Callable[[Sequence[Path], str], EncodedSet]


def encode_eval(model: str | Path, database: str, queries: Optional[str], *,
                threshold_m: Optional[float] = None, tolerance: Optional[int] = None,
                subset: Optional[str] = None, extras: Sequence[str] = (), batch_size: int = 32,
                device: str = "cpu", backend: str = "auto", progress: bool = True,
                encoder: Any = None, encode_fn: Optional[EncodeFn] = None,
                protocol: Optional[str] = None,
                ground_truth: Optional[str] = None) -> EncodedEval:
    """Read both image sets, ground truth, and encode them with the outputs ``extras``.

    ``encode_fn`` replaces full encoding (``vpr eval zoo`` passes one that runs the model's
    head on cached backbone features); everything else is the same as ``vpr eval recall``.
    ``protocol`` / ``ground_truth``: see :func:`eval_ground_truth`."""
    db, q, positives, gt_label = eval_ground_truth(
        database, queries, threshold_m=threshold_m, tolerance=tolerance, subset=subset,
        protocol=protocol, ground_truth=ground_truth)
    rng = _subset(subset)
    encoder = encoder or open_encoder(model, backend, device)
    if encode_fn is None:
        def encode_fn(paths: Sequence[Path], desc: str) -> EncodedSet:
            return encode_set(encoder, paths, batch_size, desc, progress, extras)
    t0, cpu0 = time.time(), time.process_time()
    db_enc = encode_fn(db.paths, "database")
    q_enc = encode_fn(q.paths, "queries")
    encode_s, encode_cpu = time.time() - t0, time.process_time() - cpu0
    timings = {"encode": round(encode_s, 2), "encode_cpu": round(encode_cpu, 2),
               "images_per_s": round((len(db) + len(q)) / max(encode_s, 1e-9), 1)}
    return EncodedEval(str(model), encoder, db, q, positives, gt_label, rng, db_enc, q_enc,
                       timings)


@dataclass
class DecisionOptions:
    """Sequence matching and relocalization decisions on top of ``vpr eval recall``."""

    sequence: Any = None                 # SequenceConfig; None or length 1: single frame
    more_lengths: tuple[int, ...] = ()   # further sequence lengths whose Recall@K to report
    relocalizer: Any = None              # RelocalizerConfig: report relocalization decisions
    calibrate: bool = False
    params_out: Optional[str | Path] = None
    period_s: float = 1.0
    num_thresholds: int = 50


def _decisions(ev: EncodedEval, ids: Any, scores: Any, ks: list[int], plan: SearchPlan,
               opts: DecisionOptions, out: dict[str, Any]) -> Any:
    """Sequence ranking (returned, for Recall@K) and relocalization figures (into ``out``)."""
    import dataclasses

    from vpr_ros.eval.sequence_eval import ranking, relocalization_figures, sequence_hypotheses

    seq = opts.sequence
    db_pos = ev.db.positions
    hyps_single = sequence_hypotheses(ev.db_enc.global_, ev.q_enc.global_, ids, scores,
                                      dataclasses.replace(seq, length=1), opts.period_s, db_pos)
    stages = {"single_frame": hyps_single}
    if seq.enabled:
        stages["sequence"] = sequence_hypotheses(ev.db_enc.global_, ev.q_enc.global_, ids,
                                                 scores, seq, opts.period_s, db_pos)
        out["single_frame_recall"] = evaluate_ranking(
            ids, scores, ev.positives, ks, len(ev.db_enc), plan.index, ev.gt_label).to_dict()[
            "recall"]
    by_length = {}
    for length in (seq.length, *opts.more_lengths):
        if length == seq.length and seq.enabled:
            hyps = stages["sequence"]
        else:
            hyps = hyps_single if length == 1 else sequence_hypotheses(
                ev.db_enc.global_, ev.q_enc.global_, ids, scores,
                dataclasses.replace(seq, length=length), opts.period_s, db_pos)
        r_ids, r_scores = ranking(hyps, max(ks)) if length > 1 else (ids, scores)
        by_length[str(length)] = evaluate_ranking(
            r_ids, r_scores, ev.positives, ks, len(ev.db_enc), plan.index,
            ev.gt_label).to_dict()["recall"]
    if len(by_length) > 1:
        out["recall_by_sequence_length"] = by_length
    out["sequence_length"] = seq.length
    out["sequence_config"] = {f: getattr(seq, f) for f in seq.__dataclass_fields__}
    if opts.relocalizer is not None:
        reloc: dict[str, Any] = {}
        calib = None
        last = list(stages)[-1]
        for name, hyps in stages.items():
            fig, _, c = relocalization_figures(
                hyps, ev.positives, opts.relocalizer, seq.length if name == "sequence" else 1,
                opts.period_s, calibrate=opts.calibrate and name == last,
                num_thresholds=opts.num_thresholds)
            reloc[name] = fig
            calib = c or calib
        out["relocalization"] = {"stages": reloc, "config": {
            f: getattr(opts.relocalizer, f) for f in opts.relocalizer.__dataclass_fields__}}
        if calib is not None and opts.params_out is not None:
            from vpr_ros.eval.params_file import write_params_file

            reach = (f"relocalization recall {calib.point.recall:.3f} at precision "
                     f"{calib.point.precision:.3f}" if calib.reached else
                     "no setting reached precision 1.0 with any recall: these values accept "
                     "nothing")
            seq_cfg = seq if seq.enabled else dataclasses.replace(seq, length=1)
            out["params_file"] = str(write_params_file(opts.params_out, [
                ("relocalization", dataclasses.replace(calib.config, one_shot=True)),
                ("sequence", seq_cfg)], [
                f"Calibrated by `vpr eval recall --calibrate` on {ev.q.source} against "
                f"{ev.db.source} ({len(ev.q_enc)} queries, {ev.gt_label}), model "
                f"{ev.encoder.fingerprint}: {reach}.",
                "Load after the mode's config: vpr_node --ros-args --params-file "
                "config/vpr_localization.yaml --params-file THIS_FILE",
                f"Chosen: {', '.join(f'{k}={v}' for k, v in calib.values.items())}"]))
    if seq.enabled:
        return ranking(stages["sequence"], max(ks))
    return None


def recall_from_encoded(ev: EncodedEval, plan: SearchPlan, ks: Sequence[int] = DEFAULT_KS,
                        plot_dir: Optional[str | Path] = None, label: Optional[str] = None,
                        progress: bool = False, verifier: Any = None,
                        decisions: Optional[DecisionOptions] = None) -> dict[str, Any]:
    """The ``vpr eval recall`` JSON of one search plan over already encoded sets."""
    ks = check_ks(ks)
    enc = ev.encoder
    t1 = time.time()
    ids, scores = search_encoded(ev.db_enc, ev.q_enc, enc.fingerprint, max(ks), plan,
                                 ev.db.paths, progress)
    extra: dict[str, Any] = {}
    if decisions is not None:
        with one_blas_thread():
            ranked = _decisions(ev, ids, scores, ks, plan, decisions, extra)
        if ranked is not None:
            ids, scores = ranked
    res = evaluate_ranking(ids, scores, ev.positives, ks, len(ev.db_enc), plan.index,
                           ev.gt_label)
    search_s = time.time() - t1
    res.model = {"path": ev.model, "fingerprint": enc.fingerprint, "backend": enc.backend,
                 "dim": enc.dim, "input_size": list(enc.input_size),
                 "outputs": list(enc.output_names)}
    out = res.to_dict()
    out.update({"database": str(ev.db.source), "queries": str(ev.q.source),
                "subset": list(ev.subset) if ev.subset else None,
                "search": plan.describe(ev.db_enc),
                "timings_s": {**ev.timings, "search": round(search_s, 3)}})
    out.update(extra)
    if verifier is not None:
        from vpr_ros.eval.verify_eval import verify_ranking

        out["verification"] = verify_ranking(ev.q.paths, ev.db.paths, ids, scores,
                                             ev.positives, verifier, progress)
    if plot_dir is not None:
        from vpr_ros.eval.plots import plot_examples, plot_recall_curve

        d = Path(plot_dir)
        name = label or Path(ev.model).name
        out["plots"] = [
            str(plot_recall_curve({name: res.recalls}, d / "recall_at_k.png",
                                  title=f"Recall@K ({ev.gt_label}, index {plan.index})")),
            str(plot_examples(ev.q.paths, ev.db.paths, res.ranked_ids, ev.positives,
                              d / "examples.png", title=f"{name}: queries and top matches")),
        ]
    return out


def recall_eval(model: str | Path, database: str, queries: Optional[str], *,
                threshold_m: Optional[float] = None, tolerance: Optional[int] = None,
                index: str = "flat", ks: Sequence[int] = DEFAULT_KS,
                subset: Optional[str] = None, plot_dir: Optional[str | Path] = None,
                batch_size: int = 32, device: str = "cpu", backend: str = "auto",
                progress: bool = True, label: Optional[str] = None,
                rerank: Optional[int] = None, local_rerank: bool = False,
                local_rerank_top: int = DEFAULT_TOP_N, protocol: Optional[str] = None,
                ground_truth: Optional[str] = None, verify: bool = False,
                camera: Optional[str] = None,
                decisions: Optional[DecisionOptions] = None) -> dict[str, Any]:
    """Recall@K of ``model`` for ``queries`` against ``database`` (see ``vpr eval recall``).
    ``verify``: also the recall at 100 % precision without and with geometric verification
    (``camera``: a calibration file of the images; see :mod:`vpr_ros.eval.verify_eval`).

    ``index="binary"`` with a hash-head model searches the model's own codes (``rerank``:
    Hamming candidates re-ranked by float, 0 = Hamming order only); ``local_rerank`` re-ranks the
    global top ``local_rerank_top`` by local-feature mutual NN (CQVPR)."""
    check_ks(ks)
    eval_ground_truth(database, queries, threshold_m=threshold_m, tolerance=tolerance,
                      subset=subset, protocol=protocol, ground_truth=ground_truth)  # fail fast
    encoder = open_encoder(model, backend, device)
    plan = plan_search(encoder.output_names, index, rerank, local_rerank, local_rerank_top,
                       model=str(model))
    ev = encode_eval(model, database, queries, threshold_m=threshold_m, tolerance=tolerance,
                     subset=subset, extras=plan.extras, batch_size=batch_size, device=device,
                     backend=backend, progress=progress, encoder=encoder, protocol=protocol,
                     ground_truth=ground_truth)
    return recall_from_encoded(ev, plan, ks, plot_dir, label, progress,
                               _verifier(camera) if verify else None, decisions)


def _verifier(camera: Optional[str]) -> Any:
    from vpr_ros.eval.verify_eval import ImageVerifier, load_camera

    return ImageVerifier(camera=load_camera(camera) if camera else None)


def loop_eval(model: str | Path, sequence: str | Path, *, gt_distance_m: float = 25.0,
              loop_config_path: Optional[str] = None, params: Sequence[str] = (),
              index: str = "flat", k: int = 10, use_poses: bool = False,
              period_s: float = 1.0, num_thresholds: int = 50,
              plot_dir: Optional[str | Path] = None, batch_size: int = 32, device: str = "cpu",
              backend: str = "torch", progress: bool = True, verify: bool = False,
              camera: Optional[str] = None, sequence_length: Optional[int] = None,
              calibrate: bool = False, params_out: Optional[str | Path] = None
              ) -> dict[str, Any]:
    """Loop-closure PR of ``model`` on a sequence, stage by stage (see ``vpr eval loop``);
    ``verify``: again with geometric verification (single frames, as configured otherwise),
    and the relative-pose error of verified true closures where the sequence has orientations
    and ``camera`` is given."""
    import dataclasses

    from vpr_ros.eval.loop import (ODOMETRY_NONE, SESSION, decision_configs, evaluate_sequence,
                                   evaluate_stages, make_search, odometry_for, read_sequence)

    seq = read_sequence(sequence, period_s)
    config, seq_cfg = decision_configs(loop_config_path, list(params))
    if sequence_length is not None:
        seq_cfg = dataclasses.replace(seq_cfg, length=int(sequence_length))
    if params_out is not None and not calibrate:
        raise InputError("-o/--params-out writes the calibrated settings: add --calibrate")
    encoder = open_encoder(model, backend, device)
    t0 = time.time()
    desc = encode_paths(encoder, seq.paths, batch_size, "sequence", progress)
    encode_s = time.time() - t0
    odom, source = odometry_for(seq, use_poses)
    t1 = time.time()
    with one_blas_thread():
        camera_only = evaluate_stages(desc, seq, encoder.fingerprint, config, seq_cfg,
                                      gt_distance_m, index=index, k=k, odometry=None,
                                      num_thresholds=num_thresholds,
                                      calibrate=calibrate and odom is None)
        with_odom = None
        if odom is not None:
            with_odom = evaluate_stages(desc, seq, encoder.fingerprint, config, seq_cfg,
                                        gt_distance_m, index=index, k=k, odometry=odom,
                                        num_thresholds=num_thresholds, calibrate=calibrate,
                                        search=make_search(desc, seq, encoder.fingerprint,
                                                           index, k, odom))
    decide_s = time.time() - t1
    main = with_odom if with_odom is not None else camera_only
    top_name = "sequence" if seq_cfg.enabled else "single_frame"
    top = main.evaluations[top_name]
    at = top.at_config
    out: dict[str, Any] = {
        "recall_at_100_precision": top.recall_at_100_precision, "auc": top.auc,
        "precision": None if at is None else at.precision,
        "recall": None if at is None else at.recall,
        "num_positives": top.num_positives, "num_queries": top.num_queries,
        "gt_distance_m": gt_distance_m, "index": index, "k": k, "use_poses": use_poses,
        "odometry": source, "sequence_length": seq_cfg.length,
        "stages": camera_only.stages,
        "stages_with_odometry": None if with_odom is None else with_odom.stages,
        "sequence": str(seq.source), "session": SESSION,
        "config": {f: getattr(config, f) for f in config.__dataclass_fields__},
        "sequence_config": {f: getattr(seq_cfg, f) for f in seq_cfg.__dataclass_fields__},
        "model": {"path": str(model), "fingerprint": encoder.fingerprint,
                  "backend": encoder.backend},
        "timings_s": {"encode": round(encode_s, 2), "decisions": round(decide_s, 2)},
        "curve": top.to_dict()}
    if verify:
        from vpr_ros.eval.verify_eval import relative_pose_errors, verified_search

        ev = main.evaluations["single_frame"]
        verifier = _verifier(camera)
        verdicts: dict = {}
        vev = evaluate_sequence(desc, seq, encoder.fingerprint, config, gt_distance_m, index, k,
                                use_poses, num_thresholds,
                                wrap_search=lambda s: verified_search(s, seq.paths, verifier,
                                                                      verdicts))
        out["verification"] = {
            "recall_at_100_precision": {"without": ev.recall_at_100_precision,
                                        "with": vev.recall_at_100_precision},
            "auc": {"without": ev.auc, "with": vev.auc},
            "candidates_verified": sum(v.verified for v in verdicts.values()),
            "candidates_rejected": sum(not v.verified for v in verdicts.values()),
            "relative_pose_error": relative_pose_errors(
                verdicts, seq.positions, seq.orientations if camera else None,
                gt_distance_m),
            "curve": vev.to_dict(),
            "verifier": {"estimator": verifier.config.estimator,
                         "calibrated": verifier.camera is not None, "pairs": verifier.pairs,
                         "ms_per_pair": round(1e3 * (verifier.seconds["match"]
                                                     + verifier.seconds["estimate"])
                                              / max(1, verifier.pairs), 2)}}
    calib = main.calibration
    if calib is not None:
        out["calibration"] = {**calib.to_dict(), "in_sample": True,
                              "odometry": source if main is with_odom else ODOMETRY_NONE}
        if params_out is not None:
            from vpr_ros.eval.params_file import write_params_file

            reach = (f"recall {calib.point.recall:.3f} at precision "
                     f"{calib.point.precision:.3f}" if calib.reached else
                     "no setting reached precision 1.0 with any recall: these values accept "
                     "nothing")
            out["params_file"] = str(write_params_file(params_out, [
                ("loop_closure", calib.config), ("sequence", seq_cfg)], [
                f"Calibrated by `vpr eval loop --calibrate` on {seq.source} ({len(seq)} frames, "
                f"{top.num_positives} revisits within {gt_distance_m:g} m), model "
                f"{encoder.fingerprint}: {reach}.",
                "Load after the mode's config: vpr_node --ros-args --params-file "
                "config/vpr_loop_closure.yaml --params-file THIS_FILE",
                f"Chosen: {', '.join(f'{k_}={v}' for k_, v in calib.values.items())}"]))
    if plot_dir is not None:
        from vpr_ros.eval.plots import plot_pr_curves

        curves = {name: ev for name, ev in main.evaluations.items()}
        out["plots"] = [str(plot_pr_curves(curves, Path(plot_dir) / "pr_curve.png",
                                           title=f"Loop closure: {Path(str(model)).name}"))]
    return out
