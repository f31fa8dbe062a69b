"""`vpr bench node` end to end on a tiny setting: a camera process publishes through DDS to the
hosted node, and the report holds every stage's latency, the drops and the queue evidence."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")

from test_node_common import small_model_dir  # noqa: E402


def test_node_bench_reports_a_stage_breakdown_and_no_queue(effnet_gem_model_dir: Path,
                                                            tmp_path: Path) -> None:
    from vpr_ros.bench.node_bench import NodeBenchConfig, format_table, run_node_bench

    model = small_model_dir(effnet_gem_model_dir, tmp_path.parent)
    cfg = NodeBenchConfig(model=model, map_size=2000, rates=[4.0, 200.0], seconds=2.0,
                          min_frames=0, width=320, height=240, backend="torch", threads=1,
                          workdir=tmp_path / "work")
    assert cfg.seconds_for(4.0) == 2.0
    assert NodeBenchConfig(rates=[5.0], min_frames=150).seconds_for(5.0) == 30.0
    assert NodeBenchConfig(rates=[5.0], min_frames=150).seconds_for(100.0) == 8.0
    result = run_node_bench(cfg)
    slow, flood = result["rates"]
    assert slow["sent"] >= 6 and slow["processed"] >= 0.5 * slow["sent"]
    # 200 frames/s is far above what the encoder sustains: frames are dropped, never queued.
    assert flood["dropped"] > 0 and flood["processed"] < flood["received"]
    # The executor thread takes a 320x240 frame in well under the 5 ms between frames at
    # 200 Hz (at 4 Hz its timers are spread over a few frames, so no bound there).
    assert flood["executor_cpu_ms_per_received"] < 5.0
    for row in result["rates"]:
        assert row["max_pending"] <= 1 and row["errors"] == 0
        assert row["processed"] + row["dropped"] == row["received"]
        for stage in ("conversion", "preprocess", "encode", "search", "sequence", "decision",
                      "publish", "overhead", "wait", "total", "transport"):
            assert math.isfinite(row["stages_ms"][stage]["p95"]), stage
        assert row["stages_ms"]["total"]["p50"] >= row["stages_ms"]["encode"]["p50"]
        assert row["stages_cpu_ms"]["overhead"]["p50"] > 0
        assert math.isnan(row["cpu_steal_pct"]) or 0.0 <= row["cpu_steal_pct"] <= 100.0
        assert row["executor_cpu_ms_per_received"] > 0.0
        att = row["overhead_attribution"]
        if att:  # Linux: per-stage scheduler figures for every processed frame
            assert att["frames"] == row["processed"] and 0 <= att["blocked_frames_pct"] <= 100
            assert att["overhead_unpaused_ms"]["p50"] <= row["stages_ms"]["overhead"]["p50"]
            assert att["paused_ms"]["p50"] >= 0 and att["run_queue_ms"]["p50"] >= 0
    assert result["encoder"]["backend"].startswith("torch")
    assert result["encoder"]["input_size"] == [96, 96]
    table = format_table(result)
    assert "overhead" in table and "queue growth" in table and "steal %" in table
    assert "executor CPU / received" in table


def _timing(wall: dict, cpu: dict, sched: dict):
    from vpr_ros.ros.diagnostics import FrameTiming

    t = FrameTiming(0, **wall)
    t.cpu.update(cpu)
    t.sched.update(sched)
    return t


def test_overhead_attribution_takes_off_only_unexplained_time_of_unblocked_frames() -> None:
    from vpr_ros.bench.node_bench import OVERHEAD_STAGES, overhead_attribution

    ms = 1e-3
    stages = OVERHEAD_STAGES
    k = len(stages)
    # Frame 1: 10 ms wall, 4 ms CPU, 1 ms in the run queue, never blocked -> 5 ms paused.
    one = _timing({s: 10 * ms / k for s in stages}, {s: 4 * ms / k for s in stages},
                  {s: (1 * ms / k, 0) for s in stages})
    # Frame 2: same times but it blocked once (a lock): nothing is taken off.
    two = _timing({s: 10 * ms / k for s in stages}, {s: 4 * ms / k for s in stages},
                  {**{s: (1 * ms / k, 0) for s in stages}, "search": (1 * ms / k, 1)})
    # A frame timed without the probe is left out.
    three = _timing({s: 1 * ms for s in stages}, {s: 1 * ms for s in stages}, {})
    att = overhead_attribution([one, two, three])
    assert att["frames"] == 2 and att["blocked_frames_pct"] == 50.0
    assert att["paused_ms"]["max"] == pytest.approx(5.0)
    assert att["overhead_unpaused_ms"]["max"] == pytest.approx(10.0)
    assert att["overhead_unpaused_ms"]["p50"] == pytest.approx(7.5)  # 5 and 10
    assert att["run_queue_ms"]["p50"] == pytest.approx(1.0)
    assert overhead_attribution([three]) == {}


def test_stopwatch_records_scheduler_figures_only_when_asked() -> None:
    from vpr_ros.ros.diagnostics import FrameTiming, Stopwatch, sched_sample

    if sched_sample() is None:
        pytest.skip("no /proc/thread-self/schedstat on this system")
    plain = FrameTiming(0)
    Stopwatch(plain).lap("conversion")
    assert plain.sched == {}
    probed = FrameTiming(0)
    Stopwatch.probe_scheduler = True
    try:
        watch = Stopwatch(probed)
        time.sleep(0.01)  # a sleep is a voluntary switch
        watch.lap("search")
    finally:
        Stopwatch.probe_scheduler = False
    queue, switches = probed.sched["search"]
    assert queue >= 0.0 and switches >= 1 and probed.search >= 0.01


def test_thread_cpu_counts_this_threads_work() -> None:
    import threading

    from vpr_ros.bench.node_bench import thread_cpu_s

    me = threading.get_native_id()
    before = thread_cpu_s(me)
    if math.isnan(before):
        pytest.skip("no /proc/self/task/<tid>/schedstat on this system")
    sum(i * i for i in range(300_000))
    assert thread_cpu_s(me) - before > 1e-3
    assert math.isnan(thread_cpu_s(None)) and math.isnan(thread_cpu_s(2 ** 30))


def test_steal_percent_reads_the_steal_column() -> None:
    from vpr_ros.bench.node_bench import cpu_times, steal_percent

    assert steal_percent([0] * 8, [10, 0, 10, 70, 0, 0, 0, 10]) == 10.0
    assert math.isnan(steal_percent(None, [1] * 8)) and math.isnan(steal_percent([1] * 8, [1] * 8))
    now = cpu_times()
    assert now is None or (len(now) == 8 and all(v >= 0 for v in now))
