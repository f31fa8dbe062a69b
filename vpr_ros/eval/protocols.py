"""The evaluation protocols published Recall@K figures are measured with, and ground-truth files.

Why named protocols: a Recall@1 is only comparable with a paper's when the queries, the database
and the rule for a correct answer are the paper's. Three protocols cover the figures the model
papers in this project report (docs/eval_protocols.md gives the sources and the details):

* ``msls-val``: Mapillary SLS validation cities Copenhagen and San Francisco (``cph``, ``sf``),
  every non-panorama database image; a database image is correct when it lies within 25 m of the
  query and its compass heading differs by at most 40 degrees (the rule SelaVPR++ states for
  MSLS, after the dataset paper). The usual 740-query subset is a list of query keys the user
  gives (the ``--queries`` file); without it every non-panorama validation query is used.
* ``nordland-2760``: the VPR-Bench Nordland split: query ``j`` is database frame ``10 j``
  (2760 queries for 27592 database images) and database frames ``10 j - 1 .. 10 j + 1`` are
  correct. The query folder holds either those 2760 images or the whole traversal (then every
  10th image is taken). This equals VPR-Bench's own ``ground_truth_new.npy`` for Nordland.
* ``nordland``: whole index-aligned traversals (the Patch-NetVLAD split, 27592 images each),
  correct within +-10 frames.

Ground-truth files (``--ground-truth FILE``): VPR-Bench's ``ground_truth_new.npy`` (rows
``[query_index, [database indices]]``), or one list of database indices per query (the
``*_gt.npy`` / ``pIdx`` files of GSV-Cities-style evaluation code), indices into the sorted
query and database folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from vpr_ros.datasets.image_sets import ImageSet
from vpr_ros.errors import InputError

PROTOCOLS = ("msls-val", "nordland-2760", "nordland")
MSLS_VAL_CITIES = ("cph", "sf")
MSLS_THRESHOLD_M = 25.0
MSLS_MAX_HEADING_DEG = 40.0
NORDLAND_2760_STRIDE = 10
NORDLAND_2760_TOLERANCE = 1
NORDLAND_TOLERANCE = 10


@dataclass(frozen=True)
class Protocol:
    """Database, queries and the correct database images of each query, with a label."""

    db: ImageSet
    q: ImageSet
    positives: list[np.ndarray]
    label: str


def heading_difference(a: np.ndarray, b: np.ndarray | float) -> np.ndarray:
    """Absolute difference of compass headings in degrees, in [0, 180]."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) % 360.0
    return np.minimum(d, 360.0 - d)


def read_query_list(path: str | Path) -> list[str]:
    """Query keys (file stems) from a text file (one path or key per line, ``#`` comments) or
    a ``.npy`` array of paths or keys."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: query list not found; give a .txt (one image key or path per "
                         "line) or .npy array of image paths")
    if p.suffix == ".npy":
        try:
            items = [str(x) for x in np.load(p, allow_pickle=False).reshape(-1)]
        except ValueError as exc:
            raise InputError(f"{p}: not a plain array of image paths ({exc})") from None
    else:
        items = [line.split("#", 1)[0].strip()
                 for line in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    keys = [Path(x.replace("\\", "/")).stem for x in items if x]
    if not keys:
        raise InputError(f"{p}: lists no query")
    return keys


def msls_val(root: str | Path, query_list: Optional[str | Path] = None,
             threshold_m: float = MSLS_THRESHOLD_M,
             max_heading_deg: Optional[float] = MSLS_MAX_HEADING_DEG) -> Protocol:
    """The MSLS validation protocol over an MSLS root (``train_val/cph``, ``train_val/sf``)."""
    from vpr_ros.datasets.msls import read_msls_folder_headings
    from vpr_ros.eval.ground_truth import positives_by_distance

    base = Path(root)
    base = base / "train_val" if (base / "train_val").is_dir() else base
    missing = [c for c in MSLS_VAL_CITIES if not (base / c / "database").is_dir()
               or not (base / c / "query").is_dir()]
    if missing:
        raise InputError(f"{root}: the MSLS validation protocol needs the cities "
                         f"{', '.join(MSLS_VAL_CITIES)} (<root>/train_val/<city>/database and "
                         f"query); missing: {', '.join(missing)}")
    keep = set(read_query_list(query_list)) if query_list is not None else None
    db_paths: list[Path] = []
    q_paths: list[Path] = []
    db_pos, q_pos, positives = [], [], []
    found: set[str] = set()
    for city in MSLS_VAL_CITIES:
        dp, dpos, dhead = read_msls_folder_headings(base / city / "database")
        qp, qpos, qhead = read_msls_folder_headings(base / city / "query")
        if max_heading_deg is not None and (dhead is None or qhead is None):
            raise InputError(f"{base / city}: raw.csv has no compass angle column 'ca', which "
                             "the heading rule needs; use the official MSLS files")
        if keep is not None:
            sel = np.array([p.stem in keep for p in qp], dtype=bool)
            found |= {p.stem for p in qp if p.stem in keep}
            qp = [p for p, s in zip(qp, sel) if s]
            qpos = qpos[sel]
            qhead = qhead[sel] if qhead is not None else None
        near = positives_by_distance(dpos, qpos, threshold_m) if len(dp) else \
            [np.empty(0, np.int64)] * len(qp)
        for j, ids in enumerate(near):
            if max_heading_deg is not None and len(ids):
                ids = ids[heading_difference(dhead[ids], qhead[j]) <= max_heading_deg]
            positives.append(ids + len(db_paths))
        db_paths += dp
        q_paths += qp
        db_pos.append(dpos)
        q_pos.append(qpos)
    if keep is not None and len(found) < len(keep):
        absent = sorted(keep - found)
        raise InputError(f"{query_list}: {len(absent)} of {len(keep)} listed queries are not "
                         f"non-panorama query images of {', '.join(MSLS_VAL_CITIES)} (e.g. "
                         f"{', '.join(absent[:3])}); the list belongs to another split")
    if not q_paths:
        raise InputError(f"{base}: no validation query images")
    rule = f"within {threshold_m:g} m" + (f" and {max_heading_deg:g} deg heading"
                                          if max_heading_deg is not None else "")
    db = ImageSet(base, "msls", tuple(db_paths), np.concatenate(db_pos))
    q = ImageSet(base, "msls", tuple(q_paths), np.concatenate(q_pos))
    return Protocol(db, q, positives, f"MSLS-val ({len(q_paths)} queries): {rule}")


def nordland_2760(db: ImageSet, q: ImageSet) -> Protocol:
    """The VPR-Bench Nordland split over index-aligned folders (see the module docstring)."""
    n = len(db)
    m = -(-n // NORDLAND_2760_STRIDE)
    if len(q) == n:
        q = ImageSet(q.source, q.kind, q.paths[::NORDLAND_2760_STRIDE], None)
    elif len(q) != m:
        raise InputError(f"{q.source}: the nordland-2760 protocol takes every "
                         f"{NORDLAND_2760_STRIDE}th frame of the traversal as a query, so the "
                         f"query folder must hold {m} images (the split's queries) or {n} (the "
                         f"whole traversal, as the database), not {len(q)}")
    t = NORDLAND_2760_TOLERANCE
    positives = [np.arange(max(0, NORDLAND_2760_STRIDE * j - t),
                           min(n, NORDLAND_2760_STRIDE * j + t + 1), dtype=np.int64)
                 for j in range(len(q))]
    return Protocol(db, q, positives,
                    f"Nordland 2760-query split: database frame {NORDLAND_2760_STRIDE}*i +-{t}")


def read_ground_truth(path: str | Path, num_database: int, num_queries: int
                      ) -> list[np.ndarray]:
    """Positives per query from a ground-truth ``.npy`` file (see the module docstring);
    queries the file does not list get none (and are left out of the recall)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: ground-truth file not found")
    try:
        # Object arrays need pickle: only load ground-truth files you trust (as any .npy).
        arr = np.load(p, allow_pickle=True)
    except Exception as exc:
        raise InputError(f"{p}: not a readable .npy ground-truth file ({exc})") from None
    rows: Sequence
    if arr.ndim == 2 and arr.shape[1] == 2 and arr.dtype == object:  # VPR-Bench
        listed = {}
        for r, (qi, ids) in enumerate(arr):
            qi = _index(qi, num_queries, f"{p}: row {r} query index")
            if qi in listed:
                raise InputError(f"{p}: query {qi} is listed twice (rows {listed[qi][0]} and "
                                 f"{r}); one row per query")
            listed[qi] = (r, ids)
        rows = [listed[i][1] if i in listed else [] for i in range(num_queries)]
    elif arr.ndim == 1 or (arr.ndim == 2 and arr.dtype != object):
        if len(arr) != num_queries:
            raise InputError(f"{p}: holds {len(arr)} lists of positives for {num_queries} "
                             "query images; the file belongs to another query set")
        rows = list(arr)
    else:
        raise InputError(f"{p}: array of shape {arr.shape} is not a ground truth; expected "
                         "rows [query_index, [database indices]] (VPR-Bench) or one list of "
                         "database indices per query")
    out = []
    for qi, ids in enumerate(rows):
        ids = np.atleast_1d(np.asarray(ids if ids is not None else [], dtype=object))
        vals = np.array([_index(v, num_database, f"{p}: query {qi} database index")
                         for v in ids.reshape(-1)], dtype=np.int64)
        out.append(np.unique(vals))
    return out


def _index(value, bound: int, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        else:
            raise InputError(f"{what} {value!r} is not an integer")
    if not 0 <= int(value) < bound:
        raise InputError(f"{what} {int(value)} is outside 0..{bound - 1} (the folder holds "
                         f"{bound} images, in natural name order)")
    return int(value)
