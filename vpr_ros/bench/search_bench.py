"""`vpr bench search`: build time, memory, latency, throughput and agreement with exact search of
every index kind, on real descriptors grown to N with distractors, or on synthetic clustered data.

Why agreement with exact search (not recall against ground-truth places): the index must not
change what the map answers. R@1 agreement is the fraction of queries whose top-1 equals exact
search's top-1; R@10 agreement is the mean overlap of the top-10 sets.

Data:

- ``--descriptors FILE.npy`` (real, L2-normalised descriptors of map images): the target case.
  Queries are ``--queries FILE.npy`` (e.g. the other season's images of the same places) or, when
  absent, rows held out of the file. The database is the remaining real rows grown to N with
  distractors, in blocks: each block is the real set under a fixed random signed permutation of
  coordinates (an isometry: it keeps the real data's spread and clustering but is unrelated to the
  queries), and one block in four is instead the real set plus Gaussian noise scaled so each copy
  has cosine ~0.7 with its original (near-duplicates that the queries partly match). Descriptors
  are truncated or zero-padded (then renormalised) to the requested dim.
- Otherwise synthetic clustered data: unit vectors around random cluster centres, queries are map
  rows plus noise. Reported for orientation, not a target.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from vpr_ros.errors import ConfigError, InputError

GIB = 1 << 30


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# -- synthetic clustered data ----------------------------------------------------------------------


def cluster_centres(dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    return normalize(np.random.default_rng(seed).standard_normal((clusters, dim)))


def clustered_block(centres: np.ndarray, rows: int, spread: float,
                    rng: np.random.Generator) -> np.ndarray:
    """``rows`` unit vectors, each a random centre plus isotropic noise of relative size
    ``spread`` (cosine with its centre ~ 1/sqrt(1 + spread**2))."""
    dim = centres.shape[1]
    which = rng.integers(0, len(centres), size=rows)
    noise = rng.standard_normal((rows, dim), dtype=np.float32) * (spread / np.sqrt(dim))
    return normalize(centres[which] + noise)


def clustered_descriptors(n: int, dim: int, clusters: int | None = None, spread: float = 0.6,
                          seed: int = 0) -> np.ndarray:
    """(n, dim) float32 clustered unit vectors (for tests and small benchmarks)."""
    centres = cluster_centres(dim, clusters or max(1, n // 50), seed)
    return clustered_block(centres, n, spread, np.random.default_rng(seed + 1))


def noisy_queries(base: np.ndarray, count: int, noise: float = 0.3,
                  seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``count`` queries near random rows of ``base`` (cosine ~ 1/sqrt(1 + noise**2)); returns
    (queries, the row each came from)."""
    rng = np.random.default_rng(seed)
    src = rng.choice(len(base), size=count, replace=False)
    dim = base.shape[1]
    q = np.asarray(base[src], dtype=np.float32)
    q = q + rng.standard_normal(q.shape, dtype=np.float32) * (noise / np.sqrt(dim))
    return normalize(q), src
