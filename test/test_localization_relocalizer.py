"""Relocalizer: consecutive agreement, chosen pose, covariance from spread and margin."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.localization import Candidate, Relocalization, Relocalizer, RelocalizerConfig
from vpr_ros.localization.relocalizer import score_margin

S = 1_000_000_000
FAR = (200.0, 0.0, 0.0)  # a rival place, well outside any agreement radius


def yaw(deg: float) -> tuple[float, float, float, float]:
    a = math.radians(deg)
    return (0.0, 0.0, math.sin(a / 2), math.cos(a / 2))


def query(kf_id: int, score: float, pos: Optional[tuple[float, float, float]],
          rival: float = 0.0, orientation: Optional[tuple[float, float, float, float]] = None,
          stamp_ns: int = 0, session: str = "map") -> list[Candidate]:
    """A query whose top match is ``kf_id`` at ``pos`` and whose best rival place scores ``rival``."""
    return [Candidate(kf_id, score, stamp_ns, pos, orientation, session),
            Candidate(900 + kf_id, rival, 0, FAR, session=session)]


def feed(reloc: Relocalizer, queries: list[list[Candidate]]) -> list[Optional[Relocalization]]:
    return [reloc.update(i * S, q) for i, q in enumerate(queries)]


def sigmas(result: Relocalization) -> tuple[float, float]:
    assert result.covariance is not None
    cov = np.array(result.covariance).reshape(6, 6)
    return math.sqrt(cov[0, 0]), math.sqrt(cov[5, 5])


def test_accepts_after_n_agreeing_queries_with_the_best_pose() -> None:
    reloc = Relocalizer(RelocalizerConfig(min_consistent=3, agreement_radius_m=2.0))
    outs = feed(reloc, [query(1, 0.80, (0.0, 0.0, 0.0), orientation=yaw(0)),
                        query(2, 0.90, (1.0, 0.0, 0.0), orientation=yaw(30)),
                        query(3, 0.85, (1.5, 0.0, 0.0), orientation=yaw(10))])
    assert outs[:2] == [None, None]
    res = outs[2]
    assert res is not None and res.has_pose and res.has_orientation
    assert res.keyframe_id == 2 and res.score == 0.90  # best-scoring agreeing keyframe
    assert res.position == (1.0, 0.0, 0.0)
    assert res.orientation == pytest.approx(yaw(30))
    assert res.supporting_ids == (1, 2, 3) and res.consistent_count == 3
    assert res.stamp_ns == 2 * S


def test_disagreement_restarts_the_count() -> None:
    reloc = Relocalizer(RelocalizerConfig(min_consistent=3, agreement_radius_m=2.0))
    a, b = (0.0, 0.0, 0.0), (50.0, 0.0, 0.0)
    outs = feed(reloc, [query(1, 0.9, a), query(2, 0.9, a), query(3, 0.9, b),
                        query(4, 0.9, b), query(5, 0.9, b)])
    assert outs[:4] == [None] * 4
    assert outs[4] is not None and outs[4].supporting_ids == (3, 4, 5)


def test_agreement_is_pairwise_not_a_chain() -> None:
    # Each match is 1.5 m from the previous one, but the first and third are 3 m apart.
    reloc = Relocalizer(RelocalizerConfig(min_consistent=3, agreement_radius_m=2.0))
    outs = feed(reloc, [query(i, 0.9, (1.5 * i, 0.0, 0.0)) for i in range(3)])
    # The third disagrees with the first, so the streak restarts from the third.
    assert outs == [None, None, None] and reloc.consistent_count == 1


def test_a_weak_or_empty_query_breaks_the_streak() -> None:
    reloc = Relocalizer(RelocalizerConfig(min_consistent=2, min_score=0.6))
    here = (0.0, 0.0, 0.0)
    assert feed(reloc, [query(1, 0.9, here), query(2, 0.59, here), query(3, 0.9, here)]) == [None] * 3
    assert reloc.update(3 * S, []) is None and reloc.consistent_count == 0
    assert reloc.update(4 * S, query(4, 0.9, here)) is None
    assert reloc.update(5 * S, query(5, 0.9, here)) is not None


def test_one_shot_stays_silent_until_reset_and_continuous_mode_repeats() -> None:
    here = (0.0, 0.0, 0.0)
    one = Relocalizer(RelocalizerConfig(min_consistent=2))
    outs = feed(one, [query(i, 0.9, here) for i in range(5)])
    assert [o is not None for o in outs] == [False, True, False, False, False]
    assert one.accepted
    one.reset()
    assert not one.accepted and one.consistent_count == 0
    outs = feed(one, [query(i, 0.9, here) for i in range(2)])
    assert [o is not None for o in outs] == [False, True]

    cont = Relocalizer(RelocalizerConfig(min_consistent=2, one_shot=False))
    outs = feed(cont, [query(i, 0.9, here) for i in range(4)])
    assert [o is not None for o in outs] == [False, True, True, True]
    assert outs[3] is not None and outs[3].consistent_count == 4
    assert outs[3].supporting_ids == (2, 3)  # the window keeps the last min_consistent votes


def test_keyframes_without_pose_give_an_acceptance_without_pose() -> None:
    cfg = RelocalizerConfig(min_consistent=2, agreement_stamp_window_s=5.0)
    reloc = Relocalizer(cfg)
    outs = feed(reloc, [query(1, 0.9, None, stamp_ns=100 * S), query(2, 0.95, None, stamp_ns=103 * S)])
    res = outs[1]
    assert res is not None and not res.has_pose
    assert res.keyframe_id == 2 and res.covariance is None and res.orientation is None
    # Stamps 8 s apart are different places without poses.
    reloc = Relocalizer(cfg)
    assert feed(reloc, [query(1, 0.9, None, stamp_ns=100 * S),
                        query(2, 0.9, None, stamp_ns=108 * S)]) == [None, None]


def test_a_posed_keyframe_is_preferred_over_a_better_scoring_unposed_one() -> None:
    reloc = Relocalizer(RelocalizerConfig(min_consistent=2, agreement_stamp_window_s=5.0))
    outs = feed(reloc, [query(1, 0.95, None, stamp_ns=10 * S),
                        query(2, 0.80, (3.0, 0.0, 0.0), stamp_ns=12 * S)])
    assert outs[1] is not None and outs[1].keyframe_id == 2 and outs[1].has_pose


def test_covariance_follows_the_documented_formula_and_layout() -> None:
    cfg = RelocalizerConfig(min_consistent=2, base_sigma_m=0.5, base_sigma_rad=0.1,
                            margin_scale=0.05, min_sigma_m=0.01, min_sigma_rad=0.001)
    reloc = Relocalizer(cfg)
    # Best match (0.9) at (0,0,0) yaw 0; the other at 3 m, yaw 20 deg. Rival place scores 0.85.
    outs = feed(reloc, [query(1, 0.8, (3.0, 0.0, 0.0), rival=0.1, orientation=yaw(20)),
                        query(2, 0.9, (0.0, 0.0, 0.0), rival=0.85, orientation=yaw(0))])
    res = outs[1]
    assert res is not None and res.covariance is not None and len(res.covariance) == 36
    spread = math.sqrt((3.0 ** 2 + 0.0) / 2)  # RMS distance of the two matches from the chosen
    shrink = 1 + 0.05 / 0.05
    assert res.spread_m == pytest.approx(spread) and res.margin == pytest.approx(0.05)
    sp, sr = sigmas(res)
    assert sp == pytest.approx((0.5 + spread) / shrink)
    assert sr == pytest.approx((0.1 + math.sqrt(math.radians(20) ** 2 / 2)) / shrink)
    cov = np.array(res.covariance).reshape(6, 6)
    assert np.allclose(cov, np.diag(np.diag(cov)))
    assert np.allclose(np.diag(cov), [sp ** 2] * 3 + [sr ** 2] * 3)


def run_pair(cfg: RelocalizerConfig, offset_m: float, rival: float) -> Relocalization:
    reloc = Relocalizer(cfg)
    outs = feed(reloc, [query(1, 0.8, (offset_m, 0.0, 0.0), rival=0.0, orientation=yaw(5)),
                        query(2, 0.9, (0.0, 0.0, 0.0), rival=rival, orientation=yaw(0))])
    assert outs[1] is not None
    return outs[1]


def test_covariance_grows_with_spread_and_shrinks_with_margin() -> None:
    cfg = RelocalizerConfig(min_consistent=2, agreement_radius_m=5.0)
    tight, spread = run_pair(cfg, 0.2, 0.8), run_pair(cfg, 4.0, 0.8)
    assert sigmas(spread)[0] > sigmas(tight)[0] * 2
    ambiguous, clear = run_pair(cfg, 1.0, 0.88), run_pair(cfg, 1.0, 0.6)
    assert clear.margin > ambiguous.margin
    assert sigmas(clear)[0] < sigmas(ambiguous)[0] / 2
    assert sigmas(clear)[1] < sigmas(ambiguous)[1]


def test_covariance_is_clamped() -> None:
    cfg = RelocalizerConfig(min_consistent=2, agreement_radius_m=100.0, min_sigma_m=0.3,
                            max_sigma_m=2.0, min_sigma_rad=0.05, max_sigma_rad=0.5)
    huge = run_pair(cfg, 90.0, 0.9)  # spread 64 m, no margin
    assert sigmas(huge)[0] == pytest.approx(2.0)
    sure = run_pair(cfg, 0.0, -1.0)  # no spread, margin 1.9
    assert sigmas(sure) == pytest.approx((0.3, 0.05))


def test_missing_orientation_gives_identity_with_maximal_rotation_variance() -> None:
    reloc = Relocalizer(RelocalizerConfig(min_consistent=1, max_sigma_rad=2.0))
    res = reloc.update(0, query(1, 0.9, (1.0, 2.0, 3.0), rival=0.1))
    assert res is not None and not res.has_orientation
    assert res.orientation == (0.0, 0.0, 0.0, 1.0)
    assert sigmas(res)[1] == pytest.approx(2.0)


def test_margin_ignores_runner_ups_at_the_same_place() -> None:
    top = Candidate(1, 0.90, 0, (0.0, 0.0, 0.0))
    neighbour = Candidate(2, 0.89, 0, (1.0, 0.0, 0.0))
    rival = Candidate(3, 0.70, 0, FAR)
    assert score_margin(top, [top, neighbour, rival], 5.0, 0) == pytest.approx(0.20)
    # Every result at the winner's place: the best rival is at most the lowest returned score.
    assert score_margin(top, [top, neighbour], 5.0, 0) == pytest.approx(0.01)
    assert score_margin(top, [top], 5.0, 0) == 0.0


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="RelocalizerConfig.min_consistent"):
        RelocalizerConfig(min_consistent=0)
    with pytest.raises(ConfigError, match="RelocalizerConfig.margin_scale"):
        RelocalizerConfig(margin_scale=0.0)
    with pytest.raises(ConfigError, match="min_sigma_m = 3.0 exceeds max_sigma_m = 2.0"):
        RelocalizerConfig(min_sigma_m=3.0, max_sigma_m=2.0)
    with pytest.raises(ConfigError, match="RelocalizerConfig.one_shot"):
        RelocalizerConfig(one_shot=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no parameter"):
        RelocalizerConfig.from_mapping({"min_consistant": 2})
