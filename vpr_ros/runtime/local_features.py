"""Keypoints and their descriptors (OpenCV SIFT, ORB, AKAZE), the currency of geometric
verification.

Why these three: SIFT is the accurate default (scale and rotation invariant, float-quality
matching, free of patents since 2020 and in OpenCV's main module); ORB is the fast binary one
robots use when a core is all they have (ORB-SLAM's loop closing); AKAZE sits between them
(binary, nonlinear scale space, steadier under blur). SIFT and ORB are in the pinned OpenCV 5,
so a map and the node extract exactly the same features; OpenCV 5 moved AKAZE to
opencv-contrib, so ``akaze`` works only where the installed OpenCV still has it (and is refused
with that reason elsewhere).

Descriptors are kept as ``uint8`` for all three: ORB and AKAZE are bit strings, and OpenCV's
SIFT descriptor is an array of integers in 0..255 stored as float32, so storing it as bytes
is lossless and a quarter of the size (a 1000-keypoint keyframe: 128 KB, not 512 KB).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from vpr_ros.errors import ConfigError, InputError

#: kind -> (descriptor bytes, matching norm).
KINDS: dict[str, tuple[int, str]] = {"sift": (128, "l2"), "orb": (32, "hamming"),
                                     "akaze": (61, "hamming")}
#: How far OpenCV's SIFT positions lie beyond pixel-centre coordinates (pixels, both axes).
SIFT_POSITION_BIAS_PX = 0.25
#: What ``--local-features`` accepts (``none``: the map stores no keypoints).
CHOICES = (*KINDS, "none")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"local feature kind {kind!r} is not one of {', '.join(KINDS)}")
    return kind


@dataclass
class LocalFeatures:
    """Keypoints of one image: pixel positions as taken (distorted), uint8 descriptors and,
    where depth or stereo gave them, 3-D points in the camera frame (metres; NaN rows:
    unknown)."""

    kind: str
    xy: np.ndarray                       # (n, 2) float32 pixels
    descriptors: np.ndarray              # (n, d) uint8
    xyz: Optional[np.ndarray] = None     # (n, 3) float32 camera frame, NaN = unknown
    _derived: dict[str, Any] = field(default_factory=dict, init=False, repr=False,
                                     compare=False)

    def __post_init__(self) -> None:
        width = KINDS[check_kind(self.kind)][0]
        self.xy = np.asarray(self.xy, dtype=np.float32).reshape(-1, 2)
        self.descriptors = np.asarray(self.descriptors, dtype=np.uint8).reshape(-1, width)
        n = len(self.xy)
        if len(self.descriptors) != n:
            raise InputError(f"{n} keypoints but {len(self.descriptors)} descriptors")
        if not np.isfinite(self.xy).all():
            raise InputError("keypoint positions contain NaN or Inf")
        if self.xyz is not None:
            self.xyz = np.asarray(self.xyz, dtype=np.float32).reshape(-1, 3)
            if len(self.xyz) != n:
                raise InputError(f"{n} keypoints but {len(self.xyz)} 3-D points")

    def __len__(self) -> int:
        return len(self.xy)

    def derived(self, key: str, make: Callable[["LocalFeatures"], Any]) -> Any:
        """``make(self)``, computed once per object: arrays derived from the keypoints that
        every candidate of a frame would otherwise recompute (the matcher's float operand).
        The keypoints must not be modified after the first call."""
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = make(self)
        return value

    @property
    def norm(self) -> str:
        return KINDS[self.kind][1]

    @property
    def has_points(self) -> bool:
        """Whether any keypoint has a 3-D point."""
        return self.xyz is not None and bool(np.isfinite(self.xyz[:, 0]).any())

    @classmethod
    def empty(cls, kind: str) -> "LocalFeatures":
        return cls(kind, np.zeros((0, 2), np.float32),
                   np.zeros((0, KINDS[check_kind(kind)][0]), np.uint8))


class FeatureExtractor:
    """``extract(image) -> LocalFeatures`` with the strongest ``max_features`` keypoints.

    ``sift_contrast``: SIFT's contrast threshold. OpenCV's default 0.04 drops most keypoints of
    a dim image (a revisit at dusk); 0.02 keeps them, ``max_features`` caps the count, and on
    EuRoC it also made the essential matrix more accurate (median rotation error 0.14 vs 0.18
    deg). ``equalize``: CLAHE of the gray image first; off by default, because on EuRoC it made
    the poses worse (0.31 deg) and on the rendered dusk revisit it gained nothing over the lower
    contrast threshold (docs/verification.md). OpenCV's detectors keep state, so each thread
    gets its own."""

    def __init__(self, kind: str = "sift", max_features: int = 1000, equalize: bool = False,
                 sift_contrast: float = 0.02, scale: float = 1.0) -> None:
        self.kind = check_kind(kind)
        if isinstance(max_features, bool) or not isinstance(max_features, int) \
                or not 8 <= max_features <= 100_000:
            raise ConfigError(f"max_features {max_features!r} must be an integer in "
                              "[8, 100000]")
        self.max_features = max_features
        self.equalize = bool(equalize)
        if not 0.0 < float(sift_contrast) < 1.0:
            raise ConfigError(f"sift_contrast {sift_contrast!r} must be in (0, 1)")
        self.sift_contrast = float(sift_contrast)
        if not 0.1 <= float(scale) <= 1.0:
            raise ConfigError(f"extraction scale {scale!r} must be in [0.1, 1]")
        self.scale = float(scale)
        self._local = threading.local()
        if kind == "akaze":
            import cv2

            if not hasattr(cv2, "AKAZE_create"):
                raise ConfigError(
                    f"AKAZE is not in this OpenCV ({cv2.__version__}): OpenCV 5 moved it out of "
                    "the main modules into opencv-contrib; use sift or orb, or install an "
                    "OpenCV build with AKAZE")

    @property
    def descriptor_bytes(self) -> int:
        return KINDS[self.kind][0]

    def _detector(self):  # type: ignore[no-untyped-def]
        det = getattr(self._local, "detector", None)
        if det is None:
            import cv2

            if self.kind == "sift":
                det = cv2.SIFT_create(nfeatures=self.max_features,
                                      contrastThreshold=self.sift_contrast)
            elif self.kind == "orb":
                det = cv2.ORB_create(nfeatures=self.max_features)
            else:
                det = cv2.AKAZE_create()
            self._local.detector = det
            self._local.clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
        return det

    def extract(self, image: np.ndarray) -> LocalFeatures:
        """Keypoints of an RGB (H, W, 3) or grayscale (H, W) uint8 image."""
        import cv2

        img = np.asarray(image)
        if img.dtype != np.uint8 or img.ndim not in (2, 3) or min(img.shape[:2]) < 8:
            raise InputError(f"local features need an 8-bit RGB or gray image of at least 8x8 "
                             f"pixels, got {img.dtype} {img.shape}")
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img
        detector = self._detector()
        if self.equalize:
            gray = self._local.clahe.apply(np.ascontiguousarray(gray))
        sx = sy = 1.0
        if self.scale < 1.0:
            h, w = gray.shape[:2]
            size = (max(8, round(w * self.scale)), max(8, round(h * self.scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
            sx, sy = size[0] / w, size[1] / h
        keypoints, desc = detector.detectAndCompute(gray, None)
        if desc is None or not keypoints:
            return LocalFeatures.empty(self.kind)
        if len(keypoints) > self.max_features:  # AKAZE has no count limit of its own
            order = np.argsort([-k.response for k in keypoints])[: self.max_features]
            keypoints = [keypoints[i] for i in order]
            desc = desc[order]
        xy = np.array([k.pt for k in keypoints], dtype=np.float32)
        if self.scale < 1.0:  # back to the full frame's pixels (pixel centres align)
            # OpenCV's SIFT reports positions 0.25 px beyond pixel-centre coordinates (its
            # base image is the frame doubled, and doubled-image pixel i is given as i / 2);
            # kept out of the shrink so that scaled and full-frame keypoints agree
            bias = SIFT_POSITION_BIAS_PX if self.kind == "sift" else 0.0
            xy = (xy - bias + 0.5) / np.array([sx, sy], np.float32) - 0.5 + bias
        if self.kind == "sift":
            desc = np.clip(np.rint(desc), 0, 255)
        return LocalFeatures(self.kind, xy, desc.astype(np.uint8))
