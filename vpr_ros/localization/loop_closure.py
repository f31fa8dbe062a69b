"""Loop-closure detection: which map matches of a live run are real revisits.

A place-recognition search always returns *something*; most of it must be thrown away before a
SLAM back end sees it, because one wrong loop edge can fold a whole map. The detector takes the
frame's hypotheses (:mod:`~vpr_ros.localization.hypotheses`: the search shortlist, or with
sequence matching the places that best explain the last L frames) and applies, in this order,
the filters loop-closure systems converge on (ORB-SLAM3, Kimera-VIO), then the optional
verification stage:

1. *Exclusion of the recent past*: the keyframes just behind the robot always look alike, so
   those inside ``exclusion_window_s`` of the query (in the live session) or among the last
   ``exclusion_recent_keyframes`` inserted are never candidates. The detector hands the map
   the same rule (:meth:`LoopClosureDetector.search_exclusion`) so they do not waste the top-k,
   and filters the results itself too, so a map that ignores the exclusion still cannot leak one.
2. *Thresholds*: ``min_score`` (cosine similarity of L2-normalised descriptors) and, with
   sequence matching, ``min_sequence_score`` (the path's normalised evidence).
3. *Relative score*: ``min_margin``, the lead of a hypothesis over the best one at another place
   (:func:`~vpr_ros.localization.hypotheses.evidence_margin`); a frame that looks equally like
   two places says nothing about either.
4. *Odometry distance gate* (``max_odometry_distance_m``, where the query has odometry): a
   keyframe of the live session farther from the query's odometry position than drift can
   explain is not the same place.
5. *Temporal consistency*: a candidate is accepted only when at least ``consistency_k`` of the
   last ``consistency_n`` queries (this one included) had a surviving candidate in the same map
   neighbourhood (:func:`~vpr_ros.localization.geometry.same_place`). A single look-alike frame
   rarely repeats over consecutive queries; a true revisit does.
6. *Verification* (a :data:`~vpr_ros.localization.hypotheses.Verifier`, when given): called on
   the consistent survivors best first; the first it confirms is the closure.

At most one closure comes out per query: the best consistent (and verified) hypothesis.

The detector also decides which frames become keyframes of the growing map
(:meth:`LoopClosureDetector.should_insert`), because that choice and the count-based exclusion
are one piece of state: the detector must know what was inserted to know what is "recent".
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.localization.geometry import (
    NS_PER_S,
    Candidate,
    Position,
    Quaternion,
    as_position,
    as_quaternion,
    distance,
    rotation_angle_rad,
    same_place,
    seconds_to_ns,
)
from vpr_ros.localization.hypotheses import Hypothesis, Verifier, as_hypothesis, evidence_margin
from vpr_ros.localization.params import Tunables, param, require, validate
from vpr_ros.localization.sequence import unit_descriptor


@dataclass(frozen=True)
class LoopClosureConfig(Tunables):
    """Tunables of :class:`LoopClosureDetector`; validated on construction."""

    min_score: float = param(
        0.5, "cosine similarity a match needs to be a loop candidate", -1.0, 1.0)
    exclusion_window_s: float = param(
        30.0, "keyframes of the live session this close in time to the query are never loops", 0.0)
    exclusion_recent_keyframes: int = param(
        20, "the last N inserted keyframes are never loops (covers a robot standing still)", 0)
    consistency_k: int = param(
        2, "queries (of the last consistency_n) that must agree on a neighbourhood", 1)
    consistency_n: int = param(
        5, "length of the query window temporal consistency looks at", 1)
    consistency_radius_m: float = param(
        5.0, "matches this close in map position are the same neighbourhood", 0.0)
    consistency_stamp_window_s: float = param(
        10.0, "without poses: same-session matches this close in time are the same neighbourhood",
        0.0)
    keyframe_min_distance_m: float = param(
        1.0, "with odometry: insert a keyframe after travelling this far", 0.0)
    keyframe_min_rotation_deg: float = param(
        15.0, "with odometry: insert a keyframe after turning this much", 0.0, 180.0)
    keyframe_max_interval_s: float = param(
        5.0, "insert a keyframe at least this often, whatever else says", 0.0)
    novelty_threshold: float = param(
        0.9, "without odometry: insert when similarity to recent keyframes is below this",
        -1.0, 1.0)
    novelty_window_keyframes: int = param(
        5, "without odometry: how many recent keyframes novelty compares against", 1)
    min_sequence_score: float = param(
        2.0, "with sequence matching (sequence.length > 1): evidence a loop candidate needs, the "
        "mean over the last frames of their similarity to the aligned keyframes in standard "
        "deviations above each frame's similarity to the map at large", -100.0, 100.0)
    min_margin: float = param(
        0.5, "relative score: a candidate's evidence must exceed the best candidate at another "
        "place by this much, in standard deviations of the frame's similarity to the map (plain "
        "candidates without that normalisation are not gated); 0: off", 0.0, 100.0)
    max_odometry_distance_m: float = param(
        0.0, "odometry distance gate: live-session keyframes farther than this from the query's "
        "odometry position are never loops (bounds odometry drift); 0: off", 0.0)

    def __post_init__(self) -> None:
        validate(self)
        require(
            self.consistency_n >= self.consistency_k,
            f"LoopClosureConfig.consistency_n = {self.consistency_n} must be >= consistency_k = "
            f"{self.consistency_k}: k of n queries cannot agree when n < k. Raise consistency_n "
            "or lower consistency_k.",
        )


@dataclass(frozen=True)
class SearchExclusion:
    """What the map search should leave out; field for field ``vpr_ros.mapdb.Exclusion``.

    ``around_stamp_ns``/``window_ns``/``window_session``: drop keyframes of ``window_session``
    (every session when ``None``) whose stamp is within ``window_ns`` of ``around_stamp_ns``.
    """

    sessions: frozenset[str] = frozenset()
    ids: frozenset[int] = frozenset()
    around_stamp_ns: Optional[int] = None
    window_ns: int = 0
    window_session: Optional[str] = None

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the map's own exclusion type: ``Exclusion(**ex.as_kwargs())``."""
        return {"sessions": self.sessions, "ids": self.ids, "around_stamp_ns": self.around_stamp_ns,
                "window_ns": self.window_ns, "window_session": self.window_session}


@dataclass(frozen=True)
class LoopClosure:
    """An accepted loop: query (the live frame) matched to map keyframe ``match_id``."""

    query_stamp_ns: int
    match_id: int
    match_stamp_ns: int
    score: float
    consistent_count: int
    match_session: Optional[str] = None
    match_position: Optional[Position] = None
    match_orientation: Optional[Quaternion] = None
    sequence_score: float = math.nan
    margin: float = math.nan
    sequence_steps: int = 0
    verification: Any = None


@dataclass(frozen=True)
class InsertDecision:
    """Whether a frame becomes a keyframe, why, and the measures the decision looked at.

    ``reason`` is one of ``first``, ``distance``, ``rotation``, ``interval``, ``time_jump``,
    ``novelty`` when ``insert`` is true, else ``""``. Measures that did not apply are ``None``.
    """

    insert: bool
    reason: str
    distance_m: Optional[float] = None
    rotation_deg: Optional[float] = None
    elapsed_s: Optional[float] = None
    max_similarity: Optional[float] = None

    def __bool__(self) -> bool:
        return self.insert


@dataclass
class LoopClosureStats:
    """Counters for diagnostics; cumulative over the detector's life (``reset`` keeps them)."""

    queries: int = 0
    closures: int = 0
    candidates_excluded: int = 0
    candidates_below_threshold: int = 0
    candidates_below_sequence: int = 0
    candidates_low_margin: int = 0
    candidates_beyond_odometry: int = 0
    candidates_unverified: int = 0
    inconsistent_queries: int = 0
    time_jumps: int = 0
    keyframes_inserted: int = 0


@dataclass
class _LastKeyframe:
    stamp_ns: int
    position: Optional[Position]
    orientation: Optional[Quaternion]


class LoopClosureDetector:
    """Pure state machine turning per-query search results into accepted loop closures.

    Per frame, the node calls, in order:

    1. :meth:`search_exclusion` -> pass it to the map search;
    2. :meth:`process` with the query stamp and the results as candidates -> a closure or None;
    3. :meth:`should_insert` -> if true, add the frame to the map, then :meth:`mark_inserted`
       with the id the map gave it (the detector cannot know that id before the map assigns it).

    ``session`` names the live run in the map; the time exclusion window applies to it only
    (``None``: to every session, the safe choice when sessions are not tracked).
    ``sequence_length`` > 1 says the hypotheses carry sequence evidence, which then must pass
    ``min_sequence_score`` (a hypothesis without it, e.g. a path too short, is not a loop).
    """

    def __init__(self, config: Optional[LoopClosureConfig] = None, session: Optional[str] = None,
                 sequence_length: int = 1):
        self.config = config if config is not None else LoopClosureConfig()
        self.sequence_length = int(sequence_length)
        self.stats = LoopClosureStats()
        self._session = session
        self._window_ns = seconds_to_ns(self.config.exclusion_window_s)
        self._stamp_window_ns = seconds_to_ns(self.config.consistency_stamp_window_s)
        self._history: deque[list[Candidate]] = deque(maxlen=self.config.consistency_n - 1)
        self._last_query_ns: Optional[int] = None
        self._recent_ids: deque[int] = deque(maxlen=self.config.exclusion_recent_keyframes)
        self._last_kf: Optional[_LastKeyframe] = None
        self._novelty: deque[np.ndarray] = deque(maxlen=self.config.novelty_window_keyframes)

    @property
    def session(self) -> Optional[str]:
        return self._session

    def reset(self, session: Optional[str] = None) -> None:
        """Forget the run (history, recent keyframes, last keyframe); keep the stats counters.

        ``session``: the name of the run that starts now; ``None`` keeps the current one.
        """
        if session is not None:
            self._session = session
        self._history.clear()
        self._last_query_ns = None
        self._recent_ids.clear()
        self._last_kf = None
        self._novelty.clear()

    # ----------------------------------------------------------------------------- exclusion
    def search_exclusion(self, query_stamp_ns: int) -> SearchExclusion:
        """The exclusion the node should pass to the map search for this query."""
        return SearchExclusion(
            ids=frozenset(self._recent_ids),
            around_stamp_ns=int(query_stamp_ns),
            window_ns=self._window_ns,
            window_session=self._session,
        )

    def is_excluded(self, candidate: Candidate, query_stamp_ns: int) -> bool:
        """Whether ``candidate`` lies in the recent past of the query (never a loop)."""
        if candidate.id in self._recent_ids:
            return True
        in_live_session = (self._session is None or candidate.session is None
                           or candidate.session == self._session)
        return in_live_session and abs(candidate.stamp_ns - int(query_stamp_ns)) <= self._window_ns

    # ------------------------------------------------------------------------------ decisions
    def process(self, query_stamp_ns: int, candidates: Sequence[Candidate | Hypothesis], *,
                query_position: Optional[Sequence[float]] = None,
                verifier: Optional[Verifier] = None) -> Optional[LoopClosure]:
        """Feed one query's hypotheses (or plain candidates); return the accepted closure, if any.

        Every query must be fed, including those with no candidates: they count as
        non-supporting members of the consistency window. A query stamp earlier than the last
        one (a bag restarted, sim time reset) clears the consistency history, since agreement
        across a time jump means nothing; it is counted in ``stats.time_jumps``.
        ``query_position``: the query's odometry position (the distance gate); ``verifier``:
        the optional verification stage (see :data:`~vpr_ros.localization.hypotheses.Verifier`).
        """
        stamp = int(query_stamp_ns)
        self.stats.queries += 1
        if self._last_query_ns is not None and stamp < self._last_query_ns:
            self._history.clear()
            self.stats.time_jumps += 1
        self._last_query_ns = stamp
        allowed = [h for h in map(as_hypothesis, candidates) if not self._excluded(h, stamp)]
        surviving = self.gate(allowed, query_position)
        consistent = self.consistent(surviving)
        if self._history.maxlen:
            self._history.append([h.candidate for h in surviving])
        accepted = self.decide(stamp, consistent, allowed, verifier)
        if accepted is not None:
            self.stats.closures += 1
        elif surviving:
            self.stats.inconsistent_queries += 1
        return accepted

    # The stages of process(), in order; each is small and separately testable.

    def _excluded(self, h: Hypothesis, stamp: int) -> bool:
        if self.is_excluded(h.candidate, stamp):
            self.stats.candidates_excluded += 1
            return True
        return False

    def gate(self, hypotheses: list[Hypothesis],
             query_position: Optional[Sequence[float]] = None) -> list[Hypothesis]:
        """Thresholds, relative score and odometry gate; survivors best first."""
        cfg = self.config
        query_pos = None if query_position is None else as_position(query_position)
        out: list[Hypothesis] = []
        for h in hypotheses:
            if h.score < cfg.min_score:
                self.stats.candidates_below_threshold += 1
            elif self.sequence_length > 1 and (h.sequence is None
                                               or h.sequence.score < cfg.min_sequence_score):
                self.stats.candidates_below_sequence += 1
            elif (cfg.max_odometry_distance_m > 0 and query_pos is not None
                  and h.position is not None and h.session is not None
                  and h.session == self._session
                  and distance(query_pos, h.position) > cfg.max_odometry_distance_m):
                self.stats.candidates_beyond_odometry += 1
            elif cfg.min_margin > 0 and h.normalised and \
                    self._margin(h, hypotheses) < cfg.min_margin:
                self.stats.candidates_low_margin += 1
            else:
                out.append(h)
        out.sort(key=lambda h: h.evidence, reverse=True)
        return out

    def _margin(self, h: Hypothesis, pool: Sequence[Hypothesis]) -> float:
        if math.isfinite(h.margin):
            return h.margin
        return evidence_margin(h, pool, self.config.consistency_radius_m, self._stamp_window_ns)

    def consistent(self, surviving: list[Hypothesis]) -> list[tuple[Hypothesis, int]]:
        """Survivors that enough of the last queries agree with, with their support count."""
        cfg = self.config
        out = []
        for h in surviving:
            support = 1 + sum(
                1 for past in self._history
                if any(same_place(h.candidate, other, cfg.consistency_radius_m,
                                  self._stamp_window_ns) for other in past)
            )
            if support >= cfg.consistency_k:
                out.append((h, support))
        return out

    def decide(self, stamp: int, consistent: list[tuple[Hypothesis, int]],
               pool: Sequence[Hypothesis], verifier: Optional[Verifier] = None
               ) -> Optional[LoopClosure]:
        """The first consistent hypothesis the verifier confirms (without one: the first)."""
        for h, support in consistent:
            evidence = None
            if verifier is not None:
                evidence = verifier(h)
                if evidence is None:
                    self.stats.candidates_unverified += 1
                    continue
            cand = h.candidate
            return LoopClosure(
                query_stamp_ns=stamp, match_id=cand.id, match_stamp_ns=cand.stamp_ns,
                score=cand.score, consistent_count=support, match_session=cand.session,
                match_position=cand.position, match_orientation=cand.orientation,
                sequence_score=h.sequence_score, margin=self._margin(h, pool),
                sequence_steps=h.sequence.steps if h.sequence is not None else 0,
                verification=evidence)
        return None

    # ------------------------------------------------------------------------------ keyframes
    def should_insert(
        self,
        stamp_ns: int,
        position: Optional[Sequence[float]] = None,
        orientation: Optional[Sequence[float]] = None,
        descriptor: Optional[Sequence[float] | np.ndarray] = None,
    ) -> InsertDecision:
        """Decide whether this frame becomes a keyframe; changes no state.

        With odometry (``position`` given and the last keyframe had one) the frame is inserted
        after ``keyframe_min_distance_m`` of travel or ``keyframe_min_rotation_deg`` of turn
        (rotation needs both orientations). Without odometry, by descriptor novelty: inserted
        when its best cosine similarity to the last ``novelty_window_keyframes`` keyframes is
        below ``novelty_threshold``. Odometry, when present, wins over novelty: it measures
        motion directly, while novelty also fires on lighting changes and passing people. In
        every mode ``keyframe_max_interval_s`` forces an insertion, so a robot parked in front
        of a changing scene still refreshes its map, and a backwards stamp inserts
        (``time_jump``): the previous keyframe belongs to another timeline.
        """
        cfg = self.config
        stamp = int(stamp_ns)
        last = self._last_kf
        if last is None:
            return InsertDecision(True, "first")
        elapsed_s = (stamp - last.stamp_ns) / NS_PER_S
        if elapsed_s < 0:
            return InsertDecision(True, "time_jump", elapsed_s=elapsed_s)

        if position is not None and last.position is not None:
            moved = distance(as_position(position), last.position)
            turned: Optional[float] = None
            if orientation is not None and last.orientation is not None:
                turned = math.degrees(rotation_angle_rad(as_quaternion(orientation), last.orientation))
            measures = dict(distance_m=moved, rotation_deg=turned, elapsed_s=elapsed_s)
            if moved >= cfg.keyframe_min_distance_m:
                return InsertDecision(True, "distance", **measures)
            if turned is not None and turned >= cfg.keyframe_min_rotation_deg:
                return InsertDecision(True, "rotation", **measures)
            if elapsed_s >= cfg.keyframe_max_interval_s:
                return InsertDecision(True, "interval", **measures)
            return InsertDecision(False, "", **measures)

        similarity: Optional[float] = None
        if descriptor is not None and self._novelty:
            vec = unit_descriptor(descriptor, np.float64)
            memory = self._novelty[0]
            if vec.shape != memory.shape:
                raise InputError(
                    f"descriptor has dimension {vec.size} but recent keyframes have {memory.size}; "
                    "the model changed mid-run: reset() the detector"
                )
            similarity = float(max(float(vec @ m) for m in self._novelty))
        if elapsed_s >= cfg.keyframe_max_interval_s:
            return InsertDecision(True, "interval", elapsed_s=elapsed_s, max_similarity=similarity)
        if similarity is not None and similarity < cfg.novelty_threshold:
            return InsertDecision(True, "novelty", elapsed_s=elapsed_s, max_similarity=similarity)
        return InsertDecision(False, "", elapsed_s=elapsed_s, max_similarity=similarity)

    def mark_inserted(
        self,
        keyframe_id: int,
        stamp_ns: int,
        position: Optional[Sequence[float]] = None,
        orientation: Optional[Sequence[float]] = None,
        descriptor: Optional[Sequence[float] | np.ndarray] = None,
    ) -> None:
        """Record that the frame was added to the map as ``keyframe_id``.

        It becomes the reference for the next :meth:`should_insert` and one of the recent
        keyframes excluded from loop search. Pass its descriptor so novelty can compare against
        it when there is no odometry.
        """
        pos = None if position is None else as_position(position)
        quat = None if orientation is None else as_quaternion(orientation)
        if descriptor is not None:
            vec = unit_descriptor(descriptor, np.float64)
            if self._novelty and self._novelty[0].shape != vec.shape:
                raise InputError(
                    f"descriptor has dimension {vec.size} but recent keyframes have "
                    f"{self._novelty[0].size}; the model changed mid-run: reset() the detector"
                )
            self._novelty.append(vec)
        self._last_kf = _LastKeyframe(int(stamp_ns), pos, quat)
        if self._recent_ids.maxlen:
            self._recent_ids.append(int(keyframe_id))
        self.stats.keyframes_inserted += 1
