"""Relocalization: turning place matches into a map pose a localizer can be seeded with.

A wrong ``initialpose`` sends Nav2/AMCL's particle cloud to the wrong corridor, from which it
rarely recovers; a late one costs a few frames. So the relocalizer waits until
``min_consistent`` *consecutive* queries put their top match in the same place, then reports
the pose of the best of those matches with a covariance that says how sure it is. Any query
whose top match is elsewhere (or that has no match above ``min_score``) restarts the count.

A query's vote is its best hypothesis (:mod:`~vpr_ros.localization.hypotheses`; with sequence
matching, the place that best explains the last L frames) that passes the gates: the cosine
floor ``min_score``, with sequence matching ``min_sequence_score``, the relative score
``min_margin`` (its lead over the best hypothesis at another place), and, when a verifier is
given, verification (tried best first; the first confirmed is the vote).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from vpr_ros.localization.geometry import (
    Candidate,
    Position,
    Quaternion,
    distance,
    rotation_angle_rad,
    same_place,
    seconds_to_ns,
)
from vpr_ros.localization.hypotheses import Hypothesis, Verifier, as_hypothesis, evidence_margin
from vpr_ros.localization.params import Tunables, param, require, validate

IDENTITY: Quaternion = (0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class RelocalizerConfig(Tunables):
    """Tunables of :class:`Relocalizer`; validated on construction."""

    min_score: float = param(
        0.5, "cosine similarity a top match needs to count at all", -1.0, 1.0)
    min_consistent: int = param(
        2, "consecutive queries whose top matches must agree before a pose is accepted", 1)
    agreement_radius_m: float = param(
        5.0, "top matches this close to each other in map position agree", 0.0)
    agreement_stamp_window_s: float = param(
        10.0, "top matches without poses agree when same-session and this close in time", 0.0)
    base_sigma_m: float = param(
        0.5, "position standard deviation of a perfect match, before spread and margin", 0.0)
    base_sigma_rad: float = param(
        0.1, "rotation standard deviation of a perfect match, before spread and margin", 0.0)
    margin_scale: float = param(
        0.05, "score margin that halves the standard deviations (cosine units)", 1e-6)
    min_sigma_m: float = param(0.05, "lower clamp of the position standard deviation", 0.0)
    max_sigma_m: float = param(10.0, "upper clamp of the position standard deviation", 0.0)
    min_sigma_rad: float = param(0.02, "lower clamp of the rotation standard deviation", 0.0)
    max_sigma_rad: float = param(
        math.pi, "upper clamp of the rotation standard deviation; also used for a missing "
        "orientation", 0.0)
    one_shot: bool = param(
        True, "after an acceptance stay silent until reset() (true: feed initialpose once); "
        "false: report on every further agreeing query")
    min_sequence_score: float = param(
        2.0, "with sequence matching (sequence.length > 1): evidence a vote needs, the mean over "
        "the last frames of their similarity to the aligned keyframes in standard deviations "
        "above each frame's similarity to the map at large", -100.0, 100.0)
    min_margin: float = param(
        0.5, "relative score: a vote's evidence must exceed the best hypothesis at another place "
        "by this much, in standard deviations of the frame's similarity to the map (plain "
        "candidates without that normalisation are not gated); 0: off", 0.0, 100.0)

    def __post_init__(self) -> None:
        validate(self)
        require(self.min_sigma_m <= self.max_sigma_m,
                f"RelocalizerConfig.min_sigma_m = {self.min_sigma_m} exceeds max_sigma_m = "
                f"{self.max_sigma_m}; the clamp range is empty. Swap or widen them.")
        require(self.min_sigma_rad <= self.max_sigma_rad,
                f"RelocalizerConfig.min_sigma_rad = {self.min_sigma_rad} exceeds max_sigma_rad = "
                f"{self.max_sigma_rad}; the clamp range is empty. Swap or widen them.")


@dataclass(frozen=True)
class Relocalization:
    """An accepted place, with its map pose when the map has one.

    ``position``/``covariance`` are ``None`` when none of the agreeing keyframes has a pose (a
    map built without a pose topic): the place is still reported, so the node can log or
    publish the match, but it must not publish a pose. ``orientation`` is identity with the
    rotation variances at ``max_sigma_rad**2`` when the keyframe has a position only
    (``has_orientation`` false). ``covariance`` is 6x6 row-major over (x, y, z, rot x, rot y,
    rot z), the layout of ``geometry_msgs/PoseWithCovariance``.
    """

    stamp_ns: int
    keyframe_id: int
    score: float
    consistent_count: int
    margin: float
    spread_m: Optional[float]
    position: Optional[Position]
    orientation: Optional[Quaternion]
    has_orientation: bool
    covariance: Optional[tuple[float, ...]]
    supporting_ids: tuple[int, ...]
    sequence_score: float = math.nan
    evidence_margin: float = math.nan
    verification: Any = None

    @property
    def has_pose(self) -> bool:
        return self.position is not None


@dataclass(frozen=True)
class _Vote:
    """One query's contribution to an agreement streak."""

    stamp_ns: int
    top: Candidate
    margin: float
    hypothesis: Optional[Hypothesis] = None
    evidence_margin: float = math.nan
    verification: Any = None


def score_margin(top: Candidate, candidates: Sequence[Candidate], radius_m: float,
                 stamp_window_ns: int) -> float:
    """Score of ``top`` minus that of the best candidate at a *different* place.

    Not simply top1 - top2: the runner-up is usually the keyframe next to the winner, the same
    place, and a tiny margin between two views of one corridor is no ambiguity. What makes a
    match doubtful is a rival elsewhere scoring nearly as well. When every returned candidate
    is at the winner's place, the best rival can score at most the lowest returned score (the
    results are the top-k), so that bound is used; a single result gives margin 0, the
    conservative answer.
    """
    rivals = [c.score for c in candidates
              if c.id != top.id and not same_place(top, c, radius_m, stamp_window_ns)]
    if rivals:
        return max(0.0, top.score - max(rivals))
    return max(0.0, top.score - min(c.score for c in candidates))


class Relocalizer:
    """Pure state machine: per-query search results in, an accepted map pose out.

    Feed every query to :meth:`update` (also those with no results: they break a streak).

    Covariance formula (position; rotation is the same with the ``_rad`` parameters and the
    rotation angles between agreeing orientations)::

        spread  = RMS distance of the agreeing top matches from the chosen one   (metres)
        margin  = score margin of the chosen match's query (see score_margin)    (cosine)
        sigma   = clamp((base_sigma_m + spread) / (1 + margin / margin_scale),
                        min_sigma_m, max_sigma_m)
        cov     = diag(sigma_p^2, sigma_p^2, sigma_p^2, sigma_r^2, sigma_r^2, sigma_r^2)

    Agreeing matches scattered along a corridor mean the true pose could be anywhere among
    them, so spread adds to sigma directly (in metres); an unambiguous match (a large margin
    over any rival place) shrinks it, a margin of ``margin_scale`` halving it. x, y and z share
    one sigma: a single keyframe match says nothing about which axis is better known.
    """

    def __init__(self, config: Optional[RelocalizerConfig] = None, sequence_length: int = 1):
        self.config = config if config is not None else RelocalizerConfig()
        self.sequence_length = int(sequence_length)
        self.rejected: dict[str, int] = {"below_score": 0, "below_sequence": 0, "low_margin": 0,
                                         "unverified": 0}
        self._stamp_window_ns = seconds_to_ns(self.config.agreement_stamp_window_s)
        self._streak: deque[_Vote] = deque(maxlen=self.config.min_consistent)
        self._count = 0
        self._accepted = False

    @property
    def consistent_count(self) -> int:
        """Length of the current streak of agreeing queries."""
        return self._count

    @property
    def accepted(self) -> bool:
        """True after a one-shot acceptance, until :meth:`reset`."""
        return self._accepted

    def reset(self) -> None:
        """Forget the streak and re-arm a one-shot relocalizer (node's relocalize service)."""
        self._streak.clear()
        self._count = 0
        self._accepted = False

    def _agrees(self, cand: Candidate) -> bool:
        return all(same_place(cand, vote.top, self.config.agreement_radius_m, self._stamp_window_ns)
                   for vote in self._streak)

    def update(self, stamp_ns: int, candidates: Sequence[Candidate | Hypothesis], *,
               verifier: Optional[Verifier] = None) -> Optional[Relocalization]:
        """Feed one query's ranked hypotheses (or plain candidates); return a relocalization
        once the streak is long enough (once per reset when ``one_shot``), else ``None``.

        The query's vote is its best hypothesis passing the gates (see the module docstring).
        It must agree (see :func:`~vpr_ros.localization.geometry.same_place`) with every vote
        kept in the streak (the last ``min_consistent``), else the streak restarts from it; a
        query without a vote breaks the streak.
        """
        cfg = self.config
        if self._accepted and cfg.one_shot:
            return None
        hyps = [as_hypothesis(c) for c in candidates]
        vote = self.vote(hyps, verifier)
        if vote is None:
            self._streak.clear()
            self._count = 0
            return None
        h, ev_margin, evidence = vote
        margin = score_margin(h.candidate, [o.candidate for o in hyps], cfg.agreement_radius_m,
                              self._stamp_window_ns)
        if not self._agrees(h.candidate):
            self._streak.clear()
            self._count = 0
        self._streak.append(_Vote(int(stamp_ns), h.candidate, margin, h, ev_margin, evidence))
        self._count += 1
        if self._count < cfg.min_consistent:
            return None
        self._accepted = True
        return self._build(int(stamp_ns))

    def vote(self, hyps: list[Hypothesis], verifier: Optional[Verifier] = None
             ) -> Optional[tuple[Hypothesis, float, Any]]:
        """The query's vote: the best hypothesis through the gates and the verifier, with its
        evidence margin and the verifier's evidence; None when none passes."""
        cfg = self.config
        ranked = sorted(hyps, key=lambda h: h.evidence, reverse=True)
        for h in ranked:
            if h.score < cfg.min_score:
                self.rejected["below_score"] += 1
                continue
            if self.sequence_length > 1 and (h.sequence is None
                                             or h.sequence.score < cfg.min_sequence_score):
                self.rejected["below_sequence"] += 1
                continue
            ev_margin = h.margin if math.isfinite(h.margin) else evidence_margin(
                h, ranked, cfg.agreement_radius_m, self._stamp_window_ns)
            if cfg.min_margin > 0 and h.normalised and ev_margin < cfg.min_margin:
                self.rejected["low_margin"] += 1
                continue
            evidence = None
            if verifier is not None:
                evidence = verifier(h)
                if evidence is None:
                    self.rejected["unverified"] += 1
                    continue
            return h, ev_margin, evidence
        return None

    def _build(self, stamp_ns: int) -> Relocalization:
        cfg = self.config
        votes = list(self._streak)
        posed = [v for v in votes if v.top.position is not None]
        chosen = max(posed or votes, key=lambda v: v.top.score)
        ids = tuple(v.top.id for v in votes)
        top = chosen.top
        if top.position is None:
            return Relocalization(
                stamp_ns=stamp_ns, keyframe_id=top.id, score=top.score,
                consistent_count=self._count, margin=chosen.margin, spread_m=None, position=None,
                orientation=None, has_orientation=False, covariance=None, supporting_ids=ids,
                **self._evidence(chosen))

        shrink = 1.0 + chosen.margin / cfg.margin_scale
        spread_m = math.sqrt(sum(distance(v.top.position, top.position) ** 2  # type: ignore[arg-type]
                                 for v in posed) / len(posed))
        sigma_p = min(max((cfg.base_sigma_m + spread_m) / shrink, cfg.min_sigma_m), cfg.max_sigma_m)
        if top.orientation is not None:
            oriented = [v for v in posed if v.top.orientation is not None]
            spread_rad = math.sqrt(
                sum(rotation_angle_rad(v.top.orientation, top.orientation) ** 2  # type: ignore[arg-type]
                    for v in oriented) / len(oriented))
            sigma_r = min(max((cfg.base_sigma_rad + spread_rad) / shrink, cfg.min_sigma_rad),
                          cfg.max_sigma_rad)
            orientation = top.orientation
        else:
            sigma_r = cfg.max_sigma_rad
            orientation = IDENTITY
        variances = [sigma_p ** 2] * 3 + [sigma_r ** 2] * 3
        covariance = tuple(variances[i] if i == j else 0.0 for i in range(6) for j in range(6))
        return Relocalization(
            stamp_ns=stamp_ns, keyframe_id=top.id, score=top.score, consistent_count=self._count,
            margin=chosen.margin, spread_m=spread_m, position=top.position, orientation=orientation,
            has_orientation=top.orientation is not None, covariance=covariance, supporting_ids=ids,
            **self._evidence(chosen))

    @staticmethod
    def _evidence(vote: _Vote) -> dict[str, Any]:
        h = vote.hypothesis
        return {"sequence_score": h.sequence_score if h is not None else math.nan,
                "evidence_margin": vote.evidence_margin, "verification": vote.verification}
