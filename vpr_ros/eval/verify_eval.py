"""``vpr eval recall --verify`` and ``vpr eval loop --verify``: the node's geometric verifier
replayed offline, so its effect is measured on the same data as retrieval and loop closure.

What "with verification" means, as in the node: the top ``max_candidates`` candidates of a query
are verified against the query image in rank order; for retrieval the decision is the first
verified candidate (its confidence: the inlier count), for loop closure the detector sees only
verified candidates. Without verification the decision is the top-1 candidate (confidence: its
cosine score). Both are summarised by the recall at 100 % precision: the share of queries
correctly decided at the strictest confidence threshold that accepts no wrong decision.

Image folders carry no calibration, so the verifier uses the fundamental matrix unless a camera
is given (``--camera``: a CameraInfo-like YAML/JSON with width, height, k, distortion_model, d);
with a camera and ground-truth orientations (sequence CSV columns qx, qy, qz, qw: the camera's
orientation in the world) the relative pose error of verified closures is reported too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.localization.verification import (GeometricVerifier, Verification,
                                               VerificationConfig, View)
from vpr_ros.mapdb.camera import CameraModel
from vpr_ros.mapdb.transforms import matrix_to_rotvec
from vpr_ros.runtime.local_features import FeatureExtractor, LocalFeatures


def load_camera(path: str | Path) -> CameraModel:
    """A camera from a YAML/JSON file with CameraInfo's fields (``width, height, k``, optional
    ``distortion_model, d, name``)."""
    from vpr_ros.models.config import load_yaml

    data = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping with width, height, k[, distortion_model,"
                         " d]")
    try:
        return CameraModel(str(data.get("name", "camera")), data["width"], data["height"],
                           tuple(data["k"]), str(data.get("distortion_model", "none")),
                           tuple(data.get("d", ())))
    except KeyError as exc:
        raise InputError(f"{path}: camera file lacks {exc}; give width, height and k") from exc


class ImageVerifier:
    """Verifies (query image, database image) pairs, extracting each image's keypoints once."""

    def __init__(self, config: Optional[VerificationConfig] = None,
                 camera: Optional[CameraModel] = None, kind: str = "sift",
                 max_features: int = 1000) -> None:
        self.config = config or VerificationConfig()
        self.verifier = GeometricVerifier(self.config)
        self.extractor = FeatureExtractor(kind, max_features)
        self.camera = camera
        self._cache: dict[Path, LocalFeatures] = {}
        self.seconds = {"extract": 0.0, "match": 0.0, "estimate": 0.0}
        self.pairs = 0

    def features(self, path: Path) -> LocalFeatures:
        import time

        import cv2

        feats = self._cache.get(path)
        if feats is None:
            img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise InputError(f"cannot read image {path}")
            if self.camera is not None and img.shape != (self.camera.height, self.camera.width):
                raise InputError(f"{path} is {img.shape[1]}x{img.shape[0]} but the camera is "
                                 f"{self.camera.width}x{self.camera.height}")
            t0 = time.perf_counter()
            feats = self.extractor.extract(img)
            self.seconds["extract"] += time.perf_counter() - t0
            self._cache[path] = feats
        return feats

    def verify(self, query: Path, match: Path, keyframe_id: int = -1) -> Verification:
        v = self.verifier.verify_pair(View(self.features(query), self.camera),
                                      View(self.features(match), self.camera), keyframe_id)
        self.seconds["match"] += v.match_s
        self.seconds["estimate"] += v.estimate_s
        self.pairs += 1
        return v


def recall_at_full_precision(confidence: np.ndarray, correct: np.ndarray,
                             total: int) -> float:
    """Share of ``total`` queries decided correctly at the lowest confidence threshold that
    accepts no wrong decision (``confidence`` NaN: no decision)."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    have = np.isfinite(conf)
    conf, ok = conf[have], ok[have]
    if not len(conf) or total <= 0:
        return 0.0
    wrong = conf[~ok]
    limit = wrong.max() if len(wrong) else -np.inf
    return float(np.sum(ok & (conf > limit)) / total)


def verify_ranking(q_paths: Sequence[Path], db_paths: Sequence[Path], ranked_ids: np.ndarray,
                   scores: np.ndarray, positives: Sequence[Any], verifier: ImageVerifier,
                   progress: bool = False) -> dict[str, Any]:
    """Recall at 100 % precision of retrieval without and with verification (see the module
    docstring), with the verdicts' counts and cost."""
    n = len(q_paths)
    top = verifier.config.max_candidates
    conf_without = np.asarray(scores, dtype=np.float64)[:, 0]
    ok_without = np.array([int(ranked_ids[i, 0]) in set(map(int, positives[i]))
                           for i in range(n)])
    conf_with = np.full(n, np.nan)
    ok_with = np.zeros(n, dtype=bool)
    verified = rejected = 0
    rows = range(n)
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc="verifying", unit="query")
    for i in rows:
        pos = set(map(int, positives[i]))
        for j in ranked_ids[i, :top]:
            if j < 0:
                continue
            v = verifier.verify(Path(q_paths[i]), Path(db_paths[int(j)]), int(j))
            if v.verified:
                verified += 1
                conf_with[i], ok_with[i] = v.inliers, int(j) in pos
                break
            rejected += 1
    return {
        "recall_at_100_precision": {
            "without": recall_at_full_precision(conf_without, ok_without, n),
            "with": recall_at_full_precision(conf_with, ok_with, n)},
        "decided": {"without": n, "with": int(np.isfinite(conf_with).sum())},
        "precision": {"without": float(ok_without.mean()) if n else None,
                      "with": float(ok_with[np.isfinite(conf_with)].mean())
                      if np.isfinite(conf_with).any() else None},
        "candidates_verified": verified, "candidates_rejected": rejected,
        **_cost(verifier)}


def _cost(verifier: ImageVerifier) -> dict[str, Any]:
    return {"verifier": {"estimator": verifier.config.estimator,
                         "keypoints": verifier.extractor.kind,
                         "calibrated": verifier.camera is not None,
                         "pairs": verifier.pairs,
                         "ms_per_pair": round(1e3 * (verifier.seconds["match"]
                                                     + verifier.seconds["estimate"])
                                              / max(1, verifier.pairs), 2),
                         "seconds": {k: round(v, 2) for k, v in verifier.seconds.items()}}}


def verified_search(search: Callable[[int, Any], tuple[Any, Any]], paths: Sequence[Path],
                    verifier: ImageVerifier, verdicts: dict[tuple[int, int], Verification]
                    ) -> Callable[[int, Any], tuple[Any, Any]]:
    """A loop-closure ``search(i, exclusion)`` whose results keep only the candidates the
    verifier confirms (the top ``max_candidates`` of each query are verified; every verdict
    is kept in ``verdicts`` by (query, candidate))."""
    top = verifier.config.max_candidates

    def wrapped(i: int, exclusion: Any) -> tuple[Any, Any]:
        ids, scores = search(i, exclusion)
        keep_ids, keep_scores = [], []
        for j, s in list(zip(np.asarray(ids).tolist(), np.asarray(scores).tolist()))[:top]:
            if not 0 <= j < i:
                continue
            v = verdicts.get((i, j))
            if v is None:
                v = verdicts[(i, j)] = verifier.verify(Path(paths[i]), Path(paths[j]), j)
            if v.verified:
                keep_ids.append(j)
                keep_scores.append(s)
        return np.asarray(keep_ids, dtype=np.int64), np.asarray(keep_scores, dtype=np.float64)

    return wrapped


def relative_pose_errors(verdicts: dict[tuple[int, int], Verification],
                         positions: np.ndarray, orientations: Optional[np.ndarray],
                         gt_distance_m: float) -> Optional[dict[str, Any]]:
    """Rotation and translation-direction (or metric translation) errors of verified pairs
    that are true revisits, from ground-truth camera poses (positions + orientations)."""
    if orientations is None:
        return None
    from vpr_ros.mapdb.transforms import quat_to_matrix

    rot, direction = [], []
    for (i, j), v in verdicts.items():
        if not v.verified or v.pose is None:
            continue
        if np.linalg.norm(positions[i] - positions[j]) > gt_distance_m:
            continue
        r_wi, r_wj = quat_to_matrix(orientations[i]), quat_to_matrix(orientations[j])
        r_ji = r_wj.T @ r_wi                        # query camera in the match camera frame
        t_ji = r_wj.T @ (positions[i] - positions[j])
        rot.append(float(np.degrees(np.linalg.norm(matrix_to_rotvec(
            v.pose.rotation_matrix @ r_ji.T)))))
        t = np.asarray(v.pose.translation)
        if np.linalg.norm(t_ji) > 0.05:
            cos = float(t @ t_ji / (np.linalg.norm(t) * np.linalg.norm(t_ji)))
            direction.append(float(np.degrees(np.arccos(np.clip(cos, -1, 1)))))
    if not rot:
        return None
    return {"pairs": len(rot), "rotation_deg_median": float(np.median(rot)),
            "rotation_deg_p90": float(np.percentile(rot, 90)),
            "direction_deg_median": float(np.median(direction)) if direction else None,
            "direction_deg_p90": float(np.percentile(direction, 90)) if direction else None}
