"""scripts/gpu_check.sh's module, run here as a CPU dry run with tiny sizes: it writes one valid
JSON with the encoder rows this machine can run, the preprocessing twin and parity plumbing on
real images, and every CUDA-only part skipped with its reason. The script itself imports only what
a bare machine with torch has (no project venv)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from vpr_ros.bench import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_cpu_dry_run_writes_the_json_with_the_skips_stated(tmp_path: Path,
                                                           nordland_root: Path) -> None:
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--cpu-dry-run", "--out", str(out), "--workdir",
                           str(tmp_path / "work"), "--models", "dinov2s_gem_224",
                           "--images", "6"]) == 0
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["device"] == "cpu" and res["schema"] == 1
    env = res["environment"]
    assert env["modules"]["torch"] and "cuda" in env
    rows = res["encoders"]
    assert [(r["model"], r["variant"]) for r in rows] == [("dinov2s_gem_224", "torch_fp32")]
    row = rows[0]
    assert row["input"] == 56 and row["backend"].startswith("torch-cpu")
    assert 0 < row["batch1"]["p50_ms"] <= row["batch1"]["p95_ms"]
    assert math.isfinite(row["batch4_images_per_s"]) and row["batch4_images_per_s"] > 0
    skipped = res["skipped"]
    for variant in ("torch_fp16", "torch_fp16_cuda_graphs", "onnxruntime_cuda"):
        assert skipped[f"encoder dinov2s_gem_224 {variant}"], variant
    assert "no CUDA GPU" in skipped["encoder dinov2s_gem_224 torch_fp16"]
    assert "faiss" in skipped["map_search"]
    assert "dry run" in skipped["tests"]
    # the parity and preprocessing plumbing ran on real images (CPU against CPU here)
    assert res["parity"][0]["images"] == 6 and res["parity"][0]["min_cosine"] > 0.9999
    pre = res["preprocess"][0]
    assert pre["twin_device"] == "cpu" and pre["max_abs_diff"] < 1e-3
    assert "tracebacks" not in res, res.get("tracebacks")


def test_unknown_rows_are_a_stated_skip(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    gpu_check.main(["--cpu-dry-run", "--out", str(out), "--workdir", str(tmp_path),
                    "--models", "resnet"])
    res = json.loads(out.read_text())
    assert res["encoders"] == [] and "names none of" in res["skipped"]["encoders"]


def test_the_script_needs_no_project_venv() -> None:
    """What gpu_check imports at module level is the standard library and numpy only; the
    shell script puts the repository on PYTHONPATH and never calls scripts/venv.sh."""
    src = (REPO / "vpr_ros" / "bench" / "gpu_check.py").read_text()
    top = [line for line in src.splitlines() if re.match(r"^(import|from) ", line)]
    mods = {re.split(r"[ .]", line.split()[1])[0] for line in top}
    assert mods <= {"__future__", "argparse", "importlib", "json", "os", "platform",
                    "subprocess", "sys", "time", "traceback", "pathlib", "typing", "numpy"}
    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    assert "venv.sh" not in script and "vpr_ros.bench.gpu_check" in script
    proc = subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_check.sh")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    help_out = subprocess.run([sys.executable, "-m", "vpr_ros.bench.gpu_check", "--help"],
                              capture_output=True, text=True, cwd=REPO)
    assert help_out.returncode == 0 and "--cpu-dry-run" in help_out.stdout
