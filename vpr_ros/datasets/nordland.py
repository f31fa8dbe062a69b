"""The shared Nordland thumbnails (summer/winter traversals of the same railway line).

The archive lives in the steering repo's ``shared/data`` folder beside the checkout (never copied
into this repository). It is extracted once into a cache folder and read from there. The two
traversals are index-aligned: ``summer/images-N.png`` and ``winter/images-N.png`` show the same
place, so the ground truth of a query is its own index (with a tolerance of +-1 file).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import cv2
import numpy as np

from vpr_ros.errors import InputError

ARCHIVE = "nordland_64x32_summer_winter.tar.gz"


def shared_data_dir() -> Path | None:
    """``$VPR_SHARED_DATA`` or ``<repo>/../shared/data``, if it exists."""
    env = os.environ.get("VPR_SHARED_DATA")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "data", repo / "shared" / "data"]
    return next((c for c in candidates if (c / ARCHIVE).is_file()), None)


def nordland_root(cache_dir: str | Path | None = None) -> Path:
    """Extract the archive once (atomically) and return the ``nordland_64x32`` folder."""
    data = shared_data_dir()
    if data is None:
        raise InputError(f"{ARCHIVE} not found: set VPR_SHARED_DATA to the folder holding it, or "
                         "keep the steering repo's shared/ folder beside the checkout")
    cache = Path(cache_dir or os.environ.get("VPR_CACHE_DIR",
                                             Path.home() / ".cache" / "vpr_ros" / "data"))
    root = cache / "nordland_64x32"
    if (root / ".complete").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".extract-{os.getpid()}"
    with tarfile.open(data / ARCHIVE) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / "nordland_64x32" / ".complete").touch()
    try:
        os.replace(tmp / "nordland_64x32", root)
    except OSError:  # another process won the race; its copy is complete
        pass
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return root


def frame_numbers(root: Path) -> list[int]:
    """Sorted original frame numbers present in both seasons."""
    summer = {int(p.stem.split("-")[1]) for p in (root / "summer").glob("images-*.png")}
    winter = {int(p.stem.split("-")[1]) for p in (root / "winter").glob("images-*.png")}
    return sorted(summer & winter)


def load_images(root: Path, season: str, frames: list[int]) -> list[np.ndarray]:
    """RGB uint8 images of one season, in the order of ``frames``."""
    out = []
    for n in frames:
        path = root / season / f"images-{n:05d}.png"
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f"{path}: unreadable image")
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return out
