"""`vpr bench search`: build time, memory, latency, throughput and agreement with exact search of
every index kind, on real descriptors grown to N with distractors, or on synthetic clustered data.

Why agreement with exact search (not recall against ground-truth places): the index must not
change what the map answers. R@1 agreement is the fraction of queries whose top-1 equals exact
search's top-1; R@10 agreement is the mean overlap of the top-10 sets.

Data:

- ``--descriptors FILE.npy`` (real, L2-normalised descriptors of map images): the target case.
  Queries are ``--queries FILE.npy`` (e.g. the other season's images of the same places) or, when
  absent, rows held out of the file. The database is the remaining real rows grown to N with
  distractors, in blocks: each block is the real set under a fixed random signed permutation of
  coordinates (an isometry: it keeps the real data's spread and clustering but is unrelated to the
  queries), and one block in four is instead the real set plus Gaussian noise scaled so each copy
  has cosine ~0.7 with its original (near-duplicates that the queries partly match). Descriptors
  are truncated or zero-padded (then renormalised) to the requested dim.
- Otherwise synthetic clustered data: unit vectors around random cluster centres, queries are map
  rows plus noise. Reported for orientation, not a target.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from vpr_ros.errors import ConfigError, InputError
from vpr_ros.mapdb.index.faiss_loader import load_faiss

GIB = 1 << 30


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# -- synthetic clustered data ----------------------------------------------------------------------


def cluster_centres(dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    return normalize(np.random.default_rng(seed).standard_normal((clusters, dim)))


def clustered_block(centres: np.ndarray, rows: int, spread: float,
                    rng: np.random.Generator) -> np.ndarray:
    """``rows`` unit vectors, each a random centre plus isotropic noise of relative size
    ``spread`` (cosine with its centre ~ 1/sqrt(1 + spread**2))."""
    dim = centres.shape[1]
    which = rng.integers(0, len(centres), size=rows)
    noise = rng.standard_normal((rows, dim), dtype=np.float32) * (spread / np.sqrt(dim))
    return normalize(centres[which] + noise)


def clustered_descriptors(n: int, dim: int, clusters: int | None = None, spread: float = 0.6,
                          seed: int = 0) -> np.ndarray:
    """(n, dim) float32 clustered unit vectors (for tests and small benchmarks)."""
    centres = cluster_centres(dim, clusters or max(1, n // 50), seed)
    return clustered_block(centres, n, spread, np.random.default_rng(seed + 1))


def noisy_queries(base: np.ndarray, count: int, noise: float = 0.3,
                  seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``count`` queries near random rows of ``base`` (cosine ~ 1/sqrt(1 + noise**2)); returns
    (queries, the row each came from)."""
    rng = np.random.default_rng(seed)
    src = rng.choice(len(base), size=count, replace=False)
    dim = base.shape[1]
    q = np.asarray(base[src], dtype=np.float32)
    q = q + rng.standard_normal(q.shape, dtype=np.float32) * (noise / np.sqrt(dim))
    return normalize(q), src


# -- real descriptors grown with distractors ----------------------------------------------------


def fit_dim(x: np.ndarray, dim: int) -> np.ndarray:
    """Truncate or zero-pad rows to ``dim`` values, then renormalise."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1] >= dim:
        return normalize(x[:, :dim])
    return normalize(np.pad(x, ((0, 0), (0, dim - x.shape[1]))))


def load_descriptor_file(path: Path, dim: int) -> np.ndarray:
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc}); pass (N, D) float "
                         "descriptors saved with numpy.save") from exc
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating) or len(x) < 2:
        raise InputError(f"{path}: holds {x.dtype} {x.shape}; expected (N, D) float descriptors "
                         "with N >= 2")
    x = fit_dim(np.asarray(x), dim)
    if not np.isfinite(x).all():
        raise InputError(f"{path}: contains NaN or Inf")
    return x


def distractor_block(real: np.ndarray, j: int, seed: int) -> np.ndarray:
    """Block ``j`` >= 1 of distractors derived from the real descriptors (see module doc)."""
    rng = np.random.default_rng([seed, j])
    if j % 4 == 0:
        noise = rng.standard_normal(real.shape, dtype=np.float32) / np.sqrt(real.shape[1])
        return normalize(real + noise)
    perm = rng.permutation(real.shape[1])
    signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=real.shape[1])
    return real[:, perm] * signs


@dataclass
class BenchData:
    """A database given as deterministic blocks (regenerated per index kind, never held twice)
    and the queries."""

    kind: str
    n: int
    dim: int
    queries: np.ndarray
    block: Callable[[int, int], np.ndarray]  # (block number, rows still wanted) -> rows
    block_rows: int
    note: str

    def blocks(self) -> Iterator[np.ndarray]:
        done, j = 0, 0
        while done < self.n:
            b = self.block(j, self.n - done)[: self.n - done]
            done += len(b)
            j += 1
            yield b


def synthetic_data(n: int, dim: int, queries: int, seed: int = 0,
                   spread: float = 0.6, noise: float = 0.5) -> BenchData:
    rows = min(n, max(1024, (64 << 20) // (4 * dim)))
    clusters = max(1, min(n // 50, 20_000))
    centres = cluster_centres(dim, clusters, seed)

    def block(j: int, wanted: int = rows) -> np.ndarray:
        return clustered_block(centres, min(rows, wanted), spread,
                               np.random.default_rng([seed, 1, j]))

    # Blocks are i.i.d., so query sources drawn from the first block are a fair sample.
    first = block(0)
    q, _ = noisy_queries(first, min(queries, len(first)), noise=noise, seed=seed + 2)
    return BenchData("synthetic", n, dim, q, block, rows,
                     f"synthetic: {clusters} clusters (spread {spread}), queries = map rows + "
                     f"noise {noise} (cosine ~{1 / np.sqrt(1 + noise ** 2):.2f})")


def real_data(n: int, dim: int, queries: int, descriptors: Path, query_file: Path | None,
              seed: int = 0) -> BenchData:
    real = load_descriptor_file(descriptors, dim)
    if query_file is not None:
        q = load_descriptor_file(query_file, dim)[:queries]
        note_q = f"queries: {len(q)} rows of {query_file.name}"
    else:
        rng = np.random.default_rng(seed)
        held = rng.choice(len(real), size=min(queries, len(real) // 2), replace=False)
        keep = np.setdiff1d(np.arange(len(real)), held)
        q, real = real[held], real[keep]
        note_q = f"queries: {len(q)} rows held out of {descriptors.name}"

    def block(j: int, wanted: int) -> np.ndarray:
        return real if j == 0 else distractor_block(real[:wanted], j, seed)

    return BenchData("real", n, dim, q, block, len(real),
                     f"real: {len(real)} rows of {descriptors.name} (dim fitted to {dim}), grown "
                     f"to {n} with distractors (signed-permutation copies; every 4th block "
                     f"noisy near-duplicates, cosine ~0.71); {note_q}")


# -- measurement --------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    faiss = load_faiss()

    return {"cpu": model, "cores": cores, "ram_gib": round(total / GIB, 1),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "faiss": faiss.__version__, "numpy": np.__version__}


@dataclass
class SearchBenchConfig:
    dim: int = 4096
    sizes: Sequence[int] = (100_000,)
    indexes: Sequence[str] = ("flat:float32", "flat:float16", "binary:float16",
                              "hnsw:float32", "ivfpq:float32")
    queries: int = 200
    latency_queries: int = 50
    batch: int = 64
    k: int = 10
    descriptors: Path | None = None
    query_file: Path | None = None
    workdir: Path | None = None
    seed: int = 0
    save_load: bool = True
    memory_fraction: float = 0.8
    #: numpy BLAS threads (0: library default). With OpenBLAS's default team on a shared 2-core
    #: machine, the (1, D) x (D, bits) projection of one query took 8-80 ms instead of 0.2 ms;
    #: the node caps BLAS at 1 thread (blas_threads in config/vpr_*.yaml).
    blas_threads: int = 0
    progress: Callable[[str], None] = field(default=lambda msg: None)


def parse_index(spec: str) -> tuple[str, str, dict[str, int | str]]:
    """``KIND[:DTYPE][:key=value+key=value]`` -> (kind, dtype, parameters), e.g.
    ``binary:float16:rerank=300``, ``binary:float16:codes=simhash`` or
    ``hnsw:float32:M=16+ef_search=64``. Values are integers or names (letters)."""
    from vpr_ros.mapdb.index import KINDS

    kind, _, rest = spec.partition(":")
    dtype, _, raw = rest.partition(":")
    dtype = dtype or "float32"
    params: dict[str, int | str] = {}
    for item in filter(None, raw.split("+")):
        key, eq, value = item.partition("=")
        if eq and value.lstrip("-").isdigit():
            params[key] = int(value)
        elif eq and value.isidentifier():
            params[key] = value
        else:
            raise ConfigError(f"index {spec!r}: parameter {item!r} must be key=integer or "
                              "key=name")
    if kind not in KINDS or dtype not in ("float32", "float16"):
        raise ConfigError(f"index {spec!r}: expected KIND[:DTYPE][:key=value+...] with KIND in "
                          f"{sorted(KINDS)} and DTYPE float32 or float16")
    return kind, dtype, params


def estimated_bytes(kind: str, dtype: str, n: int, dim: int, save_load: bool = True) -> int:
    """Peak resident memory to build and search one map: the descriptors, the index, and for
    fp16 exact search the faiss copy it scans (which replaces the in-memory descriptors when the
    map is saved and re-loaded memory-mapped, as the node does)."""
    desc = n * dim * np.dtype(dtype).itemsize
    extra = {"flat": desc if dtype == "float16" and not save_load else 0,
             "hnsw": desc + n * 32 * 2 * 8,
             "ivfpq": n * 80 + min(n, 50_000) * dim * 4,
             "binary": n * 64 + 100 * dim * 4}[kind]
    return desc + extra + 256 * dim * 4 * 64


def percentile_ms(samples: Sequence[float], p: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, p))


def too_big(kind: str, dtype: str, n: int, dim: int, fraction: float,
            save_load: bool = True) -> str | None:
    """Why a configuration is skipped (it would not fit in available memory), or None."""
    need = estimated_bytes(kind, dtype, n, dim, save_load)
    avail = available_bytes()
    if need > fraction * avail:
        return f"needs ~{need / GIB:.1f} GiB, {avail / GIB:.1f} GiB available"
    return None


def bench_one(data: BenchData, kind: str, dtype: str, params: dict[str, int | str],
              cfg: SearchBenchConfig, workdir: Path) -> dict[str, Any]:
    from vpr_ros.mapdb import Keyframe, PlaceMap

    label = kind + "".join(f" {k}={v}" for k, v in params.items())
    row: dict[str, Any] = {"index": label, "dtype": dtype, "n": data.n, "dim": data.dim}
    why = too_big(kind, dtype, data.n, data.dim, cfg.memory_fraction, cfg.save_load)
    if why:
        row["skipped"] = why
        return row
    gc.collect()
    rss0 = rss_bytes()
    pm = PlaceMap.create(data.dim, "bench", {"kind": kind, **params}, dtype)
    t0 = time.perf_counter()
    done = 0
    for block in data.blocks():
        kfs = [Keyframe(session="bench", stamp_ns=done + i) for i in range(len(block))]
        pm.add(block, kfs)
        done += len(block)
        cfg.progress(f"{label}:{dtype} n={data.n}: built {done}/{data.n}")
    row["build_s"] = round(time.perf_counter() - t0, 2)
    row["rss_build_mib"] = round((rss_bytes() - rss0) / 2**20)
    row["descriptor_mib"] = round(data.n * data.dim * np.dtype(dtype).itemsize / 2**20)
    if cfg.save_load:
        path = workdir / "map"
        t0 = time.perf_counter()
        pm.save(path)
        row["save_s"] = round(time.perf_counter() - t0, 2)
        del pm
        gc.collect()
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        pm = PlaceMap.load(path, expected_fingerprint="bench")
        row["load_s"] = round(time.perf_counter() - t0, 2)
    q = data.queries
    cfg.progress(f"{label}:{dtype} n={data.n}: exact reference")
    ref_ids, _ = pm.search_exact(q, cfg.k)
    for i in range(min(3, len(q))):  # warm-up: page in codes / build lazy scan structures
        pm.search(q[i: i + 1], cfg.k)
    cfg.progress(f"{label}:{dtype} n={data.n}: single-query latency")
    lat, cpu = [], []
    for i in range(min(cfg.latency_queries, len(q))):
        c0, t0 = time.process_time(), time.perf_counter()
        pm.search(q[i: i + 1], cfg.k)
        lat.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    cfg.progress(f"{label}:{dtype} n={data.n}: batch throughput")
    ids = np.empty_like(ref_ids)
    t0 = time.perf_counter()
    for s in range(0, len(q), cfg.batch):
        ids[s: s + cfg.batch] = pm.search(q[s: s + cfg.batch], cfg.k)[0]
    batch_s = time.perf_counter() - t0
    row["rss_search_mib"] = round((rss_bytes() - rss0) / 2**20)
    row["p50_ms"] = round(percentile_ms(lat, 50), 3)
    row["p99_ms"] = round(percentile_ms(lat, 99), 3)
    # CPU time of the process per query (all its threads): what the search costs, whatever the
    # other jobs on a shared machine do to the wall-clock figures.
    row["cpu_ms"] = round(percentile_ms(cpu, 50), 3)
    row["batch_qps"] = round(len(q) / batch_s, 1)
    row["r1_agreement"] = round(float((ids[:, 0] == ref_ids[:, 0]).mean()), 4)
    row["r10_agreement"] = round(float(np.mean(
        [len(set(a) & set(b)) / cfg.k for a, b in zip(ids, ref_ids)])), 4)
    if kind == "flat":
        scanned = data.n * data.dim * np.dtype(dtype).itemsize
        row["scan_gb_s"] = float(f"{scanned / (row['p50_ms'] / 1e3) / 1e9:.3g}")
    row["index_info"] = {k: v for k, v in pm.info()["index"].items() if k != "note"}
    del pm
    gc.collect()
    if cfg.save_load:
        import shutil

        shutil.rmtree(workdir / "map", ignore_errors=True)
    return row


def run_search_bench(cfg: SearchBenchConfig) -> dict[str, Any]:
    import tempfile

    if cfg.dim < 8:
        raise ConfigError(f"--dim {cfg.dim} is too small; use e.g. 1024, 4096 or 8192")
    specs = [parse_index(s) for s in cfg.indexes]
    if cfg.blas_threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=cfg.blas_threads, user_api="blas")
    results = []
    notes = {}
    with tempfile.TemporaryDirectory(prefix="vpr-bench-", dir=cfg.workdir) as tmp:
        for n in cfg.sizes:
            reasons = [too_big(kind, dtype, n, cfg.dim, cfg.memory_fraction, cfg.save_load)
                       for kind, dtype, _ in specs]
            if all(reasons):
                results += [{"index": kind, "dtype": dtype, "n": n, "dim": cfg.dim,
                             "skipped": why} for (kind, dtype, _), why in zip(specs, reasons)]
                continue
            if cfg.descriptors is not None:
                data = real_data(n, cfg.dim, cfg.queries, cfg.descriptors, cfg.query_file,
                                 cfg.seed)
            else:
                data = synthetic_data(n, cfg.dim, cfg.queries, cfg.seed)
            notes[data.kind] = data.note
            for kind, dtype, params in specs:
                cfg.progress(f"{kind}:{dtype} n={n} dim={cfg.dim}")
                results.append(bench_one(data, kind, dtype, params, cfg, Path(tmp)))
    reached = [r["n"] for r in results if "skipped" not in r]
    # Load average at the end: these figures are only comparable on an otherwise idle machine.
    return {"machine": machine(), "data": notes,
            "config": {"dim": cfg.dim, "sizes": list(cfg.sizes), "queries": cfg.queries,
                       "latency_queries": cfg.latency_queries, "batch": cfg.batch, "k": cfg.k,
                       "save_load": cfg.save_load, "blas_threads": cfg.blas_threads},
            "largest_n": max(reached) if reached else 0, "peak_rss_mib": round(max_rss_mib()),
            "results": results}


COLUMNS = [("index", "index"), ("dtype", "dtype"), ("n", "N"), ("dim", "D"),
           ("build_s", "build s"), ("rss_build_mib", "build RSS MiB"),
           ("load_s", "load s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
           ("cpu_ms", "CPU ms/q"),
           ("batch_qps", "batch q/s"), ("scan_gb_s", "scan GB/s"),
           ("r1_agreement", "R@1 agr"), ("r10_agreement", "R@10 agr")]


def format_table(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table (one row per index, skipped ones say why)."""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in report["results"]:
        if "skipped" in r:
            lines.append(f"| {r['index']} | {r['dtype']} | {r['n']} | {r['dim']} | skipped: "
                         f"{r['skipped']} |")
            continue
        lines.append("| " + " | ".join(str(r.get(key, "")) for key, _ in COLUMNS) + " |")
    m = report["machine"]
    lines.append("")
    blas = report.get("config", {}).get("blas_threads", 0)
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, load average "
                 f"{m['load_average']} at the end; faiss {m['faiss']}, numpy {m['numpy']}"
                 + (f"; numpy BLAS threads {blas}" if blas else ""))
    for note in report["data"].values():
        lines.append(f"data: {note}")
    lines.append(f"largest N reached: {report['largest_n']}")
    return "\n".join(lines)


def to_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
