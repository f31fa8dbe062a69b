"""Loop-closure precision/recall on sequences whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vpr_ros.errors import ConfigError, InputError
from vpr_ros.localization import (
    LoopClosureConfig,
    LoopEvaluation,
    SearchExclusion,
    evaluate_loop_closure,
)
from vpr_ros.localization.evaluation import interpolated_auc

S = 1_000_000_000
LAP = 20
THRESHOLDS = [0.795, 0.845, 0.895, 0.945]


def line_laps() -> tuple[np.ndarray, np.ndarray]:
    """Two passes over 20 places 2 m apart, one frame per second: frame i is at place i % 20."""
    stamps = np.arange(2 * LAP, dtype=np.int64) * S
    pos = np.zeros((2 * LAP, 3))
    pos[:, 0] = 2.0 * (np.arange(2 * LAP) % LAP)
    return stamps, pos


def scripted_search(i: int, exclusion: SearchExclusion) -> tuple[np.ndarray, np.ndarray]:
    """Hand-made results, deliberately including things the evaluator must discard.

    First pass: the previous frame (inside the exclusion window) at 0.99, the *future* frame of
    the same place at 0.99 (a whole-sequence index would return it), and a far frame at 0.3.
    Second pass, revisit m = i - 20: the true match (frame m) scores 0.80 + 0.01 m; for
    m < 5 a wrong place (frame m + 10) scores 0.85.
    """
    assert exclusion.window_ns == 5 * S and exclusion.around_stamp_ns == i * S
    if i < LAP:
        ids = [i - 1, i + LAP, max(i - 10, 0)] if i > 0 else [i + LAP]
        scores = [0.99, 0.99, 0.3] if i > 0 else [0.99]
        return np.array(ids), np.array(scores)
    m = i - LAP
    ids, scores = [m, i - 1, -1], [0.80 + 0.01 * m, 0.99, -1.0]
    if m < 5:
        ids.append(m + 10)
        scores.append(0.85)
    order = np.argsort(scores)[::-1]
    return np.array(ids)[order], np.array(scores)[order]


def config(**over: object) -> LoopClosureConfig:
    values: dict[str, object] = dict(exclusion_window_s=5.0, exclusion_recent_keyframes=3,
                                     consistency_k=1, consistency_n=1, consistency_radius_m=2.5)
    values.update(over)
    return LoopClosureConfig(**values)  # type: ignore[arg-type]


def test_precision_recall_without_consistency() -> None:
    stamps, pos = line_laps()
    ev = evaluate_loop_closure(stamps, pos, scripted_search, config(), gt_distance_m=1.0,
                               positions=pos, thresholds=THRESHOLDS)
    assert ev.num_positives == LAP and ev.num_queries == 2 * LAP
    # t=0.795: m<5 the wrong 0.85 wins (5 FP), m>=5 true (15 TP); t=0.845: m<5 only the
    # wrong one passes; t=0.895: m>=10 true; t=0.945: m>=15 true.
    assert ev.true_positives.tolist() == [15, 15, 10, 5]
    assert ev.false_positives.tolist() == [5, 5, 0, 0]
    assert ev.precision == pytest.approx([0.75, 0.75, 1.0, 1.0])
    assert ev.recall == pytest.approx([0.75, 0.75, 0.5, 0.25])
    assert ev.recall_at_100_precision == pytest.approx(0.5)
    assert ev.auc == pytest.approx(0.25 + 0.25 + 0.25 * 0.75)


def test_precision_recall_with_two_of_two_consistency() -> None:
    stamps, pos = line_laps()
    ev = evaluate_loop_closure(stamps, pos, scripted_search,
                               config(consistency_k=2, consistency_n=2), gt_distance_m=1.0,
                               positions=pos, thresholds=THRESHOLDS)
    # The first revisit query never has support. Wrong matches (m+10) walk along in step, so
    # they support each other for m = 1..4. t=0.795: the true match at m=5 is supported by
    # m=4's true match (0.84 passes), at t=0.845 it is not; and so on per threshold.
    assert ev.true_positives.tolist() == [15, 14, 9, 4]
    assert ev.false_positives.tolist() == [4, 4, 0, 0]
    assert ev.recall == pytest.approx([0.75, 0.70, 0.45, 0.20])
    assert ev.precision == pytest.approx([15 / 19, 14 / 18, 1.0, 1.0])
    assert ev.recall_at_100_precision == pytest.approx(0.45)
    assert ev.auc == pytest.approx(0.45 + 0.30 * 15 / 19)


def test_pose_free_consistency_groups_by_stamp() -> None:
    stamps, pos = line_laps()
    # Matched frames one second apart fall in a 1.5 s stamp window: same result as with poses.
    ev = evaluate_loop_closure(stamps, pos, scripted_search,
                               config(consistency_k=2, consistency_n=2,
                                      consistency_stamp_window_s=1.5),
                               gt_distance_m=1.0, thresholds=THRESHOLDS)
    assert ev.true_positives.tolist() == [15, 14, 9, 4]
    tight = evaluate_loop_closure(stamps, pos, scripted_search,
                                  config(consistency_k=2, consistency_n=2,
                                         consistency_stamp_window_s=0.5),
                                  gt_distance_m=1.0, thresholds=THRESHOLDS)
    assert tight.true_positives.tolist() == [0, 0, 0, 0]


def test_interpolated_auc_of_known_curves() -> None:
    assert interpolated_auc(np.array([0.0, 1.0]), np.array([1.0, 1.0])) == pytest.approx(1.0)
    # A dip is lifted to the best precision at higher recall.
    assert interpolated_auc(np.array([0.2, 0.4, 0.6]), np.array([0.5, 0.25, 1.0])) == \
        pytest.approx(0.6)


def test_consistency_rescues_recall_at_full_precision_under_aliasing() -> None:
    """Two laps of a 40 m loop with exact search; two revisit frames alias another place."""
    rng = np.random.default_rng(1)
    lap, dim = 40, 32
    base = rng.standard_normal((lap, dim))
    idx = np.arange(2 * lap) % lap
    desc = base[idx] + 0.5 * np.roll(base, 1, 0)[idx] + 0.3 * rng.standard_normal((2 * lap, dim))
    for query, lookalike in [(50, 30), (65, 5)]:  # near-copies of a frame 20 m away
        desc[query] = desc[lookalike] + 0.1 * rng.standard_normal(dim)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    r = lap / (2 * math.pi)
    ang = 2 * math.pi * idx / lap
    pos = np.stack([r * np.cos(ang), r * np.sin(ang), np.zeros(2 * lap)], 1)
    stamps = np.arange(2 * lap, dtype=np.int64) * S

    def search(i: int, ex: SearchExclusion) -> tuple[np.ndarray, np.ndarray]:
        s = desc @ desc[i]  # whole sequence, future included: the evaluator drops it
        order = np.argsort(-s)[:5]
        return order, s[order]

    def evaluate(k: int, n: int) -> LoopEvaluation:
        return evaluate_loop_closure(
            stamps, pos, search,
            config(exclusion_window_s=10.0, consistency_k=k, consistency_n=n,
                   consistency_radius_m=3.0),
            gt_distance_m=1.5, positions=pos, num_thresholds=20)

    single, consistent = evaluate(1, 1), evaluate(2, 3)
    # 40 revisit queries, plus the last frame of lap 1, 1 m from the first.
    assert single.num_positives == consistent.num_positives == lap + 1
    assert np.all(np.diff(single.thresholds) > 0) and len(single.thresholds) <= 20
    # Without consistency the aliased frames score ~0.99, so no threshold keeps full precision.
    assert single.recall_at_100_precision == 0.0 and single.false_positives.min() >= 1
    # Two of three agreeing queries reject both one-frame look-alikes at every threshold.
    assert consistent.false_positives.max() == 0
    assert consistent.recall_at_100_precision >= 0.9
    assert consistent.auc > single.auc
    assert set(consistent.to_dict()) >= {"precision", "recall", "auc", "recall_at_100_precision"}


def test_bad_inputs_are_reported() -> None:
    stamps, pos = line_laps()
    with pytest.raises(InputError, match=r"shape \(40, 3\)"):
        evaluate_loop_closure(stamps, pos[:, :2], scripted_search, config(), 1.0)
    with pytest.raises(ConfigError, match="gt_distance_m"):
        evaluate_loop_closure(stamps, pos, scripted_search, config(), 0.0)
    with pytest.raises(InputError, match="beyond the sequence"):
        evaluate_loop_closure(stamps, pos, lambda i, ex: ([99], [0.9]), config(), 1.0)
    single_pass = pos.copy()
    single_pass[:, 0] = 2.0 * np.arange(2 * LAP)
    with pytest.raises(InputError, match="no frame revisits"):
        evaluate_loop_closure(stamps, single_pass, scripted_search, config(), 1.0)


def test_standing_still_inside_the_window_is_not_a_revisit() -> None:
    # Ten frames parked at one spot, 1 s apart: every earlier frame is within 1 m, but all are
    # inside the 10 s exclusion window, so there is nothing the detector may find.
    stamps = np.arange(10, dtype=np.int64) * S
    parked = np.zeros((10, 3))
    with pytest.raises(InputError, match="no frame revisits"):
        evaluate_loop_closure(stamps, parked, lambda i, ex: ([], []),
                              config(exclusion_window_s=10.0), 1.0)
    # Once the window is shorter than the stop, the later frames do count as positives.
    ev = evaluate_loop_closure(stamps, parked, lambda i, ex: ([], []),
                               config(exclusion_window_s=5.0), 1.0)
    assert ev.num_positives == 4  # queries 6..9 have a frame > 5 s (and > 3 keyframes) earlier
    assert ev.recall.tolist() == [0.0] and ev.precision.tolist() == [1.0]
