"""Binary first stage + exact re-rank (the SelaVPR++ scheme): Hamming search over short sign codes
(faiss ``IndexBinaryFlat`` shards, scanned in parallel for one query: see
:mod:`vpr_ros.mapdb.index.hamming`), then exact inner products on the top ``rerank`` candidates.

Why: a 512-bit code is 64 bytes, 1/256 of a 4096-d float32 descriptor, so scanning a million codes
costs a few milliseconds, and re-ranking 100 candidates with the full descriptors restores the
exact ranking whenever the true neighbour is among them.

Where codes come from (parameter ``codes``):

- ``model``: a model with a hash head gives its own codes (``binary_codes`` in ``PlaceMap.add``,
  ``query_codes`` in ``search``). Codes may be given packed (uint8, bits/8 bytes per row,
  ``np.packbits`` order) or unpacked (bits per row; a bit is set where the value is > 0).
- ``pca`` / ``itq``: signs of a projection learned from the map's own descriptors (PCA to
  ``bits`` dimensions after centring, then a random or the ITQ rotation; see
  :mod:`vpr_ros.mapdb.index.sign_codes`), trained on the map like IVF-PQ: on a seeded sample
  of up to ``train_size`` descriptors, at the first search or save once the map holds
  ``min_train`` (see ``_ensure_trained`` for why not in ``add``); until then search is exact
  (``info()`` says so) and no codes exist. Descriptors added or merged later are coded with the
  stored projection, which is never retrained (codes and projection stay consistent).
- ``simhash`` (``projection`` in maps written before the learned codes): signs of a fixed, seeded
  Gaussian random projection D -> bits through the origin. Needs no training, but on real
  descriptors it keeps the exact top-1 among the re-ranked candidates less often (measured in
  docs/bench_search.md).
- ``auto`` (default): ``model`` when the first ``add`` brings codes, else :data:`DEFAULT_CODES`.

Three stages for projected codes (``simhash``, ``pca``, ``itq``): the Hamming scan proposes the
``shortlist`` nearest codes (default 1000, at most 1% of the map); those are re-scored
*asymmetrically* -- the query's real-valued projection against each candidate's sign bits,
``sum_i (q.w_i - t_i) * (+-1)_i``, which keeps the query's magnitudes that its own code throws
away -- and the best ``rerank`` of them get exact inner products. Why: on the 1M x 4096
real-descriptor benchmark the exact top-1 was among the 100 nearest codes for 97% of queries but
among the 100 best asymmetric scores of the 1000 nearest codes for 99.5%, for ~0.3 ms more (a
256-entry table per code byte, one gather per candidate byte); the scan itself costs the same for
100 or 1000 (faiss's counting-sort selection, see :mod:`vpr_ros.mapdb.index.hamming`).
``shortlist: 0`` (or <= ``rerank``) skips the stage, and so do maps too small for it to matter
(see :meth:`BinaryIndex.effective_shortlist`). Model codes have no query projection, so their
maps re-rank the Hamming order directly.

Projections (and thresholds) are saved with the map so that queries are coded the same way
forever; load recomputes a sample of codes from the descriptors to catch a projection or codes
file that does not belong to the map.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vpr_ros.errors import ConfigError, InputError, MapError
from vpr_ros.mapdb.index.base import (PAD_SCORE, VectorIndex, approximate_search, exact_search,
                                      faiss_threads, filtered_candidates)
from vpr_ros.mapdb.index.sign_codes import asymmetric_best
from vpr_ros.mapdb.index.gpu import BINARY_MARGIN, COPY_ROWS, GpuFailed, canonical_hamming
from vpr_ros.mapdb.index.hamming import ShardedHamming
from vpr_ros.mapdb.index.params import check_keys, int_param
from vpr_ros.mapdb.index.sign_codes import ROTATIONS, learn_sign_projection
from vpr_ros.mapdb.index.vectors import GrowableArray

log = logging.getLogger(__name__)

PARAMS = ("bits", "rerank", "shortlist", "seed", "codes", "min_train", "train_size")
CODE_SOURCES = ("auto", "simhash", "pca", "itq", "model")
#: Earlier name of "simhash", still accepted (maps written before learned codes say so).
LEGACY_NAMES = {"projection": "simhash"}
#: What ``auto`` becomes without model codes: chosen by R@1 agreement on real descriptors
#: (docs/bench_search.md).
DEFAULT_CODES = "pca"


def pack_codes(codes: np.ndarray, bits: int, what: str) -> np.ndarray:
    """(B, bits/8) uint8 from packed or unpacked codes; InputError on any other shape."""
    codes = np.asarray(codes)
    if codes.ndim == 1:
        codes = codes[None]
    if codes.ndim == 2 and codes.dtype == np.uint8 and codes.shape[1] == bits // 8:
        return np.ascontiguousarray(codes)
    if codes.ndim == 2 and codes.shape[1] == bits:
        return np.packbits(codes > 0, axis=1)
    raise InputError(f"{what} have shape {codes.shape} and dtype {codes.dtype}; expected "
                     f"(B, {bits // 8}) uint8 packed codes or (B, {bits}) values whose sign "
                     "gives each bit")


class BinaryIndex(VectorIndex):
    kind = "binary"

    def __init__(self, store, params: Mapping[str, Any]) -> None:
        super().__init__(store, params)
        self.bits = self.params["bits"]
        self.codes = GrowableArray(np.uint8, self.bits // 8)
        self.index = ShardedHamming(self.bits)
        self.projection: np.ndarray | None = None  # (D, bits)
        self.thresholds: np.ndarray | None = None  # (bits,), learned codes only

    @classmethod
    def resolve_params(cls, dim: int, given: Mapping[str, Any]) -> dict[str, Any]:
        check_keys(cls.kind, given, PARAMS)
        bits = int_param(cls.kind, given, "bits", 512, 8, 65536)
        if bits % 8:
            raise ConfigError(f"index 'binary' parameter bits={bits} must be a multiple of 8")
        source = given.get("codes", "auto")
        source = LEGACY_NAMES.get(source, source) if isinstance(source, str) else source
        if source not in CODE_SOURCES:
            raise ConfigError(f"index 'binary' parameter codes={source!r} must be one of "
                              f"{CODE_SOURCES} ('model' = a hash head supplies the codes; "
                              "'pca'/'itq' = learned from the map; 'simhash' = random)")
        if source == "itq" and bits > dim:
            raise ConfigError(f"index 'binary' codes='itq' needs bits <= the descriptor dim "
                              f"({bits} > {dim}); use codes='pca' or fewer bits")
        # PCA to min(bits, dim) dimensions needs more rows than that (then a learned projection
        # always has orthonormal columns, or rows when bits > dim, which load checks).
        need = min(bits, dim) + 1
        min_train = int_param(cls.kind, given, "min_train", max(need, 4 * min(bits, dim)), need)
        # rerank 0: the Hamming order itself (what the codes alone achieve; scores stay exact)
        return {"bits": bits, "rerank": int_param(cls.kind, given, "rerank", 100, 0),
                # Hamming candidates re-scored asymmetrically before the exact re-rank (0: off)
                "shortlist": int_param(cls.kind, given, "shortlist", 1000, 0),
                "seed": int_param(cls.kind, given, "seed", 0, 0), "codes": source,
                "min_train": min_train,
                "train_size": int_param(cls.kind, given, "train_size", 20_000, need)}

    @property
    def learned(self) -> bool:
        """Codes from a projection trained on the map (pca, itq)."""
        return self.params["codes"] in ROTATIONS

    @property
    def trained(self) -> bool:
        """Whether codes exist: always for simhash and model codes, after training for learned."""
        return not self.learned or self.projection is not None

    def _projection(self) -> np.ndarray:
        if self.projection is None:
            if self.learned:
                raise MapError("binary index: the learned projection is not trained yet")
            rng = np.random.default_rng(self.params["seed"])
            self.projection = rng.standard_normal((self.store.dim, self.bits)).astype(np.float32)
        return self.projection

    def project(self, rows: np.ndarray) -> np.ndarray:
        """Packed sign codes of float32 ``rows`` with this map's projection (and thresholds)."""
        scores = rows @ self._projection()
        if self.thresholds is not None:
            return np.packbits(scores > self.thresholds, axis=1)
        return np.packbits(scores > 0, axis=1)

    def _ensure_trained(self) -> None:
        """Train learned codes once the map holds ``min_train`` descriptors, at the first search
        or save after that, not in ``add``.

        Why lazily: the projection should describe the whole map. A bulk build (``vpr map
        build``, merge, the benchmark) adds everything and then saves, so it trains once, on a
        sample of every part of the map; training at the add that crossed ``min_train`` would
        fit the first few thousand keyframes, and on the search benchmark such a projection
        kept the exact top-1 less often than SimHash (0.90 against 0.945 at 200k), because the
        rows added later were unlike the sample. A live map (add, search, add, ...) still trains
        as soon as it is big enough."""
        if not self.trained and len(self.store) >= self.params["min_train"]:
            self._train_and_fill()

    def _train_and_fill(self) -> None:
        """Learn the projection from (a seeded sample of) the map, then code every row."""
        n = len(self.store)
        rng = np.random.default_rng(self.params["seed"])
        take = min(n, self.params["train_size"])
        sample = np.sort(rng.choice(n, size=take, replace=False)) if take < n else np.arange(n)
        log.info("training %s sign codes (%d bits) on %d of %d descriptors",
                 self.params["codes"], self.bits, take, n)
        w, t = learn_sign_projection(self.store.rows(sample), self.bits, self.params["codes"],
                                     self.params["seed"])
        self.projection, self.thresholds = w, t
        self.codes = GrowableArray(np.uint8, self.bits // 8)
        self.index.reset()
        if self.gpu is not None:
            self.gpu.reset()
        for _, block in self.store.chunks(65536):
            packed = self.project(np.asarray(block, dtype=np.float32))
            self.codes.extend(packed)
            self.index.add(packed)

    def check_codes_for_add(self, rows: int, codes: np.ndarray | None) -> None:
        """Refuse, before anything is modified, codes that do not fit this map."""
        source = self.params["codes"]
        if codes is None:
            if source == "model" and rows:
                raise InputError("this map's binary codes come from the model's hash head; pass "
                                 "binary_codes to add() for every batch (or build a map with "
                                 f"codes='{DEFAULT_CODES}')")
            return
        if source != "auto" and source != "model":
            raise InputError(f"this map derives binary codes from the descriptors "
                             f"(codes='{source}'); binary_codes from a model cannot be mixed in "
                             "(build a new map with codes='model')")
        packed = pack_codes(codes, self.bits, "binary_codes")
        if len(packed) != rows:
            raise InputError(f"binary_codes has {len(packed)} rows for {rows} descriptors; give "
                             "one code per descriptor")

    def add(self, start: int, rows: np.ndarray, codes: np.ndarray | None) -> None:
        if self.trained and len(self.codes) != start:
            raise MapError(f"binary index holds {len(self.codes)} codes but the next id is "
                           f"{start}; the codes and the descriptors disagree (rebuild the map)")
        if not len(rows):
            return
        self.check_codes_for_add(len(rows), codes)
        if self.params["codes"] == "auto":
            self.params["codes"] = "model" if codes is not None else DEFAULT_CODES
        if not self.trained:  # coded when trained (next search or save), see _ensure_trained
            return
        if codes is not None:
            packed = pack_codes(codes, self.bits, "binary_codes")
        else:
            packed = self.project(rows)
        self.codes.extend(packed)
        self.index.add(packed)

    def query_codes_for(self, queries: np.ndarray, query_codes: np.ndarray | None) -> np.ndarray:
        if self.params["codes"] == "model":
            if query_codes is None:
                raise InputError("this map's binary codes come from the model's hash head; pass "
                                 "query_codes (the hash head's output for the queries) to search()")
            packed = pack_codes(query_codes, self.bits, "query_codes")
            if len(packed) != len(queries):
                raise InputError(f"query_codes has {len(packed)} rows for {len(queries)} queries")
            return packed
        if query_codes is not None:
            raise InputError(f"this map derives binary codes from the descriptors "
                             f"(codes='{self.params['codes']}'), so query_codes from a model "
                             "cannot be used; call search() without them")
        return self.project(queries)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
               query_codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        self._ensure_trained()
        if not self.trained:  # a learned-code map still below min_train: small, scan it
            if query_codes is not None:
                self.query_codes_for(queries, query_codes)  # refuses them, as when trained
            return exact_search(self.store, queries, k, allowed)
        rerank, shortlist = self.params["rerank"], self.effective_shortlist()
        asymmetric = self.uses_asymmetric_stage(k)
        if asymmetric:  # one projection gives both the codes and the asymmetric scores
            if query_codes is not None:
                self.query_codes_for(queries, query_codes)  # refuses them, with the reason
            qproj = self.query_projection(queries)
            qcodes = np.packbits(qproj > 0, axis=1)  # == project(): a - t > 0 iff a > t
        else:
            qcodes = self.query_codes_for(queries, query_codes)

        def cpu_fetch(rows: np.ndarray, kk: int, effort: int) -> np.ndarray:
            with faiss_threads(len(rows)):
                return self.index.search(qcodes[rows], kk, allowed)

        fetch = cpu_fetch
        if self.gpu is not None and self.gpu.ready(len(self.codes), self._gpu_rows):
            fetch = self._gpu_fetch(qcodes, allowed, cpu_fetch)

        if rerank == 0:
            return self._hamming_order(queries, k, allowed, fetch)
        if not asymmetric:
            return approximate_search(self.store, queries, k, allowed, rerank, fetch)

        def narrow(cand: np.ndarray) -> np.ndarray:
            return asymmetric_best(qproj, self.codes.view(), cand, max(k, rerank))

        return approximate_search(self.store, queries, k, allowed, shortlist, fetch,
                                  narrow=narrow)

    def _gpu_rows(self, start: int):
        codes = self.codes.view()
        for s in range(start, len(codes), COPY_ROWS):
            yield np.ascontiguousarray(codes[s: s + COPY_ROWS])

    def _gpu_fetch(self, qcodes: np.ndarray, allowed: np.ndarray | None, cpu_fetch):
        """A ``fetch`` that lists Hamming candidates on the GPU in the CPU scan's order
        (distance, then id), asking for more while ties at the cut are not seen whole or too
        few allowed candidates came back (GPU indexes ignore selectors); rows it cannot settle
        within the GPU's selection limit, and any GPU failure, go to ``cpu_fetch``."""
        n = len(self.codes)
        excluded = 0 if allowed is None else n - int(allowed.sum())
        mirror = self.gpu

        def fetch(rows: np.ndarray, kk: int, effort: int) -> np.ndarray:
            limit = mirror.max_k
            m = min(n, limit, kk + excluded + BINARY_MARGIN)
            if m < min(n, kk + BINARY_MARGIN):
                return cpu_fetch(rows, kk, effort)
            out = np.full((len(rows), kk), -1, np.int64)
            todo = np.arange(len(rows))
            try:
                while len(todo):
                    dist, cand = mirror.search(qcodes[rows[todo]], m)
                    ids, sure = canonical_hamming(dist, cand, kk, n, allowed)
                    out[todo[sure]] = ids[sure]
                    todo = todo[~sure]
                    if m >= min(n, limit):
                        break
                    m = min(n, limit, 2 * m)
            except GpuFailed:
                pass
            if len(todo):
                out[todo] = cpu_fetch(rows[todo], kk, effort)
            return out

        return fetch

    def effective_shortlist(self) -> int:
        """The ``shortlist`` parameter, capped at 1% of the map.

        Why a cap: the smaller the map, the more often the exact neighbour is already among the
        nearest ``rerank`` codes (real descriptors: 0.99 of queries at 200k keyframes, 0.97 at
        1M), while re-scoring 1000 candidates costs a fixed 0.3-0.6 ms per query (measured on a
        10k map), a tenth of the node's whole per-frame budget. At 1% the stage starts above
        10k keyframes (with ``rerank`` 100) and reaches the full 1000 at 100k."""
        return min(self.params["shortlist"], len(self.store) // 100)

    def uses_asymmetric_stage(self, k: int = 0) -> bool:
        """Whether a search for ``k`` results re-scores a Hamming shortlist asymmetrically: only
        for codes from a projection (a hash head gives no real-valued query projection), with an
        exact re-rank, and when the shortlist is longer than what is re-ranked."""
        return (self.params["rerank"] > 0 and self.params["codes"] != "model"
                and self.effective_shortlist() > max(k, self.params["rerank"]))

    def query_projection(self, queries: np.ndarray) -> np.ndarray:
        """(B, bits) float32: the queries' projections less the thresholds, whose signs are
        their codes; the asymmetric stage scores candidates' bits with these values."""
        scores = np.asarray(queries, np.float32) @ self._projection()
        return scores - self.thresholds if self.thresholds is not None else scores

    def _hamming_order(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
                       fetch) -> tuple[np.ndarray, np.ndarray]:
        """``rerank: 0``: the first ``k`` allowed candidates in Hamming order (ties as faiss
        returns them), each with its exact inner-product score, not re-sorted by it."""
        ids, short = filtered_candidates(fetch, queries.shape[0], k, allowed, len(self.store))
        scores = np.full(ids.shape, PAD_SCORE, np.float32)
        for r in range(len(ids)):
            valid = ids[r] >= 0
            if valid.any():
                scores[r, valid] = self.store.dot(ids[r, valid], queries[r])
        if short.any():  # too few allowed candidates among the codes: complete exactly
            ids[short], scores[short] = exact_search(self.store, queries[short], k, allowed)
        return ids, scores

    def artifacts(self) -> dict[str, Any]:
        self._ensure_trained()
        if not self.trained:  # below min_train: nothing learned yet, nothing to save
            return {}
        out: dict[str, Any] = {"binary_codes": self.codes.view()}
        if self.params["codes"] == "simhash":
            out["binary_projection"] = self._projection()
        elif self.learned:
            out["binary_projection"] = self.projection
            out["binary_thresholds"] = self.thresholds
        return out

    def restore(self, files: Mapping[str, Path]) -> None:
        from vpr_ros.mapdb.storage import load_npy

        n = len(self.store)
        if self.learned and "binary_projection" not in files:
            if "binary_codes" in files:
                raise MapError(f"{files['binary_codes']}: binary codes without the learned "
                               "projection they were made with; the map is incomplete: "
                               "rebuild it")
            return  # saved below min_train: trains at the first search or save that needs it
        codes = load_npy(files["binary_codes"], np.uint8, (n, self.bits // 8), mmap=False) \
            if "binary_codes" in files else np.empty((0, self.bits // 8), np.uint8)
        if len(codes) != n:
            raise MapError(f"the map has {n} descriptors but no binary codes file; the map is "
                           "incomplete: rebuild it")
        if self.params["codes"] == "simhash" or self.learned:
            path = files.get("binary_projection")
            if path is None:
                raise MapError(f"{files['binary_codes']}: the map has no binary_projection "
                               "file for its codes; the map is incomplete: rebuild it")
            projection = load_npy(path, np.float32, (self.store.dim, self.bits), mmap=False)
            thresholds = None
            if self.learned:
                tpath = files.get("binary_thresholds")
                if tpath is None:
                    raise MapError(f"{path}: the learned projection has no binary_thresholds "
                                   "file; the map is incomplete: rebuild it")
                thresholds = load_npy(tpath, np.float32, (self.bits,), mmap=False)
            self._check_projection(projection, thresholds, path)
            self.projection, self.thresholds = projection, thresholds
            self._check_codes(codes, files["binary_codes"])
        self.codes = GrowableArray(np.uint8, self.bits // 8)
        self.codes.extend(codes)
        self.index.reset()
        if self.gpu is not None:
            self.gpu.reset()
        if n:
            self.index.add(codes)

    def _check_projection(self, projection: np.ndarray, thresholds: np.ndarray | None,
                          path: Path) -> None:
        """Refuse a projection that cannot be one this index wrote: non-finite values, or (for
        learned ones, whose columns or rows are orthonormal) vectors far from unit length. The
        sampled code check that follows catches a valid projection of another map."""
        if not np.isfinite(projection).all() or \
                (thresholds is not None and not np.isfinite(thresholds).all()):
            raise MapError(f"{path}: the binary projection holds NaN or Inf; the file is "
                           "corrupt: restore it or rebuild the map")
        if self.learned:
            axis = 0 if self.bits <= self.store.dim else 1
            norms = np.linalg.norm(projection, axis=axis)
            if len(norms) and np.abs(norms - 1).max() > 1e-3:
                raise MapError(f"{path}: the learned binary projection is not orthonormal "
                               f"(vector norms {norms.min():.3g}..{norms.max():.3g}); the file "
                               "is corrupt: restore it or rebuild the map")

    def _check_codes(self, codes: np.ndarray, path: Path, samples: int = 16) -> None:
        """Recompute a few codes from the descriptors: a swapped or stale codes file shows as
        ~50% differing bits, rounding near zero as a handful."""
        n = len(codes)
        if not n:
            return
        ids = np.unique(np.linspace(0, n - 1, min(n, samples)).astype(np.int64))
        fresh = self.project(self.store.rows(ids))
        differing = np.unpackbits(fresh ^ codes[ids], axis=1).mean()
        if differing > 0.02:
            raise MapError(f"{path}: {differing:.0%} of the sampled code bits differ from codes "
                           "recomputed from the descriptors; the codes file belongs to another "
                           "map or version: rebuild the map")

    def info(self) -> dict[str, Any]:
        out = {**super().info(), "code_bytes": self.bits // 8}
        out["stages"] = ("hamming -> asymmetric -> exact" if self.uses_asymmetric_stage()
                         else "hamming -> exact" if self.params["rerank"] else "hamming")
        if self.learned:
            out["trained"] = self.trained
            if not self.trained:
                out["note"] = (f"exact search until the map holds {self.params['min_train']} "
                               f"descriptors ({self.params['codes']} codes are then learned "
                               "from the map at the next search or save)")
        return out
