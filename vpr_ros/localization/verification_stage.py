"""Geometric verification as a stage of the node's per-frame decisions.

What it adds to the :class:`~vpr_ros.localization.verification.GeometricVerifier`: the map
(each keyframe's stored keypoints and its camera's calibration), the live frame's keypoints
(extracted only when a hypothesis reaches verification, or when the frame becomes a live
keyframe), the per-frame object the detector and relocalizer call
(:class:`FrameVerification`), the metric robot pose of a verified PnP relocalization, and
counters for diagnostics. No ROS types here.

Configure-time rules (item "bad input" of the design): verification needs keypoints in the map
(a map built with ``--local-features none`` or before keypoints were kept is refused with the
fix named), of a kind this OpenCV can extract, and, with ``require_points``, 3-D points.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vpr_ros.errors import ConfigError
from vpr_ros.localization.metric_pose import MetricPose, query_robot_pose
from vpr_ros.localization.verification import (FrameVerifier, GeometricVerifier, Verification,
                                               VerificationConfig, View)
from vpr_ros.mapdb.camera import CameraModel
from vpr_ros.mapdb.keypoint_depth import points_from_depth
from vpr_ros.runtime.local_features import FeatureExtractor, LocalFeatures


def check_map_for_verification(place_map: Any, config: VerificationConfig,
                               where: str = "") -> None:
    """ConfigError naming the fix when ``place_map`` cannot be verified against."""
    if place_map.keypoint_kind is None:
        raise ConfigError(
            f"verification is on but the map{where} stores no keypoints (built with "
            "--local-features none, or before keypoints were kept): rebuild it with `vpr map "
            "build ... --local-features sift`, or set verification.enabled to false to publish "
            "unverified decisions")
    if config.require_points and len(place_map) and not place_map.has_keypoint_points:
        raise ConfigError(
            f"verification.require_points is true but the map{where} has no 3-D points (built "
            "without --depth-topic or --stereo-right-topic): rebuild it with depth or stereo, or "
            "set verification.require_points to false (essential-matrix verification, "
            "keyframe poses)")


class FrameVerification:
    """One frame's verifier (the decision stages call it with a hypothesis) with the frame's
    keypoints extracted on first need and every verdict recorded."""

    def __init__(self, stage: "VerificationStage", image: np.ndarray,
                 camera: Optional[CameraModel], started: float) -> None:
        self.stage = stage
        self.image = image
        self.camera = camera
        self.started = started
        self.extract_s = 0.0
        self._features: Optional[LocalFeatures] = None
        self._verifier: Optional[FrameVerifier] = None

    def features(self) -> LocalFeatures:
        if self._features is None:
            t0 = time.perf_counter()
            self._features = self.stage.extractor.extract(self.image)
            self.extract_s += time.perf_counter() - t0
        return self._features

    def __call__(self, hypothesis: Any) -> Optional[Verification]:
        if self._verifier is None:
            # The budget is for verifying candidates: it starts once the frame's keypoints
            # are extracted (extraction is paid once per frame whatever the budget).
            features = self.features()
            self._verifier = FrameVerifier(self.stage.verifier, View(features, self.camera),
                                           self.stage.view_of)
        return self._verifier(hypothesis)

    @property
    def results(self) -> list[Verification]:
        return [] if self._verifier is None else self._verifier.round.results

    @property
    def accepted(self) -> Optional[Verification]:
        return None if self._verifier is None else self._verifier.round.accepted

    @property
    def over_budget(self) -> int:
        return 0 if self._verifier is None else self._verifier.round.over_budget

    @property
    def match_s(self) -> float:
        return 0.0 if self._verifier is None else self._verifier.round.match_s

    @property
    def estimate_s(self) -> float:
        return 0.0 if self._verifier is None else self._verifier.round.estimate_s

    def keyframe_keypoints(self, depth_m: Optional[np.ndarray], max_depth_m: float
                           ) -> LocalFeatures:
        """This frame's keypoints for a new live keyframe, with 3-D points from ``depth_m``
        (registered to the image, metres) when given and the camera is calibrated."""
        feats = self.features()
        if depth_m is None or self.camera is None:
            return feats
        t0 = time.perf_counter()
        xyz = points_from_depth(feats, self.camera, depth_m, max_depth_m)
        self.extract_s += time.perf_counter() - t0
        return LocalFeatures(feats.kind, feats.xy, feats.descriptors, xyz)


class CamerasVerification:
    """The verifier of a frame taken by several cameras: each hypothesis is verified with the
    frame of the camera whose search found it (``camera_of``; others: ``default``); the
    verdicts, times and first acceptance are those of all cameras together."""

    def __init__(self, frames: dict[str, FrameVerification], camera_of: dict[int, str],
                 default: str) -> None:
        self.frames = frames
        self.camera_of = camera_of
        self.default = default

    def __call__(self, hypothesis: Any) -> Optional[Verification]:
        camera = self.camera_of.get(int(getattr(hypothesis, "id", hypothesis)), self.default)
        frame = self.frames.get(camera)
        return None if frame is None else frame(hypothesis)

    @property
    def results(self) -> list[Verification]:
        return [r for f in self.frames.values() for r in f.results]

    @property
    def accepted(self) -> Optional[Verification]:
        return next((f.accepted for f in self.frames.values() if f.accepted is not None), None)

    @property
    def camera(self) -> Optional[CameraModel]:
        """The camera of the frame that verified the accepted candidate."""
        return next((f.camera for f in self.frames.values() if f.accepted is not None), None)

    @property
    def over_budget(self) -> int:
        return sum(f.over_budget for f in self.frames.values())

    @property
    def extract_s(self) -> float:
        return sum(f.extract_s for f in self.frames.values())

    @property
    def match_s(self) -> float:
        return sum(f.match_s for f in self.frames.values())

    @property
    def estimate_s(self) -> float:
        return sum(f.estimate_s for f in self.frames.values())


class VerificationStage:
    """Keypoints of the map and of the live frames, and the verifier between them."""

    def __init__(self, config: VerificationConfig, place_map: Any,
                 query_mount: Optional[Sequence[float]] = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        check_map_for_verification(place_map, config,
                                   f" at {place_map.path}" if place_map.path else "")
        self.config = config
        self.map = place_map
        self.verifier = GeometricVerifier(config, clock)
        self.extractor = FeatureExtractor(place_map.keypoint_kind, config.max_features,
                                          scale=config.extract_scale)
        self.query_mount = None if query_mount is None else tuple(query_mount)
        self.counts: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()

    def view_of(self, keyframe_id: int) -> Optional[View]:
        feats = self.map.keypoints(keyframe_id)
        if len(feats) == 0:
            return None
        return View(feats, self.map.camera_of(keyframe_id))

    def frame(self, image: np.ndarray, camera: Optional[CameraModel],
              started: Optional[float] = None) -> FrameVerification:
        return FrameVerification(self, image, camera,
                                 time.perf_counter() if started is None else started)

    def record(self, frame: FrameVerification) -> None:
        """Count the frame's verdicts (diagnostics)."""
        results = frame.results
        if not results and not frame.over_budget:
            return
        self.counts["frames"] += 1
        for r in results:
            self.counts["verified" if r.verified else "rejected"] += 1
            if r.verified:
                self.counts[f"verified_{r.method}"] += 1
            else:
                self.reasons[_reason_kind(r.reason)] += 1
        self.counts["over_budget"] += frame.over_budget

    def metric_pose(self, accepted: Optional[Verification],
                    query_camera: Optional[CameraModel] = None) -> Optional[MetricPose]:
        """The query robot's map pose from a verified metric (PnP) pose; None otherwise.

        The query camera's mount, in order: the node's ``camera.mount_*`` parameters (one
        camera), the query camera's own, the map's calibration of a camera of that name (the
        mapping run recorded its /tf_static), else the matched keyframe camera's (the same
        camera on the same robot)."""
        if accepted is None or accepted.pose is None or not accepted.pose.metric:
            return None
        kf = self.map.keyframe(accepted.keyframe_id)
        if kf.position is None:
            return None
        cam = self.map.camera_of(accepted.keyframe_id)
        kf_mount = cam.mount if cam is not None else None
        query_mount = self.query_mount
        if query_mount is None and query_camera is not None:
            query_mount = query_camera.mount
            if query_mount is None:
                query_mount = next((c.mount for (_, name), c in self.map.cameras().items()
                                    if name == query_camera.name and c.mount is not None),
                                   None)
        if query_mount is None:
            query_mount = kf_mount
        return query_robot_pose(kf.position, kf.orientation, accepted.pose, kf_mount,
                                query_mount)

    def counters(self) -> list[tuple[str, str]]:
        values = [(f"verification.{k}", str(v)) for k, v in sorted(self.counts.items())]
        values += [(f"verification.rejected_{k}", str(v)) for k, v in sorted(self.reasons.items())]
        return values


def _reason_kind(reason: str) -> str:
    """A short key for a rejection reason (diagnostics group them)."""
    for key in ("too few matches", "too few inliers", "inlier ratio", "median error",
                "implausible rotation", "implausible translation", "in front",
                "no keypoints", "estimation failed", "found no", "no essential",
                "no fundamental", "degenerate"):
        if key in reason:
            return key.replace(" ", "_")
    return "other"
