"""Geometric verification: does a place-recognition candidate really show the query's scene,
and where was the query camera relative to it?

A global descriptor says two images *look* alike; a wrong loop closure bends a pose graph and a
wrong relocalization sends a localizer to the wrong corridor. So, like RTAB-Map, ORB-SLAM3,
Kimera and hloc, each candidate is checked against the keyframe's stored keypoints:

1. matching: nearest neighbours of the query's descriptors among the keyframe's (L2 for SIFT,
   Hamming for ORB/AKAZE), kept when they pass Lowe's ratio test and are mutual (the keyframe
   keypoint's own nearest neighbour is the same query keypoint);
2. a robust model with calibrated geometry: **PnP** (with refinement) when the keyframe's
   keypoints have 3-D points (depth or stereo at map build) and the query camera is calibrated
   -- a metric pose; else the **essential matrix** when both cameras are calibrated (keypoints
   undistorted with their camera's model) -- rotation and the translation's direction; else the
   **fundamental matrix** on raw pixels -- inliers only, no pose;
3. a verdict from the inlier count, the inlier ratio, the inliers' median error (reprojection
   or Sampson, pixels) and the pose's plausibility (rotation below a bound, metric translation
   below a bound, the inliers in front of both cameras), never from inlier counts alone: a
   repeated facade at night gives many inliers to a *fundamental* matrix that no rigid camera
   motion explains;
4. a covariance of the relative pose from the inliers' residuals (Gauss-Newton: sigma^2
   (J^T J)^-1), expressed over [x, y, z, rx, ry, rz] of the query camera in the match camera's
   frame (rotation vector, perturbation on the left, in the match camera frame).

Candidates are verified in rank order until the first verified one, within a per-frame time
budget. Estimators: OpenCV's USAC (MAGSAC++ scoring) and poselib (LO-RANSAC + non-linear
refinement), selectable; the default is chosen by measurement on real images (README,
``docs/verification.md``). No ROS types here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vpr_ros.localization.params import Tunables, param, require, validate
from vpr_ros.mapdb.camera import CameraModel
from vpr_ros.mapdb.feature_matching import match_features
from vpr_ros.mapdb.transforms import (matrix_to_quat, quat_to_matrix,
                                      rotation_angle_deg, rotvec_to_matrix, sampson, skew)
from vpr_ros.runtime.local_features import LocalFeatures

ESTIMATORS = ("poselib", "opencv")
PNP, ESSENTIAL, FUNDAMENTAL = "pnp", "essential", "fundamental"
#: Variance (m^2) given to the translation along its own direction when only the direction is
#: known (essential matrix): the scale is unknown, and a consumer that reads the covariance as
#: an information matrix must see that axis as unconstrained.
UNKNOWN_SCALE_VARIANCE = 1.0e6


@dataclass(frozen=True)
class VerificationConfig(Tunables):
    """Tunables of :class:`GeometricVerifier` (node parameters ``verification.*``)."""

    enabled: bool = param(
        True, "verify candidates geometrically; loop closures and relocalizations are then "
        "published only for a verified candidate (false: publish every decision unverified)")
    estimator: str = param(
        "poselib", "robust estimator: poselib (LO-RANSAC + non-linear refinement) or opencv "
        "(USAC with MAGSAC++ scoring)")
    max_candidates: int = param(
        5, "candidates verified per frame at most, in rank order; stops at the first verified "
        "one", 1, 100)
    time_budget_ms: float = param(
        40.0, "per-frame time budget of verifying candidates (matching and estimation, from "
        "the end of the frame's keypoint extraction); candidates left when it is spent are "
        "not verified (counted)", 0.0, 60000.0)
    ratio: float = param(
        0.8, "Lowe's ratio: a match is kept when its distance is below ratio x the second "
        "nearest", 0.05, 1.0)
    mutual: bool = param(
        True, "keep only mutual nearest neighbours (query -> keyframe and back)")
    min_matches: int = param(
        12, "fewer ratio-test matches than this: rejected without estimation", 5, 100000)
    min_inliers: int = param(
        20, "inliers a candidate verified by PnP needs", 5, 100000)
    min_inliers_epipolar: int = param(
        30, "inliers a candidate verified by the essential or fundamental matrix needs: a "
        "five-point model finds a wrong consensus among a few inliers more easily than PnP "
        "on known depth (on rendered dusk revisits, 20 inliers let one wrong direction "
        "through)", 5, 100000)
    min_inlier_ratio: float = param(
        0.25, "inliers / matches a verified candidate needs", 0.0, 1.0)
    ransac_threshold_px: float = param(
        1.5, "epipolar (Sampson) inlier threshold of the essential / fundamental matrix, in "
        "pixels", 0.05, 100.0)
    pnp_threshold_px: float = param(
        3.0, "reprojection inlier threshold of PnP, in pixels", 0.05, 100.0)
    max_error_px: float = param(
        2.0, "median inlier error (reprojection or Sampson) a verified candidate may have, in "
        "pixels", 0.01, 100.0)
    max_rotation_deg: float = param(
        90.0, "a relative rotation above this between query and keyframe camera is "
        "implausible for a revisit: rejected", 0.0, 180.0)
    max_translation_m: float = param(
        50.0, "a metric (PnP) translation above this between query and keyframe camera is "
        "implausible for a revisit: rejected", 0.0, 100000.0)
    min_cheirality: float = param(
        0.9, "fraction of inliers that must lie in front of both cameras", 0.0, 1.0)
    min_pnp_points: int = param(
        12, "matches with a 3-D point needed to try PnP (else the essential matrix)", 4, 100000)
    pixel_sigma_floor_px: float = param(
        0.5, "covariance: the keypoint noise assumed is at least this (pixels), however small "
        "the inliers' residuals", 0.0, 100.0)
    covariance_scale: float = param(
        40.0, "covariance: multiplier of the Gauss-Newton covariance for what residuals do not "
        "show (calibration and correlated keypoint errors); set so that pose errors on EuRoC "
        "images are about one sigma", 1.0, 1.0e6)
    local_features: str = param(
        "sift", "keypoints of a new live map (loop_closure without a map file): sift or orb; "
        "a map file's own kind is always used for it")
    max_features: int = param(
        1000, "strongest keypoints extracted per camera frame (and per live keyframe)", 8,
        100000)
    require_points: bool = param(
        False, "refuse at configure a map whose keypoints have no 3-D points (metric PnP "
        "poses needed); false: such maps are verified by the essential matrix")
    ransac_confidence: float = param(
        0.999, "RANSAC success probability", 0.5, 0.999999)
    max_iterations: int = param(
        2000, "RANSAC iterations at most", 10, 1000000)
    min_iterations: int = param(
        20, "RANSAC iterations at least (poselib; OpenCV's USAC stops on confidence alone). "
        "A candidate with hundreds of inliers reaches the confidence within ten iterations, "
        "so this floor sets most of its estimation cost; the final re-selection and "
        "refinement of a passing relative pose make more iterations unnecessary for accuracy "
        "(docs/verification.md)", 0, 1000000)
    extract_scale: float = param(
        1.0, "the camera frame is shrunk by this factor before its keypoints are extracted "
        "(keypoints stay in the full frame's pixels, intrinsics unchanged): 0.5 extracts SIFT "
        "3-5x faster at 640x480; on EuRoC its PnP poses were as accurate and its "
        "essential-matrix poses about 1.7-2x less (docs/verification.md)", 0.1, 1.0)

    def __post_init__(self) -> None:
        validate(self)
        require(self.estimator in ESTIMATORS,
                f"verification.estimator = {self.estimator!r} must be one of "
                f"{', '.join(ESTIMATORS)}")
        require(self.min_inliers >= 5, "verification.min_inliers must be >= 5")
        require(self.local_features in ("sift", "orb", "akaze"),
                f"verification.local_features = {self.local_features!r} must be sift, orb or "
                "akaze")


@dataclass(frozen=True)
class View:
    """One image as verification sees it: its keypoints and its camera (None: uncalibrated)."""

    features: LocalFeatures
    camera: Optional[CameraModel] = None


@dataclass(frozen=True)
class RelativePose:
    """The query camera's pose in the match keyframe's camera frame: X_match = R X_query + t.

    ``metric``: t in metres (PnP on 3-D points); else t is a unit direction. ``covariance``:
    6x6 row-major over [x, y, z, rx, ry, rz] (rotation vector, match camera frame)."""

    rotation: tuple[float, float, float, float]      # quaternion (x, y, z, w)
    translation: tuple[float, float, float]
    metric: bool
    covariance: tuple[float, ...]

    @property
    def rotation_matrix(self) -> np.ndarray:
        return quat_to_matrix(self.rotation)


@dataclass(frozen=True)
class Verification:
    """The verdict on one candidate. ``pose``: the relative pose of a verified candidate; a
    rejected one carries none (its covariance, the costliest part of a verdict on hundreds of
    inliers, is computed only for a pose that passed every other test)."""

    keyframe_id: int
    verified: bool
    reason: str                   # "" when verified, else why not (one line)
    method: str                   # pnp | essential | fundamental | "" (not estimated)
    matches: int = 0
    inliers: int = 0
    inlier_ratio: float = 0.0
    error_px: float = float("nan")
    pose: Optional[RelativePose] = None
    match_s: float = 0.0
    estimate_s: float = 0.0


@dataclass
class VerificationRound:
    """One frame's verification: every verdict in rank order, the first verified one, the
    candidates left unverified by the time budget, and the time spent per stage."""

    results: list[Verification] = field(default_factory=list)
    accepted: Optional[Verification] = None
    over_budget: int = 0
    match_s: float = 0.0
    estimate_s: float = 0.0

    @property
    def rejected(self) -> list[Verification]:
        return [r for r in self.results if not r.verified]


def propagate(cov: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], n: int,
              eps: float = 1e-6) -> np.ndarray:
    """First-order propagation of ``cov`` (n x n, about the zero perturbation) through ``fn``
    (a perturbation of n parameters -> m outputs, ``fn(0)`` the estimate) by central
    differences: J cov J^T."""
    cols = []
    for i in range(n):
        d = np.zeros(n)
        d[i] = eps
        cols.append((np.asarray(fn(d)) - np.asarray(fn(-d))) / (2 * eps))
    jac = np.stack(cols, 1)
    return jac @ cov @ jac.T


def _safe_inverse(m: np.ndarray) -> Optional[np.ndarray]:
    try:
        inv = np.linalg.inv(m)
    except np.linalg.LinAlgError:
        return None
    return inv if np.isfinite(inv).all() else None


# ------------------------------------------------------------------------------ estimators

def _usac_params(threshold: float, cfg: VerificationConfig) -> Any:
    import cv2

    p = cv2.UsacParams()
    p.threshold = float(threshold)
    p.confidence = float(cfg.ransac_confidence)
    p.maxIterations = int(cfg.max_iterations)
    p.score = cv2.SCORE_METHOD_MAGSAC
    p.loMethod = cv2.LOCAL_OPTIM_SIGMA
    p.loIterations = 10
    p.loSampleSize = 14
    p.sampler = cv2.SAMPLING_UNIFORM
    p.final_polisher = cv2.MAGSAC
    p.final_polisher_iterations = 10
    p.randomGeneratorState = 0
    return p


def _poselib_ransac(cfg: VerificationConfig, **errors: float) -> dict[str, Any]:
    return {"max_iterations": int(cfg.max_iterations),
            "min_iterations": min(int(cfg.min_iterations), int(cfg.max_iterations)),
            "success_prob": float(cfg.ransac_confidence), "seed": 0, **errors}


_UNIT_PINHOLE = {"model": "PINHOLE", "width": 2, "height": 2, "params": [1.0, 1.0, 0.0, 0.0]}


def estimate_essential(xq: np.ndarray, xm: np.ndarray, threshold: float,
                       cfg: VerificationConfig, final_refinement: bool = True
                       ) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Relative pose from normalised coordinates: (R, t unit, inlier mask) with
    X_match = R X_query + t, or None when no model was found. ``threshold``: normalised.
    ``final_refinement`` false: poselib returns its best (locally optimised) RANSAC model
    without refining it on all its inliers (the verifier refines only the poses that pass its
    cheaper tests, :func:`refine_essential`)."""
    if len(xq) < 5:
        return None
    if cfg.estimator == "poselib":
        import poselib

        pose, info = poselib.estimate_relative_pose(
            xq, xm, _UNIT_PINHOLE, _UNIT_PINHOLE,
            _poselib_ransac(cfg, max_epipolar_error=float(threshold)),
            {"loss_scale": 0.5 * float(threshold),
             "max_iterations": 25 if final_refinement else 0})
        mask = np.asarray(info.get("inliers", []), dtype=bool)
        if mask.shape != (len(xq),) or not mask.any():
            return None
        return pose.R, np.asarray(pose.t, dtype=np.float64).reshape(3), mask
    import cv2

    e, mask = cv2.findEssentialMat(xq, xm, np.eye(3), method=cv2.USAC_MAGSAC,
                                   prob=cfg.ransac_confidence, threshold=float(threshold),
                                   maxIters=cfg.max_iterations)
    if e is None or mask is None or e.shape != (3, 3):
        return None
    mask = mask.reshape(-1).astype(bool)
    _, r, t, _ = cv2.recoverPose(e, xq, xm, np.eye(3), mask=mask.astype(np.uint8).copy())
    return r, t.reshape(3), mask


def refine_essential(xq: np.ndarray, xm: np.ndarray, r: np.ndarray, t: np.ndarray,
                     threshold: float, rounds: int = 3
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R, t unit, inlier mask) after a final local optimisation of a RANSAC relative pose:
    the correspondences within ``threshold`` (Sampson, normalised) of the given pose are
    re-selected, the pose is refined on them (poselib's non-linear refinement, Cauchy loss),
    and the inliers are selected again on the refined pose.

    Repeated (at most ``rounds`` times) until the inlier set no longer changes.

    Why: a refinement on the inlier set of whichever minimal model RANSAC scored best depends
    on the sampling path (on EuRoC the median translation-direction error varied 2.1-2.7 deg
    with the random seed alone). Re-selecting the inliers on the refined pose removes most of
    that dependence and made the poses more accurate (median rotation 0.12-0.13 instead of
    0.14-0.16 deg, direction 1.8-1.9 instead of 2.1-2.7 deg over five seeds), also with
    RANSAC stopped after 20 iterations instead of 100 (docs/verification.md)."""
    import poselib

    pose = poselib.CameraPose()
    pose.R, pose.t = r, t
    mask = sampson(skew(t) @ r, xq, xm) < threshold
    for _ in range(rounds):
        if int(mask.sum()) < 5:
            break
        pose, _ = poselib.refine_relative_pose(
            xq[mask], xm[mask], pose, _UNIT_PINHOLE, _UNIT_PINHOLE,
            {"loss_scale": 0.5 * float(threshold), "max_iterations": 25})
        r, t = np.asarray(pose.R), np.asarray(pose.t, dtype=np.float64).reshape(3)
        t = t / np.linalg.norm(t)
        again = sampson(skew(t) @ r, xq, xm) < threshold
        if (again == mask).all():
            break
        mask = again
    return r, t, mask


def estimate_fundamental(uq: np.ndarray, um: np.ndarray, threshold_px: float,
                         cfg: VerificationConfig) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(F, inlier mask) from pixel coordinates (x_m^T F x_q = 0), or None."""
    if len(uq) < 8:
        return None
    if cfg.estimator == "poselib":
        import poselib

        f, info = poselib.estimate_fundamental(
            uq, um, _poselib_ransac(cfg, max_epipolar_error=float(threshold_px)),
            {"loss_scale": 0.5 * float(threshold_px)})
        mask = np.asarray(info.get("inliers", []), dtype=bool)
        if mask.shape != (len(uq),) or not mask.any():
            return None
        return np.asarray(f), mask
    import cv2

    f, mask = cv2.findFundamentalMat(uq, um, cv2.USAC_MAGSAC, float(threshold_px),
                                     cfg.ransac_confidence, cfg.max_iterations)
    if f is None or mask is None or f.shape != (3, 3):
        return None
    return f, mask.reshape(-1).astype(bool)


def estimate_pnp(xq: np.ndarray, points: np.ndarray, threshold: float,
                 cfg: VerificationConfig) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(R, t, inlier mask) with X_query = R X_match + t from normalised query coordinates and
    3-D points in the match camera frame, refined on the inliers; or None."""
    if len(xq) < 4:
        return None
    if cfg.estimator == "poselib":
        import poselib

        pose, info = poselib.estimate_absolute_pose(
            xq, points, _UNIT_PINHOLE, _poselib_ransac(cfg, max_reproj_error=float(threshold)),
            {"loss_scale": 0.5 * float(threshold), "max_iterations": 50})
        mask = np.asarray(info.get("inliers", []), dtype=bool)
        if mask.shape != (len(xq),) or mask.sum() < 4:
            return None
        return pose.R, np.asarray(pose.t, dtype=np.float64).reshape(3), mask
    import cv2

    ok, _, rvec, tvec, inl = cv2.solvePnPRansac(
        points.reshape(-1, 1, 3), xq.reshape(-1, 1, 2), np.eye(3), None,
        params=_usac_params(threshold, cfg))
    if not ok or inl is None or len(inl) < 4:
        return None
    mask = np.zeros(len(xq), bool)
    mask[np.asarray(inl).reshape(-1)] = True
    # MAGSAC++ scores by marginalising over noise scales, so its inlier set can be smaller
    # than the threshold's: refine, take every point within the threshold, refine again.
    for _ in range(2):
        rvec, tvec = cv2.solvePnPRefineLM(points[mask].reshape(-1, 1, 3),
                                          xq[mask].reshape(-1, 1, 2), np.eye(3), None, rvec,
                                          tvec)
        res = reprojection(rotvec_to_matrix(rvec), np.asarray(tvec).reshape(3), points, xq)
        mask = np.linalg.norm(res, axis=1) < threshold
        if mask.sum() < 4:
            return None
    return rotvec_to_matrix(rvec), np.asarray(tvec, dtype=np.float64).reshape(3), mask


# ------------------------------------------------------------------------------ residuals

def reprojection(r: np.ndarray, t: np.ndarray, points: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """(n, 2) residuals of normalised query coordinates against points projected with
    X_query = R X + t; rows with the point behind the camera are +inf."""
    pc = points @ r.T + t
    z = pc[:, 2:3]
    with np.errstate(divide="ignore", invalid="ignore"):
        res = pc[:, :2] / z - xq
    res[(z[:, 0] <= 1e-9)] = np.inf
    return res


def triangulated_depths(r: np.ndarray, t: np.ndarray, xq: np.ndarray, xm: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Depths of each correspondence in the query and the match camera (X_m = R X_q + t),
    by the midpoint of the two rays."""
    dq = np.column_stack([xq, np.ones(len(xq))])
    dm = np.column_stack([xm, np.ones(len(xm))])
    a = dq @ r.T                      # query rays in the match frame
    # solve s * a - u * dm = -t in least squares per point
    aa = np.sum(a * a, 1)
    bb = np.sum(dm * dm, 1)
    ab = np.sum(a * dm, 1)
    at = a @ t
    bt = dm @ t
    den = aa * bb - ab * ab
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (ab * bt - bb * at) / den
        u = (aa * bt - ab * at) / den
    return s, u


# ------------------------------------------------------------------------------ covariances

def _pnp_covariance(r: np.ndarray, t: np.ndarray, points: np.ndarray, xq: np.ndarray,
                    focal: float, floor_px: float = 0.0, scale: float = 1.0
                    ) -> Optional[np.ndarray]:
    """Covariance over [x, y, z, rx, ry, rz] of the query camera in the match frame, from the
    inliers' reprojection residuals (pixels) of the PnP pose."""
    n = len(points)
    if n < 4:
        return None
    r_inv = r.T

    def residuals(p: np.ndarray) -> np.ndarray:
        # p: perturbation of the query pose in the match frame (dt, dtheta)
        r_mq = rotvec_to_matrix(p[3:]) @ r_inv
        t_mq = -r_inv @ t + p[:3]
        r_qm = r_mq.T
        t_qm = -r_qm @ t_mq
        return (reprojection(r_qm, t_qm, points, xq) * focal).reshape(-1)

    base = residuals(np.zeros(6))
    if not np.isfinite(base).all():
        return None
    eps = 1e-6
    jac = np.stack([(residuals(d) - residuals(-d)) / (2 * eps)
                    for d in np.eye(6) * eps], 1)
    dof = max(1, 2 * n - 6)
    sigma2 = max(float(base @ base) / dof, floor_px ** 2, 1e-4)
    inv = _safe_inverse(jac.T @ jac)
    return None if inv is None else scale * sigma2 * inv


def _essential_covariance(r: np.ndarray, t: np.ndarray, xq: np.ndarray, xm: np.ndarray,
                          focal: float, floor_px: float = 0.0, scale: float = 1.0
                          ) -> Optional[np.ndarray]:
    """Covariance over [x, y, z, rx, ry, rz] of the relative pose from the inliers' Sampson
    residuals (pixels); the translation is a unit direction, its variance along itself is
    :data:`UNKNOWN_SCALE_VARIANCE`."""
    n = len(xq)
    if n < 6:
        return None
    t = t / np.linalg.norm(t)
    helper = np.array([1.0, 0, 0]) if abs(t[0]) < 0.9 else np.array([0, 1.0, 0])
    b1 = np.cross(t, helper)
    b1 /= np.linalg.norm(b1)
    b2 = np.cross(t, b1)

    def pose(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rr = rotvec_to_matrix(p[:3]) @ r
        tt = t + p[3] * b1 + p[4] * b2
        return rr, tt / np.linalg.norm(tt)

    def residuals(p: np.ndarray) -> np.ndarray:
        rr, tt = pose(p)
        return sampson(skew(tt) @ rr, xq, xm) * focal

    base = residuals(np.zeros(5))
    eps = 1e-6
    # Sampson distance is an absolute value: differentiate the signed algebraic residual scaled
    # the same way instead, which has the same magnitude and a smooth derivative.

    def signed(p: np.ndarray) -> np.ndarray:
        rr, tt = pose(p)
        e = skew(tt) @ rr
        h1 = np.column_stack([xq, np.ones(n)])
        h2 = np.column_stack([xm, np.ones(n)])
        ex1 = h1 @ e.T
        etx2 = h2 @ e
        num = np.sum(h2 * ex1, axis=1)
        den = np.sqrt(ex1[:, 0] ** 2 + ex1[:, 1] ** 2 + etx2[:, 0] ** 2 + etx2[:, 1] ** 2)
        return num / np.maximum(den, 1e-300) * focal

    jac = np.stack([(signed(d) - signed(-d)) / (2 * eps) for d in np.eye(5) * eps], 1)
    dof = max(1, n - 5)
    sigma2 = max(float(base @ base) / dof, floor_px ** 2, 1e-4)
    inv = _safe_inverse(jac.T @ jac)
    if inv is None:
        return None
    cov5 = scale * sigma2 * inv
    basis = np.column_stack([b1, b2])
    cov = np.zeros((6, 6))
    cov[:3, :3] = basis @ cov5[3:, 3:] @ basis.T + UNKNOWN_SCALE_VARIANCE * np.outer(t, t)
    cov[3:, 3:] = cov5[:3, :3]
    cov[:3, 3:] = basis @ cov5[3:, :3]
    cov[3:, :3] = cov[:3, 3:].T
    return cov


# ------------------------------------------------------------------------------ the verifier

class GeometricVerifier:
    """Verifies candidates against a query; pure Python + OpenCV/poselib, no ROS."""

    def __init__(self, config: Optional[VerificationConfig] = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.config = config if config is not None else VerificationConfig()
        self.clock = clock

    # -- one pair -------------------------------------------------------------------------------

    def verify_pair(self, query: View, match: View, keyframe_id: int = -1,
                    query_normalized: Optional[np.ndarray] = None) -> Verification:
        """The verdict on one candidate. ``query_normalized``: the query keypoints' normalised
        coordinates when already computed (they are shared by every candidate of a frame)."""
        cfg = self.config
        t0 = self.clock()
        pairs = match_features(query.features, match.features, cfg.ratio, cfg.mutual)
        t1 = self.clock()
        n = len(pairs)
        if n < cfg.min_matches:
            return Verification(keyframe_id, False, f"too few matches ({n} < "
                                f"{cfg.min_matches})", "", n, match_s=t1 - t0)
        try:
            result = self._estimate(query, match, pairs, keyframe_id, query_normalized)
        except Exception as exc:  # an estimator failing on degenerate data is a rejection
            result = Verification(keyframe_id, False, f"estimation failed ({type(exc).__name__}"
                                  f": {exc})", "", n)
        t2 = self.clock()
        return _with_times(result, t1 - t0, t2 - t1)

    def _estimate(self, query: View, match: View, pairs: np.ndarray, kf: int,
                  query_normalized: Optional[np.ndarray]) -> Verification:
        cfg = self.config
        n = len(pairs)
        qi, mi = pairs[:, 0], pairs[:, 1]
        qcam, mcam = query.camera, match.camera
        if qcam is not None:
            xq_all = query_normalized if query_normalized is not None \
                else qcam.normalize(query.features.xy)
            xq = xq_all[qi]
            focal_q = qcam.focal
        # 1. PnP where the keyframe has 3-D points
        if qcam is not None and match.features.xyz is not None:
            pts = match.features.xyz[mi].astype(np.float64)
            has = np.isfinite(pts).all(1) & (pts[:, 2] > 0)
            if int(has.sum()) >= cfg.min_pnp_points:
                # Where the keyframe's matches have depth, PnP decides: a candidate it
                # rejects is not given a second chance by the essential matrix, which cannot
                # tell a revisit from the same facades seen from far down the street (on the
                # demo route such pairs 6-11 m apart passed it; PnP measures the distance).
                return self._pnp(kf, n, xq[has], pts[has], focal_q, int(has.sum()))
            # too few matches with depth (sparse or far depth): the 2-D geometry decides
        if qcam is not None and mcam is not None:
            xm = mcam.normalize(match.features.xy[mi])
            return self._essential(kf, n, xq, xm, 0.5 * (focal_q + mcam.focal))
        return self._fundamental(kf, n, query.features.xy[qi].astype(np.float64),
                                 match.features.xy[mi].astype(np.float64))

    def _reject(self, kf: int, method: str, n: int, inliers: int, error: float, why: str,
                pose: Optional[RelativePose] = None) -> Verification:
        return Verification(kf, False, why, method, n, inliers, inliers / max(n, 1), error, pose)

    def _judge(self, kf: int, method: str, n: int, inliers: int, error: float,
               pose: Optional[RelativePose], extra: str = "") -> Verification:
        cfg = self.config
        ratio = inliers / max(n, 1)
        need = cfg.min_inliers if method == PNP else cfg.min_inliers_epipolar
        if inliers < need:
            why = f"too few inliers ({inliers} < {need})"
        elif ratio < cfg.min_inlier_ratio:
            why = f"inlier ratio {ratio:.2f} < {cfg.min_inlier_ratio}"
        elif not error <= cfg.max_error_px:
            why = f"median error {error:.2f} px > {cfg.max_error_px}"
        else:
            why = extra
        return Verification(kf, not why, why, method, n, inliers, ratio, error, pose)

    def _pnp(self, kf: int, n: int, xq: np.ndarray, pts: np.ndarray, focal: float,
             with_points: int) -> Verification:
        cfg = self.config
        est = estimate_pnp(xq, pts, cfg.pnp_threshold_px / focal, cfg)
        if est is None:
            return self._reject(kf, PNP, n, 0, math.nan, "PnP found no pose")
        r, t, mask = est
        res = reprojection(r, t, pts[mask], xq[mask]) * focal
        err = float(np.median(np.linalg.norm(res, axis=1)))
        inliers = int(mask.sum())
        r_mq = r.T
        t_mq = -r.T @ t
        extra = ""
        angle = rotation_angle_deg(r_mq)
        front = float((((pts[mask] @ r.T) + t)[:, 2] > 0).mean())
        if angle > cfg.max_rotation_deg:
            extra = f"implausible rotation {angle:.0f} deg > {cfg.max_rotation_deg:g}"
        elif float(np.linalg.norm(t_mq)) > cfg.max_translation_m:
            extra = (f"implausible translation {float(np.linalg.norm(t_mq)):.1f} m > "
                     f"{cfg.max_translation_m:g}")
        elif front < cfg.min_cheirality:
            extra = f"only {100 * front:.0f}% of inliers in front of the camera"
        # The inlier ratio of PnP is over the matches that had a 3-D point.
        v = self._judge(kf, PNP, with_points, inliers, err, None, extra)
        if v.verified:  # the covariance only for a pose that passed every cheaper test
            cov = _pnp_covariance(r, t, pts[mask], xq[mask], focal, cfg.pixel_sigma_floor_px,
                                  cfg.covariance_scale)
            if cov is None:
                v = self._judge(kf, PNP, with_points, inliers, err, None,
                                "degenerate PnP geometry (no covariance)")
            else:
                v = self._judge(kf, PNP, with_points, inliers, err, RelativePose(
                    matrix_to_quat(r_mq), tuple(float(x) for x in t_mq),  # type: ignore
                    True, tuple(float(x) for x in cov.reshape(-1))))
        return Verification(v.keyframe_id, v.verified, v.reason, v.method, n, v.inliers,
                            v.inlier_ratio, v.error_px, v.pose)

    def _essential(self, kf: int, n: int, xq: np.ndarray, xm: np.ndarray,
                   focal: float) -> Verification:
        cfg = self.config
        threshold = cfg.ransac_threshold_px / focal
        # poselib: RANSAC's model is judged first, refined (refine_essential) only if it passes
        est = estimate_essential(xq, xm, threshold, cfg, final_refinement=False)
        if est is None:
            return self._reject(kf, ESSENTIAL, n, 0, math.nan, "no essential matrix found")
        r, t, mask = est
        v = self._essential_verdict(kf, n, xq, xm, focal, r, t, mask)
        if not v.verified:  # rejected on RANSAC's pose: no refinement, no covariance
            return v
        if cfg.estimator == "poselib":
            r, t, mask = refine_essential(xq, xm, r, t, threshold)
            v = self._essential_verdict(kf, n, xq, xm, focal, r, t, mask)
            if not v.verified:
                return v
        # the covariance only for a pose that passed every cheaper test
        cov = _essential_covariance(r, t, xq[mask], xm[mask], focal, cfg.pixel_sigma_floor_px,
                                    cfg.covariance_scale)
        if cov is None:
            return self._judge(kf, ESSENTIAL, n, v.inliers, v.error_px, None,
                               "degenerate epipolar geometry (no covariance)")
        return self._judge(kf, ESSENTIAL, n, v.inliers, v.error_px, RelativePose(
            matrix_to_quat(r), tuple(float(x) for x in t / np.linalg.norm(t)),  # type: ignore
            False, tuple(float(x) for x in cov.reshape(-1))))

    def _essential_verdict(self, kf: int, n: int, xq: np.ndarray, xm: np.ndarray,
                           focal: float, r: np.ndarray, t: np.ndarray,
                           mask: np.ndarray) -> Verification:
        """The verdict on a relative pose without its covariance (inliers, ratio, error,
        rotation, cheirality)."""
        cfg = self.config
        inliers = int(mask.sum())
        if not inliers:
            return self._reject(kf, ESSENTIAL, n, 0, math.nan, "no essential matrix found")
        e = skew(t) @ r
        err = float(np.median(sampson(e, xq[mask], xm[mask]))) * focal
        dq, dm = triangulated_depths(r, t, xq[mask], xm[mask])
        front = float(((dq > 0) & (dm > 0)).mean())
        angle = rotation_angle_deg(r)
        extra = ""
        if angle > cfg.max_rotation_deg:
            extra = f"implausible rotation {angle:.0f} deg > {cfg.max_rotation_deg:g}"
        elif front < cfg.min_cheirality:
            extra = f"only {100 * front:.0f}% of inliers in front of both cameras"
        return self._judge(kf, ESSENTIAL, n, inliers, err, None, extra)

    def _fundamental(self, kf: int, n: int, uq: np.ndarray, um: np.ndarray) -> Verification:
        cfg = self.config
        est = estimate_fundamental(uq, um, cfg.ransac_threshold_px, cfg)
        if est is None:
            return self._reject(kf, FUNDAMENTAL, n, 0, math.nan, "no fundamental matrix found")
        f, mask = est
        err = float(np.median(sampson(f, uq[mask], um[mask])))
        return self._judge(kf, FUNDAMENTAL, n, int(mask.sum()), err, None)

    # -- a frame --------------------------------------------------------------------------------

    def verify(self, query: View, candidates: Sequence[tuple[int, Optional[View]]],
               started: Optional[float] = None) -> VerificationRound:
        """Verify ``(keyframe id, view)`` candidates in the given (rank) order until the first
        verified one, at most ``max_candidates``, within ``time_budget_ms`` counted from
        ``started`` (default: now). A candidate without a view (no keypoints stored) is
        rejected with that reason."""
        cfg = self.config
        start = self.clock() if started is None else started
        budget = cfg.time_budget_ms / 1000.0
        out = VerificationRound()
        xq_all = None
        if query.camera is not None and len(query.features):
            xq_all = query.camera.normalize(query.features.xy)
        todo = list(candidates)[: cfg.max_candidates]
        for i, (kf, view) in enumerate(todo):
            if self.clock() - start > budget:
                out.over_budget = len(todo) - i
                break
            if view is None:
                out.results.append(Verification(kf, False, "the keyframe has no keypoints", ""))
                continue
            v = self.verify_pair(query, view, kf, xq_all)
            out.results.append(v)
            out.match_s += v.match_s
            out.estimate_s += v.estimate_s
            if v.verified:
                out.accepted = v
                break
        return out


def _with_times(v: Verification, match_s: float, estimate_s: float) -> Verification:
    return Verification(v.keyframe_id, v.verified, v.reason, v.method, v.matches, v.inliers,
                        v.inlier_ratio, v.error_px, v.pose, match_s, estimate_s)


class FrameVerifier:
    """One frame's verification as the decision stages call it: ``verifier(hypothesis)`` ->
    the :class:`Verification` when that keyframe is verified, else None.

    The loop-closure detector and the relocalizer try their surviving hypotheses best first and
    accept the first one verified; this object keeps the frame's rules while they do: at most
    ``max_candidates`` keyframes are verified, none once ``time_budget_ms`` (from ``started``)
    is spent (counted in ``round.over_budget``), and a keyframe asked about twice is answered
    from the first verdict. ``view_of(keyframe id)`` gives the keyframe's stored keypoints and
    camera (None when the map has none for it). Every verdict is kept in ``round``, for
    diagnostics and the verified-versus-rejected record."""

    def __init__(self, verifier: GeometricVerifier, query: View,
                 view_of: Callable[[int], Optional[View]],
                 started: Optional[float] = None) -> None:
        self.verifier = verifier
        self.query = query
        self.view_of = view_of
        self.started = verifier.clock() if started is None else started
        self.round = VerificationRound()
        self._seen: dict[int, Verification] = {}
        self._xq: Optional[np.ndarray] = None
        if query.camera is not None and len(query.features):
            self._xq = query.camera.normalize(query.features.xy)

    def __call__(self, hypothesis: Any) -> Optional[Verification]:
        kf = int(getattr(hypothesis, "id", hypothesis))
        known = self._seen.get(kf)
        if known is not None:
            return known if known.verified else None
        cfg = self.verifier.config
        if len(self._seen) >= cfg.max_candidates:
            return None
        if self.verifier.clock() - self.started > cfg.time_budget_ms / 1000.0:
            self.round.over_budget += 1
            return None
        view = self.view_of(kf)
        if view is None:
            v = Verification(kf, False, "the keyframe has no keypoints", "")
        else:
            v = self.verifier.verify_pair(self.query, view, kf, self._xq)
        self._seen[kf] = v
        self.round.results.append(v)
        self.round.match_s += v.match_s
        self.round.estimate_s += v.estimate_s
        if v.verified and self.round.accepted is None:
            self.round.accepted = v
        return v if v.verified else None
