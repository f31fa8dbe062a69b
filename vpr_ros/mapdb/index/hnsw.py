"""HNSW graph search (faiss ``IndexHNSWFlat``, inner-product metric).

Why HNSW: sub-linear search with high recall and no training, so it suits maps that grow during a
run. The graph holds its own copy of the vectors (float32, or QT_fp16 when the map stores fp16),
and building it is the expensive part, so the graph is saved with the map rather than rebuilt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vpr_ros.errors import MapError
from vpr_ros.mapdb.index.faiss_loader import load_faiss
from vpr_ros.mapdb.index.base import (VectorIndex, allowed_selector, approximate_search,
                                      faiss_threads)
from vpr_ros.mapdb.index.params import check_keys, int_param

PARAMS = ("M", "ef_construction", "ef_search", "candidates")


class HNSWIndex(VectorIndex):
    kind = "hnsw"

    def __init__(self, store, params: Mapping[str, Any]) -> None:
        super().__init__(store, params)
        self.index = self._new_index()

    @classmethod
    def resolve_params(cls, dim: int, given: Mapping[str, Any]) -> dict[str, Any]:
        check_keys(cls.kind, given, PARAMS)
        return {"M": int_param(cls.kind, given, "M", 32, 4, 256),
                "ef_construction": int_param(cls.kind, given, "ef_construction", 80, 8),
                "ef_search": int_param(cls.kind, given, "ef_search", 128, 1),
                "candidates": int_param(cls.kind, given, "candidates", 32, 1)}

    def _new_index(self):
        faiss = load_faiss()

        d, m = self.store.dim, self.params["M"]
        if self.store.dtype == np.float16:
            index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_fp16, m,
                                      faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.params["ef_construction"]
        return index

    def add(self, start: int, rows: np.ndarray, codes: np.ndarray | None) -> None:
        if self.index.ntotal != start:
            raise MapError(f"HNSW index holds {self.index.ntotal} vectors but the next id is "
                           f"{start}; the index and the descriptors disagree (rebuild the map)")
        if len(rows):
            if not self.index.is_trained:
                self.index.train(rows)
            self.index.add(np.ascontiguousarray(rows, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
               query_codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        faiss = load_faiss()

        sel, _bitmap = allowed_selector(allowed)
        ef = self.params["ef_search"]

        def fetch(rows: np.ndarray, kk: int, effort: int) -> np.ndarray:
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(ef * effort, kk)
            if sel is not None:
                params.sel = sel
            with faiss_threads(len(rows)):
                return self.index.search(queries[rows], kk, params=params)[1]

        return approximate_search(self.store, queries, k, allowed, self.params["candidates"],
                                  fetch)

    def artifacts(self) -> dict[str, Any]:
        return {"hnsw": self.index}

    def restore(self, files: Mapping[str, Path]) -> None:
        faiss = load_faiss()

        path = files["hnsw"]
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise MapError(f"{path}: not a readable faiss index ({str(exc).splitlines()[0]}); "
                           "the file is corrupt: restore it or rebuild the map") from exc
        expected = type(self._new_index()).__name__
        if type(index).__name__ != expected or index.d != self.store.dim \
                or index.ntotal != len(self.store) \
                or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise MapError(f"{path}: holds a {type(index).__name__} of dim {index.d} with "
                           f"{index.ntotal} vectors; expected a {expected} of dim "
                           f"{self.store.dim} with {len(self.store)} inner-product vectors "
                           "(the index does not belong to these descriptors: rebuild the map)")
        check_reconstruction(index, self.store, path)
        self.index = index

    def info(self) -> dict[str, Any]:
        return {**super().info(), "ntotal": int(self.index.ntotal)}


def check_reconstruction(index, store, path: Path, samples: int = 8) -> None:
    """Spot-check that stored vectors equal the map's descriptors (catches a swapped file)."""
    n = len(store)
    if not n:
        return
    ids = np.unique(np.linspace(0, n - 1, min(n, samples)).astype(np.int64))
    got = np.stack([index.reconstruct(int(i)) for i in ids])
    want = store.rows(ids)
    if not np.allclose(got, want, atol=2e-3):
        raise MapError(f"{path}: the vectors in the index differ from the map's descriptors; the "
                       "index belongs to another map or version: rebuild the map")
