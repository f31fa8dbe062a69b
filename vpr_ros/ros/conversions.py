"""ROS messages in, numpy and plain Python out: camera frames, stamps and poses.

``cv_bridge`` has no wheel; the pixel work is :mod:`vpr_ros.runtime.image_codec` (shared with
the map builder). What this module adds is what the node needs around it: each way a frame can
be unusable gets a *kind* (``FrameError.kind``), so diagnostics can count corrupt frames apart
from wrong encodings, zero-size or oversized ones, and an operator can tell a broken camera
driver from a misconfigured topic at a glance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.runtime.image_codec import (SUPPORTED_ENCODINGS, _peek_dimensions, bytes_per_pixel,
                                         decode_compressed, decode_image)

NS_PER_S = 1_000_000_000

# Per-frame error kinds, as counted in diagnostics (``errors.<kind>``).
EMPTY_IMAGE = "empty_image"
OVERSIZED_IMAGE = "oversized_image"
UNSUPPORTED_ENCODING = "unsupported_encoding"
CORRUPT_IMAGE = "corrupt_image"
STAMP_BACKWARDS = "stamp_backwards"
TIME_JUMP = "time_jump"
BAD_POSE = "bad_pose"
ENCODER_ERROR = "encoder_error"
SEARCH_ERROR = "search_error"
PUBLISH_ERROR = "publish_error"
INTERNAL_ERROR = "internal_error"
CAMERA_INFO_INVALID = "camera_info_invalid"
CAMERA_INFO_MISMATCH = "camera_info_mismatch"
DEPTH_INVALID = "depth_invalid"
VERIFICATION_ERROR = "verification_error"

ERROR_KINDS = (EMPTY_IMAGE, OVERSIZED_IMAGE, UNSUPPORTED_ENCODING, CORRUPT_IMAGE,
               STAMP_BACKWARDS, TIME_JUMP, BAD_POSE, ENCODER_ERROR, SEARCH_ERROR, PUBLISH_ERROR,
               INTERNAL_ERROR)


class FrameError(InputError):
    """An unusable input message, with the diagnostics ``kind`` it is counted under."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def stamp_to_ns(stamp: Any) -> int:
    """``builtin_interfaces/Time`` -> integer nanoseconds (exact; no float rounding)."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def ns_to_stamp_fields(ns: int) -> tuple[int, int]:
    """Nanoseconds -> (sec, nanosec) as ``builtin_interfaces/Time`` wants them."""
    sec, nanosec = divmod(int(ns), NS_PER_S)
    return sec, nanosec


def _check_dims(height: int, width: int, max_pixels: int, what: str) -> None:
    if height <= 0 or width <= 0:
        raise FrameError(EMPTY_IMAGE, f"{what} is {width}x{height}: a zero-size frame (the "
                         "camera driver published an empty image); skipped")
    if height * width > max_pixels:
        raise FrameError(OVERSIZED_IMAGE, f"{what} is {width}x{height} = {height * width} "
                         f"pixels, above max_pixels = {max_pixels} (corrupt header or an "
                         "unexpected camera mode; raise the parameter max_pixels if the camera "
                         "really is that large); skipped")


def image_msg_to_rgb(msg: Any, max_pixels: int, copy: bool = True) -> np.ndarray:
    """``sensor_msgs/Image`` -> (H, W, 3) uint8 RGB, or :class:`FrameError`; ``copy=False``
    lets a packed ``rgb8`` frame be a read-only view of ``msg.data``."""
    what = f"image ({msg.encoding or 'no encoding'})"
    if msg.encoding not in SUPPORTED_ENCODINGS:
        raise FrameError(UNSUPPORTED_ENCODING, f"unsupported image encoding "
                         f"{msg.encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)} "
                         "(republish in one of these, or as sensor_msgs/CompressedImage)")
    _check_dims(int(msg.height), int(msg.width), max_pixels, what)
    try:
        return decode_image(msg.height, msg.width, msg.encoding, msg.step, msg.data,
                            msg.is_bigendian, max_pixels=max_pixels, copy=copy)
    except InputError as exc:
        raise FrameError(CORRUPT_IMAGE, str(exc)) from exc


def compressed_msg_to_rgb(msg: Any, max_pixels: int) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` -> (H, W, 3) uint8 RGB, or :class:`FrameError`.

    The PNG/JPEG header is read before decoding so an oversized frame is refused without
    allocating it, and counted as oversized rather than corrupt.
    """
    data = msg.data
    size = len(data)
    if size == 0:
        raise FrameError(EMPTY_IMAGE, f"compressed image (format {msg.format!r}) has no data "
                         "(an empty message); skipped")
    buf = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else \
        np.frombuffer(data, dtype=np.uint8)
    if "compresseddepth" not in (msg.format or "").lower():
        dims = _peek_dimensions(buf)
        if dims is not None:
            _check_dims(dims[1], dims[0], max_pixels, f"compressed image ({msg.format!r})")
    try:
        return decode_compressed(msg.format, buf, max_pixels=max_pixels)
    except InputError as exc:
        raise FrameError(CORRUPT_IMAGE, str(exc)) from exc


def check_frame(msg: Any, compressed: bool, max_pixels: int) -> None:
    """The cheap checks (header fields, data length, compressed header), for the subscription
    callback: a frame that is certainly bad never takes the mailbox slot from a good one.
    Pixel decoding, and the errors only it can find, happen on the encoder thread."""
    if compressed:
        if len(msg.data) == 0:
            raise FrameError(EMPTY_IMAGE, f"compressed image (format {msg.format!r}) has no "
                             "data (an empty message); skipped")
        if "compresseddepth" not in (msg.format or "").lower():
            head = bytes(msg.data[:65536])
            dims = _peek_dimensions(np.frombuffer(head, dtype=np.uint8))
            if dims is not None:
                _check_dims(dims[1], dims[0], max_pixels, f"compressed image ({msg.format!r})")
        return
    if msg.encoding not in SUPPORTED_ENCODINGS:
        raise FrameError(UNSUPPORTED_ENCODING, f"unsupported image encoding "
                         f"{msg.encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)} "
                         "(republish in one of these, or as sensor_msgs/CompressedImage)")
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    _check_dims(height, width, max_pixels, f"image ({msg.encoding})")
    need = width * bytes_per_pixel(msg.encoding)
    if step < need or len(msg.data) < step * height:
        raise FrameError(CORRUPT_IMAGE, f"image {width}x{height} {msg.encoding} has step {step} "
                         f"and {len(msg.data)} bytes of data; expected step >= {need} and "
                         f"step*height = {step * height} bytes (truncated or inconsistent "
                         "message); skipped")


def frame_to_rgb(msg: Any, compressed: bool, max_pixels: int, copy: bool = True
                 ) -> np.ndarray:
    """Either camera message type -> RGB (the node knows which one it subscribed to)."""
    return compressed_msg_to_rgb(msg, max_pixels) if compressed else \
        image_msg_to_rgb(msg, max_pixels, copy=copy)


@dataclass(frozen=True)
class PoseSample:
    """One pose message, reduced to what keyframes need."""

    stamp_ns: int
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float]
    frame_id: str


def _pose_fields(pose: Any, stamp_ns: int, frame_id: str, what: str) -> PoseSample:
    p, q = pose.position, pose.orientation
    position = (float(p.x), float(p.y), float(p.z))
    orientation = (float(q.x), float(q.y), float(q.z), float(q.w))
    if not all(math.isfinite(v) for v in position + orientation):
        raise FrameError(BAD_POSE, f"{what} at {stamp_ns * 1e-9:.3f} s has a non-finite "
                         "position or orientation; sample ignored")
    norm = math.sqrt(sum(v * v for v in orientation))
    if norm < 1e-6:
        raise FrameError(BAD_POSE, f"{what} at {stamp_ns * 1e-9:.3f} s has a zero quaternion; "
                         "expected a unit (x, y, z, w); sample ignored")
    orientation = tuple(v / norm for v in orientation)  # type: ignore[assignment]
    return PoseSample(stamp_ns, position, orientation, frame_id)


def odometry_to_pose(msg: Any) -> PoseSample:
    """``nav_msgs/Odometry`` -> :class:`PoseSample` (pose part; covariance and twist unused)."""
    return _pose_fields(msg.pose.pose, stamp_to_ns(msg.header.stamp), msg.header.frame_id,
                        "odometry")


def pose_stamped_to_pose(msg: Any) -> PoseSample:
    """``geometry_msgs/PoseStamped`` -> :class:`PoseSample`."""
    return _pose_fields(msg.pose, stamp_to_ns(msg.header.stamp), msg.header.frame_id, "pose")


def classify_stamp(stamp_ns: int, last_ns: Optional[int], time_jump_ns: int) -> Optional[str]:
    """``None`` for a frame after the previous one; else why it is not.

    A stamp at or behind the previous frame's is a late (reordered) or repeated frame:
    ``STAMP_BACKWARDS``, to be dropped. A step back larger than ``time_jump_ns`` is a clock
    reset (a bag restarted, simulation time reset): ``TIME_JUMP``, after which the node
    restarts its time-dependent state and processes the frame.
    """
    if last_ns is None or stamp_ns > last_ns:
        return None
    if last_ns - stamp_ns > time_jump_ns:
        return TIME_JUMP
    return STAMP_BACKWARDS
