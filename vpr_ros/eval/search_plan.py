"""How an evaluation searches: index kind, where binary codes come from, and re-ranking.

Why: models with extra heads are searched differently by the node. A SelaVPR++ model's map
stores its hash head's codes (not a random projection of the float descriptor) and re-ranks the
Hamming candidates with the float descriptors; a CQVPR model re-ranks the global top 100 by
mutual-nearest-neighbour matches of its local features. ``vpr eval recall`` must measure that,
and say in its JSON which codes and which re-ranking produced the figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.eval.encoded import EncodedSet
from vpr_ros.mapdb.index.base import PAD_SCORE
from vpr_ros.models.rerank import DEFAULT_TOP_N, rerank_mutual_nn

INDEX_KINDS = ("flat", "hnsw", "ivfpq", "binary")


@dataclass(frozen=True)
class SearchPlan:
    """One way of searching encoded sets (one row variant of the comparison table)."""

    index: str = "flat"
    #: binary index only: "model" (the hash head's codes) or "descriptor" (the index's default
    #: codes computed from the float descriptor, as for any model without a hash head)
    binary_codes: Optional[str] = None
    #: binary index only: Hamming candidates re-ranked by exact float (0 = Hamming order only;
    #: None = the index default)
    rerank: Optional[int] = None
    #: global candidates re-ranked by local-feature mutual NN (None = no local re-ranking)
    local_rerank_top: Optional[int] = None

    @property
    def extras(self) -> tuple[str, ...]:
        """Extra encoder outputs this plan reads."""
        return tuple(n for n, used in (("binary", self.binary_codes == "model"),
                                       ("local", self.local_rerank_top is not None)) if used)

    def index_spec(self, db: EncodedSet) -> str | dict[str, Any]:
        """The PlaceMap index argument (as the map builder would create it)."""
        if self.index != "binary":
            return self.index
        spec: dict[str, Any] = {"kind": "binary"}
        if self.binary_codes == "model":
            spec.update(codes="model", bits=int(db.binary.shape[1]) * 8)
        if self.rerank is not None:
            spec["rerank"] = int(self.rerank)
        return spec

    def descriptor_bytes(self, db: EncodedSet) -> dict[str, int]:
        """Bytes per image the search reads, as stored: float32 global descriptor, packed codes,
        local features at the encoder's dtype; ``total`` is their sum for this plan (Hamming
        order alone reads the codes only)."""
        parts: dict[str, int] = {}
        hamming_only = self.index == "binary" and self.rerank == 0
        if not hamming_only:
            parts["global"] = int(db.global_.shape[1]) * 4
        if self.index == "binary":
            bits = int(db.binary.shape[1]) * 8 if self.binary_codes == "model" else 512
            parts["binary"] = bits // 8
        if self.local_rerank_top is not None:
            parts["local"] = int(np.prod(db.local.shape[1:])) * db.local.dtype.itemsize
        parts["total"] = sum(parts.values())
        return parts

    def describe(self, db: EncodedSet) -> dict[str, Any]:
        """The JSON ``search`` section: what produced the figures."""
        out: dict[str, Any] = {"index": self.index}
        if self.index == "binary":
            spec = self.index_spec(db)
            out["binary"] = {"codes": spec.get("codes", "descriptor (index default)"),
                             "bits": spec.get("bits", 512),
                             "rerank": spec.get("rerank", 100)}
        out["descriptor_bytes"] = self.descriptor_bytes(db)
        out["local_rerank"] = ({"method": "mutual_nn", "top_n": self.local_rerank_top}
                               if self.local_rerank_top is not None else None)
        return out


def plan_search(output_names: Sequence[str], index: str = "flat", rerank: Optional[int] = None,
                local_rerank: bool = False, local_rerank_top: int = DEFAULT_TOP_N,
                model: str = "the model") -> SearchPlan:
    """The plan for a model with ``output_names`` (from ``Encoder.output_names``).

    A binary index uses the model's own codes when it has a hash head ("binary" output), else
    the index's default codes of the float descriptor (today's behaviour for other models).
    """
    if index not in INDEX_KINDS:
        raise InputError(f"index {index!r}: expected one of {INDEX_KINDS}")
    if rerank is not None:
        if index != "binary":
            raise InputError(f"--rerank {rerank} sets how many Hamming candidates of a binary "
                             f"index are re-ranked; it needs --index binary (got {index})")
        if isinstance(rerank, bool) or int(rerank) != rerank or rerank < 0:
            raise InputError(f"--rerank {rerank!r}: expected an integer >= 0 (0 = Hamming "
                             "ranking only)")
    top: Optional[int] = None
    if local_rerank:
        if "local" not in output_names:
            raise InputError(f"--local-rerank: {model} has outputs {tuple(output_names)} and no "
                             "'local' local-feature head; use a model with one (CQVPR, "
                             "config/models/cqvpr_*.yaml) or leave out --local-rerank")
        if isinstance(local_rerank_top, bool) or int(local_rerank_top) != local_rerank_top \
                or local_rerank_top < 1:
            raise InputError(f"--local-rerank-top {local_rerank_top!r}: expected an integer "
                             ">= 1")
        top = int(local_rerank_top)
    codes = None
    if index == "binary":
        codes = "model" if "binary" in output_names else "descriptor"
    return SearchPlan(index=index, binary_codes=codes,
                      rerank=None if rerank is None else int(rerank), local_rerank_top=top)


def search_encoded(db: EncodedSet, q: EncodedSet, fingerprint: str, k: int, plan: SearchPlan,
                   database_paths: Optional[Sequence[Path]] = None, progress: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of every query, best first, searched and re-ranked as ``plan`` says.

    Local re-ranking fetches the global top ``max(k, top_n)``, re-sorts the first ``top_n`` by
    mutual-NN count (models/rerank.py, the node's code) and keeps the first ``k``; scores stay
    the global inner products of the re-sorted ids.
    """
    from vpr_ros.eval.recall import search_map

    for name, side in (("database", db), ("queries", q)):
        missing = [e for e in plan.extras if getattr(side, e) is None]
        if missing:
            raise InputError(f"{name} were encoded without {missing}; encode with "
                             f"extras={plan.extras}")
    top = plan.local_rerank_top
    depth = max(k, top) if top is not None else k
    ids, scores = search_map(db.global_, q.global_, fingerprint, depth, plan.index_spec(db),
                             database_paths,
                             db.binary if plan.binary_codes == "model" else None,
                             q.binary if plan.binary_codes == "model" else None)
    if top is not None:
        ids, scores = _local_rerank(ids, scores, db.local, q.local, top, progress)
    return ids[:, :k], scores[:, :k]


def _local_rerank(ids: np.ndarray, scores: np.ndarray, db_local: np.ndarray,
                  q_local: np.ndarray, top: int, progress: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    from tqdm import tqdm

    out_ids, out_scores = ids.copy(), scores.copy()
    for r in tqdm(range(len(ids)), desc="local re-rank", unit="query", disable=not progress,
                  leave=False):
        new, _counts = rerank_mutual_nn(q_local[r], ids[r], lambda c: db_local[c], top)
        score_of = {int(i): s for i, s in zip(ids[r], scores[r]) if i >= 0}
        out_ids[r] = new
        out_scores[r] = [score_of[int(i)] if i >= 0 else PAD_SCORE for i in new]
    return out_ids, out_scores
