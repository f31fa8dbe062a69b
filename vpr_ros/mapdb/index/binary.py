"""Binary first stage + exact re-rank (the SelaVPR++ scheme): Hamming search over short sign codes
(faiss ``IndexBinaryFlat``), then exact inner products on the top ``rerank`` candidates.

Why: a 512-bit code is 64 bytes, 1/256 of a 4096-d float32 descriptor, so scanning a million codes
costs a few milliseconds, and re-ranking 100 candidates with the full descriptors restores the
exact ranking whenever the true neighbour is among them.

Where codes come from: a model with a hash head gives its own codes (``binary_codes`` in
``PlaceMap.add``, ``query_codes`` in ``search``); otherwise codes are the signs of a fixed, seeded
Gaussian random projection D -> bits (SimHash), stored with the map so that queries are coded the
same way forever. Codes may be given packed (uint8, bits/8 bytes per row, ``np.packbits`` order)
or unpacked (bits per row; a bit is set where the value is > 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vpr_ros.errors import ConfigError, InputError, MapError
from vpr_ros.mapdb.index.faiss_loader import load_faiss
from vpr_ros.mapdb.index.base import (PAD_SCORE, VectorIndex, allowed_selector,
                                      approximate_search, exact_search, filtered_candidates)
from vpr_ros.mapdb.index.params import check_keys, int_param
from vpr_ros.mapdb.index.vectors import GrowableArray

PARAMS = ("bits", "rerank", "seed", "codes")
CODE_SOURCES = ("auto", "projection", "model")


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
        faiss = load_faiss()

        self.bits = self.params["bits"]
        self.codes = GrowableArray(np.uint8, self.bits // 8)
        self.index = faiss.IndexBinaryFlat(self.bits)
        self.projection: np.ndarray | None = None

    @classmethod
    def resolve_params(cls, dim: int, given: Mapping[str, Any]) -> dict[str, Any]:
        check_keys(cls.kind, given, PARAMS)
        bits = int_param(cls.kind, given, "bits", 512, 8, 65536)
        if bits % 8:
            raise ConfigError(f"index 'binary' parameter bits={bits} must be a multiple of 8")
        source = given.get("codes", "auto")
        if source not in CODE_SOURCES:
            raise ConfigError(f"index 'binary' parameter codes={source!r} must be one of "
                              f"{CODE_SOURCES} ('model' = a hash head supplies the codes)")
        # rerank 0: the Hamming order itself (what the codes alone achieve; scores stay exact)
        return {"bits": bits, "rerank": int_param(cls.kind, given, "rerank", 100, 0),
                "seed": int_param(cls.kind, given, "seed", 0, 0), "codes": source}

    def _projection(self) -> np.ndarray:
        if self.projection is None:
            rng = np.random.default_rng(self.params["seed"])
            self.projection = rng.standard_normal((self.store.dim, self.bits)).astype(np.float32)
        return self.projection

    def project(self, rows: np.ndarray) -> np.ndarray:
        return np.packbits(rows @ self._projection() > 0, axis=1)

    def check_codes_for_add(self, rows: int, codes: np.ndarray | None) -> None:
        """Refuse, before anything is modified, codes that do not fit this map."""
        source = self.params["codes"]
        if codes is None:
            if source == "model" and rows:
                raise InputError("this map's binary codes come from the model's hash head; pass "
                                 "binary_codes to add() for every batch (or build a map with "
                                 "codes='projection')")
            return
        if source == "projection":
            raise InputError("this map derives binary codes from its random projection; "
                             "binary_codes from a model cannot be mixed in (build a new map "
                             "with codes='model')")
        packed = pack_codes(codes, self.bits, "binary_codes")
        if len(packed) != rows:
            raise InputError(f"binary_codes has {len(packed)} rows for {rows} descriptors; give "
                             "one code per descriptor")

    def add(self, start: int, rows: np.ndarray, codes: np.ndarray | None) -> None:
        if len(self.codes) != start:
            raise MapError(f"binary index holds {len(self.codes)} codes but the next id is "
                           f"{start}; the codes and the descriptors disagree (rebuild the map)")
        if not len(rows):
            return
        self.check_codes_for_add(len(rows), codes)
        if self.params["codes"] == "auto":
            self.params["codes"] = "model" if codes is not None else "projection"
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
            raise InputError("this map derives binary codes from its random projection, so "
                             "query_codes from a model cannot be used; call search() without them")
        return self.project(queries)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
               query_codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        faiss = load_faiss()

        qcodes = self.query_codes_for(queries, query_codes)
        sel, _bitmap = allowed_selector(allowed)

        def fetch(rows: np.ndarray, kk: int, effort: int) -> np.ndarray:
            if sel is None:
                return self.index.search(qcodes[rows], kk)[1]
            params = faiss.SearchParameters()
            params.sel = sel
            return self.index.search(qcodes[rows], kk, params=params)[1]

        if self.params["rerank"] == 0:
            return self._hamming_order(queries, k, allowed, fetch)
        return approximate_search(self.store, queries, k, allowed, self.params["rerank"], fetch)

    def _hamming_order(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
                       fetch) -> tuple[np.ndarray, np.ndarray]:
        """``rerank: 0``: the first ``k`` allowed candidates in Hamming order (ties as faiss
        returns them), each with its exact inner-product score, not re-sorted by it."""
        ids, short = filtered_candidates(fetch, queries.shape[0], k, allowed, len(self.store))
        scores = np.full(ids.shape, PAD_SCORE, np.float32)
        for r in range(len(ids)):
            valid = ids[r] >= 0
            if valid.any():
                scores[r, valid] = self.store.rows(ids[r, valid]) @ queries[r]
        if short.any():  # too few allowed candidates among the codes: complete exactly
            ids[short], scores[short] = exact_search(self.store, queries[short], k, allowed)
        return ids, scores

    def artifacts(self) -> dict[str, Any]:
        out: dict[str, Any] = {"binary_codes": self.codes.view()}
        if self.params["codes"] == "projection":
            out["binary_projection"] = self._projection()
        return out

    def restore(self, files: Mapping[str, Path]) -> None:
        from vpr_ros.mapdb.storage import load_npy

        n = len(self.store)
        codes = load_npy(files["binary_codes"], np.uint8, (n, self.bits // 8), mmap=False) \
            if "binary_codes" in files else np.empty((0, self.bits // 8), np.uint8)
        if len(codes) != n:
            raise MapError(f"the map has {n} descriptors but no binary codes file; the map is "
                           "incomplete: rebuild it")
        if self.params["codes"] == "projection":
            self.projection = load_npy(files["binary_projection"], np.float32,
                                       (self.store.dim, self.bits), mmap=False)
            self._check_codes(codes, files["binary_codes"])
        self.codes = GrowableArray(np.uint8, self.bits // 8)
        self.codes.extend(codes)
        self.index.reset()
        if n:
            self.index.add(codes)

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
        return {**super().info(), "code_bytes": self.bits // 8}
