"""``vpr eval loop``: loop-closure precision/recall of a model on a recorded sequence.

The sequence is encoded with the model's :class:`~vpr_ros.runtime.encoder.Encoder`; frames are
added to a :class:`~vpr_ros.mapdb.place_map.PlaceMap` (of the chosen index kind) one by one,
after each is queried, exactly as the node grows its map in loop-closure mode, and the
decisions come from :func:`~vpr_ros.localization.evaluation.evaluate_loop_closure`, which
replays the node's :class:`~vpr_ros.localization.loop_closure.LoopClosureDetector` at every
score threshold. So precision/recall, recall at 100% precision and the PR AUC are the node's.

Sequence formats:

* a CSV file with columns ``image`` (path, relative to the CSV), ``stamp_ns`` (or ``stamp_s``)
  and ``x, y`` (and optionally ``z``): ground-truth positions in metres; optionally
  ``odom_x, odom_y[, odom_z, odom_yaw]``: the robot's own odometry, which is what the detector
  and the sequence matcher may use (ground truth only ever scores);
* a folder of ``@easting@northing@...`` images, in file-name order, one every ``period_s``.

Stamps must not go backwards (the detector replays rows in order); repeated stamps are allowed
(frames taken together, or a robot standing still).
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vpr_ros.datasets.images import list_images
from vpr_ros.datasets.utm_folder import parse_utm_name
from vpr_ros.errors import InputError
from vpr_ros.plain_data import parse_yaml
from vpr_ros.localization.evaluation import (Calibration, LoopEvaluation, LoopReplay,
                                             evaluate_loop_closure)
from vpr_ros.localization.loop_closure import LoopClosureConfig, SearchExclusion
from vpr_ros.localization.sequence import SequenceConfig

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
    odometry: Optional[np.ndarray] = None     # (N, 3) the robot's own estimate, metres
    odometry_yaw: Optional[np.ndarray] = None  # (N,) radians, where the CSV gives it

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, start: float, end: float) -> "LoopSequence":
        """The rows of a fraction of the sequence, ``[start, end)`` of its length."""
        n = len(self)
        a, b = int(round(start * n)), int(round(end * n))
        if not 0 <= a < b <= n:
            raise InputError(f"--subset {start}:{end} selects no rows of a {n}-row sequence")
        sl = slice(a, b)
        return LoopSequence(self.source, self.paths[sl], self.stamps_ns[sl], self.positions[sl],
                            None if self.orientations is None else self.orientations[sl],
                            None if self.odometry is None else self.odometry[sl],
                            None if self.odometry_yaw is None else self.odometry_yaw[sl])


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
    has_odom = "odom_x" in cols or "odom_y" in cols
    if has_odom and not {"odom_x", "odom_y"} <= set(cols):
        raise InputError(f"{path}: odometry needs both odom_x and odom_y columns (odom_z and "
                         "odom_yaw are optional)")
    has_yaw = "odom_yaw" in cols
    odom, yaw = [], []
    for i, r in enumerate(rows):
        where = f"{path}:{i + 2}"
        try:
            stamp = int(r["stamp_ns"]) if "stamp_ns" in r and r["stamp_ns"] != "" else \
                int(round(float(r["stamp_s"]) * 1e9))
            xyz = (float(r["x"]), float(r["y"]), float(r.get("z") or 0.0))
            if has_q:
                quats.append(tuple(float(r[c]) for c in ("qx", "qy", "qz", "qw")))
            if has_odom:
                odom.append((float(r["odom_x"]), float(r["odom_y"]),
                             float(r.get("odom_z") or 0.0)))
                if has_yaw:
                    yaw.append(float(r["odom_yaw"]))
        except (KeyError, ValueError, TypeError):
            raise InputError(f"{where}: stamp, x, y, z, q* and odom_* must be numbers, got "
                             f"{r}") from None
        if not all(np.isfinite(xyz)) or (has_odom and not np.all(np.isfinite(odom[-1]))):
            raise InputError(f"{where}: positions must be finite numbers, got {r}")
        img = Path(r["image"])
        paths.append(img if img.is_absolute() else path.parent / img)
        stamps.append(stamp)
        pos.append(xyz)
    stamps_arr = np.asarray(stamps, dtype=np.int64)
    if np.any(np.diff(stamps_arr) < 0):
        bad = int(np.flatnonzero(np.diff(stamps_arr) < 0)[0])
        raise InputError(f"{path}: stamps must be in time order (the detector replays them in "
                         f"row order); row {bad + 3} goes back in time: sort the CSV by stamp")
    return LoopSequence(path, tuple(paths), stamps_arr, np.asarray(pos, dtype=np.float64),
                        np.asarray(quats, dtype=np.float64) if has_q else None,
                        np.asarray(odom, dtype=np.float64) if has_odom else None,
                        np.asarray(yaw, dtype=np.float64) if has_yaw else None)


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


#: What ``odometry`` says in the JSON: where the positions the detector was given came from.
ODOMETRY_NONE = "none"
ODOMETRY_COLUMNS = "odometry columns (odom_x, odom_y)"
ODOMETRY_GROUND_TRUTH = "ground truth (the sequence has no odometry columns)"


def odometry_for(seq: LoopSequence, use_poses: bool) -> tuple[Optional[np.ndarray], str]:
    """The positions the detector may use and where they came from. Odometry columns are used
    whenever they exist; ground truth only on request (``--use-poses``), and then said."""
    if seq.odometry is not None:
        return seq.odometry, ODOMETRY_COLUMNS
    if use_poses:
        return seq.positions, ODOMETRY_GROUND_TRUTH
    return None, ODOMETRY_NONE


def make_search(descriptors: np.ndarray, seq: LoopSequence, fingerprint: str, index: str,
                k: int, positions: Optional[np.ndarray]
                ) -> Callable[[int, SearchExclusion], tuple[Any, Any]]:
    """``search(i, exclusion)`` over a map that grows as the node's does (frames before ``i``
    are keyframes), results memoised so several replays share one search per frame."""
    from vpr_ros.mapdb.keyframe import Exclusion, Keyframe
    from vpr_ros.mapdb.place_map import PlaceMap

    desc = np.ascontiguousarray(descriptors, dtype=np.float32)
    if len(desc) != len(seq):
        raise InputError(f"{len(desc)} descriptors for a sequence of {len(seq)} frames")
    pm = PlaceMap.create(int(desc.shape[1]), fingerprint, index=index)
    state = {"added": 0}
    memo: dict[int, tuple[Any, Any]] = {}

    def search(i: int, exclusion: SearchExclusion) -> tuple[Any, Any]:
        if i in memo:
            return memo[i]
        start = state["added"]
        if start < i:
            kfs = [Keyframe(session=SESSION, stamp_ns=int(seq.stamps_ns[j]),
                            frame_id=seq.paths[j].name,
                            position=None if positions is None else
                            tuple(map(float, positions[j])))
                   for j in range(start, i)]
            pm.add(desc[start:i], kfs)
            state["added"] = i
        ids, scores = pm.search(desc[i:i + 1], k, exclude=Exclusion(**exclusion.as_kwargs()))
        keep = ids[0] >= 0
        memo[i] = (ids[0][keep], scores[0][keep])
        return memo[i]

    return search


def evaluate_sequence(descriptors: np.ndarray, seq: LoopSequence, fingerprint: str,
                      config: LoopClosureConfig, gt_distance_m: float, index: str = "flat",
                      k: int = 10, use_poses: bool = False,
                      num_thresholds: int = 50,
                      wrap_search: Optional[Any] = None,
                      sequence: Optional[SequenceConfig] = None) -> LoopEvaluation:
    """Replay the detector over ``seq`` with a map that grows as the node's does.
    ``wrap_search``: a function of the search giving the search the detector sees (geometric
    verification keeps only the candidates it confirms); ``sequence``: sequence matching (None:
    single frames)."""
    odom, _ = odometry_for(seq, use_poses)
    search = make_search(descriptors, seq, fingerprint, index, k, odom)
    if wrap_search is not None:
        search = wrap_search(search)
    return evaluate_loop_closure(seq.stamps_ns, seq.positions, search, config, gt_distance_m,
                                 positions=odom, num_thresholds=num_thresholds, session=SESSION,
                                 sequence=sequence, descriptors=descriptors)


def stage_figures(ev: LoopEvaluation) -> dict[str, Any]:
    """One stage's row of the JSON: the threshold-free figures, the operating point at the
    configuration as given, and the PR curve."""
    at = ev.at_config
    return {"recall_at_100_precision": ev.recall_at_100_precision, "auc": ev.auc,
            "precision": None if at is None else at.precision,
            "recall": None if at is None else at.recall,
            "true_positives": None if at is None else at.true_positives,
            "false_positives": None if at is None else at.false_positives,
            "swept": ev.swept, "curve": ev.to_dict()}


@dataclass
class StageRun:
    """Everything ``vpr eval loop`` measured for one odometry setting."""

    stages: dict[str, dict[str, Any]]
    evaluations: dict[str, LoopEvaluation]
    calibration: Optional[Calibration] = None


def evaluate_stages(descriptors: np.ndarray, seq: LoopSequence, fingerprint: str,
                    config: LoopClosureConfig, sequence: SequenceConfig, gt_distance_m: float,
                    *, index: str = "flat", k: int = 10, odometry: Optional[np.ndarray] = None,
                    num_thresholds: int = 50, calibrate: bool = False,
                    search: Any = None) -> StageRun:
    """What each stage buys: ``single_frame`` (sequence.length 1), ``sequence`` (as configured,
    when length > 1) and with ``calibrate`` the ``calibrated`` settings (chosen on this very
    sequence: in-sample figures; calibrate on a validation run and evaluate another)."""
    search = search or make_search(descriptors, seq, fingerprint, index, k, odometry)
    stages: dict[str, dict[str, Any]] = {}
    evals: dict[str, LoopEvaluation] = {}
    replays = {"single_frame": dataclasses.replace(sequence, length=1)}
    if sequence.enabled:
        replays["sequence"] = sequence
    last: Optional[LoopReplay] = None
    for name, seq_cfg in replays.items():
        last = LoopReplay(seq.stamps_ns, seq.positions, search, config, gt_distance_m,
                          positions=odometry, sequence=seq_cfg, descriptors=descriptors,
                          session=SESSION)
        evals[name] = last.sweep(config, num_thresholds=num_thresholds)
        stages[name] = stage_figures(evals[name])
    calibration = None
    if calibrate and last is not None:
        calibration = last.calibrate(config)
        evals["calibrated"] = last.sweep(calibration.config, num_thresholds=num_thresholds)
        stages["calibrated"] = {**stage_figures(evals["calibrated"]),
                                "values": calibration.values, "in_sample": True,
                                "reached_full_precision": calibration.reached}
    return StageRun(stages, evals, calibration)


def decision_configs(path: Optional[str | Path], params: list[str]
                     ) -> tuple[LoopClosureConfig, SequenceConfig]:
    """LoopClosureConfig and SequenceConfig from a YAML and ``key=value`` overrides.

    The YAML may be a node params file (``vpr_node: ros__parameters: {loop_closure: ...,
    sequence: ...}``, e.g. the shipped ``config/vpr_loop_closure.yaml`` or a calibrated
    ``site.yaml``), a file with ``loop_closure`` / ``sequence`` sections, or a bare
    loop-closure mapping. Overrides name loop-closure fields plainly (``min_score=0.7``) and
    sequence fields with their prefix (``sequence.length=10``). Unknown keys are refused.
    """
    loop, seq = decision_sections(path, params, "loop_closure")
    return LoopClosureConfig.from_mapping(loop), SequenceConfig.from_mapping(seq)


def decision_sections(path: Optional[str | Path], params: Sequence[str], section: str
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw ``section`` and ``sequence`` parameter mappings from a YAML and ``key=value``
    overrides, as :func:`decision_configs` reads them (the relocalization evaluation reads its
    own section the same way, so both accept the same files and overrides).

    The YAML may be a node params file, a file with ``section`` / ``sequence`` sections, or a
    bare mapping of ``section`` parameters. Overrides name ``section`` fields plainly or with
    their ``section.`` prefix, and sequence fields with their ``sequence.`` prefix. The
    mappings are not validated here: the config classes refuse unknown keys.
    """
    from vpr_ros.models.config import load_yaml

    main: dict[str, Any] = {}
    seq: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(path)
        data = data.get("vpr_node", data)
        data = data.get("ros__parameters", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a mapping of parameters")
        if section in data or "sequence" in data:
            for name, into in ((section, main), ("sequence", seq)):
                part = data.get(name) or {}
                if not isinstance(part, dict):
                    raise InputError(f"{path}: section '{name}' must be a mapping of "
                                     f"parameters, got {type(part).__name__}")
                into.update(part)
        else:
            main.update(data)
    for item in params:
        if "=" not in item:
            raise InputError(f"--param {item!r}: expected NAME=VALUE (e.g. min_score=0.7)")
        key, raw = item.split("=", 1)
        value = parse_yaml(raw, f"--param {key}", InputError)
        if key.startswith("sequence."):
            seq[key[len("sequence."):]] = value
        else:
            main[key.removeprefix(f"{section}.")] = value
    return main, seq


def loop_config(path: Optional[str | Path], params: list[str]) -> LoopClosureConfig:
    """LoopClosureConfig from a YAML (see :func:`decision_configs`) and ``key=value``
    overrides; unknown keys are refused by the config itself."""
    return decision_configs(path, params)[0]


def write_aligned_stream(folders: list[str], out: str | Path,
                         subset: Optional[tuple[float, float]] = None, period_s: float = 1.0,
                         spacing_m: float = 1.0, gap_s: float = 0.0) -> Path:
    """One loop-closure sequence CSV from index-aligned traversals of a route (Nordland
    seasons, a route walked by day and by night): traversal after traversal, one frame every
    ``period_s`` (``gap_s`` between traversals), image j of every traversal at position
    ``j * spacing_m`` on a line (the ground truth: index-aligned means same index, same place).
    No odometry columns: the folders carry none."""
    from vpr_ros.datasets.image_sets import read_image_set

    if len(folders) < 2:
        raise InputError("give at least two index-aligned traversals (a revisit needs two)")
    if not (period_s > 0 and spacing_m > 0 and gap_s >= 0):
        raise InputError("--period-s and --spacing-m must be positive, --gap-s >= 0")
    sets = [read_image_set(f) for f in folders]
    sizes = {len(s) for s in sets}
    if len(sizes) != 1:
        raise InputError(f"index-aligned traversals must hold as many images each, got "
                         f"{[len(s) for s in sets]}")
    if subset is not None:
        sets = [s.select(*subset) for s in sets]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = 0.0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "stamp_s", "x", "y"])
        for k, s in enumerate(sets):
            if k:
                t += gap_s
            for j, p in enumerate(s.paths):
                w.writerow([str(Path(p).resolve()), f"{t:.3f}", f"{j * spacing_m:.3f}", "0"])
                t += period_s
    return path
