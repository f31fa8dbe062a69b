"""``vpr eval loop``: loop-closure precision/recall of a model on a recorded sequence.

The sequence is encoded with the model's :class:`~vpr_ros.runtime.encoder.Encoder`; frames are
added to a :class:`~vpr_ros.mapdb.place_map.PlaceMap` (of the chosen index kind) one by one,
after each is queried, exactly as the node grows its map in loop-closure mode, and the
decisions come from :func:`~vpr_ros.localization.evaluation.evaluate_loop_closure`, which
replays the node's :class:`~vpr_ros.localization.loop_closure.LoopClosureDetector` at every
score threshold. So precision/recall, recall at 100% precision and the PR AUC are the node's.

Sequence formats:

* a CSV file with columns ``image`` (path, relative to the CSV), ``stamp_ns`` (or ``stamp_s``)
  and ``x, y`` (and optionally ``z``): ground-truth positions in metres;
* a folder of ``@easting@northing@...`` images, in file-name order, one every ``period_s``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vpr_ros.datasets.images import list_images
from vpr_ros.datasets.utm_folder import parse_utm_name
from vpr_ros.errors import InputError
from vpr_ros.plain_data import parse_yaml
from vpr_ros.localization.evaluation import LoopEvaluation, evaluate_loop_closure
from vpr_ros.localization.loop_closure import LoopClosureConfig, SearchExclusion

SESSION = "eval"


@dataclass(frozen=True)
class LoopSequence:
    source: Path
    paths: tuple[Path, ...]
    stamps_ns: np.ndarray
    positions: np.ndarray  # (N, 3) ground truth, metres
    #: (N, 4) camera orientations (x, y, z, w) in the world, where the CSV gives qx..qw: the
    #: ground truth of verified closures' relative rotations
    orientations: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.paths)


def _read_csv_sequence(path: Path) -> LoopSequence:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        needed = ["image", "x", "y"]
        if "stamp_ns" not in cols and "stamp_s" not in cols:
            needed.append("stamp_ns")
        absent = [c for c in needed if c not in cols]
        if absent:
            raise InputError(f"{path}: missing column(s) {absent}; a sequence CSV has image, "
                             "stamp_ns (or stamp_s), x, y[, z]")
        rows = list(reader)
    if not rows:
        raise InputError(f"{path}: the sequence has no rows")
    paths, stamps, pos, quats = [], [], [], []
    has_q = all(c in cols for c in ("qx", "qy", "qz", "qw"))
    for i, r in enumerate(rows):
        where = f"{path}:{i + 2}"
        try:
            stamp = int(r["stamp_ns"]) if "stamp_ns" in r and r["stamp_ns"] != "" else \
                int(round(float(r["stamp_s"]) * 1e9))
            xyz = (float(r["x"]), float(r["y"]), float(r.get("z") or 0.0))
            if has_q:
                quats.append(tuple(float(r[c]) for c in ("qx", "qy", "qz", "qw")))
        except (KeyError, ValueError):
            raise InputError(f"{where}: stamp/x/y/z must be numbers, got {r}") from None
        img = Path(r["image"])
        paths.append(img if img.is_absolute() else path.parent / img)
        stamps.append(stamp)
        pos.append(xyz)
    stamps_arr = np.asarray(stamps, dtype=np.int64)
    if np.any(np.diff(stamps_arr) < 0):
        raise InputError(f"{path}: stamps must be in time order (the detector replays them in "
                         "row order); sort the CSV by stamp")
    return LoopSequence(path, tuple(paths), stamps_arr, np.asarray(pos, dtype=np.float64),
                        np.asarray(quats, dtype=np.float64) if has_q else None)


def read_sequence(spec: str | Path, period_s: float = 1.0) -> LoopSequence:
    p = Path(spec)
    if p.is_file():
        return _read_csv_sequence(p)
    if not p.is_dir():
        raise InputError(f"{p}: no such sequence (a CSV file or a folder of UTM-named images)")
    files = list_images(p)
    en = np.array([parse_utm_name(f) for f in files], dtype=np.float64)
    pos = np.concatenate([en, np.zeros((len(files), 1))], axis=1)
    stamps = (np.arange(len(files)) * period_s * 1e9).astype(np.int64)
    return LoopSequence(p, tuple(files), stamps, pos)


def evaluate_sequence(descriptors: np.ndarray, seq: LoopSequence, fingerprint: str,
                      config: LoopClosureConfig, gt_distance_m: float, index: str = "flat",
                      k: int = 10, use_poses: bool = False,
                      num_thresholds: int = 50,
                      wrap_search: Optional[Any] = None) -> LoopEvaluation:
    """Replay the detector over ``seq`` with a map that grows as the node's does.
    ``wrap_search``: a function of the search giving the search the detector sees (geometric
    verification keeps only the candidates it confirms)."""
    from vpr_ros.mapdb.keyframe import Exclusion, Keyframe
    from vpr_ros.mapdb.place_map import PlaceMap

    desc = np.ascontiguousarray(descriptors, dtype=np.float32)
    if len(desc) != len(seq):
        raise InputError(f"{len(desc)} descriptors for a sequence of {len(seq)} frames")
    pm = PlaceMap.create(int(desc.shape[1]), fingerprint, index=index)
    state = {"added": 0}

    def search(i: int, exclusion: SearchExclusion) -> tuple[Any, Any]:
        start = state["added"]
        if start < i:
            kfs = [Keyframe(session=SESSION, stamp_ns=int(seq.stamps_ns[j]),
                            frame_id=seq.paths[j].name,
                            position=tuple(map(float, seq.positions[j])) if use_poses else None)
                   for j in range(start, i)]
            pm.add(desc[start:i], kfs)
            state["added"] = i
        ids, scores = pm.search(desc[i:i + 1], k, exclude=Exclusion(**exclusion.as_kwargs()))
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]

    if wrap_search is not None:
        search = wrap_search(search)
    return evaluate_loop_closure(seq.stamps_ns, seq.positions, search, config, gt_distance_m,
                                 positions=seq.positions if use_poses else None,
                                 num_thresholds=num_thresholds, session=SESSION)


def loop_config(path: Optional[str | Path], params: list[str]) -> LoopClosureConfig:
    """LoopClosureConfig from a YAML (the file itself or its ``loop_closure`` section) and
    ``key=value`` overrides; unknown keys are refused by the config itself."""
    from vpr_ros.models.config import load_yaml

    values: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(path)
        values.update(data.get("loop_closure", data))
    for item in params:
        if "=" not in item:
            raise InputError(f"--param {item!r}: expected NAME=VALUE (e.g. min_score=0.7)")
        key, raw = item.split("=", 1)
        values[key] = parse_yaml(raw, f"--param {key}", InputError)
    return LoopClosureConfig.from_mapping(values)
