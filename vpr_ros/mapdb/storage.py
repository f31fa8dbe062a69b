"""How a map lives on disk, and how it is saved so that a crash never damages it.

A map is a directory::

    map.json                      manifest: format version, model fingerprint, dim, counts,
                                  index parameters, and name/size/sha256 of every file below
    descriptors.g000007.npy       (N, D) float32 or float16, memory-mappable (np.load mmap_mode)
    keyframes.g000007.sqlite      keyframe metadata, one row per id (queryable with sqlite3)
    <artifact>.g000007.{npy,faiss}  what the index kind needs (HNSW graph, IVF-PQ index, binary
                                  codes and projection)

Why generations instead of a temp directory that is renamed over the old one: swapping two
directories takes two renames, and a crash between them leaves no map at the path. Here every
save writes a complete new generation of files beside the current one (each fsynced), then
replaces ``map.json`` with one atomic rename (and fsyncs the directory). Until that rename the old
manifest names the old, untouched files; after it the new manifest names complete new files. Files
of other generations are deleted only after the switch. A process killed anywhere in a save or an
append (an append is an ``add`` followed by a save) leaves a loadable map: the previous one or the
new one, never a mixture. Readers that race a writer retry when the files they were told about
have just been replaced.

Loading checks the format version, dim, counts, sizes and (by default) sha256 of every file, so a
truncated, corrupt or swapped file is reported as a :class:`MapError` naming the file, never as
wrong search results. ``map.json`` carries a sha256 of its own content (``manifest_sha256``),
because some of its fields change results without touching any data file (a binary index's
``rerank``, HNSW's ``ef_search``, ...): an edited or damaged manifest is refused, not obeyed.

Readers never wait for a save (a long save must not stall a node's configure). A reader holds
a shared lock on ``.readers.lock`` while it loads, and a writer deletes the files of replaced
generations only under the exclusive lock on it (:func:`readers_lock`, :func:`gc_lock`): a
generation being read is never removed under the reader, however often a writer commits. Where
the lock file cannot be opened (a map on read-only storage, where nobody saves), a load that
fails in any way is retried when ``map.json`` names a newer generation than the one it started
with (:func:`generation_changed`).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from vpr_ros import paths
from vpr_ros.errors import MapError, VPRError
from vpr_ros.mapdb.camera import CameraModel
from vpr_ros.mapdb.index.faiss_loader import load_faiss
from vpr_ros.mapdb.keyframe import KeyframeTable
from vpr_ros.plain_data import read_json

FORMAT = "vpr_ros.map"
#: 2: keyframes name their camera; the keyframe database holds a ``cameras`` table (intrinsics,
#: distortion and mount per session and camera); optional keypoint files (local features with
#: 3-D points) for geometric verification. Version 1 maps still load (no cameras, no keypoints).
FORMAT_VERSION = 2
MANIFEST = "map.json"
#: The manifest's own checksum field (see :func:`manifest_digest`).
MANIFEST_CHECKSUM = "manifest_sha256"
LOCK = ".lock"
#: Readers hold it shared while loading; a writer deletes replaced generations holding it
#: exclusively (the save itself never takes it, so readers never wait for a save).
READERS_LOCK = ".readers.lock"
#: Test hook: the name of a save stage at which the saving process announces itself on stderr
#: and stops (so a test can SIGKILL it there). Stages: descriptors, keyframes, artifacts,
#: manifest (new manifest written, not yet renamed), committed (renamed, old files not yet removed).
PAUSE_ENV = "VPR_ROS_MAP_SAVE_PAUSE"
PAUSE_MARK = "VPR_ROS_MAP_SAVE_PAUSED"
_GENERATION_FILE = re.compile(r"^[a-z_]+\.g(\d{6,})\.(npy|sqlite|faiss)$")
_HASH_CHUNK = 8 << 20

log = logging.getLogger(__name__)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _pause_point(stage: str) -> None:
    if os.environ.get(PAUSE_ENV) == stage:
        print(f"{PAUSE_MARK} {stage}", file=sys.stderr, flush=True)
        time.sleep(3600)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _record(path: Path, digest: str) -> dict[str, Any]:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest}


class _HashingWriter:
    """A binary file that hashes what is written to it and is fsynced on close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")
        self._h = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self._h.update(data)
        return self._f.write(data)

    def close(self) -> str:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._h.hexdigest()


def write_npy(path: Path, segments: Sequence[np.ndarray], dtype: np.dtype | str,
              width: int | Sequence[int] | None = None) -> dict[str, Any]:
    """Write the row-wise concatenation of ``segments`` as one .npy file without building it in
    memory; returns the manifest record (name, bytes, sha256). ``width``: the shape of one row
    (an int, or a tuple such as a local-feature grid ``(H, W, C)`` whose segments hold the
    flattened rows)."""
    dtype = np.dtype(dtype)
    rows = sum(len(s) for s in segments)
    tail: tuple[int, ...] = () if width is None else \
        ((int(width),) if isinstance(width, (int, np.integer)) else tuple(int(w) for w in width))
    shape: tuple[int, ...] = (rows, *tail)
    out = _HashingWriter(path)
    try:
        np.lib.format.write_array_header_1_0(
            out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": shape})
        for seg in segments:
            step = max(1, (16 << 20) // max(1, seg[:1].nbytes or 1))
            for s in range(0, len(seg), step):
                block = np.ascontiguousarray(seg[s: s + step], dtype=dtype)
                out.write(memoryview(block).cast("B"))
    except BaseException:
        out.close()
        raise
    return _record(path, out.close())


def write_faiss(path: Path, index: Any) -> dict[str, Any]:
    faiss = load_faiss()

    faiss.write_index(index, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return _record(path, sha256_file(path))


_SCHEMA = """
CREATE TABLE keyframes (
    id INTEGER PRIMARY KEY,
    session TEXT NOT NULL,
    stamp_ns INTEGER NOT NULL,
    frame_id TEXT NOT NULL,
    px REAL, py REAL, pz REAL,
    qx REAL, qy REAL, qz REAL, qw REAL,
    lat REAL, lon REAL, alt REAL,
    source_bag TEXT NOT NULL,
    source_topic TEXT NOT NULL,
    camera TEXT NOT NULL DEFAULT ''
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE cameras (
    session TEXT NOT NULL,
    camera TEXT NOT NULL,
    model TEXT NOT NULL,
    PRIMARY KEY (session, camera)
);
"""
_COLUMNS_V1 = ("id, session, stamp_ns, frame_id, px, py, pz, qx, qy, qz, qw, lat, lon, alt, "
               "source_bag, source_topic")
_COLUMNS = _COLUMNS_V1 + ", camera"


def _nullable(a: np.ndarray) -> list[list[float | None]]:
    out = a.astype(object)
    out[np.isnan(a)] = None
    return out.tolist()


def write_keyframes_sqlite(path: Path, table: KeyframeTable, meta: Mapping[str, str],
                           cameras: Mapping[tuple[str, str], CameraModel] | None = None
                           ) -> dict[str, Any]:
    """One row per keyframe (NULL where a pose or fix is unknown), one row per (session,
    camera) calibration (the model as JSON: readable with sqlite3 alone), plus a small key/value
    table (fingerprint, dim, format) for people who open only the database."""
    if path.exists():
        path.unlink()
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.executescript(_SCHEMA)
        n = len(table)
        step = 100_000
        text = {f: table.text_column(f) for f in KeyframeTable.TEXT_FIELDS}
        for s in range(0, n, step):
            e = min(n, s + step)
            pos = _nullable(table.positions[s:e])
            ori = _nullable(table.orientations[s:e])
            gnss = _nullable(table.gnss[s:e])
            stamps = table.stamps[s:e].tolist()
            con.executemany(
                f"INSERT INTO keyframes ({_COLUMNS}) VALUES ({', '.join('?' * 17)})",
                ((i, text["session"][i], stamps[i - s], text["frame_id"][i], *pos[i - s],
                  *ori[i - s], *gnss[i - s], text["source_bag"][i], text["source_topic"][i],
                  text["camera"][i])
                 for i in range(s, e)))
        con.execute("CREATE INDEX keyframes_session_stamp ON keyframes (session, stamp_ns)")
        con.executemany("INSERT INTO cameras (session, camera, model) VALUES (?, ?, ?)",
                        sorted((sess, cam, model.to_json())
                               for (sess, cam), model in (cameras or {}).items()))
        con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", sorted(meta.items()))
        con.commit()
    finally:
        con.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return _record(path, sha256_file(path))


def read_keyframes_sqlite(path: Path, count: int) -> KeyframeTable:
    """The keyframe table of a map file; MapError naming the file when it is not a readable
    keyframe database or does not hold exactly ids 0..count-1."""
    return read_map_database(path, count)[0]


def read_map_database(path: Path, count: int
                      ) -> tuple[KeyframeTable, dict[tuple[str, str], CameraModel]]:
    """The keyframe table and the camera calibrations of a map's database (a version-1 map
    has neither a camera column nor a cameras table: every keyframe's camera is then "" and
    there are no calibrations); MapError naming the file on anything malformed."""
    uri = f"file:{path}?mode=ro&immutable=1"
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            names = {r[1] for r in con.execute("PRAGMA table_info(keyframes)")}
            columns = _COLUMNS if "camera" in names else _COLUMNS_V1
            rows = con.execute(f"SELECT {columns} FROM keyframes ORDER BY id").fetchall()
            tables = {r[0] for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            camera_rows = con.execute("SELECT session, camera, model FROM cameras").fetchall() \
                if "cameras" in tables else []
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise MapError(f"{path}: not a readable keyframe database ({exc}); the file is corrupt: "
                       "restore it from a backup or rebuild the map") from exc
    cameras: dict[tuple[str, str], CameraModel] = {}
    for session, name, text in camera_rows:
        try:
            model = CameraModel.from_dict(json.loads(text))
        except (ValueError, TypeError, RecursionError, VPRError) as exc:
            raise MapError(f"{path}: the calibration of camera {name!r} in session {session!r} "
                           f"is invalid ({exc}); the database was edited or is corrupt: rebuild "
                           "the map") from exc
        if model.name != name:
            raise MapError(f"{path}: camera row {name!r} holds the calibration of "
                           f"{model.name!r}; the database is corrupt: rebuild the map")
        cameras[(str(session), str(name))] = model
    return _table_from_rows(path, rows, count), cameras


def _table_from_rows(path: Path, rows: list[Any], count: int) -> KeyframeTable:
    if len(rows) != count:
        raise MapError(f"{path}: holds {len(rows)} keyframes, the manifest says {count}; the "
                       "database and the manifest disagree: rebuild the map")
    if not rows:
        return KeyframeTable()
    cols = list(zip(*rows))
    ids = np.asarray(cols[0], dtype=np.int64)
    if not np.array_equal(ids, np.arange(count)):
        raise MapError(f"{path}: keyframe ids are not 0..{count - 1}; the database was edited or "
                       "is corrupt: rebuild the map")

    def floats(idx: range) -> np.ndarray:
        return np.array([[np.nan if v is None else v for v in col] for col in
                         (cols[i] for i in idx)], dtype=np.float64).T

    try:
        return KeyframeTable.from_columns({
            "session": list(cols[1]), "stamp_ns": np.asarray(cols[2], np.int64),
            "frame_id": list(cols[3]), "position": floats(range(4, 7)),
            "orientation": floats(range(7, 11)), "gnss": floats(range(11, 14)),
            "source_bag": list(cols[14]), "source_topic": list(cols[15]),
            "camera": list(cols[16]) if len(cols) > 16 else [""] * count})
    except (TypeError, ValueError) as exc:
        raise MapError(f"{path}: keyframe rows have values of the wrong type ({exc}); the "
                       "database was edited or is corrupt: rebuild the map") from exc


def load_npy(path: Path, dtype: np.dtype | type | str, shape: tuple[int, ...],
             mmap: bool = True) -> np.ndarray:
    """np.load with the checks a map needs: MapError naming the file unless it holds exactly
    ``shape`` of ``dtype``."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise MapError(f"{path}: not a readable .npy array ({exc}); the file is truncated or "
                       "corrupt: restore it or rebuild the map") from exc
    if arr.dtype != np.dtype(dtype) or arr.shape != tuple(shape):
        raise MapError(f"{path}: holds {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} "
                       f"{tuple(shape)}; the file does not belong to this map: rebuild the map")
    return arr


@contextmanager
def _flocked(fd: int, operation: int) -> Iterator[None]:
    """Hold ``flock(fd, operation)`` for the block; the descriptor is closed after."""
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextmanager
def map_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock so two processes never save the same map at once."""
    with _flocked(_open_lock(directory / LOCK), fcntl.LOCK_EX):
        yield


@contextmanager
def readers_lock(directory: Path) -> Iterator[None]:
    """Shared lock held while a map is loaded, so that no writer deletes the generation being
    read. Where the lock file can be neither created nor opened (read-only storage with no
    lock file: nobody saves there), the load goes on without it and relies on retrying."""
    fd: Optional[int] = None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            fd = os.open(directory / READERS_LOCK, flags, 0o644)
            break
        except OSError:
            continue
    if fd is None:
        yield
        return
    with _flocked(fd, fcntl.LOCK_SH):
        yield


@contextmanager
def gc_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock while files of replaced generations are deleted: waits for loads in
    progress (a few milliseconds to seconds), never for another save."""
    with _flocked(_open_lock(directory / READERS_LOCK), fcntl.LOCK_EX):
        yield


def check_output_dir(directory: Path) -> None:
    """MapError unless a map can be written to ``directory`` (see :mod:`vpr_ros.paths`)."""
    paths.check_output_dir(directory, "a map", MapError)


def _next_generation(directory: Path) -> int:
    gen = 0
    for p in directory.iterdir():
        m = _GENERATION_FILE.match(p.name)
        if m:
            gen = max(gen, int(m.group(1)))
    try:
        gen = max(gen, int(read_json(directory / MANIFEST, MapError).get("generation", 0)))
    except (MapError, ValueError, AttributeError, TypeError):
        pass
    return gen + 1


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of a manifest's content without its own checksum: canonical JSON (sorted keys,
    no whitespace), so the way the file is indented does not matter, every value does."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest with its checksum (what :class:`MapWriter` writes)."""
    return {**manifest, MANIFEST_CHECKSUM: manifest_digest(manifest)}


def file_name(role: str, generation: int, suffix: str) -> str:
    return f"{role}.g{generation:06d}.{suffix}"


class MapWriter:
    """Writes one new generation of a map directory and commits it atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.generation = _next_generation(directory)
        self.files: dict[str, dict[str, Any]] = {}

    def path(self, role: str, suffix: str) -> Path:
        return self.directory / file_name(role, self.generation, suffix)

    def add_npy(self, role: str, segments: Sequence[np.ndarray], dtype: Any,
                width: int | Sequence[int] | None) -> None:
        self.files[role] = write_npy(self.path(role, "npy"), segments, dtype, width)

    def add_faiss(self, role: str, index: Any) -> None:
        self.files[role] = write_faiss(self.path(role, "faiss"), index)

    def add_keyframes(self, table: KeyframeTable, meta: Mapping[str, str],
                      cameras: Mapping[tuple[str, str], CameraModel] | None = None) -> None:
        self.files["keyframes"] = write_keyframes_sqlite(self.path("keyframes", "sqlite"),
                                                          table, meta, cameras)

    def stage(self, name: str) -> None:
        _pause_point(name)

    def commit(self, manifest: dict[str, Any]) -> None:
        manifest = seal_manifest({**manifest, "generation": self.generation,
                                  "files": self.files})
        tmp = self.directory / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _pause_point("manifest")
        os.replace(tmp, self.directory / MANIFEST)
        fsync_dir(self.directory)
        _pause_point("committed")
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        keep = {rec["name"] for rec in self.files.values()}
        with gc_lock(self.directory):
            for p in self.directory.iterdir():
                if _GENERATION_FILE.match(p.name) and p.name not in keep:
                    p.unlink(missing_ok=True)
                elif p.name.startswith(MANIFEST + ".tmp"):
                    p.unlink(missing_ok=True)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The validated manifest of a map directory (format, version and field types)."""
    if not directory.exists():
        raise MapError(f"no map at {directory}: the path does not exist (build one with "
                       "`vpr map build`, or check the path)")
    if not directory.is_dir():
        raise MapError(f"{directory} is a file, expected a map directory holding {MANIFEST}")
    path = directory / MANIFEST
    if not path.exists():
        raise MapError(f"{directory} is not a map: {MANIFEST} is missing (a save that never "
                       "completed leaves no manifest; build the map again)")
    manifest = read_json(path, MapError, "the manifest is corrupt: restore it or rebuild the "
                         "map")
    _check_digest(path, manifest)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MapError(f"{path}: not a vpr_ros map manifest (format "
                       f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                       f"expected {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise MapError(f"{path}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise MapError(f"{path}: map format version {version} was written by a newer vpr_ros; "
                       f"this one reads versions up to {FORMAT_VERSION}: upgrade vpr_ros")
    if version < 1:
        raise MapError(f"{path}: map format version {version} is not a released format "
                       f"(1..{FORMAT_VERSION}); rebuild the map")
    expect = {"fingerprint": str, "dim": int, "count": int, "storage_dtype": str,
              "index": dict, "files": dict, "generation": int}
    for key, typ in expect.items():
        value = manifest.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise MapError(f"{path}: field {key!r} is {value!r}, expected a {typ.__name__}; the "
                           "manifest is corrupt: rebuild the map")
    if manifest["dim"] < 1 or manifest["count"] < 0:
        raise MapError(f"{path}: dim {manifest['dim']} / count {manifest['count']} are invalid")
    return manifest


_unsealed_warned: set[str] = set()


def _check_digest(path: Path, manifest: Any) -> None:
    if not isinstance(manifest, dict):
        return
    if MANIFEST_CHECKSUM not in manifest:
        if str(path) not in _unsealed_warned:
            _unsealed_warned.add(str(path))
            log.warning("%s has no %s: edits to it cannot be detected; save the map again "
                        "(e.g. `vpr map merge MAP MAP2 -o NEW`, or load and save it) to add one",
                        path, MANIFEST_CHECKSUM)
        return
    digest = manifest[MANIFEST_CHECKSUM]
    try:
        actual = manifest_digest(manifest)
    except (TypeError, ValueError):  # NaN/Inf or non-JSON values cannot have been sealed
        actual = None
    if digest != actual:
        raise MapError(f"{path}: content does not match its {MANIFEST_CHECKSUM}; the manifest "
                       "was edited or is corrupt (an edited search parameter would silently "
                       "change results): restore it from a backup or rebuild the map")


def generation_changed(directory: Path, generation: Any) -> bool:
    """Whether ``map.json`` now names another generation than ``generation`` (a writer
    committed since it was read)."""
    try:
        newer = read_json(directory / MANIFEST, MapError)
    except MapError:
        return False
    return isinstance(newer, dict) and newer.get("generation") != generation


class ManifestFiles(dict):
    """role -> path of the files a manifest lists; asking for a role it does not list is a
    MapError naming the manifest (an index kind edited into a manifest, or a file entry
    removed from it, must not surface as a KeyError)."""

    def __init__(self, manifest_path: Path, entries: Mapping[str, Path], kind: str = "") -> None:
        super().__init__(entries)
        self.manifest_path = manifest_path
        self.kind = kind

    def __missing__(self, role: str) -> Path:
        needs = f"the {self.kind!r} index needs" if self.kind else "the map needs"
        raise MapError(f"{self.manifest_path}: {needs} a {role!r} file, which the manifest does "
                       "not list; the manifest was edited or the map is incomplete: restore it "
                       "or rebuild the map")

    def subset(self, roles: Sequence[str] | None = None, *, without: Sequence[str] = (),
               kind: str = "") -> "ManifestFiles":
        keep = {r: p for r, p in self.items()
                if (roles is None or r in roles) and r not in without}
        return ManifestFiles(self.manifest_path, keep, kind or self.kind)


def check_files(directory: Path, manifest: Mapping[str, Any],
                checksums: bool) -> ManifestFiles:
    """Paths of the manifest's files after checking that each exists with the recorded size
    (and sha256 when ``checksums``); MapError naming the first file that does not."""
    out = ManifestFiles(directory / MANIFEST, {})
    for role, rec in manifest["files"].items():
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str) \
                or "/" in rec["name"] or not isinstance(rec.get("bytes"), int):
            raise MapError(f"{directory / MANIFEST}: file entry {role!r} is malformed ({rec!r})")
        path = directory / rec["name"]
        if not path.exists():
            raise FileNotFoundError(path)
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise MapError(f"{path}: is {size} bytes, the manifest says {rec['bytes']}; the file "
                           "is truncated or was replaced: restore it or rebuild the map")
        if checksums and sha256_file(path) != rec.get("sha256"):
            raise MapError(f"{path}: sha256 differs from the manifest; the file is corrupt: "
                           "restore it or rebuild the map")
        out[role] = path
    return out
