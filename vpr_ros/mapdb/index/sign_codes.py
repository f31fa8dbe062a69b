"""Sign codes learned from a map's own descriptors: PCA to ``bits`` dimensions, then a rotation
(a seeded random orthogonal one, or the ITQ rotation of Gong & Lazebnik), then the sign of each
coordinate after centring.

Why learn them: SimHash (signs of a random projection through the origin) spends its hyperplanes
uniformly over all D directions, most of which carry little of the map's variance, and it does
not centre the data. VPR descriptors of one model are all alike (mean cosine ~0.6 for GeM), so a
query's best and second-best keyframes are often within 0.01 cosine; random hyperplanes then
scramble near ties and the exact top-1 falls out of the candidates that get re-ranked. Centring
and restricting the hyperplanes to the map's principal subspace spends every bit where the
descriptors actually differ.

Why two rotations: ITQ minimises the quantisation error of the codes (good for semantic
retrieval at few bits); a random rotation of the principal subspace spreads the variance evenly
over the bits, which keeps Hamming distance a smooth function of the angle, what an exact
re-rank of the top candidates needs. Which one keeps the exact top-1 among the candidates more
often is an empirical question; docs/bench_search.md has the measurement that chose the default.

A learned projection is a matrix ``W`` (D, bits) with orthonormal columns (or rows, when the
sample spans fewer than ``bits`` dimensions) and thresholds ``t = mean @ W``; a descriptor's code
is ``packbits(x @ W > t)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np

#: Rotations a learned projection may use.
ROTATIONS = ("pca", "itq")

#: ITQ alternations (the paper uses 50; the objective has flattened out by then).
ITQ_ITERATIONS = 50

#: Extra columns and power iterations of the randomised subspace finder: enough that the top
#: ``bits`` principal directions of a 4096-d descriptor sample are found to within rounding of
#: the exact eigendecomposition, at a fraction of its cost.
OVERSAMPLE = 64
POWER_ITERATIONS = 3


def principal_subspace(x: np.ndarray, r: int, rng: np.random.Generator) -> np.ndarray:
    """(D, r) orthonormal basis of the top-``r`` principal directions of centred rows ``x``.

    Exact (eigh of the covariance, or SVD of the rows) when the problem is small; otherwise a
    randomised range finder with power iterations, which at D = 4096 is ~10x cheaper than
    ``eigh`` and finds the same subspace (the rotation that follows makes the basis within the
    subspace irrelevant)."""
    m, d = x.shape
    width = r + OVERSAMPLE
    if width >= min(m, d) or d <= 1024:
        if m >= d:
            _, vecs = np.linalg.eigh(x.T.astype(np.float64) @ x.astype(np.float64))
            return np.ascontiguousarray(vecs[:, ::-1][:, :r], dtype=np.float32)
        _, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
        return np.ascontiguousarray(vt[:r].T, dtype=np.float32)
    q, _ = np.linalg.qr(x.T @ (x @ rng.standard_normal((d, width), dtype=np.float32)))
    for _ in range(POWER_ITERATIONS):
        q, _ = np.linalg.qr(x.T @ (x @ q))
    _, _, vt = np.linalg.svd(x @ q, full_matrices=False)
    return np.ascontiguousarray(q @ vt[:r].T, dtype=np.float32)


def random_rotation(r: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    """(r, bits): orthogonal when r == bits; orthonormal rows (a tight frame, i.e. SimHash
    inside the subspace) when the subspace has fewer dimensions than there are bits, orthonormal
    columns when it has more."""
    g = rng.standard_normal((max(r, bits), min(r, bits)))
    q, upper = np.linalg.qr(g)
    q = q * np.sign(np.diag(upper))  # Haar-distributed, not biased by the QR sign convention
    return (q if r >= bits else q.T).astype(np.float32)


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS on one thread for a loop of small products and SVDs: waking OpenBLAS's team for a
    64x64 SVD costs more than the SVD, and on a shared 2-core machine 50 ITQ iterations took 4-5 s
    with the default threads against 0.3-0.7 s on one. threadpoolctl comes with the pinned
    requirements (through scikit-learn); without it the loop just runs with the default."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def itq_rotation(v: np.ndarray, rng: np.random.Generator,
                 iterations: int = ITQ_ITERATIONS) -> np.ndarray:
    """(b, b) orthogonal R minimising ||sign(V R) - V R||_F for PCA-projected rows ``v`` (m, b):
    alternate the codes B = sign(V R) and the orthogonal Procrustes solution R = U W^T of the SVD
    V^T B = U S W^T (Gong & Lazebnik, "Iterative quantization", CVPR 2011)."""
    rot = random_rotation(v.shape[1], v.shape[1], rng)
    with one_blas_thread():
        for _ in range(iterations):
            codes = np.where(v @ rot >= 0, np.float32(1), np.float32(-1))
            u, _, wt = np.linalg.svd(v.T @ codes)
            rot = (u @ wt).astype(np.float32)
    return rot


def learn_sign_projection(sample: np.ndarray, bits: int, rotation: str,
                          seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(W (D, bits) float32, thresholds (bits,) float32) learned from ``sample`` rows (m, D).

    ``rotation`` "pca": PCA + random rotation; "itq": PCA + ITQ (needs bits <= min(D, m - 1), as
    the rotation is square)."""
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation {rotation!r} not in {ROTATIONS}")
    x = np.asarray(sample, dtype=np.float32)
    m, d = x.shape
    if m < 2:
        raise ValueError("a sign projection needs at least 2 training rows")
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    x = x - mean
    r = min(bits, d, m - 1)
    if rotation == "itq" and r < bits:
        raise ValueError(f"ITQ codes of {bits} bits need at least {bits} dimensions and "
                         f"{bits + 1} training rows; got D={d}, {m} rows")
    rng = np.random.default_rng(seed)
    basis = principal_subspace(x, r, rng)
    if rotation == "itq":
        rot = itq_rotation(x @ basis, rng)
    else:
        rot = random_rotation(r, bits, rng)
    w = np.ascontiguousarray(basis @ rot, dtype=np.float32)
    return w, (mean @ w).astype(np.float32)


#: (256, 8) float32: the +-1 value of each bit of every byte, in ``np.packbits`` order.
_BYTE_SIGNS = (np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)
               .astype(np.float32) * 2 - 1)


def asymmetric_best(query_proj: np.ndarray, codes: np.ndarray, candidates: np.ndarray,
                    keep: int) -> np.ndarray:
    """The ``keep`` candidates of each query with the best asymmetric score, best first.

    ``query_proj`` (B, bits): each query's projection less the thresholds (its code is the sign
    of it); ``codes`` (N, bits/8) packed codes of the map; ``candidates`` (B, n) ids, -1 padded.
    The score of a code is ``sum_i query_proj_i * (+1 if bit i is set else -1)``, the inner
    product of the query's real projection with the code's signs: the query keeps its magnitudes
    (a near-zero projection counts little when its sign disagrees), so it ranks candidates
    closer to the exact order than the Hamming distance does. Computed per code byte from a
    (bytes, 256) table of partial sums: one gather per candidate byte, no unpacking.
    Returns (B, keep) ids, -1 padded (a query with fewer valid candidates keeps them all).
    """
    b, bits = query_proj.shape
    nbytes = bits // 8
    out = np.full((b, keep), -1, np.int64)
    offsets = (np.arange(nbytes, dtype=np.intp) * 256)[None, :]  # byte j's rows in the table
    for r in range(b):
        cand = candidates[r]
        cand = cand[cand >= 0]
        if len(cand) <= keep:
            out[r, : len(cand)] = cand
            continue
        table = (query_proj[r].reshape(nbytes, 8) @ _BYTE_SIGNS.T).ravel()  # (bytes * 256,)
        # one flat gather (2.5x faster than indexing the 2-D table with two index arrays)
        scores = np.take(table, codes[cand] + offsets).sum(axis=1)
        best = np.argpartition(-scores, keep - 1)[:keep]
        out[r] = cand[best[np.argsort(-scores[best], kind="stable")]]
    return out
