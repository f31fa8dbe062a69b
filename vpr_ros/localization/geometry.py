"""Where a map match is: candidates with their map pose, and the small pose maths decisions need.

The decision layer never sees the map itself (``vpr_ros.mapdb``): the node turns each search
result into :class:`Candidate` values with :func:`candidates_from_results`, so the state
machines stay testable on recorded sequences and do not change when the map's storage does.
Two questions recur in every decision and are answered here, once: how far apart two poses are
(distance, rotation angle), and whether two matches point at the *same place*
(:func:`same_place`), which is what temporal consistency and relocalization agreement count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from vpr_ros.errors import InputError

Position = tuple[float, float, float]
"""(x, y, z) in metres, in the map frame."""

Quaternion = tuple[float, float, float, float]
"""(x, y, z, w), the order of ``geometry_msgs/Quaternion``."""

NS_PER_S = 1_000_000_000


def _as_vector(value: Sequence[float], size: int, what: str) -> tuple[float, ...]:
    """Coerce to a tuple of finite floats of ``size``; a bad pose is an input error, not a crash."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be {size} numbers, got {value!r}") from exc
    if len(out) != size:
        raise InputError(f"{what} must have {size} components, got {len(out)}: {value!r}")
    if not all(math.isfinite(v) for v in out):
        raise InputError(f"{what} has a non-finite component: {value!r}; drop that pose upstream")
    return out


def as_position(value: Sequence[float], what: str = "position") -> Position:
    """A validated (x, y, z) tuple."""
    x, y, z = _as_vector(value, 3, what)
    return (x, y, z)


def as_quaternion(value: Sequence[float], what: str = "orientation") -> Quaternion:
    """A validated, unit-normalised (x, y, z, w) tuple.

    Odometry quaternions drift off unit norm; normalising here keeps angles meaningful. A zero
    quaternion carries no rotation at all and is refused.
    """
    x, y, z, w = _as_vector(value, 4, what)
    norm = math.sqrt(x * x + y * y + z * z + w * w)
    if norm < 1e-9:
        raise InputError(f"{what} is a zero quaternion {value!r}; expected (x, y, z, w) of unit norm")
    return (x / norm, y / norm, z / norm, w / norm)


def distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Euclidean distance between two positions (metres)."""
    return math.sqrt(sum((float(p) - float(q)) ** 2 for p, q in zip(a, b, strict=True)))


def rotation_angle_rad(q1: Sequence[float], q2: Sequence[float]) -> float:
    """Angle in [0, pi] of the rotation taking ``q1`` to ``q2`` (both (x, y, z, w)).

    Computed from the relative quaternion with ``atan2`` rather than ``acos(dot)``, which loses
    all precision for the small angles that keyframe selection compares against.
    """
    x1, y1, z1, w1 = as_quaternion(q1, "q1")
    x2, y2, z2, w2 = as_quaternion(q2, "q2")
    # r = conj(q1) * q2
    rw = w1 * w2 + x1 * x2 + y1 * y2 + z1 * z2
    rx = w1 * x2 - x1 * w2 - y1 * z2 + z1 * y2
    ry = w1 * y2 + x1 * z2 - y1 * w2 - z1 * x2
    rz = w1 * z2 - x1 * y2 + y1 * x2 - z1 * w2
    return 2.0 * math.atan2(math.sqrt(rx * rx + ry * ry + rz * rz), abs(rw))


@dataclass(frozen=True)
class Candidate:
    """One ranked map match as the decision layer sees it.

    ``session`` names the mapping run the keyframe came from: stamps are only comparable within
    one session, and the loop-closure exclusion window only applies to the live session.
    ``None`` means unknown, which every rule treats conservatively (as possibly the same session).
    """

    id: int
    score: float
    stamp_ns: int
    position: Optional[Position] = None
    orientation: Optional[Quaternion] = None
    session: Optional[str] = None

    def __post_init__(self) -> None:
        score = float(self.score)
        if not math.isfinite(score):
            raise InputError(f"candidate {self.id} has a non-finite score {self.score!r}")
        object.__setattr__(self, "id", int(self.id))
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "stamp_ns", int(self.stamp_ns))
        if self.position is not None:
            object.__setattr__(self, "position", as_position(self.position, f"candidate {self.id} position"))
        if self.orientation is not None:
            object.__setattr__(
                self, "orientation", as_quaternion(self.orientation, f"candidate {self.id} orientation")
            )


    @classmethod
    def from_checked(cls, id: int, score: float, stamp_ns: int, position: Optional[Position],
                     orientation: Optional[Quaternion], session: Optional[str]) -> "Candidate":
        """A candidate from values already validated and converted (plain int/float, finite,
        unit quaternion), as :func:`candidates_from_columns` does for a whole result row at
        once; skips the per-field checks of the normal constructor."""
        c = object.__new__(cls)
        for name, value in (("id", id), ("score", score), ("stamp_ns", stamp_ns),
                            ("position", position), ("orientation", orientation),
                            ("session", session)):
            object.__setattr__(c, name, value)
        return c


class KeyframeLike(Protocol):
    """The keyframe metadata a candidate needs (``vpr_ros.mapdb.Keyframe`` satisfies it)."""

    session: str
    stamp_ns: int
    position: Optional[Sequence[float]]
    orientation: Optional[Sequence[float]]


def candidates_from_results(
    ids: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    keyframe_of: Callable[[int], KeyframeLike],
) -> list[Candidate]:
    """Turn one query's ranked ``(ids, scores)`` into candidates, best first, looking each
    keyframe up with ``keyframe_of`` (for callers without a columnar table; the node uses
    :func:`candidates_from_columns` directly).

    Map searches pad short result lists with id ``-1``; those entries are dropped before any
    lookup, so no decision ever looks up a keyframe that does not exist. A pose part given as
    ``None`` or all-NaN (columnar stores fill missing poses with NaN) is missing.
    """
    def columns(valid: np.ndarray) -> PoseColumns:
        kfs = [(i, keyframe_of(i)) for i in valid.tolist()]
        return ([kf.session for _, kf in kfs], np.array([kf.stamp_ns for _, kf in kfs], np.int64),
                _pose_column(kfs, "position", 3), _pose_column(kfs, "orientation", 4))

    return candidates_from_columns(ids, scores, columns)


def _pose_column(kfs: list[tuple[int, KeyframeLike]], what: str, size: int) -> np.ndarray:
    """(n, size) float64 of each keyframe's ``what``, NaN rows where it is None."""
    out = np.full((len(kfs), size), np.nan)
    for row, (kf_id, kf) in enumerate(kfs):
        vec = getattr(kf, what)
        if vec is None:
            continue
        try:
            values = [float(v) for v in vec]
        except (TypeError, ValueError) as exc:
            raise InputError(f"candidate {kf_id} {what} must be {size} numbers, got "
                             f"{vec!r}") from exc
        if len(values) != size:
            raise InputError(f"candidate {kf_id} {what} must have {size} components, got "
                             f"{len(values)}: {vec!r}")
        out[row] = values
    return out


PoseColumns = tuple[Sequence[str], np.ndarray, np.ndarray, np.ndarray]
"""(sessions, stamps_ns (n,), positions (n, 3), orientations (n, 4)); NaN rows = no pose."""


def _result_row(ids: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    id_arr = np.asarray(ids).reshape(-1)
    score_arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if id_arr.shape != score_arr.shape:
        raise InputError(
            f"search result ids and scores differ in length ({id_arr.size} vs {score_arr.size}); "
            "pass one query's row of each"
        )
    return id_arr, score_arr


def _checked_rows(values: np.ndarray, ids: Sequence[int], what: str,
                  unit: bool = False) -> list[Optional[tuple[float, ...]]]:
    """Rows of a pose column as tuples, None for all-NaN rows; a partly non-finite row is
    refused as :class:`Candidate` refuses it; ``unit``: normalised by :func:`as_quaternion`
    itself. Plain Python over ``tolist()``: for the handful of rows of a top-k, numpy's
    per-call overhead cost more than the work (24 vs 5 us for five quaternions)."""
    out: list[Optional[tuple[float, ...]]] = []
    for kf_id, row in zip(ids, values.tolist()):
        if all(v != v for v in row):  # NaN is the only value unequal to itself
            out.append(None)
        elif not all(math.isfinite(v) for v in row):
            raise InputError(f"candidate {kf_id} {what} has a non-finite component: "
                             f"{tuple(row)!r}; drop that pose upstream")
        else:
            out.append(as_quaternion(row, f"candidate {kf_id} {what}") if unit else tuple(row))
    return out


def candidates_from_columns(
    ids: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    columns_of: Callable[[np.ndarray], PoseColumns],
) -> list[Candidate]:
    """:func:`candidates_from_results` for a map that reads its keyframes column-wise
    (``columns_of(ids)``, e.g. ``KeyframeTable.pose_columns``): the same candidates, equal
    field for field, from four column reads instead of one keyframe object per id (the node
    does this for every frame)."""
    id_arr, score_arr = _result_row(ids, scores)
    keep = id_arr >= 0
    id_arr, score_arr = id_arr[keep].astype(np.int64), score_arr[keep]
    if not np.isfinite(score_arr).all():
        i = int(np.flatnonzero(~np.isfinite(score_arr))[0])
        raise InputError(f"candidate {int(id_arr[i])} has a non-finite score {score_arr[i]!r}")
    sessions, stamps, positions, orientations = columns_of(id_arr)
    id_list = id_arr.tolist()
    pos = _checked_rows(np.asarray(positions, np.float64), id_list, "position")
    ori = _checked_rows(np.asarray(orientations, np.float64), id_list, "orientation", unit=True)
    out = [Candidate.from_checked(i, s, t, p, o, sess) for i, s, t, p, o, sess in
           zip(id_list, score_arr.tolist(), np.asarray(stamps).tolist(), pos, ori, sessions)]
    out.sort(key=lambda c: c.score, reverse=True)
    return out


def same_place(a: Candidate, b: Candidate, radius_m: float, stamp_window_ns: int) -> bool:
    """Whether two matches point at the same map neighbourhood.

    With both positions known, that is a distance within ``radius_m`` (map positions are
    comparable across sessions: they share the map frame). Without them, the only evidence left
    is time: two keyframes of the *same* session taken within ``stamp_window_ns`` of each other
    saw the same stretch of the route. Keyframe ids are deliberately not used: their spacing
    depends on the keyframe policy and on merges, so an id distance has no fixed meaning.
    """
    if a.id == b.id:
        return True
    if a.position is not None and b.position is not None:
        return distance(a.position, b.position) <= radius_m
    if a.session is not None and b.session is not None and a.session != b.session:
        return False
    return abs(a.stamp_ns - b.stamp_ns) <= stamp_window_ns


def seconds_to_ns(seconds: float) -> int:
    """Seconds (a config value) to integer nanoseconds (a stamp difference)."""
    return int(round(seconds * NS_PER_S))
