"""Keyframe metadata: the record of one map image, the exclusion rule of a search, and the
columnar table that holds both for a whole map.

Why columnar: a map of a million keyframes held as a million ``Keyframe`` objects would cost about
half a gigabyte of Python objects, and every loop-closure search has to test all of them against an
:class:`Exclusion`. The :class:`KeyframeTable` keeps one numpy array per numeric field and interns
the few distinct strings (sessions, frames, bags, topics), so exclusion masks are vectorised and
``Keyframe`` objects are made only for the ids a caller asks about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.mapdb.index.vectors import GrowableArray


@dataclass(frozen=True)
class Keyframe:
    """One map image: where and when it was taken, and where it came from.

    ``id`` is assigned by :meth:`PlaceMap.add` (0..N-1, stable across save and load); the value a
    caller passes in is ignored. ``camera`` names the camera that took the image (its topic by
    default); with ``session`` it keys the map's calibration of that camera
    (:meth:`PlaceMap.camera_of`). Empty: unknown camera (maps built before cameras were kept).
    """

    session: str
    stamp_ns: int
    frame_id: str = ""
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, float, float, float] | None = None
    gnss: tuple[float, float, float] | None = None
    source_bag: str = ""
    source_topic: str = ""
    camera: str = ""
    id: int = -1

    @property
    def stamp_s(self) -> float:
        return self.stamp_ns * 1e-9


@dataclass(frozen=True)
class Exclusion:
    """What a loop-closure search must not return.

    Keyframes of any session in ``sessions`` and keyframes whose id is in ``ids`` are excluded. When
    ``around_stamp_ns`` is set, keyframes of ``window_session`` (any session when it is None) whose
    stamp lies within ``around_stamp_ns +- window_ns`` are excluded too: that is the temporal window
    that keeps a robot from "closing a loop" with the frames it has just seen.
    """

    sessions: frozenset[str] = frozenset()
    ids: frozenset[int] = frozenset()
    around_stamp_ns: int | None = None
    window_ns: int = 0
    window_session: str | None = None

    def is_empty(self) -> bool:
        return not self.sessions and not self.ids and self.around_stamp_ns is None


class _StringPool:
    """Interns the few distinct strings of a text column; code i <-> ``values[i]``."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.values: list[str] = []
        self._codes: dict[str, int] = {}
        for v in values:
            self.code(v)

    def code(self, value: str) -> int:
        c = self._codes.get(value)
        if c is None:
            c = len(self.values)
            self.values.append(value)
            self._codes[value] = c
        return c

    def find(self, value: str) -> int | None:
        return self._codes.get(value)


def _tuple_or_none(row: np.ndarray) -> tuple[float, ...] | None:
    """A stored pose vector as plain floats, None where it is missing (NaN). Plain-Python
    checks: the node looks up its top-k keyframes every frame, and numpy's per-call overhead
    on a 3- or 4-vector was most of that lookup's cost."""
    values = row.tolist()
    if any(v != v for v in values):  # NaN is the only value unequal to itself
        return None
    return tuple(values)


def _check_vector(kf: Keyframe, name: str, value: object, size: int) -> np.ndarray:
    if value is None:
        return np.full(size, np.nan)
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InputError(f"keyframe {kf.session}@{kf.stamp_ns}: {name} {value!r} is not a tuple of "
                         f"{size} numbers ({exc}); pass a {size}-tuple of floats or None") from exc
    if arr.shape != (size,) or not np.isfinite(arr).all():
        raise InputError(f"keyframe {kf.session}@{kf.stamp_ns}: {name} {value!r} must be {size} "
                         "finite numbers, or None when unknown")
    return arr


class KeyframeTable:
    """All keyframes of a map as columns; row i is the keyframe with id i."""

    TEXT_FIELDS = ("session", "frame_id", "source_bag", "source_topic", "camera")

    def __init__(self) -> None:
        self._pools = {f: _StringPool() for f in self.TEXT_FIELDS}
        self._codes = {f: GrowableArray(np.int32) for f in self.TEXT_FIELDS}
        self._stamp = GrowableArray(np.int64)
        self._position = GrowableArray(np.float64, 3, np.nan)
        self._orientation = GrowableArray(np.float64, 4, np.nan)
        self._gnss = GrowableArray(np.float64, 3, np.nan)

    def __len__(self) -> int:
        return len(self._stamp)

    # -- writing -------------------------------------------------------------------------------

    def append(self, keyframes: Sequence[Keyframe]) -> np.ndarray:
        """Validate and append; returns the ids given to the new rows."""
        n = len(keyframes)
        codes = {f: np.empty(n, np.int32) for f in self.TEXT_FIELDS}
        stamps = np.empty(n, np.int64)
        pos = np.empty((n, 3))
        ori = np.empty((n, 4))
        gnss = np.empty((n, 3))
        for i, kf in enumerate(keyframes):
            if not isinstance(kf, Keyframe):
                raise InputError(f"keyframes[{i}] is a {type(kf).__name__}, expected a Keyframe")
            if not isinstance(kf.session, str) or not kf.session:
                raise InputError(f"keyframes[{i}] has session {kf.session!r}; every keyframe needs "
                                 "a non-empty session name (bag name or run id)")
            if isinstance(kf.stamp_ns, bool) or not isinstance(kf.stamp_ns, (int, np.integer)):
                raise InputError(f"keyframes[{i}] stamp_ns {kf.stamp_ns!r} is not an integer "
                                 "(nanoseconds since the epoch)")
            for f in self.TEXT_FIELDS:
                value = getattr(kf, f)
                if not isinstance(value, str):
                    raise InputError(f"keyframes[{i}].{f} is {value!r}, expected a string")
                codes[f][i] = self._pools[f].code(value)
            stamps[i] = int(kf.stamp_ns)
            pos[i] = _check_vector(kf, "position", kf.position, 3)
            ori[i] = _check_vector(kf, "orientation", kf.orientation, 4)
            gnss[i] = _check_vector(kf, "gnss", kf.gnss, 3)
        return self._extend(codes, stamps, pos, ori, gnss)

    def _extend(self, codes: dict[str, np.ndarray], stamps: np.ndarray, pos: np.ndarray,
                ori: np.ndarray, gnss: np.ndarray) -> np.ndarray:
        start = len(self)
        for f in self.TEXT_FIELDS:
            self._codes[f].extend(codes[f])
        self._stamp.extend(stamps)
        self._position.extend(pos)
        self._orientation.extend(ori)
        self._gnss.extend(gnss)
        return np.arange(start, start + len(stamps), dtype=np.int64)

    def extend_from(self, other: "KeyframeTable") -> np.ndarray:
        """Append all rows of ``other`` (merge); their ids are renumbered after ours."""
        codes = {}
        for f in self.TEXT_FIELDS:
            remap = np.array([self._pools[f].code(v) for v in other._pools[f].values] or [0],
                             dtype=np.int32)
            codes[f] = remap[other._codes[f].view()]
        return self._extend(codes, other._stamp.view(), other._position.view(),
                            other._orientation.view(), other._gnss.view())

    @classmethod
    def from_columns(cls, columns: dict[str, np.ndarray | list[str]]) -> "KeyframeTable":
        """Build from plain columns (as read from SQLite): text fields as lists of str."""
        table = cls()
        codes = {}
        for f in cls.TEXT_FIELDS:
            values = columns[f]
            pool = table._pools[f]
            codes[f] = np.fromiter((pool.code(v) for v in values), np.int32, count=len(values))
        table._extend(codes, np.asarray(columns["stamp_ns"], np.int64),
                      np.asarray(columns["position"], np.float64).reshape(-1, 3),
                      np.asarray(columns["orientation"], np.float64).reshape(-1, 4),
                      np.asarray(columns["gnss"], np.float64).reshape(-1, 3))
        return table

    # -- reading -------------------------------------------------------------------------------

    def get(self, id: int) -> Keyframe:
        n = len(self)
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)) or not 0 <= id < n:
            raise KeyError(f"keyframe id {id!r} is not in this map (ids are 0..{n - 1})")
        i = int(id)
        text = {f: self._pools[f].values[self._codes[f].view()[i]] for f in self.TEXT_FIELDS}
        return Keyframe(
            session=text["session"], stamp_ns=int(self._stamp.view()[i]),
            frame_id=text["frame_id"],
            position=_tuple_or_none(self._position.view()[i]),  # type: ignore[arg-type]
            orientation=_tuple_or_none(self._orientation.view()[i]),  # type: ignore[arg-type]
            gnss=_tuple_or_none(self._gnss.view()[i]),  # type: ignore[arg-type]
            source_bag=text["source_bag"], source_topic=text["source_topic"],
            camera=text["camera"], id=i)

    def pose_columns(self, ids: np.ndarray
                     ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(sessions, stamps_ns (n,), positions (n, 3), orientations (n, 4)) of ``ids``, NaN
        where a pose is missing: what a search result needs per candidate, read column-wise.

        Why: the node turns its top-k into candidates every frame; making a :class:`Keyframe`
        per id (text fields, tuples, validation) cost about 50 us each, most of the decision
        path, where four fancy-indexing reads cost a few microseconds in all."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            bad = ids[(ids < 0) | (ids >= n)][0]
            raise KeyError(f"keyframe id {int(bad)} is not in this map (ids are 0..{n - 1})")
        pool = self._pools["session"].values
        sessions = [pool[c] for c in self._codes["session"].view()[ids].tolist()]
        return (sessions, self._stamp.view()[ids], self._position.view()[ids],
                self._orientation.view()[ids])

    def __iter__(self) -> Iterator[Keyframe]:
        return (self.get(i) for i in range(len(self)))

    def text_rows(self, field: str, ids: np.ndarray) -> list[str]:
        """A text field of some keyframes (a few rows, without building the whole column)."""
        values = self._pools[field].values
        return [values[c] for c in self._codes[field].view()[np.asarray(ids, np.int64)].tolist()]

    def text_column(self, field: str) -> list[str]:
        values = self._pools[field].values
        return [values[c] for c in self._codes[field].view().tolist()]

    @property
    def stamps(self) -> np.ndarray:
        return self._stamp.view()

    @property
    def positions(self) -> np.ndarray:
        return self._position.view()

    @property
    def orientations(self) -> np.ndarray:
        return self._orientation.view()

    @property
    def gnss(self) -> np.ndarray:
        return self._gnss.view()

    def sessions(self) -> list[str]:
        """Session names in the order they first appear in the map."""
        used = np.unique(self._codes["session"].view())
        return [self._pools["session"].values[c] for c in used.tolist()]

    def session_counts(self) -> dict[str, int]:
        codes, counts = np.unique(self._codes["session"].view(), return_counts=True)
        pool = self._pools["session"].values
        return {pool[c]: int(n) for c, n in zip(codes.tolist(), counts.tolist())}

    def has_poses(self) -> bool:
        return bool(len(self)) and bool((~np.isnan(self.positions[:, 0])).any())

    def has_gnss(self) -> bool:
        return bool(len(self)) and bool((~np.isnan(self.gnss[:, 0])).any())

    def excluded_mask(self, exclusion: Exclusion | None) -> np.ndarray | None:
        """Boolean (N,) mask of excluded ids, or None when nothing is excluded."""
        if exclusion is None or exclusion.is_empty() or len(self) == 0:
            return None
        n = len(self)
        mask = np.zeros(n, dtype=bool)
        session_codes = self._codes["session"].view()
        pool = self._pools["session"]
        if exclusion.sessions:
            wanted = [c for c in (pool.find(s) for s in exclusion.sessions) if c is not None]
            if wanted:
                mask |= np.isin(session_codes, np.asarray(wanted, np.int32))
        if exclusion.ids:
            ids = np.fromiter((int(i) for i in exclusion.ids), np.int64, count=len(exclusion.ids))
            ids = ids[(ids >= 0) & (ids < n)]
            mask[ids] = True
        if exclusion.around_stamp_ns is not None:
            if exclusion.window_ns < 0:
                raise InputError(f"Exclusion.window_ns is {exclusion.window_ns}; it is a half "
                                 "width in nanoseconds and must be >= 0")
            centre = int(exclusion.around_stamp_ns)
            in_window = np.abs(self.stamps - centre) <= int(exclusion.window_ns)
            if exclusion.window_session is not None:
                code = pool.find(exclusion.window_session)
                in_window &= (session_codes == code) if code is not None else False
            mask |= in_window
        return mask
