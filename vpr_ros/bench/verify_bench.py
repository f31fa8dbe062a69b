"""`vpr bench verify`: what geometric verification costs per candidate and per frame, on one core.

Pairs come from two sources, each at the image sizes asked for (frames resized, intrinsics
scaled with them):

- ``euroc``: real EuRoC stereo frames (find_dataset('euroc_micro')): the right camera's frame
  as the query, left frames of the sequence as keyframes, with 3-D points triangulated from
  their stereo pair (PnP) or without (essential matrix);
- ``street``: the demo's rendered street, a dusk revisit in the other lane as the query and
  the daylight keyframe a metre behind (with its registered depth: PnP), and, as the wrong
  candidates a decision stage must reject, keyframes 40 m and more away along the route.

Measured per configuration (source x size x keypoint kind x estimator x extraction scale x
RANSAC minimum iterations), single-threaded (OpenCV, BLAS and faiss limited to one thread,
as the node runs):

- ``extract``: the query frame's keypoints (once per frame);
- per candidate: ``match`` and ``estimate`` (and their sum) for a true candidate and for a
  wrong one;
- per frame: verifying up to ``candidates`` candidates in rank order, stopping at the first
  verified: ``frame_first`` (the true one ranked first) and ``frame_last`` (four wrong ones
  first, the true one last: the worst case that still verifies), and ``frame_none`` (all
  wrong: every one fully tried).

p50 and p95 over ``repeats`` runs of every pair, by the wall clock and, for the frame figures,
by the thread's CPU time (on a shared machine the wall clock also counts the time the thread
waited for a core; its CPU time is what one core spent); the CPU and the load are recorded, as
timings on a shared machine depend on both. The keyframes' keypoints are extracted at full
resolution (a map is built offline); ``extract_scale`` applies to the query frame.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vpr_ros.errors import ConfigError

SIZES = ((640, 480), (752, 480), (320, 240))


@dataclass
class VerifyBenchConfig:
    sources: Sequence[str] = ("street", "euroc")
    sizes: Sequence[tuple[int, int]] = ((640, 480),)
    kinds: Sequence[str] = ("sift", "orb")
    estimators: Sequence[str] = ("poselib", "opencv")
    candidates: int = 5
    pairs: int = 6
    repeats: int = 3
    max_features: int = 1000
    extract_scales: Sequence[float] = (1.0,)
    min_iterations: Sequence[int] = (20,)
    progress: Callable[[str], None] = field(default=lambda msg: None)


def _one_thread() -> None:
    import cv2

    cv2.setNumThreads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    from vpr_ros.mapdb.index.faiss_loader import load_faiss

    load_faiss().omp_set_num_threads(1)


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    w, h = size
    if img.shape[1] == w and img.shape[0] == h:
        return img
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def _scaled(camera: Any, size: tuple[int, int]) -> Any:
    from vpr_ros.mapdb.camera import CameraModel

    sx, sy = size[0] / camera.width, size[1] / camera.height
    k = list(camera.k)
    # pixel centres: u' = (u + 0.5) * s - 0.5
    k[0], k[2] = k[0] * sx, (k[2] + 0.5) * sx - 0.5
    k[4], k[5] = k[4] * sy, (k[5] + 0.5) * sy - 0.5
    return CameraModel(camera.name, size[0], size[1], tuple(k), camera.distortion_model,
                       camera.d, camera.frame_id, camera.base_frame, camera.mount)


@dataclass
class _Case:
    """One query with its true keyframe and wrong keyframes (images, depths, cameras)."""

    query: np.ndarray
    query_camera: Any
    true: tuple[np.ndarray, Optional[np.ndarray], Any]      # image, depth or xyz source, camera
    wrong: list[tuple[np.ndarray, Optional[np.ndarray], Any]]


def _street_cases(size: tuple[int, int], pairs: int, wrong: int) -> list[_Case]:
    from vpr_ros.demo.scenario import (Route, ScenarioConfig, World, camera_matrix,
                                       render_with_depth)
    from vpr_ros.mapdb.camera import CameraModel

    cfg = ScenarioConfig(image_size=(size[1], size[0]))
    world, route = World(cfg), Route(cfg)
    cam = CameraModel("street", size[0], size[1], camera_matrix(cfg))
    cases = []
    for p in range(pairs):
        s = 8.0 + p * route.length / pairs
        q = render_with_depth(world, cfg, *route.pose(s + 1.0, cfg.lap2_lateral_offset_m), 2)[0]
        rgb, depth = render_with_depth(world, cfg, *route.pose(s), 1)
        wrongs = []
        for w in range(wrong):
            far = s + 40.0 + w * 23.0
            img, d = render_with_depth(world, cfg, *route.pose(far), 1)
            wrongs.append((img, d, cam))
        cases.append(_Case(q, cam, (rgb, depth, cam), wrongs))
    return cases


def _euroc_cases(size: tuple[int, int], pairs: int, wrong: int) -> list[_Case]:
    from vpr_ros.datasets import euroc
    from vpr_ros.datasets.public_data import find_dataset, missing_reason

    root = find_dataset(euroc.NAME)
    if root is None:
        raise ConfigError(missing_reason(euroc.NAME, euroc.SOURCE))
    seq = euroc.load_euroc(root)
    c0, c1 = _scaled(seq.cam0.model, size), _scaled(seq.cam1.model, size)
    n = len(seq.cam0.files)
    cases = []
    for p in range(pairs):
        i = (p * 13) % n
        j = (i + 40) % n
        left = _resize(seq.cam0.image(i), size)
        right_i = _resize(seq.cam1.image(seq.right_index(i)), size)
        query = _resize(seq.cam1.image(seq.right_index(j)), size)
        # EuRoC has one place only: the wrong candidates are the frames upside down (as many
        # matches as a true pair, rejected as an implausible rotation: the costly rejection)
        wrongs = [(np.ascontiguousarray(_resize(seq.cam0.image((i + 7 * (w + 1)) % n),
                                                size)[::-1, ::-1]), None, c0)
                  for w in range(wrong)]
        cases.append(_Case(query, c1, (left, ("stereo", right_i, c1,
                                              seq.stereo_extrinsic()), c0), wrongs))
    return cases


def _keyframe(extractor: Any, image: np.ndarray, source: Any, camera: Any) -> Any:
    from vpr_ros.localization.verification import View
    from vpr_ros.mapdb.keypoint_depth import points_from_depth, points_from_stereo
    from vpr_ros.runtime.local_features import LocalFeatures

    feats = extractor.extract(image)
    xyz = None
    if isinstance(source, tuple) and source and source[0] == "stereo":
        _, right, right_cam, ext = source
        xyz = points_from_stereo(feats, extractor.extract(right), camera, right_cam, ext)
    elif isinstance(source, np.ndarray):
        xyz = points_from_depth(feats, camera, source)
    return View(LocalFeatures(feats.kind, feats.xy, feats.descriptors, xyz), camera)


def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan")}
    v = 1e3 * np.asarray(values)
    return {"p50": round(float(np.percentile(v, 50)), 2),
            "p95": round(float(np.percentile(v, 95)), 2)}


def _measure(cases: list[_Case], kind: str, estimator: str, cfg: VerifyBenchConfig,
             scale: float = 1.0, min_iterations: int = 20) -> dict[str, Any]:
    from vpr_ros.localization.verification import (GeometricVerifier, VerificationConfig, View)
    from vpr_ros.runtime.local_features import FeatureExtractor, LocalFeatures

    extractor = FeatureExtractor(kind, cfg.max_features)
    query_extractor = FeatureExtractor(kind, cfg.max_features, scale=scale)
    verifier = GeometricVerifier(VerificationConfig(estimator=estimator,
                                                    max_candidates=cfg.candidates,
                                                    time_budget_ms=60000.0,
                                                    min_iterations=min_iterations))
    t: dict[str, list[float]] = {k: [] for k in (
        "extract", "true_match", "true_estimate", "true_total", "wrong_match", "wrong_estimate",
        "wrong_total", "frame_first", "frame_last", "frame_none", "frame_first_cpu",
        "frame_last_cpu", "frame_none_cpu")}
    verified_true = rejected_wrong = total_true = total_wrong = 0
    methods: dict[str, int] = {}
    if cases:  # first calls pay for imports and lazy set-up: not what is measured
        warm = _keyframe(extractor, *cases[0].true)
        verifier.verify_pair(View(query_extractor.extract(cases[0].query),
                                  cases[0].query_camera), warm)
    for case in cases:
        true_view = _keyframe(extractor, *case.true)
        wrong_views = [_keyframe(extractor, *w) for w in case.wrong]
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            q = View(query_extractor.extract(case.query), case.query_camera)
            t["extract"].append(time.perf_counter() - t0)
            r = verifier.verify_pair(q, true_view, 0)
            t["true_match"].append(r.match_s)
            t["true_estimate"].append(r.estimate_s)
            t["true_total"].append(r.match_s + r.estimate_s)
            verified_true += int(r.verified)
            total_true += 1
            methods[r.method or "none"] = methods.get(r.method or "none", 0) + 1
            for w in wrong_views:
                rw = verifier.verify_pair(q, w, 1)
                t["wrong_match"].append(rw.match_s)
                t["wrong_estimate"].append(rw.estimate_s)
                t["wrong_total"].append(rw.match_s + rw.estimate_s)
                rejected_wrong += int(not rw.verified)
                total_wrong += 1
            n_wrong = cfg.candidates - 1
            for name, order in (("frame_first", [(0, true_view)] + [
                    (i + 1, v) for i, v in enumerate(wrong_views[:n_wrong])]),
                    ("frame_last", [(i + 1, v) for i, v in enumerate(wrong_views[:n_wrong])]
                     + [(0, true_view)]),
                    ("frame_none", [(i + 1, v) for i, v in
                                    enumerate(wrong_views[:cfg.candidates])])):
                # a new query object per frame: what the matcher derives from the query's
                # keypoints once per frame is paid inside the frame, as in the node
                fresh = View(LocalFeatures(q.features.kind, q.features.xy,
                                           q.features.descriptors), q.camera)
                t0, c0 = time.perf_counter(), time.thread_time()
                verifier.verify(fresh, order)
                t[f"{name}_cpu"].append(time.thread_time() - c0)
                t[name].append(time.perf_counter() - t0)
    return {"kind": kind, "estimator": estimator, "extract_scale": scale,
            "min_iterations": min_iterations, "ms": {k: _pct(v) for k, v in t.items()},
            "true_verified": f"{verified_true}/{total_true}",
            "wrong_rejected": f"{rejected_wrong}/{total_wrong}", "true_methods": methods}


def run_verify_bench(cfg: VerifyBenchConfig) -> dict[str, Any]:
    from vpr_ros.bench.node_bench import machine_info

    if cfg.candidates < 1 or cfg.pairs < 1 or cfg.repeats < 1:
        raise ConfigError("--candidates, --pairs and --repeats must be >= 1")
    _one_thread()
    rows = []
    load_before = os.getloadavg()[0]
    for source in cfg.sources:
        for size in cfg.sizes:
            cfg.progress(f"{source} {size[0]}x{size[1]}: rendering / reading")
            if source == "street":
                cases = _street_cases(size, cfg.pairs, max(cfg.candidates, 1))
            elif source == "euroc":
                cases = _euroc_cases(size, cfg.pairs, max(cfg.candidates, 1))
            else:
                raise ConfigError(f"source {source!r} is not street or euroc")
            for kind in cfg.kinds:
                for est in cfg.estimators:
                    for scale in cfg.extract_scales:
                        for min_it in cfg.min_iterations:
                            cfg.progress(f"{source} {size[0]}x{size[1]} {kind} {est} scale "
                                         f"{scale:g} min_iterations {min_it}")
                            rows.append({"source": source, "size": f"{size[0]}x{size[1]}",
                                         **_measure(cases, kind, est, cfg, scale, min_it)})
    return {"machine": {**machine_info(), "load_average_1m_before": round(load_before, 2),
                        "load_average_1m_after": round(os.getloadavg()[0], 2),
                        "threads": 1},
            "config": {"candidates": cfg.candidates, "pairs": cfg.pairs,
                       "repeats": cfg.repeats, "max_features": cfg.max_features,
                       "extract_scales": list(cfg.extract_scales),
                       "min_iterations": list(cfg.min_iterations)},
            "rows": rows}


def format_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"CPU {m.get('cpu', '?')}, one thread, load {m['load_average_1m_before']} -> "
             f"{m['load_average_1m_after']}; ms p50 / p95 by the wall clock, the last frame "
             "column by the thread's CPU time",
             "| source | size | kind | estimator | scale | min it. | extract | true cand. | "
             "wrong cand. | frame: true first | frame: true 5th | frame: none of 5 | "
             "frame: none of 5 (CPU) | true verified | wrong rejected |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ms = r["ms"]

        def cell(key: str) -> str:
            return f"{ms[key]['p50']:.1f} / {ms[key]['p95']:.1f}"
        lines.append(f"| {r['source']} | {r['size']} | {r['kind']} | {r['estimator']} | "
                     f"{r['extract_scale']:g} | {r['min_iterations']} | "
                     f"{cell('extract')} | {cell('true_total')} | {cell('wrong_total')} | "
                     f"{cell('frame_first')} | {cell('frame_last')} | {cell('frame_none')} | "
                     f"{cell('frame_none_cpu')} | {r['true_verified']} | "
                     f"{r['wrong_rejected']} |")
    return "\n".join(lines)
