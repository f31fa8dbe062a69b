"""`vpr bench sequence`: the sequence matcher's per-frame cost at map sizes 10k to 1M keyframes.

What it shows: sequence matching works on the search's shortlist, its neighbours and earlier
shortlists carried along the route, so its per-frame cost must not grow with the map beyond
the search itself. The benchmark builds maps of each size (``--sessions`` sessions at every
size, one keyframe per second and per metre, descriptors in a memory-mapped float16 file as a
loaded map keeps them), drives a query along one session (noisy copies of its keyframes), and
gives the matcher each frame's shortlist directly: the true keyframe and its neighbours plus
random distractors, so the search's own cost (``vpr bench search``) is not in the figures.
Reported per size and alignment (time over the speed range; travelled distance with odometry):
per-frame wall and CPU p50/p95, descriptor rows fetched per frame, and the configure-time cost
of building the keyframe track; and the ratio of the largest size's p50 to the smallest's.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.localization.sequence import KeyframeTrack, SequenceConfig, SequenceMatcher

NS_PER_S = 1_000_000_000


def _descriptors(path: Path, n: int, dim: int, seed: int) -> np.ndarray:
    """An (n, dim) float16 memory-mapped file of unit rows, written in chunks (reused when a
    file of the right shape is already there)."""
    shape = (n, dim)
    if path.exists() and path.stat().st_size == n * dim * 2:
        return np.memmap(path, dtype=np.float16, mode="r", shape=shape)
    rng = np.random.default_rng(seed)
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=shape)
    chunk = 65536
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        mm[s:s + len(x)] = x.astype(np.float16)
    mm.flush()
    del mm
    return np.memmap(path, dtype=np.float16, mode="r", shape=shape)


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"p50": round(float(np.percentile(a, 50)), 3),
            "p95": round(float(np.percentile(a, 95)), 3)}


def bench_size(n: int, dim: int, workdir: Path, frames: int, config: SequenceConfig,
               shortlist: int, sessions_count: int, seed: int = 0) -> dict[str, Any]:
    desc = _descriptors(workdir / f"seqbench_{n}x{dim}.f16", n, dim, seed)
    session_size = max(1, -(-n // sessions_count))
    sessions = np.repeat(np.arange((n + session_size - 1) // session_size), session_size)[:n]
    names = [f"s{c}" for c in sessions.tolist()]
    within = np.arange(n) - sessions * session_size
    stamps = (sessions * 10 * session_size + within).astype(np.int64) * NS_PER_S
    positions = np.stack([within.astype(float), sessions.astype(float) * 100.0,
                          np.zeros(n)], axis=1)
    t0, c0 = time.perf_counter(), time.process_time()
    track = KeyframeTrack()
    track.extend(names, stamps, positions)
    build = {"track_build_s": round(time.perf_counter() - t0, 3),
             "track_build_cpu_s": round(time.process_time() - c0, 3)}
    rng = np.random.default_rng(seed + 1)
    # The query drives along the middle session, one keyframe per frame.
    start = (len(np.unique(sessions)) // 2) * session_size
    start = min(start, max(0, n - frames - 1))
    out: dict[str, Any] = {"keyframes": n, "sessions": int(sessions.max()) + 1, **build}
    for mode, odometry in (("time", False), ("distance", True)):
        fetched: list[int] = []

        def descriptors_of(ids: np.ndarray, fetched: list[int] = fetched) -> np.ndarray:
            fetched.append(len(ids))
            return np.asarray(desc[ids], dtype=np.float32)

        matcher = SequenceMatcher(config, track, descriptors_of, seed=seed)
        walls, cpus, rows = [], [], []
        hits = 0
        for t in range(frames):
            kf = start + t
            q = desc[kf].astype(np.float32) + 0.5 * rng.standard_normal(dim).astype(
                np.float32) / np.sqrt(dim)
            sl = np.concatenate([[kf], rng.integers(0, n, size=shortlist - 1)])
            pos = (float(within[kf]), float(sessions[kf]) * 100.0, 0.0) if odometry else None
            fetched.clear()
            w0, c0 = time.perf_counter(), time.thread_time()
            res = matcher.update(int(stamps[kf]), q, sl, position=pos)
            cpus.append(time.thread_time() - c0)
            walls.append(time.perf_counter() - w0)
            rows.append(sum(fetched))
            hits += bool(res.matches) and res.matches[0].id == kf
        warm = slice(min(config.length, frames - 1), None)  # after the buffer has filled
        out[mode] = {"wall_ms": _percentiles(walls[warm]), "cpu_ms": _percentiles(cpus[warm]),
                     "rows_fetched_per_frame_max": int(max(rows[warm])),
                     "top1_correct": round(hits / frames, 3)}
    return out


def run_bench(sizes: list[int], dim: int, workdir: Path, frames: int, length: int,
              shortlist: int, sessions: int) -> dict[str, Any]:
    from vpr_ros.eval.tasks import one_blas_thread

    workdir.mkdir(parents=True, exist_ok=True)
    config = SequenceConfig(length=length)
    with one_blas_thread():  # as the node runs it (blas_threads: 1)
        rows = [bench_size(n, dim, workdir, frames, config, shortlist, sessions)
                for n in sizes]
    ratio = {mode: round(rows[-1][mode]["wall_ms"]["p50"] / rows[0][mode]["wall_ms"]["p50"], 3)
             for mode in ("time", "distance")}
    return {"machine": machine(), "dim": dim, "frames": frames, "length": length,
            "shortlist": shortlist, "sessions": sessions, "sizes": rows,
            "p50_ratio_largest_to_smallest": ratio}


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f
                          if ln.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(), "numpy": np.__version__}


def format_table(result: dict[str, Any]) -> str:
    lines = ["| keyframes | alignment | wall p50 / p95 ms | CPU p50 / p95 ms | rows fetched (max) | "
             "track build s |", "|---|---|---|---|---|---|"]
    for row in result["sizes"]:
        for mode in ("time", "distance"):
            r = row[mode]
            lines.append(f"| {row['keyframes']:,} | {mode} | {r['wall_ms']['p50']} / "
                         f"{r['wall_ms']['p95']} | {r['cpu_ms']['p50']} / {r['cpu_ms']['p95']} | "
                         f"{r['rows_fetched_per_frame_max']} | {row['track_build_s']} |")
    m = result["machine"]
    lines.append(f"\np50 ratio largest/smallest map: {result['p50_ratio_largest_to_smallest']}; "
                 f"{m['cpu']}, {m['cores']} cores, load {m['load_average']}")
    return "\n".join(lines)


def register(sub: Any) -> None:
    """Add ``sequence`` to the ``vpr bench`` sub-parsers."""
    from vpr_ros.bench import int_list as _int_list

    p = sub.add_parser(
        "sequence", help="sequence matcher per-frame cost at 10k..1M keyframes",
        description="Per-frame cost of the sequence matcher (time and distance alignment) on "
        "maps of each size, given each frame's shortlist (the search is not timed), and the "
        "ratio of the largest map's p50 to the smallest's.")
    p.add_argument("--n", type=_int_list, default=[10_000, 1_000_000], metavar="N[,N...]",
                   help="map sizes (default 10000,1000000)")
    p.add_argument("--dim", type=int, default=1280,
                   help="descriptor dim (default 1280, the CPU default model's)")
    p.add_argument("--frames", type=int, default=300, help="query frames per size and mode")
    p.add_argument("--length", type=int, default=10, help="sequence length L (default 10)")
    p.add_argument("--shortlist", type=int, default=5, help="search shortlist per frame "
                   "(the node's top_k, default 5)")
    p.add_argument("--sessions", type=int, default=10,
                   help="map sessions, the same number at every size (default 10): the "
                   "matcher's work per frame grows with the distinct sessions its shortlists "
                   "touch (at most shortlist x length), not with the keyframes")
    p.add_argument("--workdir", type=Path, default=Path("bench_sequence"),
                   help="where the memory-mapped descriptor files are written (1M x 1280 "
                   "float16 = 2.6 GB) and reused")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)


def _run(args: Any) -> int:
    import json

    result = run_bench(args.n, args.dim, args.workdir, args.frames, args.length,
                       args.shortlist, args.sessions)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
