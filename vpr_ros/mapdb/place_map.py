"""The place map: keyframes, their descriptors and a search index, as one object.

Why one object: the node, the map builder, the merger and the benchmarks all need the same three
things kept in step (row i of the descriptors, keyframe id i and index entry i are the same
place), the same refusal to mix descriptors of different models (the fingerprint), and the same
crash-safe persistence. Keeping them behind ``add`` / ``search`` / ``save`` / ``load`` /
``merge`` means no caller can update one without the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from vpr_ros import __version__
from vpr_ros.errors import ConfigError, InputError, MapError, MapMismatchError
from vpr_ros.mapdb import storage
from vpr_ros.mapdb.camera import CameraModel
from vpr_ros.mapdb.index import make_index, parse_spec
from vpr_ros.mapdb.index.base import PAD_SCORE, VectorIndex, exact_search, sort_results
from vpr_ros.mapdb.index.binary import BinaryIndex
from vpr_ros.mapdb.index.gpu import GPU_KINDS, FaissGpu, GpuBackend, GpuMirror, gpu_support
from vpr_ros.mapdb.index.vectors import STORAGE_DTYPES, DescriptorStore
from vpr_ros.mapdb.keyframe import Exclusion, Keyframe, KeyframeTable
from vpr_ros.mapdb.keypoint_store import ROLES as KEYPOINT_ROLES, KeypointStore
from vpr_ros.mapdb.local_store import LOCAL_DTYPE, ROLE as LOCAL_ROLE, LocalFeatureStore
from vpr_ros.runtime.local_features import LocalFeatures
from vpr_ros.mapdb.model_outputs import ModelOutputs

#: How far a descriptor's L2 norm may be from 1 (descriptors must be L2-normalised so that the
#: inner product is the cosine similarity every threshold in this project assumes).
NORM_TOLERANCE = 1e-2
#: Loads started over when a writer commits a new generation during one (each restart means a
#: complete save happened meanwhile, so this bounds a reader racing a writer saving in a loop).
_LOAD_ATTEMPTS = 8
_MERGE_BLOCK = 65536


def _mismatch_advice() -> str:
    return ("use the model the map was built with, or rebuild the map with this model "
            "(`vpr map build ... --model MODEL`)")


class PlaceMap:
    """Keyframes + descriptors + index; ids are 0..N-1 in insertion order."""

    def __init__(self, dim: int, fingerprint: str, index: str | Mapping[str, Any] = "flat",
                 storage_dtype: str = "float32",
                 local_grid: Sequence[int] | None = None,
                 keypoints: str | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ConfigError(f"descriptor dim {dim!r} must be a positive integer")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ConfigError(f"model fingerprint {fingerprint!r} must be a non-empty string "
                              "(Encoder.fingerprint)")
        if storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(f"storage_dtype {storage_dtype!r} must be one of {STORAGE_DTYPES}")
        self._dim = int(dim)
        self._fingerprint = fingerprint
        self._store = DescriptorStore(self._dim, storage_dtype)
        self._table = KeyframeTable()
        self._index: VectorIndex = make_index(index, self._store)
        self._local: LocalFeatureStore | None = \
            LocalFeatureStore(local_grid) if local_grid is not None else None
        self._cameras: dict[tuple[str, str], CameraModel] = {}
        self._keypoints: KeypointStore | None = \
            KeypointStore(keypoints) if keypoints not in (None, "none") else None
        self.created = storage.now_iso()
        self.updated = self.created
        self.path: Path | None = None
        self._gpu_note = "cpu"

    @classmethod
    def create(cls, dim: int, fingerprint: str, index: str | Mapping[str, Any] = "flat",
               storage_dtype: str = "float32",
               local_grid: Sequence[int] | None = None,
               keypoints: str | None = None) -> "PlaceMap":
        """An empty map for descriptors of ``dim`` from the model ``fingerprint``.

        ``index``: "flat" (exact), "hnsw", "ivfpq" or "binary", or a dict such as
        ``{"kind": "binary", "bits": 512, "rerank": 100}``. ``local_grid`` (e.g. ``(25, 25,
        128)``): keep each keyframe's local features (float16) for mutual-NN re-ranking.
        ``keypoints`` ("sift", "orb", "akaze"; None or "none": no store): keep each keyframe's
        keypoints (and 3-D points where known) for geometric verification.
        """
        return cls(dim, fingerprint, index, storage_dtype, local_grid, keypoints)

    # -- properties ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._table)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def index_kind(self) -> str:
        return self._index.kind

    @property
    def storage_dtype(self) -> str:
        return self._store.dtype.name

    @property
    def model_codes(self) -> bool:
        """True when the index searches the model's hash-head codes (``add`` needs
        ``binary_codes`` and ``search`` needs ``query_codes``)."""
        return isinstance(self._index, BinaryIndex) and self._index.params["codes"] == "model"

    def binary_codes(self) -> np.ndarray | None:
        """(N, bits/8) uint8 packed codes of a binary index (the model's own where
        :attr:`model_codes`), None for other index kinds."""
        return self._index.codes.view() if isinstance(self._index, BinaryIndex) else None

    @property
    def local_grid(self) -> tuple[int, ...] | None:
        """Per-keyframe local feature grid, or None when the map stores no local features."""
        return self._local.grid if self._local is not None else None

    def local_features(self, ids: np.ndarray) -> np.ndarray:
        """float32 ``(len(ids), *local_grid)`` local features of keyframes ``ids``."""
        if self._local is None:
            raise InputError("this map stores no local features (built from a model without a "
                             "local head, or with --no-local-features)")
        return self._local.get(ids)

    def check_outputs(self, outputs: ModelOutputs, need_local: bool = False) -> None:
        """Refuse a model whose extra outputs cannot serve this map: a map searched with the
        hash head's codes needs a model giving codes of the same length, and stored local
        features need the same grid (``need_local``: also refuse a model without a local
        head, as live mapping must keep the store in step)."""
        where = f" at {self.path}" if self.path else ""
        if self.model_codes:
            bits = self._index.params["bits"]
            if outputs.code_bytes is None:
                raise MapMismatchError(
                    f"the map{where} is searched with {bits}-bit codes from the model's hash "
                    "head, but this model (or export) has no 'binary' output; use the model "
                    "directory or an export that keeps the hash head, or rebuild the map with "
                    "--index flat")
            if 8 * outputs.code_bytes != bits:
                raise MapMismatchError(
                    f"the map{where} holds {bits}-bit hash codes but the model gives "
                    f"{8 * outputs.code_bytes}-bit codes: " + _mismatch_advice())
        if self._local is not None:
            if outputs.local_grid is None:
                if need_local:
                    raise MapMismatchError(
                        f"the map{where} stores local features {self._local.grid} per keyframe "
                        "but this model (or export) has no 'local' output, so new keyframes "
                        "could not get theirs; use the model directory or an export with the "
                        "local head")
            elif tuple(outputs.local_grid) != self._local.grid:
                raise MapMismatchError(
                    f"the map{where} stores local features of grid {self._local.grid} but the "
                    f"model gives {tuple(outputs.local_grid)}: " + _mismatch_advice())

    # -- keypoints --------------------------------------------------------------------------------

    @property
    def keypoint_kind(self) -> str | None:
        """Kind of the keyframes' stored keypoints (sift, orb, akaze), None when none."""
        return self._keypoints.kind if self._keypoints is not None else None

    @property
    def has_keypoint_points(self) -> bool:
        """Whether any keyframe's keypoints have 3-D points (PnP is possible)."""
        return self._keypoints is not None and self._keypoints.has_points

    def keypoints(self, id: int) -> LocalFeatures:
        """Keypoints (pixel positions, descriptors, 3-D points in the keyframe's camera frame
        where known) of keyframe ``id``."""
        if self._keypoints is None:
            raise InputError("this map stores no keypoints (built with --local-features none, "
                             "or before keypoints were kept); rebuild it with --local-features "
                             "sift to verify candidates geometrically")
        return self._keypoints.get(int(id))

    # -- cameras ----------------------------------------------------------------------------------

    def add_camera(self, session: str, camera: CameraModel) -> None:
        """Record the calibration of ``camera`` (its ``name``) in ``session``; keyframes of that
        session whose ``camera`` is that name are read with it. Recording the same calibration
        again is a no-op; a different one for the same (session, camera) is refused: the pixels
        already stored were taken with the first one."""
        if not isinstance(camera, CameraModel):
            raise InputError(f"camera is a {type(camera).__name__}, expected a CameraModel")
        if not isinstance(session, str) or not session:
            raise InputError(f"camera session {session!r} must be a non-empty session name")
        key = (session, camera.name)
        old = self._cameras.get(key)
        if old is not None and old != camera:
            raise MapMismatchError(
                f"camera {camera.name!r} of session {session!r} is already calibrated "
                f"differently in this map ({old.width}x{old.height}, K {list(old.k)}, "
                f"{old.distortion_model}) than now ({camera.width}x{camera.height}, K "
                f"{list(camera.k)}, {camera.distortion_model}); a recalibrated camera is a new "
                "session: use another --session")
        self._cameras[key] = camera

    def camera(self, session: str, name: str) -> CameraModel | None:
        """The calibration of camera ``name`` in ``session``, None when the map has none."""
        return self._cameras.get((session, name))

    def camera_of(self, id: int) -> CameraModel | None:
        """The calibration of the camera that took keyframe ``id`` (None: uncalibrated)."""
        kf = self._table.get(id)
        return self._cameras.get((kf.session, kf.camera))

    def cameras(self) -> dict[tuple[str, str], CameraModel]:
        """Every calibration: (session, camera name) -> model."""
        return dict(self._cameras)

    @property
    def keyframe_table(self) -> KeyframeTable:
        """Columnar keyframe metadata (stamps, positions, ... as numpy arrays), read-only use."""
        return self._table

    def sessions(self) -> list[str]:
        return self._table.sessions()

    def keyframe(self, id: int) -> Keyframe:
        return self._table.get(id)

    def keyframes(self, ids: Iterable[int]) -> list[Keyframe]:
        return [self._table.get(int(i)) for i in np.asarray(list(ids)).reshape(-1)]

    def descriptors(self) -> np.ndarray:
        """(N, D) in the storage dtype: the memory-mapped file itself for a loaded map with
        nothing added since; otherwise an in-memory array."""
        return self._store.array()

    def check_compatible(self, fingerprint: str, dim: int) -> None:
        """Refuse descriptors of another model (MapMismatchError naming both fingerprints)."""
        if fingerprint != self._fingerprint or int(dim) != self._dim:
            where = f" at {self.path}" if self.path else ""
            raise MapMismatchError(
                f"the map{where} was built with model fingerprint {self._fingerprint} "
                f"(dim {self._dim}), but the descriptors come from fingerprint {fingerprint} "
                f"(dim {dim}); descriptors of different models are not comparable: "
                + _mismatch_advice())

    # -- adding and searching --------------------------------------------------------------------

    def _as_rows(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self._dim:
            raise InputError(f"{what} have shape {x.shape}; expected (B, {self._dim}) for this "
                             f"map (descriptor dim {self._dim})")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"{what} have dtype {x.dtype}; expected float32 descriptors")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise InputError(f"{what} contain NaN or Inf; the encoder output is corrupt")
        return x

    def add(self, descriptors: np.ndarray, keyframes: Sequence[Keyframe],
            binary_codes: np.ndarray | None = None,
            local_features: np.ndarray | None = None,
            keypoints: Sequence[LocalFeatures] | None = None) -> np.ndarray:
        """Append L2-normalised descriptors and their keyframes; returns the new ids (int64).

        ``binary_codes``: the hash head's codes (maps searched with model codes need them);
        ``local_features``: ``(B, *local_grid)`` (maps with a local-feature store need them);
        ``keypoints``: one :class:`LocalFeatures` per keyframe (maps with a keypoint store need
        them)."""
        x = self._as_rows(descriptors, "descriptors")
        if len(keyframes) != len(x):
            raise InputError(f"{len(x)} descriptors but {len(keyframes)} keyframes; give one "
                             "keyframe per descriptor")
        norms = np.linalg.norm(x, axis=1)
        bad = np.abs(norms - 1.0) > NORM_TOLERANCE
        if bad.any():
            raise InputError(f"{int(bad.sum())} of {len(x)} descriptors are not L2-normalised "
                             f"(norms {norms[bad][:3].round(4).tolist()}...); normalise them "
                             "(Encoder outputs already are) so inner product = cosine")
        if binary_codes is not None and not isinstance(self._index, BinaryIndex):
            raise InputError(f"binary_codes were given but this map's index is "
                             f"{self.index_kind!r}; codes are used only by index 'binary'")
        if isinstance(self._index, BinaryIndex):
            self._index.check_codes_for_add(len(x), binary_codes)
        local_rows = None
        if self._local is not None:
            if local_features is None:
                raise InputError("this map stores local features for re-ranking; pass "
                                 "local_features (the model's 'local' output) with every add")
            local_rows = self._local.as_rows(local_features, len(x))
        elif local_features is not None:
            raise InputError("local_features were given but this map has no local-feature "
                             "store (create it with local_grid=...)")
        kp_rows = None
        if self._keypoints is not None:
            kp_rows = self._keypoints.check(keypoints, len(x))  # type: ignore[arg-type]
        elif keypoints is not None:
            raise InputError("keypoints were given but this map has no keypoint store "
                             "(create it with keypoints='sift', ...)")
        stored = x.astype(self._store.dtype, copy=False)
        start = len(self._store)
        ids = self._table.append(keyframes)
        self._store.append(stored)
        self._index.add(start, stored.astype(np.float32, copy=False), binary_codes)
        if local_rows is not None:
            assert self._local is not None
            self._local.append(local_rows)
        if kp_rows is not None:
            assert self._keypoints is not None
            self._keypoints.append(kp_rows)
        self.updated = storage.now_iso()
        return ids

    def search(self, queries: np.ndarray, k: int, exclude: Exclusion | None = None,
               query_codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` keyframes per query: ids (B, k) int64 padded with -1, scores (B, k)
        float32 (exact inner product = cosine; -inf on padding), best first. Excluded keyframes
        are never returned. ``query_codes`` (hash-head codes) are used by a binary index whose
        codes came from the model and ignored by other kinds."""
        q = self._as_rows(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k={k!r} must be a positive integer")
        k = int(k)
        b = len(q)
        if exclude is not None and not isinstance(exclude, Exclusion):
            raise InputError(f"exclude is a {type(exclude).__name__}, expected an Exclusion")
        n = len(self)
        if n == 0 or b == 0:
            return np.full((b, k), -1, np.int64), np.full((b, k), PAD_SCORE, np.float32)
        excluded = self._table.excluded_mask(exclude)
        allowed = None if excluded is None else ~excluded
        if allowed is not None and not allowed.any():
            return np.full((b, k), -1, np.int64), np.full((b, k), PAD_SCORE, np.float32)
        if not isinstance(self._index, BinaryIndex):
            query_codes = None
        ids, scores = self._index.search(q, k, allowed, query_codes)
        if excluded is not None:
            # Defence in depth: whatever an index returns, excluded ids never leave this method.
            leaked = (ids >= 0) & excluded[np.clip(ids, 0, n - 1)]
            if leaked.any():
                scores = np.where(leaked, PAD_SCORE, scores)
                ids, scores = sort_results(scores, np.where(leaked, -1, ids), k)
        return ids, scores

    def search_exact(self, queries: np.ndarray, k: int,
                     exclude: Exclusion | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force search over the stored descriptors, whatever the index kind: the reference
        that approximate kinds are measured against (same result layout as :meth:`search`)."""
        q = self._as_rows(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k={k!r} must be a positive integer")
        excluded = self._table.excluded_mask(exclude)
        if len(self) == 0 or (excluded is not None and excluded.all()):
            return (np.full((len(q), int(k)), -1, np.int64),
                    np.full((len(q), int(k)), PAD_SCORE, np.float32))
        return exact_search(self._store, q, int(k), None if excluded is None else ~excluded)

    # -- GPU search ------------------------------------------------------------------------------

    def use_gpu(self, min_keyframes: int, device: int = 0,
                backend: GpuBackend | None = None) -> str:
        """Search a flat or binary index on a GPU once the map holds ``min_keyframes`` (0: never),
        where a GPU build of faiss sees one; returns :attr:`search_device`.

        Results stay those of the CPU search (see :mod:`vpr_ros.mapdb.index.gpu`); any GPU error
        (GPU memory short when the map is copied, a failed search) releases the GPU copy and the
        map is searched on the CPU from then on, with the reason in :attr:`search_device`.
        ``backend`` replaces faiss's GPU indexes (tests)."""
        if isinstance(min_keyframes, bool) or not isinstance(min_keyframes, (int, np.integer)) \
                or min_keyframes < 0:
            raise ConfigError(f"GPU threshold {min_keyframes!r} must be an integer >= 0 "
                              "(0: never search on the GPU)")
        if self._index.gpu is not None:
            self._index.gpu.release()
            self._index.gpu = None
        if min_keyframes == 0:
            self._gpu_note = "cpu (GPU search off)"
        elif self.index_kind not in GPU_KINDS:
            self._gpu_note = (f"cpu (index {self.index_kind} is searched on the CPU; GPU search "
                              f"covers {' and '.join(GPU_KINDS)})")
        else:
            if backend is None:
                count, why = gpu_support()
                if count == 0:
                    self._gpu_note = f"cpu ({why})"
                    return self.search_device
                if not 0 <= int(device) < count:
                    raise ConfigError(f"GPU device {device} for the map search: faiss sees "
                                      f"{count} GPU(s), numbered 0..{count - 1}")
                backend = FaissGpu(int(device))
            width = self._dim if self.index_kind == "flat" else self._index.params["bits"]
            self._index.gpu = GpuMirror(self.index_kind, width, int(min_keyframes), backend)
        return self.search_device

    @property
    def search_device(self) -> str:
        """Where searches run and why, in one line (``/diagnostics`` shows it)."""
        mirror = self._index.gpu
        return mirror.note(len(self)) if mirror is not None else self._gpu_note

    # -- persistence -----------------------------------------------------------------------------

    def _manifest(self) -> dict[str, Any]:
        stamps = self._table.stamps
        return {
            "format": storage.FORMAT, "format_version": storage.FORMAT_VERSION,
            "fingerprint": self._fingerprint, "dim": self._dim, "count": len(self),
            "storage_dtype": self.storage_dtype, "index": self._index.manifest_params(),
            "local_features": None if self._local is None else
            {"grid": list(self._local.grid), "dtype": LOCAL_DTYPE},
            "keypoints": None if self._keypoints is None else self._keypoints.manifest_entry(),
            "sessions": self._table.session_counts(),
            "stamp_range_ns": [int(stamps.min()), int(stamps.max())] if len(stamps) else None,
            "has_poses": self._table.has_poses(), "has_gnss": self._table.has_gnss(),
            "created": self.created, "updated": self.updated,
            "software": {"vpr_ros": __version__},
        }

    def save(self, path: str | Path) -> None:
        """Write the map to directory ``path`` atomically (see :mod:`vpr_ros.mapdb.storage`):
        a crash at any point leaves the previous map at ``path`` loadable and intact."""
        directory = Path(path)
        storage.check_output_dir(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MapError(f"cannot save a map to {directory}: {exc.strerror or exc}") from exc
        with storage.map_lock(directory):
            writer = storage.MapWriter(directory)
            writer.add_npy("descriptors", [seg for _, seg in self._store.segments()],
                           self._store.dtype, self._dim)
            if self._local is not None:
                writer.add_npy(LOCAL_ROLE, self._local.segments(), LOCAL_DTYPE, self._local.grid)
            if self._keypoints is not None:
                for role, (segments, dtype, width) in self._keypoints.segments().items():
                    writer.add_npy(role, segments, dtype, width)
            writer.stage("descriptors")
            writer.add_keyframes(self._table, {
                "fingerprint": self._fingerprint, "dim": str(self._dim),
                "format": storage.FORMAT, "format_version": str(storage.FORMAT_VERSION)},
                self._cameras)
            writer.stage("keyframes")
            for role, artifact in self._index.artifacts().items():
                if isinstance(artifact, np.ndarray):
                    writer.add_npy(role, [artifact], artifact.dtype,
                                   artifact.shape[1] if artifact.ndim == 2 else None)
                else:
                    writer.add_faiss(role, artifact)
            writer.stage("artifacts")
            writer.commit(self._manifest())
        self.path = directory

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None, mmap: bool = True,
             verify: bool = True) -> "PlaceMap":
        """Open a saved map. Checks format version, fingerprint (when ``expected_fingerprint`` is
        given), dim, counts, file sizes and (``verify``) sha256 of every file. ``mmap`` maps the
        descriptors instead of reading them into memory."""
        directory = Path(path)
        for attempt in range(_LOAD_ATTEMPTS):
            with storage.readers_lock(directory):
                manifest = storage.read_manifest(directory)
                try:
                    return cls._load(directory, manifest, expected_fingerprint, mmap, verify)
                except (FileNotFoundError, MapError) as exc:
                    # Whatever failed, if a writer committed a new generation meanwhile it may
                    # have removed the files this manifest named (only where the readers' lock
                    # could not be taken): a missing file, an unreadable index or database are
                    # then no damage. Read the new one.
                    if attempt + 1 < _LOAD_ATTEMPTS and \
                            storage.generation_changed(directory, manifest["generation"]):
                        continue
                    if isinstance(exc, MapError):
                        raise
                    raise MapError(f"{exc.filename or exc}: missing; the map at {directory} is "
                                   "incomplete (a file was deleted): restore it or rebuild the "
                                   "map") from exc
        raise AssertionError("unreachable")

    @classmethod
    def _load(cls, directory: Path, manifest: Mapping[str, Any],
              expected_fingerprint: str | None, mmap: bool, verify: bool) -> "PlaceMap":
        mpath = directory / storage.MANIFEST
        if expected_fingerprint is not None and manifest["fingerprint"] != expected_fingerprint:
            raise MapMismatchError(
                f"the map at {directory} was built with model fingerprint "
                f"{manifest['fingerprint']}, but fingerprint {expected_fingerprint} was expected; "
                + _mismatch_advice())
        dim, count, dtype = manifest["dim"], manifest["count"], manifest["storage_dtype"]
        if dtype not in STORAGE_DTYPES:
            raise MapError(f"{mpath}: storage_dtype {dtype!r} is not one of {STORAGE_DTYPES}")
        for role in ("descriptors", "keyframes"):
            if role not in manifest["files"]:
                raise MapError(f"{mpath}: lists no {role} file; the manifest is corrupt: "
                               "rebuild the map")
        files = storage.check_files(directory, manifest, checksums=verify)
        try:
            kind, params = parse_spec(manifest["index"], dim)
        except ConfigError as exc:
            raise MapError(f"{mpath}: index entry is invalid ({exc})") from exc
        base = storage.load_npy(files["descriptors"], dtype, (count, dim), mmap=mmap)
        table, cameras = storage.read_map_database(files["keyframes"], count)
        pm = cls(dim, manifest["fingerprint"], {"kind": kind, **params}, dtype)
        pm._store = DescriptorStore(dim, dtype, base)
        pm._table = table
        pm._cameras = cameras
        pm._index = make_index({"kind": kind, **params}, pm._store)
        pm._index.restore(files.subset(without=("descriptors", "keyframes", LOCAL_ROLE,
                                                *KEYPOINT_ROLES), kind=kind))
        pm._local = cls._load_local(mpath, manifest, files, count, mmap)
        entry = manifest.get("keypoints")
        if entry is None:
            if any(r in files for r in KEYPOINT_ROLES):
                raise MapError(f"{mpath}: lists keypoint files but no keypoints entry; the "
                               "manifest is corrupt: rebuild the map")
            pm._keypoints = None
        else:
            pm._keypoints = KeypointStore.load(mpath, entry, files, count, mmap)
        pm.created = str(manifest.get("created", pm.created))
        pm.updated = str(manifest.get("updated", pm.updated))
        pm.path = directory
        return pm

    @staticmethod
    def _load_local(mpath: Path, manifest: Mapping[str, Any], files: Mapping[str, Path],
                    count: int, mmap: bool) -> LocalFeatureStore | None:
        entry = manifest.get("local_features")
        if entry is None:
            if LOCAL_ROLE in files:
                raise MapError(f"{mpath}: lists a {LOCAL_ROLE} file but no local_features "
                               "entry; the manifest is corrupt: rebuild the map")
            return None
        grid = entry.get("grid") if isinstance(entry, dict) else None
        if not (isinstance(grid, list) and len(grid) in (2, 3)
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)
                and entry.get("dtype") == LOCAL_DTYPE):
            raise MapError(f"{mpath}: local_features entry {entry!r} is invalid (expected a "
                           f"grid of 2 or 3 positive integers and dtype {LOCAL_DTYPE}); the "
                           "manifest is corrupt: rebuild the map")
        if LOCAL_ROLE not in files:
            raise MapError(f"{mpath}: the map has local features but lists no {LOCAL_ROLE} "
                           "file; the manifest is corrupt: rebuild the map")
        base = storage.load_npy(files[LOCAL_ROLE], LOCAL_DTYPE, (count, *grid), mmap=mmap)
        return LocalFeatureStore(grid, base)

    # -- merging and reporting -------------------------------------------------------------------

    def merge(self, other: "PlaceMap") -> np.ndarray:
        """Append every keyframe of ``other`` (ids renumbered after ours, metadata kept);
        returns the ids the other map's keyframes got here."""
        if other is self:
            raise InputError("cannot merge a map into itself")
        if other.fingerprint != self._fingerprint or other.dim != self._dim:
            raise MapMismatchError(
                f"cannot merge: this map has model fingerprint {self._fingerprint} (dim "
                f"{self._dim}), the other{f' ({other.path})' if other.path else ''} has "
                f"{other.fingerprint} (dim {other.dim}); maps of different models cannot be "
                "mixed: rebuild one of them with the other's model")
        codes = None
        if isinstance(self._index, BinaryIndex) and self._index.params["codes"] == "model":
            if not (isinstance(other._index, BinaryIndex)
                    and other._index.params["codes"] == "model"
                    and other._index.bits == self._index.bits):
                raise MapMismatchError("cannot merge: this map's binary codes come from the "
                                       "model's hash head and the other map has no such codes")
            codes = other._index.codes.view()
        if isinstance(self._index, BinaryIndex):
            self._index.check_codes_for_add(len(other), codes)
        if self.keypoint_kind != other.keypoint_kind:
            raise MapMismatchError(
                f"cannot merge: this map stores {self.keypoint_kind or 'no'} keypoints, the "
                f"other{f' ({other.path})' if other.path else ''} "
                f"{other.keypoint_kind or 'none'}; rebuild one with the other's "
                "--local-features so both keep the same kind")
        if self.local_grid != other.local_grid:
            raise MapMismatchError(
                f"cannot merge: this map stores local features {self.local_grid or 'none'}, the "
                f"other{f' ({other.path})' if other.path else ''} "
                f"{other.local_grid or 'none'}; rebuild one so both keep the same local "
                "features (or neither: --no-local-features)")
        for key, camera in other._cameras.items():
            mine = self._cameras.get(key)
            if mine is not None and mine != camera:
                raise MapMismatchError(
                    f"cannot merge: camera {key[1]!r} of session {key[0]!r} is calibrated "
                    f"differently in the two maps (K {list(mine.k)} vs {list(camera.k)}); give "
                    "one of them another session name (vpr map build --session)")
        start = len(self)
        ids = self._table.extend_from(other._table)
        for first, block in other._store.chunks(_MERGE_BLOCK):
            stored = np.asarray(block).astype(self._store.dtype, copy=False)
            self._store.append(stored)
            self._index.add(start + first, stored.astype(np.float32, copy=False),
                            None if codes is None else codes[first: first + len(block)])
        for (session, _), camera in other._cameras.items():
            self.add_camera(session, camera)  # same calibration again: no-op; another: refused
        if self._local is not None and other._local is not None:
            self._local.extend_from(other._local)
        if self._keypoints is not None and other._keypoints is not None:
            self._keypoints.extend_from(other._keypoints)
        self.updated = storage.now_iso()
        return ids

    def info(self) -> dict[str, Any]:
        """Counts, sessions, dim, dtype, index, fingerprint, bytes, dates, stamp range, poses."""
        stamps = self._table.stamps
        out: dict[str, Any] = {
            "path": str(self.path) if self.path else None,
            "count": len(self), "sessions": self._table.session_counts(),
            "dim": self._dim, "storage_dtype": self.storage_dtype,
            "index": self._index.info(), "fingerprint": self._fingerprint,
            "descriptor_bytes": int(len(self) * self._dim * self._store.dtype.itemsize),
            "created": self.created, "updated": self.updated,
            "stamp_range_ns": [int(stamps.min()), int(stamps.max())] if len(stamps) else None,
            "has_poses": self._table.has_poses(), "has_gnss": self._table.has_gnss(),
            "format_version": storage.FORMAT_VERSION,
            "local_features": None if self._local is None else
            {"grid": list(self._local.grid), "dtype": LOCAL_DTYPE, "bytes": self._local.nbytes},
            "keypoints": None if self._keypoints is None else {
                **self._keypoints.manifest_entry(), "bytes": self._keypoints.nbytes,
                "per_keyframe": round(self._keypoints.rows / max(1, len(self)), 1),
                "with_points": self._points_fraction()},
            "cameras": [{"session": sess, **cam.to_dict()}
                        for (sess, _), cam in sorted(self._cameras.items())],
        }
        if self.path is not None and (self.path / storage.MANIFEST).exists():
            try:
                manifest = storage.read_manifest(self.path)
                out["disk_bytes"] = int(sum(r.get("bytes", 0)
                                            for r in manifest["files"].values()))
            except MapError:
                pass
        return out

    def _points_fraction(self) -> float:
        """Fraction of stored keypoints that have a 3-D point."""
        store = self._keypoints
        if store is None or not store.rows or not store.has_points:
            return 0.0
        segs = store.segments().get("keypoint_points")
        if segs is None:
            return 0.0
        finite = sum(int(np.isfinite(np.asarray(seg)[:, 0]).sum()) for seg in segs[0])
        return round(finite / store.rows, 3)

    def __repr__(self) -> str:
        return (f"PlaceMap(count={len(self)}, dim={self._dim}, index={self.index_kind!r}, "
                f"dtype={self.storage_dtype}, fingerprint={self._fingerprint[:12]!r})")
