"""IVF-PQ search (faiss ``IndexIVFPQ``, inner-product metric), trained on the map's own descriptors.

Why: product-quantised codes (64 bytes per 4096-d descriptor by default) keep a million-keyframe
map's search structure small, and the inverted lists make a query touch a fraction of it.

Why a fallback: PQ needs at least 2**nbits training vectors (and k-means wants many more), so a
map that is still small cannot be trained. Until the map reaches ``min_train`` descriptors, search
is exact (and ``info()`` says so); the first ``add`` that reaches it trains on up to
``train_size`` of the map's descriptors and indexes everything. Defaults scale with the map at
that moment: nlist ~ sqrt(N) (at least 39 training points per list), m = the largest of 64,
48, 32, ... that cuts the dimension into sub-vectors of at least 4 values, nprobe = nlist / 8
(at least 8).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vpr_ros.errors import ConfigError, MapError
from vpr_ros.mapdb.index.faiss_loader import load_faiss
from vpr_ros.mapdb.index.base import (VectorIndex, allowed_selector, approximate_search,
                                      exact_search, faiss_threads)
from vpr_ros.mapdb.index.params import check_keys, int_param

log = logging.getLogger(__name__)

PARAMS = ("nlist", "m", "nbits", "nprobe", "min_train", "train_size", "candidates", "seed")


def default_m(dim: int) -> int:
    for m in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1):
        if dim % m == 0 and dim // m >= 4:
            return m
    return 1


def default_nlist(n: int) -> int:
    return int(max(1, min(round(np.sqrt(n)), n // 39)))


class IVFPQIndex(VectorIndex):
    kind = "ivfpq"

    def __init__(self, store, params: Mapping[str, Any]) -> None:
        super().__init__(store, params)
        self.index = None  # faiss IndexIVFPQ once trained
        self._quantizer = None
        self._trained_with: dict[str, int] = {}

    @classmethod
    def resolve_params(cls, dim: int, given: Mapping[str, Any]) -> dict[str, Any]:
        check_keys(cls.kind, given, PARAMS)
        p = {"nlist": int_param(cls.kind, given, "nlist", None, 1),
             "m": int_param(cls.kind, given, "m", None, 1, dim),
             "nbits": int_param(cls.kind, given, "nbits", 8, 1, 16),
             "nprobe": int_param(cls.kind, given, "nprobe", None, 1),
             "min_train": int_param(cls.kind, given, "min_train", None, 1),
             "train_size": int_param(cls.kind, given, "train_size", 50_000, 1),
             "candidates": int_param(cls.kind, given, "candidates", 100, 1),
             "seed": int_param(cls.kind, given, "seed", 0, 0)}
        if p["m"] is not None and dim % p["m"]:
            raise ConfigError(f"index 'ivfpq' parameter m={p['m']} must divide the descriptor "
                              f"dim {dim}; try m={default_m(dim)}")
        floor = max(2 ** p["nbits"], 39 * p["nlist"] if p["nlist"] else 0)
        if p["min_train"] is None:
            p["min_train"] = max(4 * 2 ** p["nbits"], floor)
        elif p["min_train"] < floor:
            raise ConfigError(f"index 'ivfpq' parameter min_train={p['min_train']} is too small: "
                              f"nbits={p['nbits']} and nlist={p['nlist']} need at least {floor} "
                              "training vectors")
        return p

    @property
    def trained(self) -> bool:
        return self.index is not None

    def add(self, start: int, rows: np.ndarray, codes: np.ndarray | None) -> None:
        if self.index is None:
            if len(self.store) >= self.params["min_train"]:
                self._train_and_fill()
            return
        if self.index.ntotal != start:
            raise MapError(f"IVF-PQ index holds {self.index.ntotal} vectors but the next id is "
                           f"{start}; the index and the descriptors disagree (rebuild the map)")
        if len(rows):
            self.index.add(np.ascontiguousarray(rows, dtype=np.float32))

    def _shape(self, n: int) -> dict[str, int]:
        nlist = self.params["nlist"] or default_nlist(n)
        return {"nlist": nlist, "m": self.params["m"] or default_m(self.store.dim),
                "nbits": self.params["nbits"],
                "nprobe": min(nlist, self.params["nprobe"] or max(8, nlist // 8))}

    def _new_index(self, shape: Mapping[str, int]):
        faiss = load_faiss()

        quantizer = faiss.IndexFlatIP(self.store.dim)
        index = faiss.IndexIVFPQ(quantizer, self.store.dim, shape["nlist"], shape["m"],
                                 shape["nbits"], faiss.METRIC_INNER_PRODUCT)
        index.nprobe = shape["nprobe"]
        self._quantizer = quantizer
        return index

    def _train_and_fill(self) -> None:
        n = len(self.store)
        shape = self._shape(n)
        index = self._new_index(shape)
        index.cp.niter = 10
        # Small maps are trained on purpose (see the module doc): no faiss warnings about it.
        index.cp.min_points_per_centroid = 1
        index.pq.cp.min_points_per_centroid = 1
        index.pq.cp.niter = 15
        rng = np.random.default_rng(self.params["seed"])
        take = min(n, self.params["train_size"])
        sample = np.sort(rng.choice(n, size=take, replace=False)) if take < n else np.arange(n)
        log.info("training IVF-PQ (nlist=%d, m=%d, nbits=%d) on %d of %d descriptors",
                 shape["nlist"], shape["m"], shape["nbits"], take, n)
        index.train(self.store.rows(sample))
        for _, block in self.store.chunks(65536):
            index.add(np.ascontiguousarray(block, dtype=np.float32))
        self.index = index
        self._trained_with = shape

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
               query_codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            return exact_search(self.store, queries, k, allowed)
        faiss = load_faiss()

        sel, _bitmap = allowed_selector(allowed)
        nprobe, nlist = self._trained_with["nprobe"], self._trained_with["nlist"]

        def fetch(rows: np.ndarray, kk: int, effort: int) -> np.ndarray:
            params = faiss.SearchParametersIVF()
            params.nprobe = min(nlist, nprobe * effort)
            if sel is not None:
                params.sel = sel
            with faiss_threads(len(rows)):
                return self.index.search(queries[rows], kk, params=params)[1]

        return approximate_search(self.store, queries, k, allowed, self.params["candidates"],
                                  fetch)

    def manifest_params(self) -> dict[str, Any]:
        return {**super().manifest_params(), "trained": self.trained,
                "trained_with": dict(self._trained_with)}

    def artifacts(self) -> dict[str, Any]:
        return {"ivfpq": self.index} if self.index is not None else {}

    def restore(self, files: Mapping[str, Path]) -> None:
        faiss = load_faiss()

        if "ivfpq" not in files:
            if len(self.store) >= self.params["min_train"]:
                self._train_and_fill()
            return
        path = files["ivfpq"]
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise MapError(f"{path}: not a readable faiss index ({str(exc).splitlines()[0]}); "
                           "the file is corrupt: restore it or rebuild the map") from exc
        if not isinstance(index, faiss.IndexIVFPQ) or index.d != self.store.dim \
                or index.ntotal != len(self.store) \
                or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise MapError(f"{path}: holds a {type(index).__name__} of dim {index.d} with "
                           f"{index.ntotal} vectors; expected an IndexIVFPQ of dim "
                           f"{self.store.dim} with {len(self.store)} inner-product vectors "
                           "(the index does not belong to these descriptors: rebuild the map)")
        self.index = index
        self._trained_with = {"nlist": int(index.nlist), "m": int(index.pq.M),
                              "nbits": int(index.pq.nbits), "nprobe": int(index.nprobe)}

    def info(self) -> dict[str, Any]:
        out = {**super().info(), "trained": self.trained, **self._trained_with}
        if not self.trained:
            out["note"] = (f"exact search until the map holds {self.params['min_train']} "
                           "descriptors (then IVF-PQ is trained on them)")
        return out
