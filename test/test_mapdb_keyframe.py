"""The columnar keyframe table: lossless Keyframe round trip (including unknown poses), string
interning across merges, and exclusion masks."""

from __future__ import annotations

import numpy as np

from vpr_ros.mapdb import Exclusion, Keyframe, KeyframeTable


def test_table_round_trips_keyframes_and_merges() -> None:
    kfs = [Keyframe("a", 10, "cam", (1.0, 2.0, 3.0), (0.0, 0.0, 0.0, 1.0), None, "bag", "/t"),
           Keyframe("b", 20, gnss=(1.5, 2.5, 3.5)),
           Keyframe("a", 30, source_topic="/u")]
    t = KeyframeTable()
    assert t.append(kfs).tolist() == [0, 1, 2]
    assert [t.get(i) for i in range(3)] == [Keyframe(**{**kf.__dict__, "id": i})
                                            for i, kf in enumerate(kfs)]
    assert t.sessions() == ["a", "b"] and t.session_counts() == {"a": 2, "b": 1}
    assert t.has_poses() and t.has_gnss()
    other = KeyframeTable()
    other.append([Keyframe("c", 5, "cam2"), Keyframe("b", 6)])
    assert t.extend_from(other).tolist() == [3, 4]
    assert t.get(3) == Keyframe("c", 5, "cam2", id=3) and t.get(4).session == "b"
    assert t.sessions() == ["a", "b", "c"]


def test_exclusion_masks() -> None:
    t = KeyframeTable()
    t.append([Keyframe("live" if i >= 5 else "old", i * 100) for i in range(10)])
    assert t.excluded_mask(None) is None and t.excluded_mask(Exclusion()) is None
    assert np.flatnonzero(t.excluded_mask(Exclusion(sessions=frozenset({"live"})))).tolist() \
        == [5, 6, 7, 8, 9]
    assert not t.excluded_mask(Exclusion(sessions=frozenset({"unknown"}))).any()
    assert np.flatnonzero(t.excluded_mask(Exclusion(ids=frozenset({1, 42, -3})))).tolist() == [1]
    window = Exclusion(around_stamp_ns=450, window_ns=150)
    assert np.flatnonzero(t.excluded_mask(window)).tolist() == [3, 4, 5, 6]
    live_window = Exclusion(around_stamp_ns=450, window_ns=150, window_session="live")
    assert np.flatnonzero(t.excluded_mask(live_window)).tolist() == [5, 6]
    nobody = Exclusion(around_stamp_ns=450, window_ns=150, window_session="nobody")
    assert not t.excluded_mask(nobody).any()
