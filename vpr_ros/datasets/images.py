"""Reading dataset images from disk, with errors that name the file.

Training on a million files means some of them are missing or truncated; the error a user sees
must name the file and say what to do, not be a ``NoneType`` traceback from deep inside a data
loader worker. Every reader in this package goes through :func:`read_rgb`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from vpr_ros.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BAD_IMAGE_POLICIES = ("error", "skip")


def read_rgb(path: str | Path) -> np.ndarray:
    """An HxWx3 uint8 RGB image, or :class:`InputError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: image file is missing; restore it, or drop it from the dataset "
                         "(set on_bad_image: skip in the training config)")
    bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise InputError(f"{p}: unreadable image (truncated or not an image); re-download it, "
                         "or set on_bad_image: skip in the training config to train without it")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted by path), or InputError if the folder is absent/empty."""
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"{d}: no such image folder")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in d.glob(pattern)
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"{d}: contains no images ({', '.join(IMAGE_SUFFIXES)}); check the "
                         "path" + ("" if recursive else " (images in sub-folders are not read)"))
    return files


def find_bad_images(paths: Sequence[Path], decode: bool) -> list[tuple[Path, str]]:
    """(path, reason) for each image that is missing, or (``decode``) cannot be decoded."""
    bad: list[tuple[Path, str]] = []
    for p in paths:
        if not p.is_file():
            bad.append((p, "missing"))
        elif decode and cv2.imread(str(p), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
            bad.append((p, "unreadable"))
    return bad


def describe(items: Iterable[tuple[Path, str]], n: int = 5) -> str:
    items = list(items)
    head = "; ".join(f"{p} ({why})" for p, why in items[:n])
    return head + (f"; ... and {len(items) - n} more" if len(items) > n else "")


def handle_bad_images(source: str, bad: list[tuple[Path, str]], policy: str) -> None:
    """Apply the ``on_bad_image`` policy: error (default) or a warning naming the files."""
    if not bad:
        return
    if policy not in BAD_IMAGE_POLICIES:
        raise InputError(f"{source}: on_bad_image={policy!r} must be one of "
                         f"{list(BAD_IMAGE_POLICIES)}")
    if policy == "error":
        raise InputError(f"{source}: {len(bad)} image(s) are missing or unreadable: "
                         f"{describe(bad)}. Restore them, or set on_bad_image: skip for this "
                         "dataset to train without them.")
    msg = (f"{source}: skipping {len(bad)} missing or unreadable image(s): {describe(bad)}")
    log.warning(msg)
    warnings.warn(msg, stacklevel=3)
