"""Index kinds behind one interface: exact ("flat"), "hnsw", "ivfpq" and "binary" (Hamming first
stage + exact re-rank). ``make_index`` turns a plain spec (a kind name, or a dict with ``kind`` and
parameters) into one, so maps, configs and the CLI name indexes the same way.
"""

from __future__ import annotations

from typing import Any, Mapping

from vpr_ros.errors import ConfigError
from vpr_ros.mapdb.index.base import VectorIndex
from vpr_ros.mapdb.index.binary import BinaryIndex
from vpr_ros.mapdb.index.flat import FlatIndex
from vpr_ros.mapdb.index.hnsw import HNSWIndex
from vpr_ros.mapdb.index.ivfpq import IVFPQIndex
from vpr_ros.mapdb.index.vectors import DescriptorStore

KINDS: dict[str, type[VectorIndex]] = {
    "flat": FlatIndex, "hnsw": HNSWIndex, "ivfpq": IVFPQIndex, "binary": BinaryIndex}


def parse_spec(spec: str | Mapping[str, Any], dim: int) -> tuple[str, dict[str, Any]]:
    """(kind, resolved parameters) from ``"hnsw"`` or ``{"kind": "hnsw", "M": 16}``."""
    if isinstance(spec, str):
        kind, given = spec, {}
    elif isinstance(spec, Mapping):
        given = dict(spec)
        kind = given.pop("kind", None)
        for state_key in ("trained", "trained_with"):
            given.pop(state_key, None)
    else:
        raise ConfigError(f"index spec {spec!r} must be a kind name or a dict with 'kind'")
    if kind not in KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; choose one of {sorted(KINDS)}")
    return kind, KINDS[kind].resolve_params(dim, given)


def make_index(spec: str | Mapping[str, Any], store: DescriptorStore) -> VectorIndex:
    kind, params = parse_spec(spec, store.dim)
    return KINDS[kind](store, params)


__all__ = ["KINDS", "VectorIndex", "DescriptorStore", "make_index", "parse_spec"]
