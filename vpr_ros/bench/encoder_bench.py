"""`vpr bench encoder`: latency, throughput and memory of each backend x precision x model x
input size, with the ratio to PyTorch fp32 measured in the same run; ``--accuracy``: the
Nordland held-out Recall@1 of each backend x precision next to fp32's.

Per cell: p50/p95 latency of ``encode`` at batch 1, throughput (images/s) at batch 8 and 32, and
peak memory (on CPU the peak RSS growth of the process from before the encoder was opened; on
GPU ``torch.cuda.max_memory_allocated``, plus the TensorRT context's own device memory).

Why each cell runs in its own process: RSS growth is only meaningful in a fresh process, torch
and ONNX Runtime keep global thread pools that would otherwise leak settings from one cell into
the next, and a backend that crashes or runs out of memory must not take the table down.

What is timed is ``Encoder.encode`` on uint8 RGB images already at the model's input size: the
whole per-frame cost (normalisation, host/device copies, inference, the NaN check) except the
resize, which depends on the camera. Models are built from ``config/models/*.yaml`` with random
weights (speed does not depend on the values), kept with their exports in ``--workdir``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vpr_ros.errors import BackendError, ConfigError

#: Backend names of the benchmark -> load_encoder arguments (and how to prepare the artifact).
BACKENDS: dict[str, dict[str, Any]] = {
    "torch-cpu": {"backend": "torch", "device": "cpu", "artifact": "model_dir"},
    "torch-cuda": {"backend": "torch", "device": "cuda", "precision": "fp32",
                   "artifact": "model_dir"},
    "torch-cuda-fp16": {"backend": "torch", "device": "cuda", "precision": "fp16",
                        "artifact": "model_dir"},
    "torch-cpu-bf16": {"backend": "torch:bf16", "device": "cpu", "artifact": "model_dir"},
    "onnxruntime-cpu": {"backend": "onnxruntime", "device": "cpu", "artifact": "onnx"},
    "onnxruntime-cpu-int8": {"backend": "onnxruntime:int8", "device": "cpu", "artifact": "onnx"},
    "openvino-cpu-fp32": {"backend": "openvino:fp32", "device": "cpu", "artifact": "onnx"},
    "openvino-cpu-bf16": {"backend": "openvino:bf16", "device": "cpu", "artifact": "onnx"},
    "openvino-cpu-fp16": {"backend": "openvino:fp16", "device": "cpu", "artifact": "onnx"},
    "onnxruntime-cpu-untuned": {"backend": "onnxruntime", "device": "cpu", "tuned": False,
                                "artifact": "onnx"},
    "onnxruntime-cpu-spin": {"backend": "onnxruntime", "device": "cpu", "spin": True,
                             "artifact": "onnx"},
    "onnxruntime-cuda": {"backend": "onnxruntime", "device": "cuda", "provider": "cuda",
                         "artifact": "onnx"},
    "onnxruntime-tensorrt": {"backend": "onnxruntime", "device": "cuda",
                             "provider": "tensorrt", "artifact": "onnx"},
    "tensorrt": {"backend": "tensorrt", "device": "cuda", "artifact": "engine"},
}
DEFAULT_MODELS = ("dinov2s_gem", "qaa_dinov2b_8192")
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "config" / "models"


def default_backends() -> list[str]:
    """Every backend x precision this machine can run (reduced precisions where the CPU has
    the instructions for them, as ``auto`` offers them)."""
    from vpr_ros.runtime.backend_select import probe
    from vpr_ros.runtime.cpu_features import cpu_info

    avail, cpu = probe(), cpu_info()
    names = ["torch-cpu"] + (["torch-cpu-bf16"] if cpu.bf16 else [])
    if avail.onnxruntime:
        names += ["onnxruntime-cpu"] + (["onnxruntime-cpu-int8"] if cpu.int8 else [])
    if avail.openvino_cpu is not None:
        names.append("openvino-cpu-fp32")
        if cpu.bf16 and "BF16" in avail.openvino_cpu:
            names.append("openvino-cpu-bf16")
        if "FP16" in avail.openvino_cpu:
            names.append("openvino-cpu-fp16")
    if avail.torch_cuda:
        names += ["torch-cuda", "torch-cuda-fp16"]
        if "CUDAExecutionProvider" in avail.ort_providers:
            names.append("onnxruntime-cuda")
        if avail.tensorrt:
            names.append("tensorrt")
    return names


def resolve_config(name: str) -> Path:
    """``dinov2s_gem`` / ``config/models/x.yaml`` / any YAML path -> the file."""
    p = Path(name)
    for cand in (p, REPO_CONFIGS / p, REPO_CONFIGS / f"{name}.yaml", Path.cwd() / "config" /
                 "models" / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"model config {name!r} not found (looked in {REPO_CONFIGS}); give a "
                      "YAML path or a name from config/models/")


def ensure_model_dir(config: str | Path, root: Path, size: Optional[int] = None,
                     seed: int = 0) -> Path:
    """A model directory for ``config`` at ``size`` (default: its own), with the config's
    backbone weights or random ones (with trained-like layer scales), created once under
    ``root`` and reused."""
    import torch

    from vpr_ros.models.config import load_yaml, model_config_from_dict
    from vpr_ros.models.model_dir import init_model, save_model_dir

    path = resolve_config(str(config))
    data = load_yaml(path)
    cfg = model_config_from_dict(data, source=str(path))
    if size:
        cfg = cfg.with_input_size((int(size), int(size)))
    out = root / f"{cfg.name}_{cfg.input.size[0]}x{cfg.input.size[1]}"
    if (out / "model.json").is_file() and (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(seed)
    weights = dict(data.get("weights") or {})
    model = init_model(cfg, weights)
    if weights.get("backbone") in (None, "none", "random"):
        trained_like_layer_scales(model)
    save_model_dir(model, out, extra={"init_config": str(path), "purpose": "benchmark"})
    return out


def trained_like_layer_scales(model, low: float = 0.05, high: float = 0.5) -> int:
    """Set ViT LayerScale factors to magnitudes trained DINOv2 models have.

    timm initialises them at 1e-5, which makes every block of a random ViT nearly the identity:
    its descriptors would hide any numerical difference between backends in the attention and
    MLPs (speed is unaffected either way). Returns the number of factors set."""
    import torch

    count = 0
    with torch.no_grad():
        for module in model.modules():
            gamma = getattr(module, "gamma", None)
            if type(module).__name__ == "LayerScale" and isinstance(gamma, torch.Tensor):
                gamma.uniform_(low, high)
                count += 1
    return count


def prepare_artifact(kind: str, model_dir: Path, root: Path) -> Path:
    """The file a backend runs: the model dir, its ONNX export, or a TensorRT engine."""
    from vpr_ros.runtime.backend_select import cached_onnx

    if kind == "model_dir":
        return model_dir
    onnx_path = cached_onnx(model_dir, root / "exports")
    if kind == "onnx":
        return onnx_path
    from vpr_ros.export.tensorrt_build import build_engine

    engine = onnx_path.with_suffix(".engine")
    if not engine.is_file():
        build_engine(onnx_path, engine, max_batch=32, opt_batch=1,
                     timing_cache=root / "exports" / "timing.cache")
    return engine


# -- one cell --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    backend: str
    artifact: str
    model: str
    size: int
    batches: tuple[int, ...] = (8, 32)
    latency_iters: int = 30
    min_time_s: float = 3.0
    threads: Optional[int] = None
    warmup: int = 3


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the peak of this cell can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def timed(fn: Callable[[], Any], iters: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_cell(cell: Cell) -> dict[str, Any]:
    """Measure one backend x model x size in this process."""
    from vpr_ros.runtime.encoder import load_encoder

    spec = dict(BACKENDS[cell.backend])
    spec.pop("artifact")
    gpu = spec["device"] == "cuda"
    if gpu:
        import torch

        torch.cuda.reset_peak_memory_stats()
    if cell.threads:
        spec["threads"] = cell.threads
    rss0 = _rss()
    peak_ok = _reset_peak_rss()
    t0 = time.perf_counter()
    enc = load_encoder(cell.artifact, **spec)
    load_s = time.perf_counter() - t0
    h, w = enc.input_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(max(cell.batches + (1,)), h, w, 3), dtype=np.uint8)
    one = images[:1]
    for _ in range(cell.warmup):
        enc.encode(one)
    lat = np.array(timed(lambda: enc.encode(one), cell.latency_iters)) * 1e3
    row: dict[str, Any] = {
        "backend": enc.backend, "model": cell.model, "size": cell.size,
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p95_ms": round(float(np.percentile(lat, 95)), 2), "load_s": round(load_s, 2),
        "load_average_1m": round(os.getloadavg()[0], 2)}
    for b in cell.batches:
        batch = images[:b]
        enc.encode(batch)
        times: list[float] = []
        cpu0 = time.process_time()
        while len(times) < 2 or sum(times) < cell.min_time_s:
            times += timed(lambda: enc.encode(batch), 1)
        row[f"ips_b{b}"] = round(b * len(times) / sum(times), 2)
        # CPU time of all the process's threads per image: the cost to a shared CPU, and a
        # figure load from other processes distorts far less than wall time
        row[f"cpu_ms_b{b}"] = round((time.process_time() - cpu0) * 1e3 / (b * len(times)), 1)
    if gpu:
        import torch

        mem = torch.cuda.max_memory_allocated()
        ctx = getattr(getattr(enc, "_engine", None), "device_memory_size", 0) or 0
        row["peak_mib"] = round((mem + int(ctx)) / 2**20, 1)
        row["memory"] = "cuda max_memory_allocated" + (" + TensorRT context" if ctx else "")
    else:
        row["peak_mib"] = round(((_peak_rss() if peak_ok else _rss()) - rss0) / 2**20, 1)
        row["memory"] = "peak RSS growth" if peak_ok else "RSS growth (peak unavailable)"
    return row


# -- the table -------------------------------------------------------------------------------

@dataclass
class EncoderBenchConfig:
    backends: Sequence[str] = field(default_factory=default_backends)
    models: Sequence[str] = DEFAULT_MODELS
    sizes: Sequence[Optional[int]] = (None,)
    batches: tuple[int, ...] = (8, 32)
    latency_iters: int = 30
    min_time_s: float = 3.0
    threads: Optional[int] = None
    warmup: int = 3
    rounds: int = 1
    workdir: Path = field(default_factory=lambda: Path(
        os.environ.get("VPR_CACHE_DIR") or Path.home() / ".cache" / "vpr_ros") / "bench")
    in_process: bool = False


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    from vpr_ros.cpu_cores import usable_cores

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    from vpr_ros.runtime.cpu_features import cpu_info

    info: dict[str, Any] = {"cpu": cpu, "cores": usable_cores(),
                            "cpu_flags": sorted(cpu_info().flags),
                            "load_average": [round(v, 2) for v in os.getloadavg()],
                            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import openvino

        info["openvino"] = openvino.__version__.split("-")[0]
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _spawn(cell: Cell) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "vpr_ros.bench.encoder_bench", json.dumps(asdict(cell))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0]}
    return json.loads(lines[-1])


def run_encoder_bench(cfg: EncoderBenchConfig,
                      progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Every backend x model x size; a cell that fails is reported with its error."""
    unknown = sorted(set(cfg.backends) - set(BACKENDS))
    if unknown:
        raise ConfigError(f"unknown backend(s) {unknown}; choose from {sorted(BACKENDS)}")
    if not cfg.batches or min(cfg.batches) < 1:
        raise ConfigError("batches must be positive integers")
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    load_start = [round(v, 2) for v in os.getloadavg()]
    cells: list[tuple[dict[str, Any], Optional[Cell]]] = []
    for model in cfg.models:
        for size in cfg.sizes:
            model_dir = ensure_model_dir(model, cfg.workdir / "models", size)
            from vpr_ros.models.model_dir import read_model_meta

            real_size = read_model_meta(model_dir).config.input.size[0]
            for backend in cfg.backends:
                base = {"backend": backend, "model": Path(str(model)).stem, "size": real_size}
                try:
                    artifact = prepare_artifact(BACKENDS[backend]["artifact"], model_dir,
                                                cfg.workdir)
                except (BackendError, ConfigError) as exc:
                    cells.append(({**base, "error": str(exc)}, None))
                    continue
                except Exception as exc:  # an export/build failure is a result, not a crash
                    cells.append(({**base, "error": f"{type(exc).__name__}: {exc}"}, None))
                    continue
                cells.append((base, Cell(
                    backend=backend, artifact=str(artifact), model=base["model"],
                    size=real_size, batches=tuple(cfg.batches), latency_iters=cfg.latency_iters,
                    min_time_s=cfg.min_time_s, threads=cfg.threads, warmup=cfg.warmup)))
    # Rounds interleave the cells (A B C, A B C, ...) so that load from other processes hits
    # every backend alike; each figure is the median over rounds.
    runs: list[list[dict[str, Any]]] = [[] for _ in cells]
    for r in range(max(1, cfg.rounds)):
        for i, (base, cell) in enumerate(cells):
            if cell is None:
                continue
            if progress:
                progress(f"round {r + 1}: {base['backend']} {base['model']} {base['size']}px")
            runs[i].append(run_cell(cell) if cfg.in_process else _spawn(cell))
    rows = [base if cell is None else {**base, **merge_rounds(results)}
            for (base, cell), results in zip(cells, runs)]
    return {"machine": {**machine(), "load_average_start": load_start}, "rows": rows,
            "batches": list(cfg.batches), "rounds": max(1, cfg.rounds),
            "speedups": speedups(rows)}


def merge_rounds(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over rounds (the first error, if every round failed)."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"error": results[0]["error"] if results else "not run"}
    merged = dict(ok[0])
    for key, value in ok[0].items():
        if isinstance(value, float):  # measurements; ints (size) and strings identify
            merged[key] = round(float(np.median([r[key] for r in ok if key in r])), 2)
    merged["rounds_ok"] = len(ok)
    return merged


def speedups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each backend relative to PyTorch fp32 eager on the same device, model and size, from
    the same run: batch-1 p50 latency (``x_p50``: how many times faster), throughput
    (``x_bN``) and CPU time per image (``cpu_x_bN``)."""
    out = []
    for r in rows:
        if "error" in r or r["backend"] in ("torch-cpu-fp32", "torch-cuda-fp32"):
            continue
        device = "cpu" if "cpu" in r["backend"] else "cuda"
        ref = next((t for t in rows if "error" not in t and t["model"] == r["model"]
                    and t["size"] == r["size"] and t["backend"] == f"torch-{device}-fp32"),
                   None)
        if ref is None:
            continue
        keys = [k for k in r if k.startswith("ips_b")]
        cpu = [k for k in r if k.startswith("cpu_ms_b")]
        out.append({"backend": r["backend"], "model": r["model"], "size": r["size"],
                     "vs": ref["backend"],
                     **({"x_p50": round(ref["p50_ms"] / r["p50_ms"], 2)}
                        if r.get("p50_ms") else {}),
                     **{f"x_{k[4:]}": round(r[k] / ref[k], 2) for k in keys if ref.get(k)},
                     **{f"cpu_x_{k[7:]}": round(ref[k] / r[k], 2) for k in cpu
                        if ref.get(k) and r[k]}})
    return out


def format_table(result: dict[str, Any]) -> str:
    batches = result["batches"]
    head = ["backend", "model", "size", "p50 ms (b1)", "p95 ms (b1)",
            *[f"img/s b{b}" for b in batches], *[f"CPU ms/img b{b}" for b in batches],
            "peak MiB", "load s", f"x torch fp32 (b1 / b{batches[0]})"]
    ratio = {(s["backend"], s["model"], s["size"]): s for s in result["speedups"]}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['model']} | {r['size']} | error: "
                         f"{r['error'][:120]} |")
            continue
        x = ratio.get((r["backend"], r["model"], r["size"]))
        cells = [r["backend"], r["model"], str(r["size"]), f"{r['p50_ms']:.1f}",
                 f"{r['p95_ms']:.1f}", *[f"{r.get(f'ips_b{b}', float('nan')):.2f}"
                                         for b in batches],
                 *[f"{r.get(f'cpu_ms_b{b}', float('nan')):.0f}" for b in batches],
                 f"{r['peak_mib']:.0f}", f"{r['load_s']:.1f}",
                 "1 (reference)" if r["backend"].startswith("torch-") and r["backend"].endswith(
                     "-fp32") else (f"{x.get('x_p50', float('nan')):.2f} / "
                                    f"{x.get(f'x_b{batches[0]}', float('nan')):.2f}"
                                    if x else "")]
        lines.append("| " + " | ".join(cells) + " |")
    for s in result["speedups"]:
        xs = ", ".join(f"{k[2:]} x{v}" for k, v in s.items()
                       if k.startswith("x_") and k != "x_p50")
        cx = ", ".join(f"{k[6:]} x{v}" for k, v in s.items() if k.startswith("cpu_x_"))
        lines.append(f"\n{s['backend']} vs {s['vs']} ({s['model']} {s['size']}px): batch 1 "
                     f"x{s.get('x_p50', float('nan'))} faster, throughput {xs}"
                     + (f"; CPU time per image {cx} less" if cx else ""))
    m = result["machine"]
    lines.append(f"\nmachine: {m['cpu']} [{' '.join(m.get('cpu_flags', []))}], {m['cores']} "
                 f"cores, load {m.get('load_average_start', '?')} at the start and "
                 f"{m['load_average']} at the end ({result.get('rounds', 1)} interleaved "
                 f"round(s), medians), torch {m['torch']}, onnxruntime {m['onnxruntime']}"
                 + (f", openvino {m['openvino']}" if "openvino" in m else "")
                 + (f", GPU {m['gpu']}" if "gpu" in m else ""))
    return "\n".join(lines)


def _main(argv: Sequence[str]) -> int:
    """``python -m vpr_ros.bench.encoder_bench CELL_JSON``: one cell, JSON on stdout."""
    doc = json.loads(argv[0])
    doc["batches"] = tuple(doc["batches"])
    print(json.dumps(run_cell(Cell(**doc))))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
