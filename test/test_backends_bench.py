"""`vpr bench encoder` end to end on a small model (speed figures are not asserted: they depend
on the machine; the structure, units and the failure reporting are)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpr_ros.bench.encoder_bench import (EncoderBenchConfig, format_table, run_cell,
                                         run_encoder_bench, speedups)
from vpr_ros.errors import ConfigError

from backend_models import shared_dirs  # noqa: E402



@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The shared folder of the export/parity tests, so the model and its export are reused."""
    return shared_dirs(tmp_path_factory)[0].parent


def test_bench_rows_for_each_backend(workdir: Path) -> None:
    cfg = EncoderBenchConfig(backends=["torch-cpu", "onnxruntime-cpu", "tensorrt"],
                             models=[str(workdir / "models" / "test_dinov2s_qaa.yaml")],
                             batches=(2,), latency_iters=3, min_time_s=0.0, warmup=1,
                             workdir=workdir, in_process=True)
    result = run_encoder_bench(cfg)
    rows = {r["backend"]: r for r in result["rows"]}
    assert rows["torch-cpu-fp32"]["size"] == rows["onnxruntime-cpu"]["size"] == 112
    for name in ("torch-cpu-fp32", "onnxruntime-cpu"):
        r = rows[name]
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["ips_b2"] > 0 and r["load_s"] >= 0
        assert r["cpu_ms_b2"] > 0 and r["rounds_ok"] == 1
        assert r["peak_mib"] > 0 and r["memory"].startswith("peak RSS")
    # no TensorRT here (or no GPU): reported as a row with the reason, not a crash
    trt = rows.get("tensorrt")
    if trt is not None and "error" in trt:
        assert "tensorrt" in trt["error"].lower()
    [s] = [s for s in result["speedups"] if s["backend"] == "onnxruntime-cpu"]
    assert s["vs"] == "torch-cpu-fp32" and s["x_b2"] > 0
    table = format_table(result)
    assert "| onnxruntime-cpu | test_dinov2s_qaa | 112 |" in table and "img/s b2" in table
    json.dumps(result)  # --json output is plain data


def test_bench_cell_in_a_subprocess_matches_in_process_shape(workdir: Path) -> None:
    from vpr_ros.bench.encoder_bench import Cell, _spawn, ensure_model_dir

    model_dir = ensure_model_dir(workdir / "models" / "test_dinov2s_qaa.yaml", workdir / "models")
    cell = Cell(backend="torch-cpu", artifact=str(model_dir), model="m", size=112, batches=(1,),
                latency_iters=1, min_time_s=0.0, warmup=1)
    here, there = run_cell(cell), _spawn(cell)
    assert set(here) == set(there) and "error" not in there
    bad = Cell(backend="torch-cpu", artifact=str(workdir / "missing"), model="m", size=112)
    assert "no such" in _spawn(bad)["error"]


def test_rounds_are_merged_by_median() -> None:
    from vpr_ros.bench.encoder_bench import merge_rounds

    runs = [{"backend": "b", "p50_ms": 10.0, "ips_b8": 3.0}, {"error": "crashed"},
            {"backend": "b", "p50_ms": 30.0, "ips_b8": 1.0},
            {"backend": "b", "p50_ms": 20.0, "ips_b8": 2.0}]
    merged = merge_rounds(runs)
    assert merged["p50_ms"] == 20.0 and merged["ips_b8"] == 2.0 and merged["rounds_ok"] == 3
    assert merge_rounds([{"error": "x"}]) == {"error": "x"}


def test_bench_refuses_unknown_backends(workdir: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backend"):
        run_encoder_bench(EncoderBenchConfig(backends=["tpu"], workdir=workdir))
    assert speedups([{"backend": "torch-cpu-fp32", "model": "m", "size": 1, "ips_b8": 1.0}]) == []
