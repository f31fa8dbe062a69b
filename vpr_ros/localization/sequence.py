"""Sequence evidence: which map place explains the last L camera frames, not just this one.

A single frame's best match is often wrong (night, repeated facades, a tunnel); the frames a
robot saw just before it usually are not all wrong in the same way. SeqSLAM's answer is to
score a hypothesis "the current frame is keyframe j" by the similarity of the last L query
frames to the keyframes *along the route* that lead to j. This module does that incrementally,
per frame, without ever forming the N x N (or N x L) similarity matrix of the map:

- **Hypotheses** are path ends: the current frame's search shortlist (the index's top-K) and
  those keyframes' neighbours along their session, plus the shortlists of the previous frames
  carried forward along the route by the distance (or time) travelled since. So a place that
  was in the top-K of any of the last L frames is scored, even when this frame's top-K misses it.
- **Alignment** of query frame i-t with a keyframe walks back along the end keyframe's session
  in keyframe order (:class:`KeyframeTrack`): by *travelled distance* when the query frames carry
  odometry and the session carries positions (one alignment, no search), otherwise by *time*
  over a range of relative speeds (SeqSLAM's velocity search). A traversal in the opposite
  direction walks forward instead (``reverse``). A step that falls outside the session (its
  start or end), into a gap between keyframes wider than ``max_gap_s`` / ``max_gap_m``, or onto
  a keyframe the caller excludes (the recent past in loop-closure mode) is missing.
- **Scores** are normalised per query frame: a frame's cosine similarity to a keyframe is
  turned into standard deviations above that frame's similarity to the map at large (mean and
  spread over a fixed random sample of keyframes, ``background_samples``), the per-row
  normalisation SeqSLAM relies on, estimated at a cost that does not depend on the map's size.
  A path's score is the sum over the frames of the evidence buffer divided by their number:
  a missing step counts as 0, the background, so a short or broken path is never *more*
  convincing than a whole one. Paths with fewer than ``min_steps`` aligned frames carry no
  sequence evidence and are not returned.

The per-frame cost is the shortlist's paths times the buffer length, plus one
``(L x U)`` matrix product with the U keyframes those paths touch, plus the background sample:
independent of the map's size except for a binary search (log N) per path step.

Frames enter the evidence buffer (at most ``length``, the current frame always last) when the
query has moved ``step_m`` (odometry) or ``step_s`` (time) since the last one kept; a frame
that has not moved replaces the current one, so a robot standing still does not fill its buffer
with one place, and with ``still_similarity`` < 1 a frame that looks like the previous one does
not advance the time axis either (standing still without odometry).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.localization.params import Tunables, param, require, validate

NS_PER_S = 1_000_000_000

#: Matches returned per frame after suppressing near-duplicates along a session: enough for
#: every decision stage (best place, its rivals, consistency) at a bounded cost.
MAX_MATCHES = 32

DescriptorsOf = Callable[[np.ndarray], np.ndarray]
"""``descriptors_of(ids) -> (len(ids), D)`` map descriptors (any float dtype), L2-normalised."""


@dataclass(frozen=True)
class SequenceConfig(Tunables):
    """Tunables of :class:`SequenceMatcher` (node parameters ``sequence.*``)."""

    length: int = param(
        10, "query frames of evidence per decision (L); 1: single-frame matching, no sequence",
        1, 1000)
    min_steps: int = param(
        5, "a path needs this many of its frames aligned with keyframes (session ends, gaps and "
        "excluded keyframes leave steps missing) to count as sequence evidence; capped at "
        "length", 1, 1000)
    use_odometry: bool = param(
        True, "align by travelled distance where the query frames carry odometry and the map "
        "session carries positions; otherwise (or false) align by time over the speed range")
    speed_min: float = param(
        0.8, "without odometry: slowest map-to-query speed ratio searched (map seconds per "
        "query second)", 0.01, 100.0)
    speed_max: float = param(
        1.25, "without odometry: fastest map-to-query speed ratio searched", 0.01, 100.0)
    speed_steps: int = param(
        5, "without odometry: speeds tried, log-spaced from speed_min to speed_max (1.0 "
        "included when inside)", 1, 101)
    reverse: bool = param(
        False, "also match the map session traversed in the opposite direction")
    neighbours: int = param(
        2, "keyframes either side (in session order) of each shortlisted keyframe also tried as "
        "path ends", 0, 100)
    step_s: float = param(
        0.0, "without odometry: a frame joins the evidence after this much time since the last "
        "one kept (s); 0: every frame that moved on", 0.0, 3600.0)
    step_m: float = param(
        1.0, "with odometry: a frame joins the evidence after travelling this far since the "
        "last one kept (m)", 0.0, 1000.0)
    max_gap_s: float = param(
        3.0, "time alignment: a path step is missing where no keyframe lies within this of the "
        "aligned time (s)", 0.0, 3600.0)
    max_gap_m: float = param(
        3.0, "distance alignment: a path step is missing where no keyframe lies within this of "
        "the aligned travelled distance (m)", 0.0, 10000.0)
    still_similarity: float = param(
        1.0, "without odometry: a frame at least this similar (cosine) to the previous one is "
        "the robot standing still and does not advance the time axis; 1.0: off", -1.0, 1.0)
    background_samples: int = param(
        256, "map keyframes sampled to estimate each frame's similarity to the map at large "
        "(the per-frame normalisation)", 8, 100000)

    def __post_init__(self) -> None:
        validate(self)
        require(self.speed_min <= self.speed_max,
                f"SequenceConfig.speed_min = {self.speed_min} exceeds speed_max = "
                f"{self.speed_max}; the speed range is empty. Swap or widen them.")

    @property
    def enabled(self) -> bool:
        """Sequence evidence is in use (length > 1)."""
        return self.length > 1

    @property
    def effective_min_steps(self) -> int:
        return min(self.min_steps, self.length)

    def speeds(self) -> np.ndarray:
        """The relative speeds of the time alignment (log-spaced, 1.0 included if in range)."""
        if self.speed_steps == 1 or self.speed_min == self.speed_max:
            return np.array([math.sqrt(self.speed_min * self.speed_max)])
        v = np.geomspace(self.speed_min, self.speed_max, self.speed_steps)
        if self.speed_min <= 1.0 <= self.speed_max:
            v[int(np.argmin(np.abs(np.log(v))))] = 1.0
        return np.unique(v)


# ------------------------------------------------------------------------------ keyframe track

class _Column:
    """An append-only numpy column (amortised doubling), viewed without copying."""

    def __init__(self, dtype: Any, width: int = 0, fill: float = 0) -> None:
        self._width = width
        shape = (64, width) if width else (64,)
        self._data = np.full(shape, fill, dtype=dtype)
        self._fill = fill
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def view(self) -> np.ndarray:
        return self._data[:self._n]

    def extend(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self._data.dtype)
        need = self._n + len(values)
        if need > len(self._data):
            cap = max(need, 2 * len(self._data))
            shape = (cap, self._width) if self._width else (cap,)
            grown = np.full(shape, self._fill, dtype=self._data.dtype)
            grown[:self._n] = self._data[:self._n]
            self._data = grown
        self._data[self._n:need] = values
        self._n = need

    def assign(self, values: np.ndarray) -> None:
        """Replace the whole column (a session re-sorted)."""
        self._n = 0
        self.extend(values)


class _Session:
    """One session's keyframes in stamp order: ids, seconds since ``ref_ns`` and travelled
    metres (carried forward over keyframes without a position)."""

    def __init__(self, ref_ns: int) -> None:
        self.ref_ns = ref_ns
        self.ids = _Column(np.int64)
        self.t = _Column(np.float64)
        self.s = _Column(np.float64)
        self.tail_ns = ref_ns
        self.posed = 0
        self.last_pos: Optional[np.ndarray] = None
        self._order_t: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def stampless(self) -> bool:
        """All keyframes share one stamp (a map made without real stamps)."""
        return len(self.ids) > 1 and self.tail_ns == self.ref_ns and \
            not np.any(self.t.view())

    def times(self) -> np.ndarray:
        """Seconds along the session; keyframe order (1 s per keyframe) when stampless."""
        if self.stampless:
            if self._order_t is None or len(self._order_t) != len(self.ids):
                self._order_t = np.arange(len(self.ids), dtype=np.float64)
            return self._order_t
        return self.t.view()

    def append(self, ids: np.ndarray, stamps: np.ndarray, pos: np.ndarray) -> None:
        """Append keyframes that are in stamp order and not older than the tail."""
        s_prev = float(self.s.view()[-1]) if len(self.s) else 0.0
        valid = ~np.isnan(pos[:, 0])
        pp = pos[valid]
        if len(pp):
            head = self.last_pos[None] if self.last_pos is not None else pp[:1]
            steps = np.linalg.norm(np.diff(np.vstack([head, pp]), axis=0), axis=1)
            cum = s_prev + np.cumsum(steps)
            k = np.cumsum(valid) - 1
            s = np.where(k >= 0, cum[np.clip(k, 0, None)], s_prev)
            self.last_pos = pp[-1].copy()
            self.posed += len(pp)
        else:
            s = np.full(len(ids), s_prev)
        self.ids.extend(ids)
        self.t.extend((stamps - self.ref_ns) / NS_PER_S)
        self.s.extend(s)
        self.tail_ns = int(stamps[-1])

    def rebuild(self, ids: np.ndarray, stamps: np.ndarray, pos: np.ndarray) -> None:
        order = np.argsort(stamps, kind="stable")
        self.ids.assign(np.empty(0, np.int64))
        self.t.assign(np.empty(0))
        self.s.assign(np.empty(0))
        self.posed, self.last_pos = 0, None
        self.ref_ns = int(stamps[order[0]]) if len(order) else self.ref_ns
        self.append(ids[order], stamps[order], pos[order])


class KeyframeTrack:
    """Every map session's keyframes in stamp order, with how far along its session each one is.

    Keyframe ids are the map's (0..N-1, appended in id order with :meth:`extend`). Keyframes are
    grouped into *tracks*: one per session and camera (a multi-camera session holds one stream
    of images per camera, and a path must walk one camera's views, not alternate between the
    front and the rear). Progress along a track is kept two ways: seconds since its first
    keyframe, and metres travelled along its positions (where it has any). Appending in stamp
    order is O(1) per keyframe; a keyframe older than its track's newest (a map merged out of
    order; a repeated stamp is fine) re-sorts that track once and is counted in
    :attr:`reordered`, never silently misplaced. Exclusions (by session name) apply to every
    camera of a session.
    """

    def __init__(self) -> None:
        self._names: list[str] = []                 # session names (exclusions name them)
        self._index: dict[str, int] = {}
        self._group_index: dict[tuple[str, str], int] = {}
        self._sessions: list[_Session] = []         # one per (session, camera) track
        self._group_labels: list[str] = []
        self._sess = _Column(np.int32)              # per id: its track
        self._name = _Column(np.int32)              # per id: its session name
        self._stamp = _Column(np.int64)
        self._pos = _Column(np.float64, 3, np.nan)
        self._rank = _Column(np.int64)
        self.reordered = 0

    def __len__(self) -> int:
        return len(self._sess)

    @property
    def session_names(self) -> list[str]:
        return list(self._names)

    def session_sizes(self) -> dict[str, int]:
        """Keyframes per track (``session`` or ``session [camera]``)."""
        return {name: len(s) for name, s in zip(self._group_labels, self._sessions)}

    def extend(self, sessions: Sequence[str], stamps_ns: Sequence[int] | np.ndarray,
               positions: Optional[np.ndarray] = None,
               cameras: Optional[Sequence[str]] = None) -> None:
        """Append keyframes with the next ids (``len(self)`` onwards), in id order;
        ``cameras``: each keyframe's camera ("" or None: one camera)."""
        stamps = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
        n = len(stamps)
        if len(sessions) != n or (cameras is not None and len(cameras) != n):
            raise InputError(f"{len(sessions)} session names and "
                             f"{n if cameras is None else len(cameras)} cameras for {n} "
                             "keyframe stamps")
        if n == 0:
            return
        pos = np.full((n, 3), np.nan) if positions is None else \
            np.asarray(positions, dtype=np.float64).reshape(n, 3)
        cams = [""] * n if cameras is None else [c or "" for c in cameras]
        keys = list(zip(sessions, cams))
        uniq = list(dict.fromkeys(keys))
        group_of: dict[tuple[str, str], int] = {}
        for key in uniq:
            name, cam = key
            if not isinstance(name, str) or not name:
                raise InputError(f"keyframe session name {name!r} must be a non-empty string")
            if name not in self._index:
                self._index[name] = len(self._names)
                self._names.append(name)
            g = self._group_index.get(key)
            if g is None:
                g = len(self._sessions)
                self._group_index[key] = g
                first = min(int(st) for k, st in zip(keys, stamps.tolist()) if k == key)
                self._sessions.append(_Session(first))
                self._group_labels.append(f"{name} [{cam}]" if cam else name)
            group_of[key] = g
        sess = np.fromiter((group_of[k] for k in keys), np.int32, count=n)
        name_codes = np.fromiter((self._index[k[0]] for k in keys), np.int32, count=n)
        start = len(self)
        ids = np.arange(start, start + n, dtype=np.int64)
        self._sess.extend(sess)
        self._name.extend(name_codes)
        self._stamp.extend(stamps)
        self._pos.extend(pos)
        self._rank.extend(np.zeros(n, np.int64))
        for code in np.unique(sess).tolist():
            rows = np.flatnonzero(sess == code)
            session = self._sessions[code]
            st = stamps[rows]
            in_order = bool(np.all(np.diff(st) >= 0)) and int(st[0]) >= session.tail_ns \
                if len(session) else bool(np.all(np.diff(st) >= 0))
            if in_order:
                first = len(session)
                session.append(ids[rows], st, pos[rows])
                self._rank.view()[ids[rows]] = np.arange(first, first + len(rows))
            else:
                late = int(np.sum(st < session.tail_ns)) if len(session) else 0
                self.reordered += max(late, 1)
                all_ids = np.concatenate([session.ids.view(), ids[rows]])
                session.rebuild(all_ids, self._stamp.view()[all_ids], self._pos.view()[all_ids])
                self._rank.view()[session.ids.view()] = np.arange(len(session))

    # -- lookups -------------------------------------------------------------------------------

    def sessions_of(self, ids: np.ndarray) -> np.ndarray:
        """The track (session and camera) of each keyframe."""
        return self._sess.view()[ids]

    def session_code(self, name: str, camera: str = "") -> Optional[int]:
        """The track of session ``name`` (and ``camera``), None if the map has none."""
        return self._group_index.get((name, camera))

    def stamps_of(self, ids: np.ndarray) -> np.ndarray:
        return self._stamp.view()[ids]


    def ranks_of(self, ids: np.ndarray) -> np.ndarray:
        """Position of each keyframe in its session's stamp order."""
        return self._rank.view()[ids]

    def has_distance(self, code: int) -> bool:
        """Whether the session's keyframes carry positions (distance alignment possible)."""
        return self._sessions[code].posed >= 2

    def sessions_without_positions(self) -> int:
        return sum(1 for s in self._sessions if s.posed < 2)

    @property
    def sessions_without_stamps(self) -> int:
        """Sessions of several keyframes that all share one stamp: their keyframe order is
        their time axis (documented fallback)."""
        return sum(1 for s in self._sessions if s.stampless)

    def progress(self, ids: np.ndarray, code: int, by_distance: bool) -> np.ndarray:
        """Seconds (or metres) along session ``code`` of keyframes ``ids`` (all of it)."""
        session = self._sessions[code]
        arr = session.s.view() if by_distance else session.times()
        return arr[self._rank.view()[ids]]

    def align(self, code: int, by_distance: bool, targets: np.ndarray, max_gap: float
              ) -> np.ndarray:
        """Keyframe of session ``code`` nearest each target progress; -1 where none is within
        ``max_gap`` (before the session's start, after its end, in a gap) or the target is NaN."""
        session = self._sessions[code]
        arr = session.s.view() if by_distance else session.times()
        flat = np.asarray(targets, dtype=np.float64).reshape(-1)
        out = np.empty(flat.shape, np.int64)
        out.fill(-1)
        n = len(arr)
        if n == 0:
            return out.reshape(np.shape(targets))
        finite = np.isfinite(flat)
        tg = np.where(finite, flat, 0.0)
        pos = np.searchsorted(arr, tg)
        hi = np.minimum(pos, n - 1)
        lo = np.maximum(pos - 1, 0)
        d_lo = np.abs(tg - arr[lo])
        d_hi = np.abs(arr[hi] - tg)
        idx = np.where(d_hi < d_lo, hi, lo)
        ok = finite & (np.minimum(d_lo, d_hi) <= max_gap)
        out[ok] = session.ids.view()[idx[ok]]
        return out.reshape(np.shape(targets))

    def neighbours(self, ids: np.ndarray, radius: int) -> np.ndarray:
        """``ids`` and the keyframes up to ``radius`` before and after each in its session."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if radius <= 0 or len(ids) == 0:
            return ids
        out = [ids]
        offsets = np.arange(-radius, radius + 1)
        sess = self._sess.view()[ids]
        ranks = self._rank.view()[ids]
        for code in np.unique(sess).tolist():
            session = self._sessions[code]
            r = ranks[sess == code][:, None] + offsets[None, :]
            r = r[(r >= 0) & (r < len(session))]
            out.append(session.ids.view()[r])
        return np.unique(np.concatenate(out))

    def excluded(self, ids: np.ndarray, exclusion: Any) -> np.ndarray:
        """Boolean mask of ``ids`` an exclusion (``SearchExclusion``-like: sessions, ids,
        around_stamp_ns, window_ns, window_session) leaves out."""
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.zeros(ids.shape, dtype=bool)
        if exclusion is None or ids.size == 0:
            return mask
        sess = self._name.view()[ids]
        if exclusion.sessions:
            codes = [c for c in (self._index.get(s) for s in exclusion.sessions) if c is not None]
            if codes:
                mask |= np.isin(sess, np.asarray(codes, np.int32))
        if exclusion.ids:
            mask |= np.isin(ids, np.fromiter(exclusion.ids, np.int64, len(exclusion.ids)))
        if exclusion.around_stamp_ns is not None:
            near = np.abs(self._stamp.view()[ids] - int(exclusion.around_stamp_ns)) \
                <= int(exclusion.window_ns)
            if exclusion.window_session is not None:
                code = self._index.get(exclusion.window_session)
                near &= (sess == code) if code is not None else False
            mask |= near
        return mask


# ------------------------------------------------------------------------------ the matcher

@dataclass(frozen=True)
class SequenceMatch:
    """One place the last frames may show: the best path ending there.

    ``score``: mean normalised similarity of the evidence frames to the keyframes the best path
    aligns them with (missing steps count 0); ``frame_score``: the current frame's own
    normalised similarity to ``id``; both in standard deviations of the frame's similarity to
    the map at large. ``steps`` of ``frames`` were aligned; ``speed`` is the path's map
    progress per query progress (1.0 when aligned by distance). Paths ending within
    ``neighbours`` keyframes of a better one (same session) are the same place and are not
    returned.
    """

    id: int
    score: float
    frame_score: float
    cosine: float
    steps: int
    frames: int
    speed: float
    reverse: bool
    by_distance: bool


@dataclass
class SequenceStats:
    """Counters for diagnostics (cumulative; ``reset`` keeps them)."""

    frames: int = 0
    resets: int = 0                   # buffer restarted: stamps went backwards, reset() calls
    odometry_fallbacks: int = 0       # frames aligned by time although odometry was asked for
    short_frames: int = 0             # frames whose paths all had fewer than min_steps steps
    empty_map_frames: int = 0         # frames with no keyframe to match at all


class _RowCache:
    """Descriptors of recently touched keyframes as float32 rows.

    Consecutive frames walk nearly the same paths, so most rows a frame needs were fetched for
    the previous one; keeping them saves the map read and the float16 -> float32 conversion.
    Bounded (``capacity`` rows); when full it starts over, which costs one full fetch. The slot
    of each keyframe id is kept in an int32 array over all ids (4 bytes per keyframe), so a
    frame's lookups are one vectorised read."""

    def __init__(self, fetch: DescriptorsOf, capacity: int = 4096) -> None:
        self._fetch = fetch
        self._capacity = capacity
        self._slot_of = np.full(0, -1, np.int32)
        self._used: list[np.ndarray] = []
        self._count = 0
        self._rows: Optional[np.ndarray] = None

    def _clear(self) -> None:
        for ids in self._used:
            self._slot_of[ids] = -1
        self._used.clear()
        self._count = 0

    def get(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), D) float32 rows of unique keyframe ids (map descriptors never change)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and int(ids.max()) >= len(self._slot_of):
            grown = np.full(max(int(ids.max()) + 1, 2 * len(self._slot_of)), -1, np.int32)
            grown[:len(self._slot_of)] = self._slot_of
            self._slot_of = grown
        slots = self._slot_of[ids]
        missing = ids[slots < 0]
        if len(missing) > self._capacity - self._count:
            self._clear()
            missing = ids
            if len(missing) > self._capacity:
                return np.asarray(self._fetch(ids), dtype=np.float32)
        if len(missing):
            fresh = np.asarray(self._fetch(missing), dtype=np.float32)
            if self._rows is None or self._rows.shape[1] != fresh.shape[1]:
                self._rows = np.empty((self._capacity, fresh.shape[1]), np.float32)
            start = self._count
            self._rows[start:start + len(missing)] = fresh
            self._slot_of[missing] = np.arange(start, start + len(missing), dtype=np.int32)
            self._used.append(missing)
            self._count += len(missing)
            slots = self._slot_of[ids]
        assert self._rows is not None
        return self._rows[slots]


@dataclass
class _Frame:
    stamp_ns: int
    desc: np.ndarray
    t: float
    s: float            # metres along this odometry chain; NaN without a position
    chain: int          # odometry chain id (a missing position starts a new chain)
    position: Optional[np.ndarray]
    mu: float
    sigma: float
    shortlist: np.ndarray


@dataclass(frozen=True)
class SequenceResult:
    """A frame's sequence matches, best first, and how they were obtained."""

    matches: list[SequenceMatch]
    frames: int
    by_distance: bool
    mu: float
    sigma: float
    by_id: dict[int, SequenceMatch] = field(default_factory=dict)

    def normalise(self, cosine: float) -> float:
        """A cosine similarity of the current frame in the matches' units."""
        return (float(cosine) - self.mu) / self.sigma


def unit_descriptor(descriptor: np.ndarray | Sequence[float], dtype: Any = np.float32
                    ) -> np.ndarray:
    """A 1-D unit vector of ``dtype`` (cosine similarity is then a dot product) from a (D,) or
    (1, D) descriptor; InputError for any other shape, non-finite values or an all-zero
    vector. The sequence matcher and the loop-closure detector check descriptors here."""
    vec = np.asarray(descriptor, dtype=dtype)
    if vec.ndim == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.ndim != 1 or vec.size == 0:
        raise InputError(f"descriptor must be one vector (D,) or (1, D), got shape {vec.shape}")
    if not np.all(np.isfinite(vec)):
        raise InputError("descriptor has non-finite values; the encoder output is broken")
    norm = float(np.linalg.norm(vec))
    if norm < 1e-12:
        raise InputError("descriptor is all zeros; cannot measure its similarity to anything")
    return vec / norm


class SequenceMatcher:
    """Per-frame sequence matching against a map (see the module docstring).

    ``track`` describes the map's keyframes (the caller keeps it in step with the map:
    :meth:`KeyframeTrack.extend` with every added keyframe, before the next :meth:`update`);
    ``descriptors_of(ids)`` returns their descriptors. Feed every processed frame, in time
    order, to :meth:`update`.
    """

    def __init__(self, config: SequenceConfig, track: KeyframeTrack,
                 descriptors_of: DescriptorsOf, seed: int = 0) -> None:
        self.config = config
        self.track = track
        self._descriptors_of = descriptors_of
        self._rng = np.random.default_rng(seed)
        self._rows = _RowCache(descriptors_of)
        self._speeds = config.speeds()
        self._kept: deque[_Frame] = deque(maxlen=max(0, config.length - 1))
        self._current: Optional[_Frame] = None
        self._chain = 0
        self._bg_ids = np.empty(0, np.int64)
        self._bg_desc: Optional[np.ndarray] = None
        self._bg_size = 0
        self.stats = SequenceStats()

    def reset(self) -> None:
        """Forget the evidence buffer (a new run, a clock reset); keep the counters."""
        if self._current is not None or self._kept:
            self.stats.resets += 1
        self._kept.clear()
        self._current = None

    # -- background -------------------------------------------------------------------------

    def _background(self, query: np.ndarray, exclusion: Any) -> tuple[float, float]:
        """Mean and spread of the query's similarity to a random sample of keyframes outside
        ``exclusion`` (the recent past looks like the query and is not "the map at large")."""
        n = len(self.track)
        b = self.config.background_samples
        stale = self._bg_desc is None or (n <= b and n != self._bg_size) or n >= 1.25 * self._bg_size
        if stale and n:
            ids = np.arange(n) if n <= b else np.sort(self._rng.choice(n, size=b, replace=False))
            self._bg_ids = ids.astype(np.int64)
            self._bg_desc = np.asarray(self._descriptors_of(self._bg_ids), dtype=np.float32)
            self._bg_size = n
        if self._bg_desc is None or not len(self._bg_ids):
            return 0.0, 1.0
        if self._bg_desc.shape[1] != query.size:
            raise InputError(f"descriptor has dimension {query.size} but the map's have "
                             f"{self._bg_desc.shape[1]}; the model changed mid-run: use the "
                             "map's model")
        sims = self._bg_desc @ query
        keep = ~self.track.excluded(self._bg_ids, exclusion)
        if keep.sum() >= 8:
            sims = sims[keep]
        mu = float(sims.mean())
        sigma = max(float(sims.std()), 1e-3)
        return mu, sigma

    # -- buffer -----------------------------------------------------------------------------

    def _advance(self, stamp: int, desc: np.ndarray, position: Optional[np.ndarray],
                 mu: float, sigma: float, shortlist: np.ndarray) -> _Frame:
        cfg = self.config
        prev = self._current
        if prev is not None and desc.shape != prev.desc.shape:
            raise InputError(f"descriptor has dimension {desc.size} but the sequence buffer holds "
                             f"{prev.desc.size}; the model changed mid-run: reset the matcher")
        if prev is None:
            frame = _Frame(stamp, desc, 0.0, 0.0 if position is not None else math.nan,
                           self._chain, position, mu, sigma, shortlist)
            self._current = frame
            return frame
        dt = (stamp - prev.stamp_ns) / NS_PER_S
        if cfg.still_similarity < 1.0 and float(desc @ prev.desc) >= cfg.still_similarity:
            dt = 0.0
        t = prev.t + dt
        if position is not None and prev.position is not None and prev.chain == self._chain:
            s = prev.s + float(np.linalg.norm(position - prev.position))
        else:
            if position is not None and prev.position is None:
                self._chain += 1
            s = 0.0 if position is not None else math.nan
        frame = _Frame(stamp, desc, t, s, self._chain, position, mu, sigma, shortlist)
        # The previous current frame is kept as evidence if it moved on from the last kept one.
        last = self._kept[-1] if self._kept else None
        if self._kept.maxlen:
            if last is None:
                self._kept.append(prev)
            else:
                if position is not None and prev.chain == last.chain and math.isfinite(prev.s):
                    moved = prev.s - last.s
                    step = cfg.step_m
                else:
                    moved = prev.t - last.t
                    step = cfg.step_s
                if moved >= step and moved > 0:
                    self._kept.append(prev)
        self._current = frame
        return frame

    # -- per frame --------------------------------------------------------------------------

    def update(self, stamp_ns: int, descriptor: np.ndarray | Sequence[float],
               shortlist: Sequence[int] | np.ndarray, *,
               position: Optional[Sequence[float]] = None,
               exclusion: Any = None) -> SequenceResult:
        """Feed one frame: its stamp, descriptor, the map search's shortlist (ranked ids; -1
        padding is ignored), its odometry position if any and the exclusion the search used.
        Returns the sequence matches of this frame, best first.

        A stamp earlier than the previous frame's restarts the evidence (counted in
        ``stats.resets``): alignment across a clock reset would be silently wrong.
        """
        cfg = self.config
        stamp = int(stamp_ns)
        desc = unit_descriptor(descriptor)
        pos = None
        if position is not None:
            pos = np.asarray([float(v) for v in position], dtype=np.float64)
            if pos.shape != (3,) or not np.all(np.isfinite(pos)):
                raise InputError(f"query position must be 3 finite numbers, got {position!r}")
        if self._current is not None and stamp < self._current.stamp_ns:
            self.reset()
        self.stats.frames += 1
        n = len(self.track)
        ids = np.asarray(shortlist, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < n)]
        if len(ids):
            ids = ids[~self.track.excluded(ids, exclusion)]
        if self._current is not None and desc.shape != self._current.desc.shape:
            raise InputError(f"descriptor has dimension {desc.size} but the sequence buffer "
                             f"holds {self._current.desc.size}; the model changed mid-run: "
                             "reset the matcher")
        mu, sigma = self._background(desc, exclusion)
        frame = self._advance(stamp, desc, pos, mu, sigma, ids)
        frames = [*self._kept, frame] if cfg.enabled else [frame]
        by_distance = bool(cfg.enabled and cfg.use_odometry and pos is not None)
        if cfg.enabled and cfg.use_odometry and pos is None:
            self.stats.odometry_fallbacks += 1
        if n == 0:
            self.stats.empty_map_frames += 1
            return SequenceResult([], len(frames), by_distance, mu, sigma)
        matches = self._score(frames, exclusion, by_distance)
        if not matches and len(ids):
            self.stats.short_frames += 1
        return SequenceResult(matches, len(frames), by_distance, mu, sigma,
                              {m.id: m for m in matches})

    def _options(self, by_distance: bool) -> list[tuple[float, bool]]:
        if not self.config.enabled:
            return [(1.0, False)]
        speeds = [1.0] if by_distance else self._speeds.tolist()
        dirs = [False, True] if self.config.reverse else [False]
        return [(v, r) for r in dirs for v in speeds]

    def _score(self, frames: list[_Frame], exclusion: Any, by_distance: bool
               ) -> list[SequenceMatch]:
        cfg = self.config
        track = self.track
        cur = frames[-1]
        m = len(frames)
        dt = np.array([cur.t - f.t for f in frames])
        ds = np.array([(cur.s - f.s) if (f.chain == cur.chain and math.isfinite(f.s))
                       else np.nan for f in frames])
        direct = cur.shortlist if not cfg.enabled else track.neighbours(cur.shortlist,
                                                                        cfg.neighbours)
        if len(direct):
            direct = direct[~track.excluded(direct, exclusion)]
        # Earlier frames' shortlists, each with how far the query has gone since that frame.
        past = [(f.shortlist, e) for e, f in enumerate(frames[:-1]) if len(f.shortlist)] \
            if cfg.enabled else []
        past_ids = np.concatenate([p for p, _ in past]) if past else np.empty(0, np.int64)
        past_frame = np.concatenate([np.full(len(p), e) for p, e in past]) if past \
            else np.empty(0, np.int64)
        codes = np.unique(np.concatenate([track.sessions_of(direct),
                                          track.sessions_of(past_ids)]))
        pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for code in codes.tolist():
            dist = by_distance and track.has_distance(code)
            options = self._options(dist)
            v = np.array([o[0] for o in options])
            r = np.array([o[1] for o in options], bool)
            gap = cfg.max_gap_m if dist else cfg.max_gap_s
            delta = ds if dist else dt
            # Path ends: the shortlist and its neighbours under every option, and the earlier
            # shortlists carried forward along the session by each option's speed.
            d_ids = direct[track.sessions_of(direct) == code]
            ends = [np.repeat(d_ids, len(options))]
            opt = [np.tile(np.arange(len(options)), len(d_ids))]
            sel = track.sessions_of(past_ids) == code
            if sel.any():
                c = past_ids[sel]
                de = delta[past_frame[sel]]
                ok = np.isfinite(de)
                c, de = c[ok], de[ok]
                prog = track.progress(c, code, dist)
                moved = np.where(r, -1.0, 1.0)[None, :] * v[None, :] * de[:, None]
                carried = track.align(code, dist, prog[:, None] + moved, gap)
                good = carried >= 0
                ends.append(carried[good])
                opt.append(np.broadcast_to(np.arange(len(options)), carried.shape)[good])
            end = np.concatenate(ends)
            o = np.concatenate(opt)
            if not len(end):
                continue
            key = np.unique(end * len(options) + o)
            end, o = key // len(options), key % len(options)
            keep = ~track.excluded(end, exclusion)
            end, o = end[keep], o[keep]
            if not len(end):
                continue
            # Walk each path back (forward for reverse) over the evidence frames.
            prog = track.progress(end, code, dist)
            sign = np.where(r[o], 1.0, -1.0)
            targets = prog[:, None] + (sign * v[o])[:, None] * delta[None, :]
            aligned = track.align(code, dist, targets, gap)
            aligned[:, -1] = end
            pieces.append((aligned, v[o], r[o], np.full(len(end), dist)))
        if not pieces:
            return []
        path_ids = np.concatenate([p[0] for p in pieces])
        speed = np.concatenate([p[1] for p in pieces])
        rev = np.concatenate([p[2] for p in pieces])
        dist_path = np.concatenate([p[3] for p in pieces])
        valid = path_ids >= 0
        flat_valid = np.flatnonzero(valid.reshape(-1))
        if len(flat_valid) and exclusion is not None:
            bad = track.excluded(path_ids.reshape(-1)[flat_valid], exclusion)
            valid.reshape(-1)[flat_valid[bad]] = False
        uniq, inverse = np.unique(np.where(valid, path_ids, -1), return_inverse=True)
        inverse = inverse.reshape(path_ids.shape)
        has_pad = bool(len(uniq)) and uniq[0] == -1
        real = uniq[1:] if has_pad else uniq
        mdesc = self._rows.get(real)
        q = np.stack([f.desc for f in frames])
        mu = np.array([f.mu for f in frames])
        sigma = np.array([f.sigma for f in frames])
        cos = (q @ mdesc.T).astype(np.float64)             # (m, U)
        z = (cos - mu[:, None]) / sigma[:, None]
        if has_pad:
            z = np.concatenate([np.zeros((m, 1)), z], axis=1)
            cos = np.concatenate([np.zeros((m, 1)), cos], axis=1)
        step_z = np.where(valid, z[np.arange(m)[None, :], inverse], 0.0)   # (P, m)
        steps = valid.sum(axis=1)
        score = step_z.sum(axis=1) / m
        end_id = path_ids[:, -1]
        end_col = inverse[:, -1]
        enough = np.flatnonzero(steps >= cfg.effective_min_steps)
        if not len(enough):
            return []
        # Best path per end keyframe, then near-duplicate ends along a session suppressed.
        order = enough[np.lexsort((-score[enough], end_id[enough]))]
        first = np.ones(len(order), bool)
        first[1:] = end_id[order[1:]] != end_id[order[:-1]]
        best = order[first]
        best = best[np.argsort(-score[best], kind="stable")]
        radius = max(1, cfg.neighbours)
        sess = track.sessions_of(end_id[best]).tolist()
        ranks = track.ranks_of(end_id[best]).tolist()
        frame_z = z[m - 1, end_col]
        out: list[SequenceMatch] = []
        suppressed: set[tuple[int, int]] = set()
        for i, sc, rk in zip(best.tolist(), sess, ranks):
            if (sc, rk) in suppressed:
                continue
            suppressed.update((sc, rk + d) for d in range(-radius, radius + 1))
            out.append(SequenceMatch(
                id=int(end_id[i]), score=float(score[i]), frame_score=float(frame_z[i]),
                cosine=float(cos[m - 1, end_col[i]]), steps=int(steps[i]), frames=m,
                speed=float(speed[i]), reverse=bool(rev[i]), by_distance=bool(dist_path[i])))
            if len(out) >= MAX_MATCHES:
                break
        return out
