"""QAA: Query-based Adaptive Aggregation (Xiao et al., ICRA 2026), as released.

Two banks of learned, image-independent queries:

* reference ("feature") queries ``Q x cluster_dim``, refined by self-attention + LayerNorm;
* score queries ``Q x C``, refined the same way, then cross-attending over the patch tokens,
  LayerNorm, and projected per query to ``num_clusters`` (a 1x1 conv over the query axis).

The Cross-query Similarity is ONE matrix product: ``V[b] = F^T P[b]`` of shape
``(cluster_dim, num_clusters)``; no softmax and no optimal transport are involved. Each column
(cluster) is L2-normalised, the matrix is flattened cluster_dim-major (the released layout), and
the whole vector is L2-normalised. With DINOv2-B (C=768) and the default 256 queries, 16 heads,
64 clusters x 128 dims the aggregator has 5.07M parameters (8192-D descriptor).

Both query banks depend on parameters only, so in inference (eval mode, no autograd) they are
computed once and cached; the cache is dropped whenever a query parameter changes (tracked by
the tensors' version counters), on ``train()`` and on state-dict loads. Module and parameter
names follow the released ``qaa.py`` so official checkpoints load with a prefix map only.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vpr_ros.models.backbones.base import BackboneOutput
from vpr_ros.models.registry import register_aggregator


class QueryBank(nn.Module):
    """Learned queries refined by residual self-attention and LayerNorm."""

    def __init__(self, dim: int, num_queries: int, num_heads: int,
                 out_norm: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"query width {dim} is not divisible by {num_heads} heads")
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, num_heads=num_heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.out_norm = out_norm

    def forward(self) -> torch.Tensor:
        q = self.queries
        q = q + self.self_attn(q, q, q, need_weights=False)[0]
        return self.norm_q(q) if self.out_norm else q


class QueryScorer(nn.Module):
    """Score queries attend over patch tokens, then map each query to ``num_clusters`` scores."""

    def __init__(self, in_dim: int, num_clusters: int, num_heads: int,
                 out_norm: bool = False) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(in_dim, num_heads=num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(in_dim)
        self.conv = nn.Conv1d(in_dim, num_clusters, kernel_size=1)
        self.norm2_out = nn.LayerNorm(num_clusters)
        self.out_norm = out_norm

    def forward(self, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, C), queries (B, Q, C) -> scores (B, Q, num_clusters)."""
        out = self.cross_attn(queries, tokens, tokens, need_weights=False)[0]
        out = self.norm_out(out)
        # A 1x1 conv over the query axis is a linear layer applied to every query.
        out = F.linear(out, self.conv.weight.squeeze(-1), self.conv.bias)
        return self.norm2_out(out) if self.out_norm else out


@register_aggregator("qaa")
class QAAAggregator(nn.Module):
    """Args:
        in_channels: backbone width C (injected by the model builder).
        num_queries: Q, queries per bank (256 in the paper).
        num_clusters, cluster_dim: descriptor = num_clusters * cluster_dim (+ token_dim).
        feature_heads, score_heads: attention heads of the two banks (16 each).
        token_dim: if > 0, an MLP of the class token (C -> 512 -> token_dim) is L2-normalised
            and prepended, as in the release (0 for the published models).
        query_norm: LayerNorm after the self-attention of both banks (release: True).
        score_norm: LayerNorm over the cluster scores (the release's ``out_norm``: False).
    """

    def __init__(self, in_channels: int, num_queries: int = 256, num_clusters: int = 64,
                 cluster_dim: int = 128, feature_heads: int = 16, score_heads: int = 16,
                 token_dim: int = 0, query_norm: bool = True, score_norm: bool = False) -> None:
        super().__init__()
        for name, v in (("num_queries", num_queries), ("num_clusters", num_clusters),
                        ("cluster_dim", cluster_dim)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if in_channels % score_heads:
            raise ValueError(f"backbone width {in_channels} is not divisible by score_heads="
                             f"{score_heads}")
        self.in_channels = in_channels
        self.num_clusters = num_clusters
        self.cluster_dim = cluster_dim
        self.token_dim = token_dim
        self.queries_feature = QueryBank(cluster_dim, num_queries, feature_heads, query_norm)
        self.queries_score = QueryBank(in_channels, num_queries, score_heads, query_norm)
        self.score = QueryScorer(in_channels, num_clusters, score_heads, score_norm)
        self.token_features: Optional[nn.Sequential] = None
        if token_dim:
            self.token_features = nn.Sequential(nn.Linear(in_channels, 512), nn.ReLU(),
                                                nn.Linear(512, token_dim))
        self._bank_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._bank_key: Optional[tuple] = None

    @property
    def out_dim(self) -> int:
        return self.num_clusters * self.cluster_dim + self.token_dim

    # -- the image-independent part ---------------------------------------------------------
    def _bank_params(self) -> list[torch.Tensor]:
        return list(self.queries_feature.parameters()) + list(self.queries_score.parameters())

    def query_banks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Refined reference queries (Q, cluster_dim) and score queries (Q, C)."""
        caching = not self.training and not torch.is_grad_enabled()
        if caching:
            params = self._bank_params()
            key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
            if self._bank_cache is not None and self._bank_key == key:
                return self._bank_cache
        banks = (self.queries_feature()[0], self.queries_score()[0])
        if caching:
            self._bank_cache, self._bank_key = banks, key
        else:
            self._bank_cache = self._bank_key = None
        return banks

    def train(self, mode: bool = True) -> "QAAAggregator":
        self._bank_cache = self._bank_key = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        self._bank_cache = self._bank_key = None
        super()._load_from_state_dict(*args, **kwargs)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: BackboneOutput) -> torch.Tensor:
        feats = x.features
        b = feats.shape[0]
        tokens = feats.flatten(2).transpose(1, 2)  # (B, N, C)
        ref_q, score_q = self.query_banks()
        scores = self.score(tokens, score_q.unsqueeze(0).expand(b, -1, -1))  # (B, Q, K)
        # Cross-query similarity: one matrix product (cluster_dim, Q) @ (B, Q, K).
        v = torch.matmul(ref_q.transpose(0, 1), scores)  # (B, cluster_dim, K)
        v = F.normalize(v, p=2, dim=1).flatten(1)
        if self.token_features is not None:
            if x.cls_token is None:
                raise ValueError("token_dim > 0 needs a backbone with a class token")
            t = F.normalize(self.token_features(x.cls_token), p=2, dim=-1)
            v = torch.cat([t, v], dim=-1)
        return F.normalize(v, p=2, dim=-1)
