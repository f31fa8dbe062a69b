"""`vpr bench verify` measures what it says: per candidate and per frame, on one thread, a true
candidate verified and the wrong ones rejected (a benchmark of a verifier that accepts
everything would time the wrong thing)."""

from __future__ import annotations

from vpr_ros.bench.verify_bench import VerifyBenchConfig, format_table, run_verify_bench


def test_bench_verify_times_true_and_wrong_candidates_and_frames() -> None:
    report = run_verify_bench(VerifyBenchConfig(sources=["street"], sizes=[(640, 480)],
                                                kinds=["sift"], estimators=["poselib"],
                                                candidates=3, pairs=2, repeats=1,
                                                extract_scales=[1.0, 0.5]))
    row, half = report["rows"]
    assert row["source"] == "street" and row["size"] == "640x480"
    assert row["extract_scale"] == 1.0 and half["extract_scale"] == 0.5
    assert row["min_iterations"] == 20
    assert row["true_verified"] == "2/2" and row["wrong_rejected"] == "6/6"
    ms = row["ms"]
    for key in ("extract", "true_total", "wrong_total", "frame_first", "frame_last",
                "frame_none", "frame_first_cpu", "frame_last_cpu", "frame_none_cpu"):
        assert 0 < ms[key]["p50"] <= ms[key]["p95"], key
    # stopping at the first verified candidate: the true one first costs less than last
    assert ms["frame_first"]["p50"] < ms["frame_last"]["p50"]
    # a quarter of the pixels: SIFT extraction is cheaper by far (4x on an idle core)
    assert half["ms"]["extract"]["p50"] < 0.6 * ms["extract"]["p50"]
    assert report["machine"]["threads"] == 1 and "cpu" in report["machine"]
    assert "| street | 640x480 | sift | poselib | 1 | 20 |" in format_table(report)
