"""Sequence matching: alignment by distance and by time, speeds, direction, session ends, gaps,
standing still, bad stamps, and a per-frame cost that does not grow with the map.

The route: place descriptors that change smoothly along a line (neighbouring places look
alike, as along a street), mapped once with mild noise and revisited with strong noise, so a
single frame's best match is often wrong and a sequence of frames is not.
"""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.errors import ConfigError, InputError
from vpr_ros.localization import (KeyframeTrack, SearchExclusion, SequenceConfig,
                                  SequenceMatcher)

NS = 1_000_000_000


def route(n: int, dim: int = 64, seed: int = 0, smooth: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n + 2 * smooth, dim))
    kernel = np.ones(2 * smooth + 1)
    places = np.stack([np.convolve(raw[:, j], kernel, mode="valid") for j in range(dim)], 1)
    return places / np.linalg.norm(places, axis=1, keepdims=True)


def noisy(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    y = x + level * rng.normal(size=x.shape) / np.sqrt(x.shape[1])
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


class Route:
    """A mapped route (session "map", 1 keyframe per metre and per second) and a matcher."""

    def __init__(self, cfg: SequenceConfig, n: int = 300, seed: int = 1,
                 spacing_s: float = 1.0) -> None:
        self.rng = np.random.default_rng(seed)
        self.places = route(n)
        self.db = noisy(self.places, 0.3, self.rng)
        self.track = KeyframeTrack()
        pos = np.c_[np.arange(n, dtype=float), np.zeros(n), np.zeros(n)]
        self.track.extend(["map"] * n, (np.arange(n) * spacing_s * NS).astype(np.int64), pos)
        self.requested: list[int] = []
        self.matcher = SequenceMatcher(cfg, self.track, self._desc)

    def _desc(self, ids: np.ndarray) -> np.ndarray:
        self.requested.append(len(ids))
        return self.db[ids]

    def drive(self, place_idx: np.ndarray, noise: float = 2.0, odom: bool = False,
              k: int = 5, period_s: float = 1.0) -> tuple[float, float]:
        """Top-1 hit rate (+-1 keyframe) of single frames and of the sequence matches."""
        q = noisy(self.places[place_idx], noise, self.rng)
        single = seq = 0
        for t, (i, d) in enumerate(zip(place_idx.tolist(), q)):
            top = np.argsort(-(self.db @ d))[:k]
            res = self.matcher.update(int(t * period_s * NS), d, top,
                                      position=(float(i), 0.0, 0.0) if odom else None)
            single += abs(int(top[0]) - i) <= 1
            seq += bool(res.matches) and abs(res.matches[0].id - i) <= 1
        return single / len(place_idx), seq / len(place_idx)


def test_sequence_evidence_beats_single_frames_and_length_one_is_single_frame() -> None:
    single, seq = Route(SequenceConfig(length=10)).drive(np.arange(300))
    assert single < 0.85 and seq > 0.93, (single, seq)
    r = Route(SequenceConfig(length=1))
    single1, seq1 = r.drive(np.arange(300))
    assert seq1 == pytest.approx(single1, abs=0.01)  # L=1: the shortlist's own order


def test_time_alignment_searches_the_speed_range() -> None:
    # The query drives at half the mapping speed: 0.5 map seconds per query second.
    half = np.repeat(np.arange(150), 2)
    _, inside = Route(SequenceConfig(length=12, speed_min=0.4, speed_max=1.2)).drive(half)
    _, outside = Route(SequenceConfig(length=12, speed_min=1.5, speed_max=2.5)).drive(half)
    assert inside > 0.9 and outside < 0.5, (inside, outside)


def test_odometry_aligns_by_distance_whatever_the_speed() -> None:
    rng = np.random.default_rng(3)
    # Irregular speed: 0 to 2 m per frame, including standing still.
    steps = rng.choice([0, 0, 1, 1, 2], size=400)
    places = np.minimum(np.cumsum(steps), 299)
    cfg = SequenceConfig(length=10, step_m=1.0, speed_min=0.9, speed_max=1.1)
    _, by_time = Route(cfg).drive(places, odom=False)
    _, by_dist = Route(cfg).drive(places, odom=True)
    assert by_dist > 0.95 and by_dist > by_time + 0.1, (by_time, by_dist)


def test_standing_still_with_odometry_keeps_the_evidence() -> None:
    places = np.r_[np.arange(100), np.full(60, 100), np.arange(101, 160)]
    r = Route(SequenceConfig(length=10, step_m=1.0))
    _, seq = r.drive(places, odom=True)
    assert seq > 0.95
    # The buffer did not fill with the stop: at most one frame per metre was kept.
    assert len(r.matcher._kept) <= 9


def test_standing_still_without_odometry_with_the_still_rule() -> None:
    r = Route(SequenceConfig(length=10, still_similarity=0.999))
    # Identical frames while stopped (the same image) do not advance the time axis.
    q = noisy(r.places[np.arange(80)], 2.0, r.rng)
    frames = np.r_[q, np.repeat(q[-1:], 40, axis=0)]
    for t, d in enumerate(frames):
        top = np.argsort(-(r.db @ d))[:5]
        res = r.matcher.update(t * NS, d, top)
    assert res.matches and abs(res.matches[0].id - 79) <= 1
    assert res.frames == 10 and r.matcher._current.t == pytest.approx(79.0)


def test_opposite_direction_needs_reverse() -> None:
    back = np.arange(299, -1, -1)
    _, forward_only = Route(SequenceConfig(length=10)).drive(back)
    _, both = Route(SequenceConfig(length=10, reverse=True)).drive(back)
    assert forward_only < 0.5 and both > 0.9, (forward_only, both)


def test_paths_stop_at_session_ends_and_in_gaps() -> None:
    track = KeyframeTrack()
    # Session a: keyframes 0..9 at 0..9 s; session b starts right after at 10..19 s.
    track.extend(["a"] * 10 + ["b"] * 10, np.arange(20) * NS)
    # Session c: a 30 s gap between its 5th and 6th keyframe.
    track.extend(["c"] * 10, np.r_[np.arange(5), np.arange(35, 40)] * NS)
    b = track.session_code("b")
    # From the start of b, 3 s back in time is outside b (not in a: sessions never chain).
    assert track.align(b, False, np.array([-3.0, 0.0, 4.0]), 1.0).tolist() == [-1, 10, 14]
    c = track.session_code("c")
    assert track.align(c, False, np.array([4.0, 20.0, 35.0]), 3.0).tolist() == [24, -1, 25]

    dim = 8
    rng = np.random.default_rng(0)
    desc = noisy(rng.normal(size=(30, dim)), 0.0, rng)
    m = SequenceMatcher(SequenceConfig(length=6, min_steps=3), track, lambda ids: desc[ids])
    for t in range(6):  # the query replays session b's first frames
        res = m.update(t * NS, desc[10 + t], np.array([10 + t]))
    best = res.by_id[15]
    assert best.steps == 6 and best.frames == 6
    m.reset()
    for t in range(6):  # replaying b from its start: at the 3rd frame paths have 3 steps
        res = m.update((100 + t) * NS, desc[10 + min(t, 2)], np.array([10 + min(t, 2)]))
        if t == 2:
            assert res.by_id[12].steps == 3


def test_session_shorter_than_the_sequence_gives_partial_paths() -> None:
    track = KeyframeTrack()
    track.extend(["short"] * 4, np.arange(4) * NS)
    rng = np.random.default_rng(0)
    desc = noisy(rng.normal(size=(4, 16)), 0.0, rng)
    m = SequenceMatcher(SequenceConfig(length=20, min_steps=3), track, lambda ids: desc[ids])
    for t in range(20):
        res = m.update(t * NS, desc[min(t, 3)], np.array([min(t, 3)]))
    assert res.matches and res.matches[0].id == 3
    assert res.matches[0].steps < 10 and res.matches[0].frames == 20
    # Missing steps count as no evidence: the score is diluted, never inflated.
    assert res.matches[0].score < res.matches[0].frame_score
    m2 = SequenceMatcher(SequenceConfig(length=20, min_steps=12), track, lambda ids: desc[ids])
    for t in range(20):
        res = m2.update(t * NS, desc[min(t, 3)], np.array([min(t, 3)]))
    assert res.matches == [] and m2.stats.short_frames > 0


def test_excluded_keyframes_are_never_path_steps() -> None:
    r = Route(SequenceConfig(length=8))
    excl = SearchExclusion(ids=frozenset(range(95, 100)))
    q = noisy(r.places[np.arange(60, 110)], 0.5, r.rng)
    for t, d in enumerate(q):
        top = np.argsort(-(r.db @ d))[:5]
        res = r.matcher.update(t * NS, d, top, exclusion=excl)
        assert not any(95 <= mt.id < 100 for mt in res.matches)
    # Paths through the excluded stretch lost those steps.
    assert res.by_id and max(mt.steps for mt in res.matches) <= 8


def test_out_of_order_keyframes_are_reordered_and_counted() -> None:
    track = KeyframeTrack()
    track.extend(["s"] * 3, np.array([0, 1, 2]) * NS)
    track.extend(["s"], np.array([5]) * NS)
    track.extend(["s"], np.array([3]) * NS)        # older than the tail
    assert track.reordered == 1
    code = track.session_code("s")
    assert track.align(code, False, np.array([3.0, 5.0]), 0.1).tolist() == [4, 3]
    assert track.neighbours(np.array([4]), 1).tolist() == [2, 3, 4]


def test_sessions_without_stamps_use_keyframe_order() -> None:
    track = KeyframeTrack()
    track.extend(["nostamps"] * 5, np.zeros(5, np.int64))
    assert track.sessions_without_stamps == 1
    code = track.session_code("nostamps")
    assert track.align(code, False, np.array([2.0, 4.0]), 0.5).tolist() == [2, 4]


def test_backwards_stamps_restart_the_evidence() -> None:
    r = Route(SequenceConfig(length=5))
    q = noisy(r.places[:20], 0.5, r.rng)
    for t in range(10):
        r.matcher.update(t * NS, q[t], np.arange(5))
    res = r.matcher.update(3 * NS, q[10], np.arange(5))  # the clock went back
    assert r.matcher.stats.resets == 1 and res.frames == 1


def test_bad_inputs_are_clear_errors() -> None:
    r = Route(SequenceConfig(length=5))
    with pytest.raises(InputError, match="non-finite"):
        r.matcher.update(0, np.full(64, np.nan), [0])
    with pytest.raises(InputError, match="position"):
        r.matcher.update(0, r.db[0], [0], position=(1.0, np.inf, 0.0))
    r.matcher.update(0, r.db[0], [0])
    with pytest.raises(InputError, match="model changed"):
        r.matcher.update(NS, np.ones(32, np.float32), [0])
    with pytest.raises(ConfigError, match="speed_min"):
        SequenceConfig(speed_min=2.0, speed_max=1.0)
    with pytest.raises(ConfigError, match="length"):
        SequenceConfig(length=0)


def test_per_frame_work_does_not_grow_with_the_map() -> None:
    """Descriptors fetched per frame (beyond the fixed background sample) are the same for a
    map of 1,000 and of 100,000 keyframes: the matcher touches only the shortlist's paths."""
    fetched = {}
    for n in (1_000, 100_000):
        rng = np.random.default_rng(0)
        track = KeyframeTrack()
        track.extend(["m"] * n, np.arange(n) * NS)
        db = noisy(rng.normal(size=(n, 16)), 0.0, rng)
        sizes: list[int] = []
        m = SequenceMatcher(SequenceConfig(length=10, background_samples=64), track,
                            lambda ids: (sizes.append(len(ids)), db[ids])[1])
        for t in range(30):
            m.update(t * NS, db[500 + t], np.arange(500 + t, 505 + t))
        fetched[n] = sizes[1:]  # the first call is the background sample
    assert max(fetched[1_000]) == max(fetched[100_000])
    assert max(fetched[100_000]) < 500


def test_each_camera_of_a_session_is_its_own_track() -> None:
    """Front and rear keyframes taken together in one session: a path walks one camera's
    views, while an exclusion by session name covers both cameras."""
    track = KeyframeTrack()
    n = 6
    sessions = ["run"] * (2 * n)
    stamps = np.repeat(np.arange(n), 2) * NS          # front and rear at the same instants
    cameras = ["front", "rear"] * n
    track.extend(sessions, stamps, None, cameras)
    front, rear = track.session_code("run", "front"), track.session_code("run", "rear")
    assert front is not None and rear is not None and front != rear
    assert track.align(front, False, np.arange(n, dtype=float), 0.1).tolist() == \
        list(range(0, 2 * n, 2))
    assert track.align(rear, False, np.arange(n, dtype=float), 0.1).tolist() == \
        list(range(1, 2 * n, 2))
    assert track.neighbours(np.array([4]), 1).tolist() == [2, 4, 6]
    excl = SearchExclusion(around_stamp_ns=3 * NS, window_ns=NS, window_session="run")
    assert track.excluded(np.arange(2 * n), excl).tolist() == \
        [False] * 4 + [True] * 6 + [False] * 2
    assert track.session_sizes() == {"run [front]": n, "run [rear]": n}
