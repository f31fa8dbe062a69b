"""Several cameras, one decision: merging each camera's hypotheses into one ranked list.

A robot with a front and a rear camera sees a place twice: when one view is blank (a wall, a
person in front of the lens, the sun), the other may still recognise it, and when both
recognise the same place that agreement is evidence in itself. Each camera's frame is searched
on its own (its own query, its own top-k, its frame score normalised against its own
similarity to the map); :func:`merge_cameras` then pools the hypotheses and groups them into
places.

Merge rules (node parameter ``cameras_merge``):

- ``vote``: a place's evidence is the best evidence any camera found for it plus
  ``vote_bonus`` for each further camera that found the same place among its hypotheses. A
  place seen by two cameras therefore outranks one seen equally well by one camera, while a
  clearly better single-camera match (by more than the bonus) still wins. The bonus is in
  evidence units: standard deviations of the frame's similarity to the map at large (the
  normalised frame score of single-frame matching).
- ``best``: the best evidence alone (cameras only widen the pool).

Hypotheses whose cosine score is below ``min_score`` (the decision's own threshold) rank after
every one above it, whatever their evidence: a frame that shows nothing (a blinded lens, a
blank wall) has a narrow spread of similarities, so its normalised frame scores come out high
for matches the decision would refuse anyway; they must not push a camera that sees the place
out of the top of the list.

Two hypotheses are the same place by :func:`~vpr_ros.localization.geometry.same_place`:
positions within ``radius_m`` when both keyframes have one, else the same session and stamps
within ``window_ns`` (the front and rear keyframes a mapping run took at the same moment).
Every hypothesis keeps its own keyframe and cosine score; only evidence (its frame score) is
raised, so score thresholds keep their meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from vpr_ros.errors import ConfigError
from vpr_ros.localization.geometry import same_place
from vpr_ros.localization.hypotheses import Hypothesis

MERGE_RULES = ("vote", "best")


@dataclass
class MergedHypotheses:
    """The pooled hypotheses, best evidence first, and for each keyframe id the camera that
    found it (the best-scoring one) and how many cameras found its place."""

    hypotheses: list[Hypothesis] = field(default_factory=list)
    camera_of: dict[int, str] = field(default_factory=dict)
    votes: dict[int, int] = field(default_factory=dict)


def merge_cameras(per_camera: Sequence[tuple[str, Sequence[Hypothesis]]], rule: str = "vote",
                  vote_bonus: float = 0.5, radius_m: float = 2.0,
                  window_ns: int = 500_000_000, min_score: float = -1.0) -> MergedHypotheses:
    """Pool the cameras' hypotheses (see the module docstring)."""
    if rule not in MERGE_RULES:
        raise ConfigError(f"camera merge rule {rule!r} is not one of {', '.join(MERGE_RULES)}")
    if not (math.isfinite(vote_bonus) and vote_bonus >= 0):
        raise ConfigError(f"camera vote bonus must be >= 0, got {vote_bonus!r}")
    def rank(h: Hypothesis) -> tuple[bool, float]:
        return h.score >= min_score, h.evidence

    pooled = sorted(((h, cam) for cam, hyps in per_camera for h in hyps),
                    key=lambda item: rank(item[0]), reverse=True)
    places: list[tuple[Hypothesis, set[str], list[int]]] = []  # representative, cameras, members
    place_of: list[int] = []
    for h, cam in pooled:
        for p, (rep, cams, members) in enumerate(places):
            if same_place(rep.candidate, h.candidate, radius_m, window_ns):
                cams.add(cam)
                members.append(len(place_of))
                place_of.append(p)
                break
        else:
            places.append((h, {cam}, [len(place_of)]))
            place_of.append(len(places) - 1)
    out = MergedHypotheses()
    boosted: list[Hypothesis] = []
    for (h, cam), p in zip(pooled, place_of):
        votes = len(places[p][1])
        bonus = vote_bonus * (votes - 1) if rule == "vote" else 0.0
        if h.id in out.camera_of:  # the same keyframe from another camera: keep the best
            continue
        out.camera_of[h.id] = cam
        out.votes[h.id] = votes
        if bonus and h.sequence is None and math.isfinite(h.frame_score):
            h = replace(h, frame_score=h.frame_score + bonus)
        boosted.append(h)
    out.hypotheses = sorted(boosted, key=rank, reverse=True)
    return out
