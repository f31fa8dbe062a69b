"""One camera of a recording as map building needs it: calibration, mount, depth or stereo
partner, and the keypoints (with 3-D points) of each keyframe it takes.

Why a unit of its own: the map keeps calibrations per (session, camera) and a keyframe's
keypoints are pixels of the camera that took it, so everything that turns a camera's frames into
verification data belongs together. Where each piece comes from:

- calibration: ``sensor_msgs/CameraInfo`` on ``--camera-info-topic`` (default: the image topic's
  sibling ``camera_info``, ROS's naming: ``/cam/image_raw`` -> ``/cam/camera_info``). Without
  one the keypoints are stored uncalibrated and verification can only use the fundamental
  matrix (no pose); with one, every frame whose size differs from it is refused.
- mount (camera optical frame in the robot base frame): ``--camera-to-robot``, else the bag's
  ``/tf_static`` from ``--base-frame`` to the camera's frame.
- 3-D points: an aligned depth topic (``16UC1`` mm / ``32FC1`` m), or a right camera (its
  CameraInfo and the left-from-right extrinsic from ``/tf_static``, or, for a rectified pair,
  the baseline in the right CameraInfo's P).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from vpr_ros.errors import BagError, ConfigError
from vpr_ros.mapdb.bag_reader import BagReader, ImageFrame, SyncedFrame
from vpr_ros.mapdb.bag_writer import CAMERA_INFO
from vpr_ros.mapdb.camera import CameraModel, check_mount, sibling_topic  # noqa: F401
from vpr_ros.mapdb.keypoint_depth import points_from_depth, points_from_stereo
from vpr_ros.mapdb.transforms import matrix_to_pose7
from vpr_ros.runtime.local_features import FeatureExtractor, LocalFeatures

Pose7 = tuple[float, float, float, float, float, float, float]


@dataclass
class SensorOptions:
    """Where a camera's calibration, mount and 3-D come from (``vpr map build`` flags).

    ``camera_info_topic``: None = the sibling ``camera_info`` if the bag has it; "" = none."""

    camera_info_topic: Optional[str] = None
    depth_topic: Optional[str] = None
    right_topic: Optional[str] = None
    right_camera_info_topic: Optional[str] = None
    base_frame: str = "base_link"
    camera_mount: Optional[Sequence[float]] = None
    #: Several cameras: image topic -> its registered depth topic (cameras not named here
    #: have no depth).
    depth_topics: Optional[dict[str, str]] = None

    def for_camera(self, image_topic: str) -> "SensorOptions":
        """The options of one of several cameras: its CameraInfo is its sibling topic, its
        depth the one ``depth_topics`` names for it, its mount from /tf_static."""
        return SensorOptions(base_frame=self.base_frame,
                             depth_topic=(self.depth_topics or {}).get(image_topic))

    def __post_init__(self) -> None:
        if self.depth_topic and self.right_topic:
            raise ConfigError("give a depth topic or a stereo right topic, not both: one source "
                              "of 3-D points per camera")
        if self.camera_mount is not None:
            self.camera_mount = check_mount(self.camera_mount, "--camera-to-robot")


@dataclass
class RigStats:
    frames_wrong_size: int = 0
    keyframes_without_depth: int = 0
    keypoints: int = 0
    keypoints_with_points: int = 0


@dataclass
class CameraRig:
    """A camera's calibration, mount and 3-D source, and its keypoint extractor."""

    name: str
    camera: Optional[CameraModel]
    extractor: Optional[FeatureExtractor]
    depth_topic: Optional[str] = None
    right_topic: Optional[str] = None
    right_camera: Optional[CameraModel] = None
    left_from_right: Optional[np.ndarray] = None
    max_depth_m: float = 40.0
    stats: RigStats = field(default_factory=RigStats)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, reader: BagReader, image_topic: str, options: SensorOptions,
             keypoints: str, max_keypoints: int, max_depth_m: float) -> "CameraRig":
        """Read the calibration, mount and stereo extrinsic out of the bag (BagError naming the
        topic or frame that is missing when the options ask for it)."""
        notes: list[str] = []
        info_topic = options.camera_info_topic
        explicit = bool(info_topic)
        if info_topic is None:
            info_topic = sibling_topic(image_topic)
        camera: Optional[CameraModel] = None
        if info_topic:
            if info_topic in reader.topics:
                camera = reader.camera_info(info_topic, image_topic)
            elif explicit:
                reader.check_topic(info_topic, (CAMERA_INFO,))
            else:
                notes.append(f"no CameraInfo ({info_topic} is not in the bag): keypoints are "
                             "kept uncalibrated; verification can then only check a "
                             "fundamental matrix and gives no pose (give --camera-info-topic)")
        tree = reader.static_transforms()
        if camera is not None:
            mount = options.camera_mount
            base = options.base_frame
            if mount is None and camera.frame_id:
                t = tree.lookup(base, camera.frame_id)
                if t is not None:
                    mount = matrix_to_pose7(t)
                else:
                    notes.append(f"no camera-to-robot transform: /tf_static has no path from "
                                 f"{base!r} to {camera.frame_id!r} (frames: "
                                 f"{', '.join(tree.frames()) or 'none'}); robot poses from "
                                 "PnP then assume the camera is at the robot's origin (give "
                                 "--camera-to-robot or --base-frame)")
            camera = camera.with_mount(mount, base if mount is not None else "")
        if (options.depth_topic or options.right_topic) and camera is None:
            raise BagError("3-D points from depth or stereo need the camera's calibration: give "
                           "--camera-info-topic (the bag has no "
                           f"{info_topic or 'CameraInfo'} topic)")
        rig = cls(image_topic, camera, FeatureExtractor(keypoints, max_keypoints)
                  if keypoints != "none" else None, options.depth_topic, options.right_topic,
                  max_depth_m=max_depth_m, notes=notes)
        if options.depth_topic:
            reader.check_topic(options.depth_topic, ("sensor_msgs/msg/Image",))
        if options.right_topic:
            rig._open_stereo(reader, options, tree)
        return rig

    def _open_stereo(self, reader: BagReader, options: SensorOptions, tree) -> None:
        assert self.camera is not None and options.right_topic
        right_info = options.right_camera_info_topic or sibling_topic(options.right_topic)
        reader.check_topic(right_info, (CAMERA_INFO,))
        right = reader.camera_info(right_info, options.right_topic)
        t = tree.lookup(self.camera.frame_id, right.frame_id) \
            if self.camera.frame_id and right.frame_id else None
        if t is None:
            # A rectified pair: the right camera's P carries -fx * baseline in P[0, 3].
            tx = _projection_tx(reader, right_info)
            if tx is None or tx >= 0:
                raise BagError(
                    f"stereo needs the left-from-right extrinsic: /tf_static has no path from "
                    f"{self.camera.frame_id!r} to {right.frame_id!r}, and {right_info}'s P "
                    "carries no baseline (P[0,3] = -fx * baseline for a rectified pair)")
            t = np.eye(4)
            t[0, 3] = -tx / right.k[0]
            self.notes.append(f"stereo extrinsic from {right_info}'s P: a rectified pair with "
                              f"a {t[0, 3]:.3f} m baseline")
        self.right_camera, self.left_from_right = right, t

    # -- per frame ---------------------------------------------------------------------------

    def accepts(self, frame: ImageFrame) -> bool:
        """False (counted) for a frame whose size differs from the calibration."""
        if self.camera is None:
            return True
        h, w = frame.rgb.shape[:2]
        if (h, w) != (self.camera.height, self.camera.width):
            self.stats.frames_wrong_size += 1
            return False
        return True

    def keypoints(self, synced: SyncedFrame) -> Optional[LocalFeatures]:
        """The keyframe's keypoints with their 3-D points where depth or stereo give them."""
        if self.extractor is None:
            return None
        feats = self.extractor.extract(synced.image.rgb)
        xyz = None
        if self.depth_topic:
            if synced.depth is not None and \
                    synced.depth.depth_m.shape == synced.image.rgb.shape[:2]:
                assert self.camera is not None
                xyz = points_from_depth(feats, self.camera, synced.depth.depth_m,
                                        self.max_depth_m)
            else:
                self.stats.keyframes_without_depth += 1
        elif self.right_topic:
            right = synced.right
            if right is not None and self.right_camera is not None and \
                    right.rgb.shape[:2] == (self.right_camera.height, self.right_camera.width):
                assert self.camera is not None and self.left_from_right is not None
                assert self.extractor is not None
                xyz = points_from_stereo(feats, self.extractor.extract(right.rgb), self.camera,
                                         self.right_camera, self.left_from_right,
                                         max_depth_m=self.max_depth_m)
            else:
                self.stats.keyframes_without_depth += 1
        if xyz is not None:
            feats = LocalFeatures(feats.kind, feats.xy, feats.descriptors, xyz)
            self.stats.keypoints_with_points += int(np.isfinite(xyz[:, 0]).sum())
        self.stats.keypoints += len(feats)
        return feats


def _projection_tx(reader: BagReader, topic: str) -> Optional[float]:
    for message in reader.messages([topic]):
        try:
            p = np.asarray(reader.deserialize(message).p, dtype=np.float64).reshape(-1)
        except Exception:
            continue
        return float(p[3]) if p.size == 12 and np.isfinite(p[3]) else None
    return None
