"""The verifier's logic on scenes with known geometry: which model it fits (PnP, essential,
fundamental), what it accepts and rejects and why, that its covariance matches the spread of
its errors when the noise is known, that it stops at the first verified candidate and keeps
to its time budget, and that its parameters are declared and checked."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.errors import ConfigError, InputError
from vpr_ros.localization import verification as V
from vpr_ros.localization.verification import (GeometricVerifier, VerificationConfig, View,
                                               match_features)
from vpr_ros.mapdb.camera import CameraModel
from vpr_ros.mapdb.transforms import matrix_to_rotvec, rotvec_to_matrix
from vpr_ros.runtime.local_features import LocalFeatures

CAM = CameraModel("cam", 640, 480, (500.0, 0, 320.0, 0, 500.0, 240.0, 0, 0, 1), "plumb_bob",
                  (-0.2, 0.05, 0.001, -0.001, 0.0))
R_TRUE = rotvec_to_matrix(np.array([0.03, -0.2, 0.01]))
T_TRUE = np.array([0.6, 0.05, -0.3])  # query camera in the keyframe camera frame: X_m = R X_q + t


def scene(n: int = 300, outliers: int = 100, noise_px: float = 0.5, seed: int = 0):
    """Keyframe view with 3-D points and a query view of the same points, SIFT-like
    descriptors shared by corresponding keypoints, plus unrelated keypoints in both."""
    rng = np.random.default_rng(seed)
    xm = np.column_stack([rng.uniform(-3, 3, n), rng.uniform(-2, 2, n), rng.uniform(3, 12, n)])
    xq = (xm - T_TRUE) @ R_TRUE  # R^T (X_m - t)
    keep = (xq[:, 2] > 0.5)
    xm, xq = xm[keep], xq[keep]
    um = CAM.project(xm) + rng.normal(0, noise_px, (len(xm), 2))
    uq = CAM.project(xq) + rng.normal(0, noise_px, (len(xq), 2))
    wrong = rng.random(len(uq)) < 0.15  # matched descriptors at the wrong place: outliers
    uq[wrong] = rng.uniform([0, 0], [640, 480], (int(wrong.sum()), 2))
    inside = (uq[:, 0] > 0) & (uq[:, 0] < 640) & (uq[:, 1] > 0) & (uq[:, 1] < 480) & \
        (um[:, 0] > 0) & (um[:, 0] < 640) & (um[:, 1] > 0) & (um[:, 1] < 480)
    xm, um, uq = xm[inside], um[inside], uq[inside]
    k = len(um)
    desc = rng.integers(0, 200, (k, 128))
    dq = np.clip(desc + rng.integers(-3, 4, desc.shape), 0, 255)
    extra_m = rng.uniform([0, 0], [640, 480], (outliers, 2))
    extra_q = rng.uniform([0, 0], [640, 480], (outliers, 2))
    m = LocalFeatures("sift", np.vstack([um, extra_m]),
                      np.vstack([desc, rng.integers(0, 200, (outliers, 128))]),
                      np.vstack([xm, np.full((outliers, 3), np.nan)]))
    q = LocalFeatures("sift", np.vstack([uq, extra_q]),
                      np.vstack([dq, rng.integers(0, 200, (outliers, 128))]))
    return q, m


def test_matching_keeps_true_pairs_and_drops_ambiguous_ones() -> None:
    q, m = scene(outliers=0)
    pairs = match_features(q, m)
    assert len(pairs) >= 0.95 * len(q) and (pairs[:, 0] == pairs[:, 1]).all()
    assert len(match_features(q, m, mutual=False)) >= len(pairs)
    # a keyframe with every descriptor twice: nothing passes the ratio test
    twice = LocalFeatures("sift", np.vstack([m.xy, m.xy]), np.vstack([m.descriptors] * 2))
    assert len(match_features(q, twice)) == 0
    with pytest.raises(InputError, match="extract the kind the map stores"):
        match_features(q, LocalFeatures.empty("orb"))


def test_matching_equals_an_exact_brute_force_reference() -> None:
    """The one-product matcher (float32 augmented operands, arg-min passes) must give exactly
    the pairs of an exact int64 distance matrix, also for descriptors at the uint8 extremes
    (where float32 exactness is tightest) and with the query reused across keyframes."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (400, 128))
    base[390:] = base[:10]  # identical query descriptors: exact ties at column minima
    q = LocalFeatures("sift", rng.uniform(0, 640, (400, 2)), base)
    extremes = np.full((4, 128), 255)
    extremes[1] = 0
    for seed in range(3):
        r = np.random.default_rng(seed + 10)
        desc = np.clip(base[r.permutation(400)[:350]] + r.integers(-40, 41, (350, 128)), 0, 255)
        m = LocalFeatures("sift", r.uniform(0, 640, (354, 2)), np.vstack([desc, extremes]))
        d = (q.descriptors.astype(np.int64)[:, None, :]
             - m.descriptors.astype(np.int64)[None, :, :]) ** 2
        d = d.sum(2)
        order = np.argsort(d, axis=1, kind="stable")
        d1 = np.take_along_axis(d, order[:, :1], 1)[:, 0]
        d2 = np.take_along_axis(d, order[:, 1:2], 1)[:, 0]
        back = d.argmin(axis=0)
        assert (back[order[390:, 0]] < 10).any()  # a tie the first query row wins
        for ratio, mutual in ((0.8, True), (0.9, False)):
            keep = d1 < ratio * ratio * d2
            qi, mi = np.flatnonzero(keep), order[keep, 0]
            if mutual:
                ok = back[mi] == qi
                qi, mi = qi[ok], mi[ok]
            got = match_features(q, m, ratio, mutual)
            assert len(qi) > 50
            np.testing.assert_array_equal(got, np.column_stack([qi, mi]))


@pytest.mark.parametrize("estimator", ["poselib", "opencv"])
def test_pnp_with_points_gives_the_metric_pose(estimator: str) -> None:
    q, m = scene()
    r = GeometricVerifier(VerificationConfig(estimator=estimator)).verify_pair(
        View(q, CAM), View(m, CAM), keyframe_id=7)
    assert r.verified and r.method == "pnp" and r.pose.metric and r.keyframe_id == 7
    assert np.linalg.norm(np.asarray(r.pose.translation) - T_TRUE) < 0.05
    assert np.degrees(np.linalg.norm(matrix_to_rotvec(r.pose.rotation_matrix @ R_TRUE.T))) < 0.3
    assert r.error_px < 1.0 and r.inliers > 150 and r.match_s > 0 and r.estimate_s > 0


@pytest.mark.parametrize("estimator", ["poselib", "opencv"])
def test_without_points_the_essential_matrix_gives_rotation_and_direction(estimator) -> None:
    q, m = scene()
    m = LocalFeatures("sift", m.xy, m.descriptors)  # no depth
    r = GeometricVerifier(VerificationConfig(estimator=estimator)).verify_pair(
        View(q, CAM), View(m, CAM))
    assert r.verified and r.method == "essential" and not r.pose.metric
    t = np.asarray(r.pose.translation)
    assert np.linalg.norm(t) == pytest.approx(1.0)
    # OpenCV's recoverPose has no final refinement: less accurate (why poselib is default)
    bound = 3.0 if estimator == "poselib" else 12.0
    assert np.degrees(np.arccos(t @ T_TRUE / np.linalg.norm(T_TRUE))) < bound
    cov = np.asarray(r.pose.covariance).reshape(6, 6)
    # the scale is unknown: unconstrained along the direction
    assert t @ cov[:3, :3] @ t == pytest.approx(V.UNKNOWN_SCALE_VARIANCE, rel=1e-3)


def test_the_final_refinement_converges_and_beats_ransacs_pose() -> None:
    """The verifier refines a passing relative pose on inliers re-selected on the refined pose
    (RANSAC's pose depends on its sampling path); over noisy scenes the refined direction is
    closer to the truth, and its inlier set is a fixed point of the re-selection."""
    raw, refined = [], []
    for seed in range(5):
        q, m = scene(outliers=50, noise_px=1.0, seed=200 + seed)
        pairs = match_features(q, m)
        xq, xm = CAM.normalize(q.xy[pairs[:, 0]]), CAM.normalize(m.xy[pairs[:, 1]])
        thr = 1.5 / CAM.focal
        r, t, _ = V.estimate_essential(xq, xm, thr, VerificationConfig(),
                                       final_refinement=False)
        r2, t2, mask = V.refine_essential(xq, xm, r, t, thr)
        again = V.sampson(V.skew(t2) @ r2, xq, xm) < thr
        assert (again == mask).all() and mask.sum() > 150
        raw.append(np.degrees(np.arccos(t @ T_TRUE / np.linalg.norm(t) / np.linalg.norm(T_TRUE))))
        refined.append(np.degrees(np.arccos(t2 @ T_TRUE / np.linalg.norm(T_TRUE))))
    assert np.mean(refined) < 0.8 * np.mean(raw), (raw, refined)


def test_a_rejected_candidate_carries_no_pose() -> None:
    """The covariance (the costliest part of a verdict on many inliers) is computed only for
    a pose that passed every other test."""
    q, m = scene()
    r = GeometricVerifier(VerificationConfig(max_rotation_deg=5.0)).verify_pair(
        View(q, CAM), View(LocalFeatures("sift", m.xy, m.descriptors), CAM))
    assert not r.verified and "implausible rotation" in r.reason and r.pose is None
    assert r.inliers > 150


def test_an_uncalibrated_camera_gets_a_fundamental_matrix_and_no_pose() -> None:
    q, m = scene()
    r = GeometricVerifier().verify_pair(View(q, None), View(m, CAM))
    assert r.verified and r.method == "fundamental" and r.pose is None


def test_unrelated_images_are_rejected_with_the_reason() -> None:
    q, _ = scene(seed=1)
    _, m = scene(seed=2)
    r = GeometricVerifier().verify_pair(View(q, CAM), View(m, CAM))
    assert not r.verified and "too few matches" in r.reason


def test_each_verdict_rule_rejects_on_its_own() -> None:
    q, m = scene()
    base = dict(estimator="poselib")
    cases = [(dict(min_inliers=100000, min_inliers_epipolar=100000), "too few inliers"),
             (dict(min_inlier_ratio=0.999), "inlier ratio"),
             (dict(max_error_px=0.01), "median error"),
             (dict(max_rotation_deg=5.0), "implausible rotation"),
             (dict(max_translation_m=0.2), "implausible translation")]
    for changes, why in cases:
        r = GeometricVerifier(VerificationConfig(**base, **changes)).verify_pair(
            View(q, CAM), View(m, CAM))
        assert not r.verified and why in r.reason, (changes, r.reason)


def _monte_carlo(method: str, trials: int = 40) -> float:
    """Median over trials of sqrt(e^T C^-1 e / 6) (rotation part only, /3, for the essential
    matrix) with the covariance uninflated: ~0.9 when the covariance is right."""
    cfg = VerificationConfig(covariance_scale=1.0, pixel_sigma_floor_px=0.0)
    z = []
    for s in range(trials):
        q, m = scene(outliers=20, noise_px=0.7, seed=100 + s)
        if method == "essential":
            m = LocalFeatures("sift", m.xy, m.descriptors)
        r = GeometricVerifier(cfg).verify_pair(View(q, CAM), View(m, CAM))
        assert r.verified and r.method == method
        cov = np.asarray(r.pose.covariance).reshape(6, 6)
        rot = matrix_to_rotvec(r.pose.rotation_matrix @ R_TRUE.T)
        if method == "pnp":
            e = np.concatenate([np.asarray(r.pose.translation) - T_TRUE, rot])
            z.append(np.sqrt(e @ np.linalg.solve(cov, e) / 6))
        else:
            z.append(np.sqrt(rot @ np.linalg.solve(cov[3:, 3:], rot) / 3))
    return float(np.median(z))


@pytest.mark.parametrize("method", ["pnp", "essential"])
def test_covariance_matches_the_errors_when_the_noise_is_known(method: str) -> None:
    assert 0.6 < _monte_carlo(method) < 1.3


def test_verify_stops_at_the_first_verified_candidate_and_keeps_to_its_budget() -> None:
    q, m = scene()
    _, other = scene(seed=5)
    good, bad = View(m, CAM), View(other, CAM)
    v = GeometricVerifier()
    rnd = v.verify(View(q, CAM), [(1, bad), (2, None), (3, good), (4, good)])
    assert [r.keyframe_id for r in rnd.results] == [1, 2, 3]
    assert rnd.accepted is not None and rnd.accepted.keyframe_id == 3
    assert rnd.results[1].reason == "the keyframe has no keypoints"
    assert [r.keyframe_id for r in rnd.rejected] == [1, 2] and rnd.over_budget == 0
    # a clock that has used the whole budget before the second candidate
    # start, budget check, matching start and end (candidate 1 fails before estimation)
    ticks = iter([0.0] * 4 + [10.0] * 100)
    slow = GeometricVerifier(VerificationConfig(time_budget_ms=5.0), clock=lambda: next(ticks))
    rnd = slow.verify(View(q, CAM), [(1, bad), (3, good)])
    assert rnd.accepted is None and rnd.over_budget == 1 and len(rnd.results) == 1
    capped = GeometricVerifier(VerificationConfig(max_candidates=1))
    assert len(capped.verify(View(q, CAM), [(1, bad), (3, good)]).results) == 1


def test_parameters_are_declared_with_ranges_and_checked() -> None:
    specs = {s.name: s for s in VerificationConfig.parameter_specs()}
    assert specs["enabled"].default is True and specs["estimator"].default == "poselib"
    assert all(s.description for s in specs.values())
    assert specs["max_candidates"].low == 1
    with pytest.raises(ConfigError, match="estimator"):
        VerificationConfig(estimator="magic")
    with pytest.raises(ConfigError, match="ratio"):
        VerificationConfig(ratio=1.5)
    with pytest.raises(ConfigError, match="no parameter"):
        VerificationConfig.from_mapping({"min_inlier": 3})


def test_frame_verifier_is_the_decision_stages_seam() -> None:
    """The detector and the relocalizer call ``verifier(hypothesis)`` best first: verdicts are
    kept, a keyframe asked twice is not verified twice, and the frame's limits hold."""
    from types import SimpleNamespace

    from vpr_ros.localization.verification import FrameVerifier

    q, m = scene()
    _, other = scene(seed=5)
    views = {1: View(other, CAM), 3: View(m, CAM)}
    calls: list[int] = []

    def view_of(kf: int):
        calls.append(kf)
        return views.get(kf)

    fv = FrameVerifier(GeometricVerifier(), View(q, CAM), view_of)
    assert fv(SimpleNamespace(id=1)) is None
    assert fv(SimpleNamespace(id=2)) is None  # no keypoints stored
    got = fv(SimpleNamespace(id=3))
    assert got is not None and got.verified and got.keyframe_id == 3
    assert fv(SimpleNamespace(id=3)) is got and calls == [1, 2, 3]
    assert fv.round.accepted is got and [r.keyframe_id for r in fv.round.rejected] == [1, 2]
    capped = FrameVerifier(GeometricVerifier(VerificationConfig(max_candidates=1)),
                           View(q, CAM), view_of)
    assert capped(SimpleNamespace(id=1)) is None and capped(SimpleNamespace(id=3)) is None
    late = FrameVerifier(GeometricVerifier(VerificationConfig(time_budget_ms=1.0)),
                         View(q, CAM), view_of, started=-10.0)
    assert late(SimpleNamespace(id=3)) is None and late.round.over_budget == 1
