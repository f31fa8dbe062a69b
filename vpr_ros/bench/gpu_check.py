"""One prepared run of every GPU measurement and check, written to one JSON file.

Why one script: a machine with a GPU is lent to this project only sometimes, for minutes, with no
network. ``scripts/gpu_check.sh`` runs this module there from a plain copy of the repository
(torch, timm and onnxruntime installed; the project venv absent): the CUDA tests that skip
elsewhere, CUDA fp16 against fp32 descriptors of real images, the GPU preprocessing twin against
the CPU preprocessing, encoder latency/throughput rows, and a map-search row where a GPU build of
faiss imports. Every part that cannot run records why under ``skipped`` instead of failing the
run, so whatever the machine allows comes back.

``--cpu-dry-run`` runs the same code on the CPU with tiny sizes (what CI checks: the JSON's shape,
and that every CUDA-only part states its skip).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[2]

#: The encoder rows: (name in the JSON, model config, input size).
MODELS = (("dinov2b_qaa8192_322", "qaa_dinov2b_8192", 322),
          ("dinov2s_gem_224", "dinov2s_gem", 224))
#: Variants of each row: (name, backend, precision, CUDA graphs).
VARIANTS = (("torch_fp32", "torch", "fp32", False),
            ("torch_fp16", "torch", "fp16", False),
            ("torch_fp16_cuda_graphs", "torch", "fp16", True),
            ("onnxruntime_cuda", "onnxruntime", "fp32", False))
#: Tests whose CUDA / faiss-GPU parts skip on machines without a GPU.
CUDA_TESTS = ("test/test_backends_parity.py", "test/test_backends_preprocess.py",
              "test/test_float_resize.py", "test/test_backends_bad_input.py",
              "test/test_backends_select.py", "test/test_mapdb_gpu.py")
FP16_TARGET_COSINE = 0.999
MODULES = ("torch", "timm", "numpy", "cv2", "safetensors", "yaml", "onnx", "onnxruntime",
           "faiss", "pytest", "tensorrt")


class Skip(Exception):
    """A part that cannot run here; its message is the reason recorded in the JSON."""


def _version(name: str) -> Optional[str]:
    try:
        mod = importlib.import_module(name)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "present"))


def environment() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "processor": platform.processor() or None,
                           "cpus": os.cpu_count(), "modules": {m: _version(m) for m in MODULES}}
    try:
        out["load_avg"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import torch

        out["cuda"] = bool(torch.cuda.is_available())
        if out["cuda"]:
            out["gpu"] = torch.cuda.get_device_name(0)
            out["cuda_version"] = torch.version.cuda
            free, total = torch.cuda.mem_get_info()
            out["gpu_memory_gib"] = round(total / 2 ** 30, 1)
    except Exception as exc:
        out["cuda"] = False
        out["cuda_error"] = str(exc)[:200]
    try:
        import onnxruntime as ort

        out["ort_providers"] = list(ort.get_available_providers())
    except Exception:
        out["ort_providers"] = []
    return out


def _stats_ms(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 3),
            "p95_ms": round(float(np.percentile(a, 95)), 3), "n": len(samples)}


def real_images(count: int, size: int) -> list[np.ndarray]:
    """``count`` real Nordland frames (both seasons, spread along the line) at ``size``."""
    try:
        from vpr_ros.datasets.nordland import frame_numbers, load_images, nordland_root

        root = nordland_root()
    except Exception as exc:
        raise Skip(f"the shared Nordland data is not readable here ({exc})") from None
    import cv2

    frames = frame_numbers(root)[100:3500:max(1, 3400 // count)][:count]
    imgs = load_images(root, "summer", frames[: count // 2]) + \
        load_images(root, "winter", frames[count // 2:])
    return [cv2.resize(i, (size, size), interpolation=cv2.INTER_LINEAR) for i in imgs]


class Check:
    """Runs the parts and collects rows and skips."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = bool(args.cpu_dry_run)
        self.env = environment()
        self.cuda = bool(self.env.get("cuda")) and not self.dry
        self.device = "cuda" if self.cuda else "cpu"
        self.workdir = Path(args.workdir)
        self.result: dict[str, Any] = {
            "schema": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dry_run": self.dry, "device": self.device, "environment": self.env,
            "fp16_target_cosine": FP16_TARGET_COSINE, "tests": None, "parity": [],
            "preprocess": [], "encoders": [], "map_search": [], "skipped": {}}

    def part(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Skip as exc:
            self.result["skipped"][name] = str(exc)
        except Exception as exc:  # a failure is recorded, the other parts still run
            self.result["skipped"][name] = f"failed: {type(exc).__name__}: {exc}"[:500]
            self.result.setdefault("tracebacks", {})[name] = traceback.format_exc()[-3000:]

    def size(self, native: int) -> int:
        return 56 if self.dry else native

    def model_dir(self, config: str, size: int) -> Path:
        from vpr_ros.bench.encoder_bench import ensure_model_dir

        return ensure_model_dir(config, self.workdir / "models", size)

    # -- parts -----------------------------------------------------------------------------------

    def tests(self) -> None:
        if self.dry:
            raise Skip("dry run: the CUDA tests are run by the check itself, not from its test")
        if self.env["modules"].get("pytest") is None:
            raise Skip("pytest is not installed here (add its wheel with GPU_CHECK_WHEELS)")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               *CUDA_TESTS]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              timeout=self.args.tests_timeout)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        self.result["tests"] = {"command": " ".join(cmd[1:]), "returncode": proc.returncode,
                                "seconds": round(time.time() - t0, 1),
                                "summary": lines[-1] if lines else "",
                                "tail": lines[-40:]}

    def models(self) -> list[tuple[str, str, int]]:
        chosen = [m for m in MODELS if not self.args.models or m[0] in self.args.models]
        if not chosen:
            raise Skip(f"--models {self.args.models} names none of {[m[0] for m in MODELS]}")
        return chosen

    def parity(self) -> None:
        if not self.cuda and not self.dry:
            raise Skip("no CUDA GPU: fp16 vs fp32 cosine needs one")
        from vpr_ros.export.parity import encoder_parity
        from vpr_ros.runtime.encoder import load_encoder

        # dry run: CPU fp32 against itself, so the plumbing runs (cosine 1 means nothing)
        cand = ("cuda", "fp16") if self.cuda else ("cpu", "fp32")
        for name, config, native in self.models():
            size = self.size(native)
            imgs = real_images(self.args.images, size)
            d = self.model_dir(config, size)
            fp32 = load_encoder(d, backend="torch", device=self.device, precision="fp32")
            fp16 = load_encoder(d, backend="torch", device=cand[0], precision=cand[1])
            half = len(imgs) // 2
            rep = encoder_parity(fp32, fp16, imgs[:half], imgs[half:])
            self.result["parity"].append({
                "model": name, "compared": f"{fp16.backend} vs {fp32.backend}",
                "images": len(imgs), "min_cosine": round(rep.min_cosine, 6),
                "mean_cosine": round(float(getattr(rep, "mean_cosine", rep.min_cosine)), 6),
                "top1_agreement": rep.top1_agreement,
                "meets_target": rep.min_cosine >= FP16_TARGET_COSINE})

    def preprocess(self) -> None:
        if not self.cuda and not self.dry:
            raise Skip("no CUDA GPU: the GPU preprocessing twin needs one")
        import torch

        from vpr_ros.runtime.preprocess import preprocess_batch
        from vpr_ros.runtime.torch_encoder import TorchEncoder
        from vpr_ros.runtime.torch_preprocess import TorchPreprocessor

        for name, config, native in self.models():
            size = self.size(native)
            prep = TorchEncoder.from_model_dir(self.model_dir(config, size)).preprocessing
            imgs = real_images(self.args.images, 2 * size)  # a real resize on both paths
            cpu = preprocess_batch(imgs, prep)
            gpu = TorchPreprocessor(prep, self.device)(imgs)
            if self.cuda:
                torch.cuda.synchronize()
            diff = np.abs(gpu.cpu().numpy() - cpu)
            self.result["preprocess"].append({
                "model": name, "twin_device": self.device, "images": len(imgs),
                "interpolation": getattr(prep, "interpolation", "opencv"),
                "max_abs_diff": round(float(diff.max()), 6),
                "mean_abs_diff": round(float(diff.mean()), 8)})

    def encoders(self) -> None:
        import torch

        from vpr_ros.bench.encoder_bench import timed
        from vpr_ros.runtime.encoder import load_encoder

        iters, batch = (3, 4) if self.dry else (self.args.iters, 32)
        rng = np.random.default_rng(0)
        for name, config, native in self.models():
            size = self.size(native)
            d = self.model_dir(config, size)
            one = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8)]
            many = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
            for variant, backend, precision, graphs in VARIANTS:
                key = f"encoder {name} {variant}"
                try:
                    enc = self._open(d, backend, precision, graphs)
                    sync = torch.cuda.synchronize if self.cuda else (lambda: None)

                    def run(frames):
                        enc.encode(frames)
                        sync()

                    lat = timed(lambda: run(one), iters, warmup=3)
                    tput = timed(lambda: run(many), max(2, iters // 5), warmup=1)
                    mem = (round(torch.cuda.max_memory_allocated() / 2 ** 20)
                           if self.cuda else None)
                    self.result["encoders"].append({
                        "model": name, "input": size, "variant": variant,
                        "backend": enc.backend, "device": self.device,
                        "batch1": _stats_ms(lat),
                        f"batch{batch}_images_per_s": round(batch / float(np.median(tput)), 2),
                        "torch_peak_mib": mem})
                    del enc
                    if self.cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                except Skip as exc:
                    self.result["skipped"][key] = str(exc)
                except Exception as exc:
                    self.result["skipped"][key] = f"failed: {type(exc).__name__}: {exc}"[:500]

    def _open(self, model_dir: Path, backend: str, precision: str, graphs: bool):
        from vpr_ros.runtime.encoder import load_encoder

        if backend == "onnxruntime":
            if "CUDAExecutionProvider" not in self.env.get("ort_providers", []):
                raise Skip("onnxruntime has no CUDAExecutionProvider here (providers: "
                           f"{', '.join(self.env.get('ort_providers', [])) or 'none'})")
            if not self.cuda:
                raise Skip("no CUDA GPU")
            from vpr_ros.bench.encoder_bench import prepare_artifact

            onnx = prepare_artifact("onnx", model_dir, self.workdir)
            return load_encoder(onnx, backend="onnxruntime", device="cuda")
        if not self.cuda and (precision == "fp16" or graphs):
            raise Skip("no CUDA GPU: fp16 and CUDA graphs run on CUDA only")
        return load_encoder(model_dir, backend="torch", device=self.device,
                            precision=precision, cuda_graphs=graphs if self.cuda else None)

    def map_search(self) -> None:
        try:
            from vpr_ros.mapdb.index.gpu import gpu_support
        except Exception as exc:
            raise Skip(f"faiss does not import here ({exc})") from None
        count, why = gpu_support()
        if count == 0:
            raise Skip(f"no GPU build of faiss: {why}")
        from vpr_ros.bench.encoder_bench import timed
        from vpr_ros.bench.search_bench import clustered_descriptors, noisy_queries
        from vpr_ros.mapdb import Keyframe, PlaceMap

        rows, dim = (20_000, 256) if self.dry else (self.args.map_rows, 4096)
        db = clustered_descriptors(rows, dim, seed=0)
        q, _ = noisy_queries(db, 20, seed=1)
        for index in ("flat", {"kind": "binary", "bits": 512, "rerank": 100}):
            kind = index if isinstance(index, str) else "binary"
            maps = []
            for _ in range(2):
                pm = PlaceMap.create(dim, "gpu-check", index=index)
                for s in range(0, rows, 65536):
                    pm.add(db[s: s + 65536], [Keyframe(session="s", stamp_ns=i)
                                               for i in range(s, min(rows, s + 65536))])
                maps.append(pm)
            cpu, gpu = maps
            gpu.use_gpu(1)
            gpu.search(q[:1], 10)  # copies the map to the GPU
            cpu_t = timed(lambda: [cpu.search(q[i: i + 1], 10) for i in range(len(q))], 1, 1)
            gpu_t = timed(lambda: [gpu.search(q[i: i + 1], 10) for i in range(len(q))], 1, 1)
            same = all(np.array_equal(cpu.search(q[i: i + 1], 10)[0],
                                      gpu.search(q[i: i + 1], 10)[0]) for i in range(len(q)))
            self.result["map_search"].append({
                "index": kind, "rows": rows, "dim": dim, "queries": len(q),
                "cpu_ms_per_query": round(1e3 * cpu_t[0] / len(q), 3),
                "gpu_ms_per_query": round(1e3 * gpu_t[0] / len(q), 3),
                "same_ids": same, "search_device": gpu.search_device})

    def run(self) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name, fn in (("tests", self.tests), ("parity", self.parity),
                         ("preprocess", self.preprocess), ("encoders", self.encoders),
                         ("map_search", self.map_search)):
            self.part(name, fn)
        self.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return self.result


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vpr_ros.bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="JSON written here")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "vpr_ros" / "gpu_check"),
                    help="model directories and exports are kept here between runs")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run on the CPU with tiny sizes (checks the script, measures nothing)")
    ap.add_argument("--iters", type=int, default=100, help="batch-1 timings per row")
    ap.add_argument("--images", type=int, default=24, help="real images for the parity checks")
    ap.add_argument("--map-rows", type=int, default=1_000_000, help="map-search row size")
    ap.add_argument("--tests-timeout", type=int, default=300, help="seconds for the CUDA tests")
    ap.add_argument("--models", nargs="*", default=[],
                    help=f"encoder rows to run (default all: {', '.join(m[0] for m in MODELS)})")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    result = Check(args).run()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    print(f"gpu_check: wrote {out} ({len(result['encoders'])} encoder rows, "
          f"{len(result['skipped'])} parts skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
