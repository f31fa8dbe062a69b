"""Evaluation image sets: a database or query folder, with positions when the format has them.

One entry point, :func:`read_image_set`, recognises the three layouts the evaluator accepts, so
the user passes folders and the ground truth follows from the format:

* an MSLS ``query/`` or ``database/`` folder (``postprocessed.csv``): UTM positions;
* a folder of ``@easting@northing@...`` files (the VPR evaluation sets): UTM positions;
* any other image folder (or ``nordland:<season>``): no positions; images are index-aligned
  with the other folder and matched with an index tolerance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpr_ros.datasets.images import list_images
from vpr_ros.datasets.msls import is_msls_folder, read_msls_folder
from vpr_ros.datasets.traversals import resolve_folder
from vpr_ros.datasets.utm_folder import parse_utm_name
from vpr_ros.errors import InputError


@dataclass(frozen=True)
class ImageSet:
    """Images of one side of a retrieval evaluation; ``positions`` (N, 2) metres or None."""

    source: Path
    kind: str  # "msls" | "utm" | "aligned"
    paths: tuple[Path, ...]
    positions: np.ndarray | None

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, start: float, end: float) -> "ImageSet":
        """The contiguous block ``[start, end)`` (fractions) of the images in sorted order."""
        if not (0.0 <= start < end <= 1.0):
            raise InputError(f"subset {start}:{end} must satisfy 0 <= start < end <= 1")
        n = len(self.paths)
        lo, hi = int(round(start * n)), int(round(end * n))
        if hi <= lo:
            raise InputError(f"{self.source}: subset {start}:{end} of {n} images is empty")
        pos = None if self.positions is None else self.positions[lo:hi]
        return ImageSet(self.source, self.kind, self.paths[lo:hi], pos)


def read_image_set(spec: str | Path) -> ImageSet:
    folder = resolve_folder(spec)
    if not folder.is_dir():
        raise InputError(f"{spec}: no such image folder")
    if is_msls_folder(folder):
        paths, pos = read_msls_folder(folder)
        if not paths:
            raise InputError(f"{folder}: postprocessed.csv lists no (non-panorama) image")
        return ImageSet(folder, "msls", tuple(paths), pos)
    paths = list_images(folder, recursive=False)
    if paths[0].name.startswith("@"):
        pos = np.array([parse_utm_name(p) for p in paths], dtype=np.float64)
        return ImageSet(folder, "utm", tuple(paths), pos)
    return ImageSet(folder, "aligned", tuple(sorted(paths, key=natural_key)), None)


def natural_key(path: Path) -> tuple:
    """Sort key reading digit runs as numbers: ``2.jpg`` before ``10.jpg``.

    Why: index-aligned folders and ground-truth files number their images (VPR-Bench writes
    ``0.jpg``, ``1.jpg``, ...); a plain string sort would put ``10.jpg`` second and pair every
    image with the wrong place. Zero-padded names keep the order a string sort gives."""
    return tuple(int(part) if part.isdigit() else part
                 for part in re.split(r"(\d+)", path.name))
