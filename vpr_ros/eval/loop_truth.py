"""Loop ground truth from a file, for recordings without poses.

Public loop-closure datasets do not ship poses with every frame; they ship which frames see
the same place: an N x N boolean matrix over the image sequence (FAB-MAP's City Centre and New
College ground truth, as an image or a NumPy array), or a list of (query, match) pairs. This
module reads either into :class:`LoopTruth`, which answers "do these two stamps show the same
place?" for the frames of one image topic, whose stamps the caller supplies in recording order
(frame index i = the i-th message on the topic, as the matrix counts them).

Formats (chosen by the file suffix):

- ``.csv`` / ``.txt``: one loop per row, ``query_stamp, match_stamp`` (a header row is
  skipped). Stamps are seconds (``1700000000.25``) or integer nanoseconds (whichever names
  more of the frames); each is matched to the nearest frame stamp within half a frame
  period.
- ``.npy``: an N x N array; nonzero (or True) at [i, j] means frames i and j are the same place.
- an image (``.png``, ``.bmp``, ``.tif``, ``.pgm``, ``.jpg``): the same matrix as pixels;
  nonzero means a loop (colour images: any channel).

Pairs are symmetric (i with j is j with i) and a frame never counts as its own loop. A loop
published between frames q and m is correct when a ground-truth pair lies within
``tolerance`` frames of (q, m) on both ends: pair lists mark one frame of a revisit, the
recognised neighbour one frame off is the same place.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from vpr_ros.errors import InputError

IMAGE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".jpg", ".jpeg")
CSV_SUFFIXES = (".csv", ".txt")


@dataclass
class LoopTruth:
    """Loop pairs over the frames of one image topic (indices into ``stamps_ns``)."""

    stamps_ns: np.ndarray
    pairs: set[tuple[int, int]] = field(default_factory=set)
    tolerance: int = 2
    source: str = ""
    unmatched_rows: int = 0  # CSV rows naming a stamp that is none of the frames

    def __post_init__(self) -> None:
        self.stamps_ns = np.asarray(self.stamps_ns, dtype=np.int64)
        if len(self.stamps_ns) == 0:
            raise InputError("loop ground truth needs the frames of the image topic, and it "
                             "has none")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, int) \
                or self.tolerance < 0:
            raise InputError(f"loop ground-truth tolerance must be a whole number of frames "
                             f">= 0, got {self.tolerance!r}")
        self._order = np.argsort(self.stamps_ns, kind="stable")
        self._sorted = self.stamps_ns[self._order]
        gaps = np.diff(self._sorted)
        gaps = gaps[gaps > 0]
        self._half_period = int(np.median(gaps) // 2) if len(gaps) else 1_000_000
        self.set_pairs(self.pairs)

    def set_pairs(self, pairs: set[tuple[int, int]]) -> None:
        """The loop pairs (both directions), and which frames revisit an earlier one."""
        self.pairs = pairs
        self._revisits = {max(i, j) for i, j in pairs}

    def __len__(self) -> int:
        return len(self.stamps_ns)

    def frame_of(self, stamp_ns: int) -> Optional[int]:
        """The index of the frame stamped closest to ``stamp_ns`` (None: none within half a
        frame period)."""
        at = int(np.searchsorted(self._sorted, stamp_ns))
        best: Optional[int] = None
        for k in (at - 1, at):
            if 0 <= k < len(self._sorted):
                if best is None or abs(int(self._sorted[k]) - stamp_ns) < \
                        abs(int(self._sorted[best]) - stamp_ns):
                    best = k
        if best is None or abs(int(self._sorted[best]) - stamp_ns) > max(self._half_period,
                                                                         1_000_000):
            return None
        return int(self._order[best])

    def same_place(self, stamp_a: int, stamp_b: int) -> Optional[bool]:
        """Whether the frames at these stamps are a ground-truth loop (None: a stamp is not
        one of the topic's frames)."""
        a, b = self.frame_of(stamp_a), self.frame_of(stamp_b)
        if a is None or b is None:
            return None
        t = self.tolerance
        return any((i, j) in self.pairs for i in range(a - t, a + t + 1)
                   for j in range(b - t, b + t + 1) if i != j)

    def has_revisit(self, stamp_ns: int) -> bool:
        """Whether the frame at this stamp has any ground-truth loop with an earlier frame."""
        q = self.frame_of(stamp_ns)
        return q is not None and q in self._revisits

    @property
    def revisit_frames(self) -> list[int]:
        """Frames that close a loop with an earlier frame (the recall denominator)."""
        return sorted(self._revisits)


def _symmetric(pairs: np.ndarray) -> set[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    for i, j in pairs.tolist():
        if i != j:
            out.add((int(i), int(j)))
            out.add((int(j), int(i)))
    return out


def _matrix_pairs(matrix: np.ndarray, path: Path, frames: int) -> set[tuple[int, int]]:
    if matrix.ndim == 3:  # a colour image: a loop where any channel is set
        matrix = matrix.any(axis=2)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise InputError(f"loop ground truth {path} is a {' x '.join(map(str, matrix.shape))} "
                         "array; expected a square N x N matrix over the frames")
    if matrix.shape[0] != frames:
        raise InputError(f"loop ground truth {path} is {matrix.shape[0]} x {matrix.shape[1]} "
                         f"but the image topic has {frames} frames; the matrix must cover "
                         "exactly the topic's frames, in recording order")
    return _symmetric(np.argwhere(np.asarray(matrix) != 0))


def _number(text: str) -> float:
    value = float(text)
    if not np.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


def _csv_pairs(path: Path, truth: LoopTruth) -> set[tuple[int, int]]:
    """Rows of two stamps. Seconds or nanoseconds is decided for the whole file by which
    reading names more of the topic's frames: a magnitude rule would misread the small stamps
    of simulated-time bags."""
    values: list[tuple[float, float]] = []
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    for n, row in enumerate(rows):
        cells = [c.strip() for c in row if c.strip()]
        try:
            if len(cells) < 2:
                raise ValueError("fewer than two columns")
            values.append((_number(cells[0]), _number(cells[1])))
        except ValueError:
            if n == 0:
                continue  # a header row
            raise InputError(f"loop ground truth {path}, row {n + 1}: {row!r} is not two "
                             "stamps (query, match) in seconds or nanoseconds") from None
    best: list[tuple[int, int]] = []
    for scale in (1e9, 1.0):  # seconds, then nanoseconds
        found = []
        for q, m in values:
            qi = truth.frame_of(int(round(q * scale)))
            mi = truth.frame_of(int(round(m * scale)))
            if qi is not None and mi is not None:
                found.append((qi, mi))
        if len(found) > len(best):
            best = found
    if not best:
        raise InputError(f"loop ground truth {path}: none of its {len(rows)} rows names two "
                         "stamps of the image topic's frames (are they the bag's header "
                         "stamps, in seconds or nanoseconds?)")
    truth.unmatched_rows = len(values) - len(best)
    return _symmetric(np.asarray(best, dtype=np.int64).reshape(-1, 2))


def load_loop_truth(path: str | Path, stamps_ns: Sequence[int], tolerance: int = 2
                    ) -> LoopTruth:
    """Read a loop ground-truth file (see the module docstring) over frames ``stamps_ns``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"loop ground truth {p} does not exist; give a CSV of (query, match) "
                         "stamps, or an N x N matrix as .npy or an image")
    truth = LoopTruth(np.asarray(stamps_ns, dtype=np.int64), set(), tolerance, str(p))
    suffix = p.suffix.lower()
    if suffix in CSV_SUFFIXES:
        truth.set_pairs(_csv_pairs(p, truth))
    elif suffix == ".npy":
        try:
            matrix = np.load(p, allow_pickle=False)
        except Exception as exc:  # numpy raises several types for a bad file
            raise InputError(f"loop ground truth {p} is not a readable .npy array "
                             f"({type(exc).__name__}: {exc})") from exc
        truth.set_pairs(_matrix_pairs(matrix, p, len(truth)))
    elif suffix in IMAGE_SUFFIXES:
        import cv2

        matrix = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if matrix is None:
            raise InputError(f"loop ground truth {p} is not a readable image")
        truth.set_pairs(_matrix_pairs(matrix, p, len(truth)))
    else:
        raise InputError(f"loop ground truth {p}: unknown format {suffix or '(no suffix)'}; "
                         f"expected .csv/.txt (stamp pairs), .npy or an image "
                         f"({', '.join(IMAGE_SUFFIXES)}) holding an N x N matrix")
    return truth
