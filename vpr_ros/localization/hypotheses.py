"""Place hypotheses: what the decision stages pass along, and the seam where verification fits.

The decision pipeline is a chain of small stages over an ordered list of hypotheses (one map
keyframe each, with the evidence gathered for it so far):

1. **search** gives the shortlist (:class:`~vpr_ros.localization.geometry.Candidate`);
2. **sequence** (:mod:`~vpr_ros.localization.sequence`) scores paths over the last L frames and
   turns them into :class:`Hypothesis` values, best first (:func:`build_hypotheses`);
3. **gates** in the detector / relocalizer: exclusion, cosine floor, sequence score, the
   relative score (:func:`evidence_margin`: the lead over the best hypothesis at another place),
   the odometry distance gate, temporal consistency;
4. **verification** (optional): a :data:`Verifier` is called on the survivors in rank order
   and the first one it confirms is accepted; it may return any evidence object (a relative
   transform, inlier counts), which the accepted result carries as ``verification``;
5. **decide**: one loop closure / relocalization vote per frame.

Everything here is plain data so each stage can be tested on recorded sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vpr_ros.localization.geometry import Candidate, Position, Quaternion, same_place
from vpr_ros.localization.sequence import SequenceMatch, SequenceResult

NAN = float("nan")


@dataclass(frozen=True)
class Hypothesis:
    """"The current frame shows map keyframe ``candidate.id``", with its evidence.

    ``candidate.score`` is the current frame's cosine similarity to the keyframe;
    ``frame_score`` the same normalised per frame (standard deviations above the frame's
    similarity to the map at large; NaN when nothing normalised it); ``sequence`` the best path
    ending there (None in single-frame matching, or when the path was too short to count).
    """

    candidate: Candidate
    sequence: Optional[SequenceMatch] = None
    frame_score: float = NAN
    #: The relative score (:func:`evidence_margin`) when already known (an evaluation computes
    #: it once per frame and replays many configurations); NaN: the deciding stage computes it.
    margin: float = NAN

    @property
    def id(self) -> int:
        return self.candidate.id

    @property
    def score(self) -> float:
        return self.candidate.score

    @property
    def stamp_ns(self) -> int:
        return self.candidate.stamp_ns

    @property
    def session(self) -> Optional[str]:
        return self.candidate.session

    @property
    def position(self) -> Optional[Position]:
        return self.candidate.position

    @property
    def orientation(self) -> Optional[Quaternion]:
        return self.candidate.orientation

    @property
    def normalised(self) -> bool:
        """Whether the evidence is in standard deviations (a matcher normalised it), which
        the relative-score threshold is expressed in."""
        return self.sequence is not None or math.isfinite(self.frame_score)

    @property
    def sequence_score(self) -> float:
        return self.sequence.score if self.sequence is not None else NAN

    @property
    def evidence(self) -> float:
        """What ranks hypotheses and what margins are measured in: the sequence score, else the
        normalised frame score, else (plain candidates) the cosine similarity."""
        if self.sequence is not None:
            return self.sequence.score
        if math.isfinite(self.frame_score):
            return self.frame_score
        return self.candidate.score


Verifier = Callable[[Hypothesis], Optional[Any]]
"""``verifier(hypothesis) -> evidence or None``: the geometric verification stage.

Called on hypotheses that passed every other stage, best first, until one returns non-None
(that one is accepted and its return value travels with the result as ``verification``); a
verifier that keeps a time budget simply returns None once it is spent."""


def as_hypothesis(item: Candidate | Hypothesis) -> Hypothesis:
    return item if isinstance(item, Hypothesis) else Hypothesis(item)


def build_hypotheses(candidates: Sequence[Candidate], result: Optional[SequenceResult],
                     candidates_of: Callable[[np.ndarray, np.ndarray], list[Candidate]],
                     sequence_enabled: bool) -> list[Hypothesis]:
    """Hypotheses of one frame, best first.

    Without a matcher result: the candidates as they are. Single-frame matching
    (``sequence_enabled`` false): the candidates with their normalised frame score. With
    sequence evidence: one hypothesis per sequence match, in the matcher's order, its candidate
    looked up with ``candidates_of(ids, cosines)`` (map metadata for keyframes that need not be
    in this frame's shortlist; the score is the frame's own cosine similarity to them).
    """
    if result is None:
        return [Hypothesis(c) for c in candidates]
    if not sequence_enabled:
        return [Hypothesis(c, None, result.normalise(c.score)) for c in candidates]
    if not result.matches:
        return []
    ids = np.array([m.id for m in result.matches], dtype=np.int64)
    cos = np.array([m.cosine for m in result.matches], dtype=np.float64)
    by_id = {c.id: c for c in candidates_of(ids, cos)}
    return [Hypothesis(by_id[m.id], m, m.frame_score) for m in result.matches if m.id in by_id]


def evidence_margin(h: Hypothesis, pool: Sequence[Hypothesis], radius_m: float,
                    stamp_window_ns: int) -> float:
    """How far ``h`` leads the best hypothesis of ``pool`` at another place (evidence units).

    Rivals at the same place (:func:`~vpr_ros.localization.geometry.same_place`: the
    neighbouring keyframes of one corridor) are no ambiguity and are ignored. With no rival at
    all, the lead over the weakest hypothesis returned is used: every rival the search could
    have returned scored at most that (a conservative bound; one hypothesis alone gives 0).
    Negative when a hypothesis elsewhere is stronger.
    """
    rivals = [o.evidence for o in pool
              if o.id != h.id and not same_place(h.candidate, o.candidate, radius_m,
                                                 stamp_window_ns)]
    if rivals:
        return h.evidence - max(rivals)
    return max(0.0, h.evidence - min((o.evidence for o in pool), default=h.evidence))

