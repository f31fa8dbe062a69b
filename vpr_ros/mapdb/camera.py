"""A camera's calibration as the map stores it: image size, intrinsics, distortion, mount.

Why the map keeps it: geometric verification needs calibrated geometry (an essential matrix,
PnP), and the keyframes' keypoints are pixel positions of the camera that took them. A map
built from several robots or cameras holds one :class:`CameraModel` per (session, camera), so
a keyframe's pixels are always read with the calibration they were taken with, after merges
too. The fields are those of ``sensor_msgs/CameraInfo`` that a pinhole model needs (size, K,
distortion model and coefficients) plus the camera-to-robot transform (from the bag's
``/tf_static`` or given as parameters), which turns a pose of the camera into a pose of the
robot.

Distortion models are ROS's names (``plumb_bob``, ``rational_polynomial``, ``equidistant``)
and are undone with OpenCV (``cv2.undistortPoints`` / ``cv2.fisheye.undistortPoints``), so
verification works on ideal pinhole coordinates. Validation is strict: a CameraInfo with zeros,
NaN, an unknown model or the wrong number of coefficients is an :class:`InputError` naming the
field, never a silently wrong pose.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vpr_ros.errors import InputError

#: ROS distortion model name -> accepted coefficient counts. ``none``: ideal pinhole (also
#: what an empty model name with no coefficients means).
DISTORTION_MODELS: dict[str, tuple[int, ...]] = {
    "none": (0,),
    "plumb_bob": (4, 5),
    "rational_polynomial": (8, 12, 14),
    "equidistant": (4,),
}

Pose7 = tuple[float, float, float, float, float, float, float]
"""(tx, ty, tz, qx, qy, qz, qw)."""

#: Largest image side accepted in a CameraInfo (a larger one is a corrupt message).
MAX_SIDE = 100_000


def _floats(values: Any, what: str, camera: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError) as exc:
        raise InputError(f"camera {camera!r}: {what} {values!r} is not a list of numbers") \
            from exc
    if not all(math.isfinite(v) for v in out):
        raise InputError(f"camera {camera!r}: {what} has NaN or Inf ({list(out)}); the "
                         "CameraInfo is corrupt: fix the camera driver's calibration")
    return out


def check_mount(mount: Optional[Sequence[float]], camera: str = "") -> Optional[Pose7]:
    """A validated camera-to-robot transform (unit quaternion) or None."""
    if mount is None:
        return None
    v = _floats(mount, "camera-to-robot transform", camera)
    if len(v) != 7:
        raise InputError(f"camera {camera!r}: camera-to-robot transform needs 7 numbers "
                         f"(tx, ty, tz, qx, qy, qz, qw), got {len(v)}")
    norm = math.sqrt(sum(q * q for q in v[3:]))
    if norm < 1e-6:
        raise InputError(f"camera {camera!r}: camera-to-robot rotation is a zero quaternion; "
                         "give (qx, qy, qz, qw) of unit norm")
    return (v[0], v[1], v[2], v[3] / norm, v[4] / norm, v[5] / norm, v[6] / norm)


@dataclass(frozen=True)
class CameraModel:
    """One calibrated camera. ``name`` identifies it within a session (the image topic by
    default); ``k`` is row-major 3x3; ``mount`` is the camera optical frame's pose in the robot
    base frame ``base_frame`` (None: unknown, robot poses then equal camera poses)."""

    name: str
    width: int
    height: int
    k: tuple[float, ...]
    distortion_model: str = "none"
    d: tuple[float, ...] = ()
    frame_id: str = ""
    base_frame: str = ""
    mount: Optional[Pose7] = None

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str):
            raise InputError(f"camera name {name!r} must be a string")
        for side in ("width", "height"):
            v = getattr(self, side)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) \
                    or not 0 < int(v) <= MAX_SIDE:
                raise InputError(f"camera {name!r}: {side} {v!r} must be a positive integer "
                                 f"<= {MAX_SIDE}; a CameraInfo with a zero size is not "
                                 "calibrated: calibrate the camera or give --camera-info-topic")
            object.__setattr__(self, side, int(v))
        k = _floats(self.k, "K", name)
        if len(k) != 9:
            raise InputError(f"camera {name!r}: K needs 9 numbers (row-major 3x3), got {len(k)}")
        fx, skew, cx, zero1, fy, cy, zero2, zero3, one = k
        if fx <= 0 or fy <= 0:
            raise InputError(f"camera {name!r}: focal lengths fx={fx}, fy={fy} must be > 0 (an "
                             "all-zero K means the camera is uncalibrated): calibrate it")
        if abs(zero1) > 1e-9 or abs(zero2) > 1e-9 or abs(zero3) > 1e-9 or abs(one - 1) > 1e-9:
            raise InputError(f"camera {name!r}: K {list(k)} is not a pinhole matrix (bottom "
                             "rows must be 0 fy cy / 0 0 1)")
        w, h = self.width, self.height
        if not (-w <= cx <= 2 * w and -h <= cy <= 2 * h):
            raise InputError(f"camera {name!r}: principal point ({cx}, {cy}) lies far outside "
                             f"the {w}x{h} image; the CameraInfo does not belong to these images")
        if not math.isfinite(skew):
            raise InputError(f"camera {name!r}: K skew is not finite")
        object.__setattr__(self, "k", k)
        model = self.distortion_model or "none"
        d = _floats(self.d, "distortion coefficients D", name)
        if model == "plumb_bob" and not any(d):
            model, d = "none", ()
        if model not in DISTORTION_MODELS:
            raise InputError(f"camera {name!r}: distortion model {model!r} is not supported; "
                             f"use one of {', '.join(DISTORTION_MODELS)} (ROS names)")
        if len(d) not in DISTORTION_MODELS[model]:
            if model == "none" and not any(d):
                d = ()
            else:
                raise InputError(
                    f"camera {name!r}: distortion model {model} takes "
                    f"{' or '.join(str(n) for n in DISTORTION_MODELS[model])} coefficients, got "
                    f"{len(d)} ({list(d)})")
        object.__setattr__(self, "distortion_model", model)
        object.__setattr__(self, "d", d)
        object.__setattr__(self, "mount", check_mount(self.mount, name))
        for text in ("frame_id", "base_frame"):
            if not isinstance(getattr(self, text), str):
                raise InputError(f"camera {name!r}: {text} must be a string")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_camera_info(cls, msg: Any, name: str, mount: Optional[Sequence[float]] = None,
                         base_frame: str = "") -> "CameraModel":
        """From a ``sensor_msgs/CameraInfo`` (rclpy or rosbags message: fields ``width``,
        ``height``, ``k``, ``distortion_model``, ``d``, ``header.frame_id``)."""
        try:
            width, height = int(msg.width), int(msg.height)
            k, d = list(msg.k), list(msg.d)
            model = str(msg.distortion_model)
            frame = str(msg.header.frame_id)
        except (AttributeError, TypeError, ValueError) as exc:
            raise InputError(f"camera {name!r}: not a sensor_msgs/CameraInfo ({exc})") from exc
        return cls(name, width, height, tuple(k), model, tuple(d), frame, base_frame,
                   None if mount is None else tuple(mount))  # type: ignore[arg-type]

    def with_mount(self, mount: Optional[Sequence[float]], base_frame: str = "") -> "CameraModel":
        return CameraModel(self.name, self.width, self.height, self.k, self.distortion_model,
                           self.d, self.frame_id, base_frame or self.base_frame,
                           None if mount is None else tuple(mount))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "width": self.width, "height": self.height, "k": list(self.k),
                "distortion_model": self.distortion_model, "d": list(self.d),
                "frame_id": self.frame_id, "base_frame": self.base_frame,
                "mount": None if self.mount is None else list(self.mount)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CameraModel":
        try:
            return cls(str(data["name"]), data["width"], data["height"], tuple(data["k"]),
                       str(data.get("distortion_model", "none")), tuple(data.get("d", ())),
                       str(data.get("frame_id", "")), str(data.get("base_frame", "")),
                       None if data.get("mount") is None else tuple(data["mount"]))
        except (KeyError, TypeError) as exc:
            raise InputError(f"camera record {dict(data)!r} is incomplete ({exc})") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    # -- geometry -------------------------------------------------------------------------------

    @property
    def matrix(self) -> np.ndarray:
        """K as a float64 (3, 3) array."""
        return np.asarray(self.k, dtype=np.float64).reshape(3, 3)

    @property
    def focal(self) -> float:
        """Mean focal length in pixels (turns pixel thresholds into normalised ones)."""
        return 0.5 * (self.k[0] + self.k[4])

    @property
    def is_distorted(self) -> bool:
        return self.distortion_model != "none"

    def check_image(self, height: int, width: int) -> None:
        """InputError unless an image of ``height`` x ``width`` is what this camera gives."""
        if (int(height), int(width)) != (self.height, self.width):
            raise InputError(f"image is {width}x{height} but the CameraInfo of camera "
                             f"{self.name!r} says {self.width}x{self.height}; the calibration "
                             "does not belong to these images (resized stream, wrong "
                             "camera_info topic)")

    def normalize(self, uv: np.ndarray) -> np.ndarray:
        """Pixel coordinates (n, 2) -> undistorted normalised image coordinates (n, 2) float64
        (x/z, y/z of the viewing ray)."""
        pts = np.ascontiguousarray(np.asarray(uv, dtype=np.float64).reshape(-1, 1, 2))
        if not len(pts):
            return np.zeros((0, 2))
        import cv2

        if self.distortion_model == "equidistant":
            out = cv2.fisheye.undistortPoints(pts, self.matrix, np.asarray(self.d))
        elif self.distortion_model == "none":
            k = self.matrix
            x = (pts[:, 0, 0] - k[0, 2] - k[0, 1] * (pts[:, 0, 1] - k[1, 2]) / k[1, 1]) / k[0, 0]
            y = (pts[:, 0, 1] - k[1, 2]) / k[1, 1]
            return np.stack([x, y], 1)
        else:
            out = cv2.undistortPoints(pts, self.matrix, np.asarray(self.d),
                                      criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS,
                                                20, 1e-9))
        return out.reshape(-1, 2).astype(np.float64)

    def undistort_pixels(self, uv: np.ndarray) -> np.ndarray:
        """Pixel coordinates -> pixel coordinates of the ideal pinhole camera with the same K."""
        xy = self.normalize(uv)
        k = self.matrix
        return np.stack([k[0, 0] * xy[:, 0] + k[0, 1] * xy[:, 1] + k[0, 2],
                         k[1, 1] * xy[:, 1] + k[1, 2]], 1)

    def project(self, xyz: np.ndarray) -> np.ndarray:
        """Camera-frame points (n, 3), z > 0 -> distorted pixel coordinates (n, 2)."""
        import cv2

        pts = np.ascontiguousarray(np.asarray(xyz, dtype=np.float64).reshape(-1, 1, 3))
        if not len(pts):
            return np.zeros((0, 2))
        zero = np.zeros(3)
        if self.distortion_model == "equidistant":
            out, _ = cv2.fisheye.projectPoints(pts, zero, zero, self.matrix, np.asarray(self.d))
        else:
            out, _ = cv2.projectPoints(pts, zero, zero, self.matrix,
                                       np.asarray(self.d) if self.d else None)
        return out.reshape(-1, 2)

    def back_project(self, uv: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Pixels (n, 2) with their depth along the optical axis (n,) -> camera-frame points
        (n, 3)."""
        xy = self.normalize(uv)
        z = np.asarray(depth, dtype=np.float64).reshape(-1)
        return np.stack([xy[:, 0] * z, xy[:, 1] * z, z], 1)


def sibling_topic(image_topic: str, leaf: str = "camera_info") -> str:
    """``/ns/image_raw[/compressed]`` -> ``/ns/camera_info`` (ROS's image_transport layout)."""
    parts = image_topic.rstrip("/").split("/")
    if len(parts) > 1 and parts[-1] in ("compressed", "compressedDepth", "theora", "zstd"):
        parts = parts[:-1]
    parts[-1] = leaf
    out = "/".join(parts)
    return out if out.startswith("/") else "/" + out
