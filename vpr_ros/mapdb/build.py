"""Build a place map from a rosbag: read -> interpolate poses -> select keyframes -> encode in
batches -> ``PlaceMap.add`` -> atomic save.

The bag is streamed: only one batch of keyframe images is in memory at a time, so a long
recording maps with bounded memory. Poses are read first (small) so each frame's pose is known
when it arrives. A bag without a pose topic gives a stamps-only map (keyframes chosen by time),
which still serves loop closure by time and relocalisation by keyframe id.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from vpr_ros.errors import BagError, ConfigError, MapError
from vpr_ros.mapdb.bag_reader import BagReader, SyncedFrame
from vpr_ros.mapdb.bag_writer import NAVSAT_FIX, POSE_TYPES
from vpr_ros.mapdb.camera_rig import CameraRig, SensorOptions
from vpr_ros.mapdb.keyframe_selection import KeyframePolicy, KeyframeSelector
from vpr_ros.mapdb.model_outputs import (INDEX_CHOICES, ModelOutputs, extra_output_names,
                                         index_spec_for)
from vpr_ros.mapdb.poses import Pose, PoseTrack, interpolate
from vpr_ros.mapdb.storage import check_output_dir
from vpr_ros.plain_data import read_yaml
from vpr_ros.runtime.image_codec import DEFAULT_MAX_PIXELS
from vpr_ros.runtime.local_features import CHOICES as KEYPOINT_CHOICES

log = logging.getLogger(__name__)

#: frame_id recorded for keyframes whose position is local ENU metres from NavSatFix.
ENU_FRAME = "local_enu"
INDEX_KINDS = INDEX_CHOICES


class EncoderLike(Protocol):
    """What map building needs of an encoder (``vpr_ros.runtime.encoder.Encoder`` fits)."""

    dim: int
    fingerprint: str

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class BuildConfig:
    """Everything tunable about map building; ``config/map_build.yaml`` holds the defaults."""

    keyframes: KeyframePolicy = field(default_factory=KeyframePolicy)
    max_pose_gap_s: float = 0.5
    batch_size: int = 16
    max_pixels: int = DEFAULT_MAX_PIXELS
    index: str = "auto"
    storage_dtype: str = "float32"
    local_features: bool = True
    keypoints: str = "sift"
    max_keypoints: int = 1000
    max_depth_m: float = 40.0
    sync_tolerance_s: float = 0.02

    def __post_init__(self) -> None:
        if not (isinstance(self.max_pose_gap_s, (int, float)) and self.max_pose_gap_s > 0):
            raise ConfigError(f"poses.max_gap_s must be a positive number of seconds, got "
                              f"{self.max_pose_gap_s!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) \
                or self.max_pixels < 1:
            raise ConfigError(f"encoding.max_pixels must be a positive integer, got "
                              f"{self.max_pixels!r}")
        if self.index not in INDEX_KINDS:
            raise ConfigError(f"map.index {self.index!r} is not one of {', '.join(INDEX_KINDS)}")
        if not isinstance(self.local_features, bool):
            raise ConfigError(f"map.local_features must be true or false, got "
                              f"{self.local_features!r}")
        if self.keypoints not in KEYPOINT_CHOICES:
            raise ConfigError(f"keypoints.kind {self.keypoints!r} is not one of "
                              f"{', '.join(KEYPOINT_CHOICES)}")
        if isinstance(self.max_keypoints, bool) or not isinstance(self.max_keypoints, int) \
                or not 8 <= self.max_keypoints <= 100_000:
            raise ConfigError(f"keypoints.max_count must be an integer in [8, 100000], got "
                              f"{self.max_keypoints!r}")
        for name, value in (("keypoints.max_depth_m", self.max_depth_m),
                            ("keypoints.sync_tolerance_s", self.sync_tolerance_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 < value < 1e6:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")

    def replace(self, **changes: Any) -> "BuildConfig":
        """A copy with the given fields changed (``None`` values are ignored)."""
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        values.update({k: v for k, v in changes.items() if v is not None})
        return BuildConfig(**values)


_SECTIONS: dict[str, dict[str, str]] = {
    "poses": {"max_gap_s": "max_pose_gap_s"},
    "encoding": {"batch_size": "batch_size", "max_pixels": "max_pixels"},
    "map": {"index": "index", "storage_dtype": "storage_dtype",
            "local_features": "local_features"},
    "keypoints": {"kind": "keypoints", "max_count": "max_keypoints",
                  "max_depth_m": "max_depth_m", "sync_tolerance_s": "sync_tolerance_s"},
}


def build_config_from_mapping(data: Mapping[str, Any], source: str = "config") -> BuildConfig:
    """Parse the YAML structure of ``config/map_build.yaml``; unknown keys are refused."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with sections keyframes, poses, "
                          f"encoding, map, keypoints; got {type(data).__name__}")
    unknown = sorted(set(data) - {"keyframes", *_SECTIONS})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; expected keyframes, poses, "
                          "encoding, map, keypoints")
    values: dict[str, Any] = {}
    keyframes = data.get("keyframes") or {}
    if not isinstance(keyframes, Mapping):
        raise ConfigError(f"{source}: keyframes must be a mapping")
    values["keyframes"] = KeyframePolicy.from_mapping(keyframes)
    for section, keys in _SECTIONS.items():
        body = data.get(section) or {}
        if not isinstance(body, Mapping):
            raise ConfigError(f"{source}: {section} must be a mapping")
        bad = sorted(set(body) - set(keys))
        if bad:
            raise ConfigError(f"{source}: unknown {section} option(s) {bad}; expected "
                              f"{sorted(keys)}")
        for key, attr in keys.items():
            if key in body:
                values[attr] = body[key]
    return BuildConfig(**values)


def load_build_config(path: str | Path | None = None) -> BuildConfig:
    """Read a map-building YAML; ``None`` gives the built-in defaults (same as the shipped
    ``config/map_build.yaml``)."""
    if path is None:
        return BuildConfig()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"map build config {p} does not exist; pass an existing YAML file "
                          "(see config/map_build.yaml)")
    data = read_yaml(p, ConfigError, "see config/map_build.yaml") or {}
    return build_config_from_mapping(data, str(p))


@dataclass
class BuildSummary:
    """What a build did; printed at the end of ``vpr map build`` and returned to callers."""

    bag: str
    image_topic: str
    pose_topic: str | None
    session: str
    map_path: str | None
    frames_read: int = 0
    frames_corrupt: int = 0
    #: Frames whose header stamp is earlier than a frame read before them (skipped, not mapped).
    frames_out_of_order: int = 0
    keyframes: int = 0
    keyframes_with_pose: int = 0
    keyframes_without_pose: int = 0
    pose_samples: int = 0
    bag_damaged: bool = False
    map_size: int = 0
    index: str = ""
    local_features: bool = False
    keypoints: str = "none"
    keypoints_per_keyframe: float = 0.0
    keypoints_with_points: float = 0.0
    calibrated: bool = False
    frames_wrong_size: int = 0
    keyframes_without_depth: int = 0
    keyframes_per_camera: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"bag:           {self.bag}" + ("  (DAMAGED: partly salvaged)" if self.bag_damaged
                                            else ""),
            f"frames read:   {self.frames_read} on {self.image_topic}"
            f" ({self.frames_corrupt} corrupt, {self.frames_out_of_order} out of order; "
            "skipped)",
            f"poses:         {self.pose_samples} samples on {self.pose_topic}"
            if self.pose_topic else "poses:         none (stamps-only map)",
            f"keyframes:     {self.keyframes} added to session '{self.session}' "
            f"({self.keyframes_with_pose} with pose, {self.keyframes_without_pose} without)"
            + ("; per camera: " + ", ".join(f"{c} {n}" for c, n in
                                            self.keyframes_per_camera.items())
               if len(self.keyframes_per_camera) > 1 else ""),
            f"map:           {self.map_path} ({self.map_size} keyframes in total; index "
            f"{self.index}{', local features' if self.local_features else ''})",
            f"keypoints:     {self.keypoints}" + (
                "" if self.keypoints == "none" else
                f", {self.keypoints_per_keyframe:.0f} per keyframe, "
                f"{100 * self.keypoints_with_points:.0f}% with 3-D points; camera "
                f"{'calibrated' if self.calibrated else 'UNCALIBRATED (no pose from verification)'}"
                + (f"; {self.frames_wrong_size} frames refused (size differs from CameraInfo)"
                   if self.frames_wrong_size else "")
                + (f"; {self.keyframes_without_depth} keyframes without depth"
                   if self.keyframes_without_depth else "")),
            f"time:          {self.seconds:.1f} s",
        ]
        if self.warnings:
            lines.append(f"warnings:      {len(self.warnings)} (see the log above)")
        return "\n".join(lines)


def _default_session(bag: Path) -> str:
    return bag.name if bag.is_dir() else bag.stem


def build_map(bag: str | Path, image_topic: str | Sequence[str],
              encoder: EncoderLike | Callable[[], EncoderLike],
              out: str | Path | None = None, *, pose_topic: str | None = None,
              session: str | None = None, config: BuildConfig | None = None,
              append: bool = False, progress: bool = False,
              sensors: SensorOptions | None = None) -> tuple[Any, BuildSummary]:
    """Build (or with ``append``, extend) a map from one bag; returns ``(PlaceMap, summary)``.

    ``encoder`` is an encoder or a zero-argument factory of one; a factory is called only
    after the bag and its topics have been checked, so a typo in a topic name fails at once
    instead of after loading a model. ``out`` is where the map is saved atomically (None: not
    saved). An existing map at ``out`` is refused unless ``append`` is set, in which case this
    bag becomes a new session of it (its model fingerprint must match the encoder's).

    Each keyframe's ``frame_id`` names the frame its position is in: the pose topic's header
    frame (``local_enu`` for NavSatFix), or the camera frame for a keyframe without a pose.

    ``sensors``: where the camera's calibration, mount and 3-D points come from
    (:class:`~vpr_ros.mapdb.camera_rig.SensorOptions`); keyframes get ``config.keypoints``
    keypoints (with 3-D points from depth or stereo), the map the calibration.

    Several cameras: ``image_topic`` is a list. Each camera is read in its own pass over the
    bag with its own keyframe selection (distance, rotation and time apply per camera), its
    calibration from its sibling ``camera_info``, and every keyframe names its camera (its
    topic); all go into the one session. Explicit CameraInfo, depth and stereo options name
    one camera's topics and are refused with several.
    """
    from vpr_ros.mapdb.keyframe import Keyframe

    started = time.monotonic()
    config = config or BuildConfig()
    bag = Path(bag)
    out_path = Path(out) if out is not None else None
    if out_path is not None and _is_existing_map(out_path) and not append:
        raise MapError(f"{out_path} already exists; choose a new output path, or pass --append "
                       "to add this bag to that map as a new session")
    topics = [image_topic] if isinstance(image_topic, str) else list(image_topic)
    if not topics or len(set(topics)) != len(topics):
        raise ConfigError(f"image topics {topics}: give one or more, each once")
    sensors = sensors or SensorOptions()
    if len(topics) > 1 and (sensors.camera_info_topic or sensors.depth_topic
                            or sensors.right_topic or sensors.right_camera_info_topic
                            or sensors.camera_mount is not None):
        raise ConfigError("--camera-info-topic, --depth-topic, --stereo-right-topic and "
                          "--camera-to-robot describe one camera; with several --image-topic "
                          "each camera's CameraInfo is its sibling camera_info topic and mounts "
                          "come from /tf_static")
    if out_path is not None:
        check_output_dir(out_path)
    reader = BagReader(bag, max_pixels=config.max_pixels)
    with reader:
        image_types = {t: reader.check_topic(t, ("sensor_msgs/msg/Image",
                                                 "sensor_msgs/msg/CompressedImage"))
                       for t in topics}
        if pose_topic is not None:
            reader.check_topic(pose_topic, POSE_TYPES)
        if sensors.depth_topics and set(sensors.depth_topics) - set(topics):
            raise ConfigError(f"depth topics are given for {sorted(sensors.depth_topics)} but "
                              f"the image topics are {topics}")
        rigs = {t: CameraRig.open(reader, t, sensors if len(topics) == 1 and
                                  not sensors.depth_topics else sensors.for_camera(t),
                                  config.keypoints, config.max_keypoints, config.max_depth_m)
                for t in topics}
        for topic, rig in rigs.items():
            for note in rig.notes:
                reader.warn(note if len(topics) == 1 else f"{topic}: {note}")
        if not hasattr(encoder, "encode"):
            encoder = encoder()  # type: ignore[operator]
        assert hasattr(encoder, "encode")
        existing = _open_existing(out_path, encoder) if append else None
        if existing is not None and existing.keypoint_kind != (
                None if config.keypoints == "none" else config.keypoints):
            raise MapError(f"the map at {out_path} stores {existing.keypoint_kind or 'no'} "
                           f"keypoints but this build asks for {config.keypoints}; append with "
                           f"--local-features {existing.keypoint_kind or 'none'}")
        # A new map is created at the first batch, when the model's extra outputs are known.
        target: list[Any] = [existing]
        extras = extra_output_names(encoder)
        session = session or _default_session(bag)
        if existing is not None and session in existing.sessions():
            raise MapError(f"session '{session}' is already in the map at {out_path}; pass "
                           "--session with a new name to add this bag as another session")
        track: PoseTrack | None = None
        pose_frame = ""
        if pose_topic is not None:
            track = reader.poses(pose_topic)
            pose_frame = ENU_FRAME if reader.topics[pose_topic] == NAVSAT_FIX else track.frame_id
            if len(track) == 0:
                reader.warn(f"pose topic {pose_topic} has no usable samples; building a "
                             "stamps-only map")
        summary = BuildSummary(bag=str(bag), image_topic=", ".join(topics),
                               pose_topic=pose_topic,
                               session=session,
                               map_path=str(out_path) if out_path is not None else None,
                               pose_samples=len(track) if track is not None else 0)
        pending: list[tuple[SyncedFrame, Pose | None]] = []
        source_bag = str(bag.resolve())
        current: list[str] = [topics[0]]  # the camera being read

        def flush() -> None:
            if not pending:
                return
            topic = current[0]
            rig = rigs[topic]
            images = [f.image.rgb for f, _ in pending]
            outs = encoder.encode_all(images) if extras else \
                {"global": encoder.encode(images)}  # type: ignore[attr-defined]
            if target[0] is None:
                target[0] = _create_map(encoder, config, ModelOutputs.from_batch(outs))
            place_map = target[0]
            if rig.camera is not None:
                place_map.add_camera(session, rig.camera)
            keypoints = [rig.keypoints(f) for f, _ in pending] \
                if place_map.keypoint_kind is not None else None
            keyframes = [
                Keyframe(session=session, stamp_ns=int(f.stamp_ns),
                         frame_id=pose_frame if pose is not None else f.frame_id,
                         position=pose.position if pose is not None else None,
                         orientation=pose.orientation if pose is not None else None,
                         gnss=pose.gnss if pose is not None else None,
                         source_bag=source_bag, source_topic=topic, camera=topic)
                for f, pose in ((s.image, p) for s, p in pending)]
            summary.keyframes_per_camera[topic] = \
                summary.keyframes_per_camera.get(topic, 0) + len(pending)
            place_map.add(np.asarray(outs["global"], dtype=np.float32), keyframes,
                          binary_codes=outs.get("binary") if place_map.model_codes else None,
                          local_features=outs.get("local") if place_map.local_grid else None,
                          keypoints=keypoints)
            summary.keyframes += len(pending)
            with_pose = sum(1 for _, pose in pending if pose is not None)
            summary.keyframes_with_pose += with_pose
            summary.keyframes_without_pose += len(pending) - with_pose
            pending.clear()

        frames_read: dict[str, int] = {}
        for image_topic in topics:  # one pass per camera, each selecting its own keyframes
            rig = rigs[image_topic]
            current[0] = image_topic
            selector = KeyframeSelector(config.keyframes)
            read_before = reader.stats.images_read
            newest: int | None = None
            out_of_order = 0
            total = reader.message_counts.get(image_topic, -1)
            bar = _progress(progress, total if total > 0 else None,
                            f"{image_topic} ({image_types[image_topic].rsplit('/', 1)[-1]})")
            try:
                tolerance = int(config.sync_tolerance_s * 1e9)
                for synced in reader.synced_frames(image_topic, rig.depth_topic,
                                                   rig.right_topic, tolerance):
                    frame = synced.image
                    bar.update(1)
                    # Keyframe selection walks forward in time. A frame stamped before one
                    # already seen (a reordered recording, a camera clock that jumped back)
                    # cannot be placed in that walk: it is skipped, counted and warned about,
                    # instead of stalling the selection so that a few keyframes stand for the
                    # whole bag.
                    if newest is not None and frame.stamp_ns < newest:
                        out_of_order += 1
                        continue
                    newest = frame.stamp_ns
                    if not rig.accepts(frame):
                        continue
                    pose = interpolate(track, frame.stamp_ns, config.max_pose_gap_s) \
                        if track is not None else None
                    if selector.accept(frame.stamp_ns, pose.position if pose else None,
                                       pose.orientation if pose else None):
                        pending.append((synced, pose))
                        if len(pending) >= config.batch_size:
                            flush()
                            bar.set_postfix(keyframes=summary.keyframes, refresh=False)
                flush()
            finally:
                bar.close()
            frames_read[image_topic] = reader.stats.images_read - read_before
            summary.frames_out_of_order += out_of_order
            if out_of_order:
                reader.warn(f"{out_of_order} of {frames_read[image_topic]} frames on "
                            f"{image_topic} have a header stamp earlier than a frame before "
                            "them (stamps going backwards: a reordered recording or a camera "
                            "clock reset) and were skipped, not mapped; check the stamps (vpr "
                            "bag info), fix or split the bag, and build again")
            summary.frames_wrong_size += rig.stats.frames_wrong_size
            summary.keyframes_without_depth += rig.stats.keyframes_without_depth
            if rig.stats.frames_wrong_size:
                assert rig.camera is not None
                reader.warn(f"refused {rig.stats.frames_wrong_size} frame(s) of {image_topic} "
                            f"whose size differs from the CameraInfo's {rig.camera.width}x"
                            f"{rig.camera.height} (a resized stream or the wrong camera_info)")
            if rig.stats.keyframes_without_depth:
                reader.warn(f"{rig.stats.keyframes_without_depth} keyframe(s) got no 3-D "
                            f"points: no {'depth image' if rig.depth_topic else 'right image'} "
                            f"of their size within {config.sync_tolerance_s} s of their stamp")
        summary.frames_read = reader.stats.images_read
        summary.frames_corrupt = reader.stats.images_corrupt
        if len(topics) > 1:
            for topic, n in frames_read.items():
                if n == 0:
                    reader.warn(f"camera {topic}: no decodable frame; the map has keyframes of "
                                "the other cameras only")
        summary.bag_damaged = reader.stats.damaged
        summary.warnings = list(reader.stats.warnings)
    if summary.frames_read == 0:
        raise BagError(f"no decodable frame on {', '.join(topics)} in bag {bag} "
                       f"({summary.frames_corrupt} corrupt); nothing to map. Check the topic "
                       "(vpr map build lists the bag's topics on a wrong name) and the bag")
    if track is not None and len(track) and summary.keyframes_with_pose == 0:
        text = (f"none of the {summary.keyframes} keyframes got a pose: the image stamps lie "
                f"outside the pose samples of {pose_topic} or in gaps over "
                f"{config.max_pose_gap_s} s (clock mismatch between camera and odometry?)")
        summary.warnings.append(text)
        log.warning(text)
    place_map = target[0]
    if place_map is None:  # no keyframe was selected: an empty map of the right layout
        place_map = _create_map(encoder, config, ModelOutputs.probe(encoder))
    for rig in rigs.values():
        if rig.camera is not None:
            place_map.add_camera(session, rig.camera)
    if out_path is not None:
        place_map.save(out_path)
    summary.map_size = len(place_map)
    summary.index = place_map.index_kind + (" (model codes)" if place_map.model_codes else "")
    summary.local_features = place_map.local_grid is not None
    summary.keypoints = place_map.keypoint_kind or "none"
    summary.calibrated = all(rig.camera is not None for rig in rigs.values())
    keypoints = sum(rig.stats.keypoints for rig in rigs.values())
    if keypoints:
        summary.keypoints_per_keyframe = keypoints / max(1, summary.keyframes)
        summary.keypoints_with_points = sum(rig.stats.keypoints_with_points
                                            for rig in rigs.values()) / keypoints
    summary.seconds = time.monotonic() - started
    return place_map, summary


def _is_existing_map(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def _open_existing(out: Path | None, encoder: EncoderLike) -> Any:
    """The map at ``out`` to append to (None when there is none yet), checked against the
    encoder: fingerprint, dim, and the extra outputs its stored codes / local features need."""
    from vpr_ros.mapdb.place_map import PlaceMap

    if out is None or not _is_existing_map(out):
        return None
    existing = PlaceMap.load(out, expected_fingerprint=encoder.fingerprint, mmap=False)
    if existing.dim != encoder.dim:
        raise MapError(f"the map at {out} holds {existing.dim}-D descriptors but the "
                       f"encoder gives {encoder.dim}-D; use the map's model")
    existing.check_outputs(ModelOutputs.probe(encoder), need_local=True)
    return existing


def _create_map(encoder: EncoderLike, config: BuildConfig, outputs: ModelOutputs) -> Any:
    """A new map laid out for the model: index from ``config.index`` (``auto``: binary over the
    hash head's codes, else flat) and a local-feature store when the model has a local head
    (unless ``config.local_features`` is off)."""
    from vpr_ros.mapdb.place_map import PlaceMap

    grid = outputs.local_grid if config.local_features else None
    return PlaceMap.create(encoder.dim, encoder.fingerprint,
                           index=index_spec_for(config.index, outputs),
                           storage_dtype=config.storage_dtype, local_grid=grid,
                           keypoints=None if config.keypoints == "none" else config.keypoints)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, total: int | None, desc: str) -> Any:
    """A tqdm bar on stderr (frames read, rate and ETA when the frame count is known)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", dynamic_ncols=True, smoothing=0.1)
