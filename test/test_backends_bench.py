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


def test_bench_rows_for_reduced_precisions_with_ratios_to_torch_fp32(workdir: Path) -> None:
    """Every backend x precision this CPU offers is a row, with its ratio to PyTorch fp32
    measured in the same run."""
    from vpr_ros.bench.encoder_bench import default_backends
    from vpr_ros.runtime.cpu_features import cpu_info

    names = default_backends()
    assert {"torch-cpu", "onnxruntime-cpu", "openvino-cpu-fp32"} <= set(names)
    assert ("torch-cpu-bf16" in names) == cpu_info().bf16
    assert ("onnxruntime-cpu-int8" in names) == cpu_info().int8
    wanted = ["torch-cpu", "openvino-cpu-fp32"] + (["openvino-cpu-bf16"] if cpu_info().bf16
                                                   else [])
    cfg = EncoderBenchConfig(backends=wanted,
                             models=[str(workdir / "models" / "test_dinov2s_qaa.yaml")],
                             batches=(2,), latency_iters=3, min_time_s=0.0, warmup=1,
                             workdir=workdir, in_process=True)
    result = run_encoder_bench(cfg)
    rows = {r["backend"]: r for r in result["rows"]}
    assert "openvino-cpu-fp32" in rows and "error" not in rows["openvino-cpu-fp32"]
    ratios = {s["backend"]: s for s in result["speedups"]}
    for name in rows:
        if name == "torch-cpu-fp32":
            continue
        s = ratios[name]
        assert s["vs"] == "torch-cpu-fp32" and s["x_p50"] > 0 and s["x_b2"] > 0
        assert s["x_p50"] == round(rows["torch-cpu-fp32"]["p50_ms"] / rows[name]["p50_ms"], 2)
    assert rows["torch-cpu-fp32"]["load_average_1m"] >= 0
    m = result["machine"]
    assert m["load_average_start"] and "openvino" in m and isinstance(m["cpu_flags"], list)
    table = format_table(result)
    assert "x torch fp32 (b1 / b2)" in table and "1 (reference)" in table


def test_accuracy_reports_r1_next_to_fp32_and_records_it_for_auto(
        workdir: Path, nordland_root: Path, tmp_path: Path, monkeypatch) -> None:
    from vpr_ros.bench.encoder_accuracy import format_accuracy, run_accuracy
    from vpr_ros.runtime import auto_select

    monkeypatch.setenv("VPR_CACHE_DIR", str(tmp_path / "cache"))
    result = run_accuracy([str(workdir / "models" / "test_dinov2s_qaa.yaml")],
                          ["openvino-cpu-fp32", "openvino-cpu-fp16"], workdir,
                          subset="0.6:0.62")
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) == {"torch-cpu-fp32", "openvino-cpu-fp32", "openvino-cpu-fp16"}
    ref = rows["torch-cpu-fp32"]
    assert ref["queries"] == round(0.62 * 3576) - round(0.6 * 3576)
    for r in rows.values():
        assert r["fp32_r1"] == ref["r1"] and 0 <= r["r1"] <= 100
        assert r["delta_points"] == round(r["r1"] - ref["r1"], 2)
    recorded = auto_select.read_accuracy()[ref["fingerprint"]]
    assert set(recorded) == {"openvino:fp16"}  # reduced precisions only
    assert recorded["openvino:fp16"]["fp32_r1"] == ref["r1"]
    text = format_accuracy(result)
    assert "| openvino-cpu-fp16 | test_dinov2s_qaa |" in text and "random weights" in text
