"""The node's per-frame pipeline with sequence matching, on a real PlaceMap (no ROS): both modes,
the live map kept in step with the matcher, the stage timed, the counters reported."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.mapdb import Keyframe, PlaceMap
from vpr_ros.mapdb.poses import Pose
from vpr_ros.ros.diagnostics import FrameTiming
from vpr_ros.ros.params import settings_from_values
from vpr_ros.ros.pipeline import Pipeline, Query

NS = 1_000_000_000
DIM = 64


def places(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n + 6, DIM))
    p = np.stack([np.convolve(raw[:, j], np.ones(7), mode="valid") for j in range(DIM)], 1)
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def noisy(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    y = x + level * rng.normal(size=x.shape) / np.sqrt(DIM)
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


def settings(mode: str, **over: object):
    values = {"mode": mode, "top_k": 5, "map_index": "flat", "sequence.length": 8,
              "sequence.min_steps": 4, "verification.enabled": False}
    values.update(over)
    return settings_from_values(values)


def test_localization_with_sequence_evidence_on_a_prebuilt_map() -> None:
    rng = np.random.default_rng(1)
    route = places(200)
    pm = PlaceMap.create(DIM, "fp")
    pm.add(noisy(route, 0.3, rng), [Keyframe("map", i * NS, position=(float(i), 0.0, 0.0))
                                    for i in range(200)])
    cfg = settings("localization", **{"relocalization.min_score": 0.0,
                                      "relocalization.min_sequence_score": 3.0,
                                      "relocalization.min_consistent": 2,
                                      "relocalization.one_shot": False})
    pipe = Pipeline(None, pm, cfg, "q")  # type: ignore[arg-type]
    q = noisy(route[40:120], 1.2, rng)
    accepted, timings = [], []
    for t, d in enumerate(q):
        timing = FrameTiming(t)
        out = pipe.decide((1000 + t) * NS, Query(d[None]), None, "cam", timing)
        timings.append(timing)
        if out.relocalization is not None:
            accepted.append((40 + t, out.relocalization.keyframe_id))
        assert out.hypotheses == [] or out.hypotheses[0].sequence is not None
    assert len(accepted) > 40
    assert all(abs(truth - kf) <= 2 for truth, kf in accepted)
    assert all(t.sequence > 0 for t in timings) and "sequence" in timings[-1].cpu
    counters = dict(pipe.counters())
    assert counters["sequence_frames"] == "80" and counters["sequence_length"] == "8"


def test_loop_closure_grows_the_track_with_the_live_map() -> None:
    rng = np.random.default_rng(2)
    route = places(60)
    cfg = settings("loop_closure", **{"loop_closure.min_score": 0.0,
                                      "loop_closure.min_sequence_score": 3.0,
                                      "loop_closure.exclusion_window_s": 20.0,
                                      "loop_closure.exclusion_recent_keyframes": 10,
                                      "loop_closure.consistency_k": 1,
                                      "loop_closure.consistency_n": 1,
                                      "loop_closure.keyframe_min_distance_m": 0.5,
                                      "sequence.step_m": 1.0})
    pm = PlaceMap.create(DIM, "fp")
    pipe = Pipeline(None, pm, cfg, "live")  # type: ignore[arg-type]
    idx = np.r_[np.arange(60), np.arange(60)]          # two laps of a 60 m loop
    frames = noisy(route[idx], 0.8, rng)
    closures = []
    for t, (i, d) in enumerate(zip(idx.tolist(), frames)):
        pose = (Pose(position=(float(t), 0.0, 0.0), orientation=(0.0, 0.0, 0.0, 1.0)), "odom")
        out = pipe.decide(t * NS, Query(d[None]), pose, "cam", FrameTiming(t))
        if out.closure is not None:
            closures.append((t, out.closure.match_id))
    assert len(pipe.track) == len(pm)                   # every live keyframe is on the track
    assert closures and all(t >= 60 for t, _ in closures)
    # Matches on lap 1: keyframe id = frame index there (one keyframe per frame).
    assert all(abs((t - 60) - m) <= 2 for t, m in closures)
    assert len(closures) > 30


def test_localization_refuses_a_map_whose_sessions_are_all_too_short() -> None:
    pm = PlaceMap.create(DIM, "fp")
    rng = np.random.default_rng(0)
    pm.add(noisy(places(3), 0.1, rng), [Keyframe(f"s{i}", i * NS) for i in range(3)])
    with pytest.raises(ConfigError, match="min_steps"):
        Pipeline(None, pm, settings("localization"), "q")  # type: ignore[arg-type]
    # Single-frame matching has no such need.
    Pipeline(None, pm, settings("localization", **{"sequence.length": 1}), "q")  # type: ignore
