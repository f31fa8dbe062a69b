"""Per-keyframe keypoints (positions, descriptors, optional 3-D points) for geometric
verification, stored under the map's rules.

Why a ragged store: keyframes have different numbers of keypoints (a blank wall has few, a shop
front many), so rows are concatenated and an offsets array (N + 1 int64) says where each
keyframe's rows start. On disk that is four plain ``.npy`` files (offsets, xy float32,
descriptors uint8, points float32 when any keyframe has 3-D points), memory-mapped on load: a
frame reads only its few candidates' rows. Files are written, checksummed and committed with
the rest of the map's generation (atomic save), checked on load (dtypes, shapes, offsets
monotonic from 0 to the row count), appended in memory by live mapping and concatenated by a
merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vpr_ros.errors import InputError, MapError
from vpr_ros.runtime.local_features import KINDS, LocalFeatures, check_kind

#: Manifest roles of the keypoint files.
OFFSETS, XY, DESCRIPTORS, POINTS = ("keypoint_offsets", "keypoint_xy", "keypoint_descriptors",
                                    "keypoint_points")
ROLES = (OFFSETS, XY, DESCRIPTORS, POINTS)


class KeypointStore:
    """Keypoints of keyframes 0..N-1 of one kind (``sift``, ``orb``, ``akaze``)."""

    def __init__(self, kind: str, base: Optional[Mapping[str, np.ndarray]] = None) -> None:
        self.kind = check_kind(kind)
        self.width = KINDS[kind][0]
        if base is None:
            base = {OFFSETS: np.zeros(1, np.int64), XY: np.zeros((0, 2), np.float32),
                    DESCRIPTORS: np.zeros((0, self.width), np.uint8), POINTS: None}
        self._base_offsets = np.asarray(base[OFFSETS])
        self._base = {XY: base[XY], DESCRIPTORS: base[DESCRIPTORS], POINTS: base.get(POINTS)}
        self._new: list[LocalFeatures] = []
        self._new_rows = 0

    # -- size ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._base_offsets) - 1 + len(self._new)

    @property
    def rows(self) -> int:
        return int(self._base_offsets[-1]) + self._new_rows

    @property
    def has_points(self) -> bool:
        if self._base[POINTS] is not None and len(self._base[POINTS]) and \
                bool(np.isfinite(np.asarray(self._base[POINTS])[:, 0]).any()):
            return True
        return any(f.has_points for f in self._new)

    @property
    def nbytes(self) -> int:
        return self.rows * (8 + self.width + (12 if self.has_points else 0)) + 8 * (len(self) + 1)

    # -- writing ------------------------------------------------------------------------------

    def check(self, features: Sequence[LocalFeatures], count: int) -> list[LocalFeatures]:
        """``features`` (one per new keyframe) checked against this store; InputError naming
        what was expected otherwise."""
        if features is None or len(features) != count:
            got = "none" if features is None else len(features)
            raise InputError(f"this map stores {self.kind} keypoints per keyframe: pass one "
                             f"LocalFeatures per keyframe ({count}), got {got}")
        for f in features:
            if not isinstance(f, LocalFeatures):
                raise InputError(f"keypoints must be LocalFeatures, got {type(f).__name__}")
            if f.kind != self.kind:
                raise InputError(f"keypoints are {f.kind} but this map stores {self.kind}; "
                                 "extract the map's kind")
        return list(features)

    def append(self, features: Sequence[LocalFeatures]) -> None:
        for f in features:
            self._new.append(f)
            self._new_rows += len(f)

    def extend_from(self, other: "KeypointStore") -> None:
        for i in range(len(other)):
            self.append([other.get(i)])

    # -- reading ------------------------------------------------------------------------------

    def get(self, id: int) -> LocalFeatures:
        """The keypoints of keyframe ``id`` (arrays are views of the mapped files where they
        come from a loaded map)."""
        n_base = len(self._base_offsets) - 1
        if not 0 <= id < len(self):
            raise InputError(f"keypoints of keyframe {id} asked; the store holds ids "
                             f"0..{len(self) - 1}")
        if id >= n_base:
            return self._new[id - n_base]
        a, b = int(self._base_offsets[id]), int(self._base_offsets[id + 1])
        pts = self._base[POINTS]
        return LocalFeatures(self.kind, np.asarray(self._base[XY][a:b]),
                             np.asarray(self._base[DESCRIPTORS][a:b]),
                             None if pts is None else np.asarray(pts[a:b]))

    # -- persistence --------------------------------------------------------------------------

    def segments(self) -> dict[str, tuple[list[np.ndarray], Any, Any]]:
        """role -> (row segments, dtype, row width) for :meth:`MapWriter.add_npy`; the points
        file only when some keyframe has 3-D points."""
        base_rows = int(self._base_offsets[-1])
        counts = np.array([len(f) for f in self._new], np.int64)
        offsets = np.concatenate([self._base_offsets.astype(np.int64),
                                  base_rows + np.cumsum(counts)]) if len(counts) else \
            self._base_offsets.astype(np.int64)
        out: dict[str, tuple[list[np.ndarray], Any, Any]] = {
            OFFSETS: ([offsets], np.int64, None),
            XY: ([self._base[XY], *(f.xy for f in self._new)], np.float32, 2),
            DESCRIPTORS: ([self._base[DESCRIPTORS], *(f.descriptors for f in self._new)],
                          np.uint8, self.width),
        }
        if self.has_points:
            base_pts = self._base[POINTS]
            if base_pts is None:
                base_pts = np.full((base_rows, 3), np.nan, np.float32)
            out[POINTS] = ([base_pts, *(f.xyz if f.xyz is not None else
                                        np.full((len(f), 3), np.nan, np.float32)
                                        for f in self._new)], np.float32, 3)
        return out

    def manifest_entry(self) -> dict[str, Any]:
        return {"kind": self.kind, "descriptor_bytes": self.width, "rows": self.rows,
                "points": self.has_points}

    @classmethod
    def load(cls, mpath: Path, entry: Any, files: Mapping[str, Path], count: int,
             mmap: bool) -> "KeypointStore":
        """The store a manifest's ``keypoints`` entry describes; MapError naming the file or
        the entry when anything disagrees."""
        from vpr_ros.mapdb.storage import load_npy

        ok = isinstance(entry, dict) and entry.get("kind") in KINDS and \
            entry.get("descriptor_bytes") == KINDS.get(entry.get("kind"), (None,))[0] and \
            isinstance(entry.get("rows"), int) and entry["rows"] >= 0 and \
            isinstance(entry.get("points"), bool)
        if not ok:
            raise MapError(f"{mpath}: keypoints entry {entry!r} is invalid (expected kind "
                           f"{'/'.join(KINDS)}, its descriptor_bytes, rows >= 0 and points "
                           "true/false); the manifest is corrupt: rebuild the map")
        need = [OFFSETS, XY, DESCRIPTORS] + ([POINTS] if entry["points"] else [])
        for role in need:
            if role not in files:
                raise MapError(f"{mpath}: the map has keypoints but lists no {role} file; the "
                               "manifest is corrupt: rebuild the map")
        kind, rows = entry["kind"], entry["rows"]
        offsets = load_npy(files[OFFSETS], np.int64, (count + 1,), mmap=False)
        if offsets[0] != 0 or offsets[-1] != rows or (np.diff(offsets) < 0).any():
            raise MapError(f"{files[OFFSETS]}: keypoint offsets are not monotonic from 0 to "
                           f"{rows}; the file is corrupt: rebuild the map")
        base = {OFFSETS: offsets,
                XY: load_npy(files[XY], np.float32, (rows, 2), mmap=mmap),
                DESCRIPTORS: load_npy(files[DESCRIPTORS], np.uint8, (rows, KINDS[kind][0]),
                                      mmap=mmap),
                POINTS: load_npy(files[POINTS], np.float32, (rows, 3), mmap=mmap)
                if entry["points"] else None}
        return cls(kind, base)
