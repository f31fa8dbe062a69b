"""Read camera images and pose streams out of rosbag2 bags (sqlite3 or MCAP) and ROS 1 bags.

The storage is detected; a ROS 1 ``.bag`` (or a directory of split ``.bag`` files) is read by
:mod:`vpr_ros.mapdb.rosbag1`, which hands its messages on converted to ROS 2 CDR, so the rest
of this module (and ``vpr bag play``) sees one kind of message whatever the bag.

Bags come from robots, and robots lose power: a recording killed mid-write has no
``metadata.yaml``, an MCAP file without its footer, or an SQLite file shorter than its header
says. rosbags refuses all of these outright. This reader opens a bag with rosbags' AnyReader
when it can and, when it cannot (or when reading fails part-way), salvages the storage files
directly: SQLite rows in rowid order with the size check relaxed, MCAP records front to back
(partial chunks included). Everything before the damage is kept and a warning says what was
lost; a bag from which nothing at all can be read is a :class:`~vpr_ros.errors.BagError`.
A single undecodable message is skipped and counted, never fatal.
"""

from __future__ import annotations

import logging
import mmap
import re
import sqlite3
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from vpr_ros.errors import BagError, InputError
from vpr_ros.mapdb.bag_chunks import MCAP_CHUNKS, skip_damage
from vpr_ros.mapdb.bag_writer import (CAMERA_INFO, IMAGE, IMAGE_TYPES, NAVSAT_FIX, POSE_STAMPED,
                                      POSE_TYPES, TF_STATIC, default_typestore)
from vpr_ros.mapdb.camera import CameraModel
from vpr_ros.mapdb.poses import PoseTrack, navsat_track
from vpr_ros.mapdb.rosbag1 import Ros1Bag, Ros1Types, is_ros1_bag, ros1_files
from vpr_ros.mapdb.transforms import TransformTree
from vpr_ros.runtime.image_codec import (DEFAULT_MAX_PIXELS, decode_compressed, decode_depth,
                                         decode_image)

log = logging.getLogger(__name__)

# Per-message warnings beyond this many per topic are counted, not printed.
_MAX_FRAME_WARNINGS = 5


@dataclass(frozen=True)
class RawMessage:
    """One serialised message as stored: topic, type, bag (receive) time and CDR bytes."""

    topic: str
    msgtype: str
    log_time_ns: int
    data: bytes | memoryview
    #: Why ``data`` is not CDR of ``msgtype`` (a ROS 1 message that could not be converted:
    #: corrupt bytes); empty for every ordinary message. Decoding such a message raises.
    error: str = ""


@dataclass(frozen=True)
class ImageFrame:
    """A decoded camera frame: header stamp (bag time when the header has none), RGB pixels."""

    stamp_ns: int
    rgb: np.ndarray
    frame_id: str
    index: int  # 0-based position among the messages read from its topic (corrupt included)


@dataclass(frozen=True)
class DepthFrame:
    """A decoded depth image: header stamp, (H, W) float32 metres (NaN: no reading)."""

    stamp_ns: int
    depth_m: np.ndarray
    index: int


@dataclass(frozen=True)
class SyncedFrame:
    """A camera frame with its depth image and right stereo frame (None where not asked for
    or not found within the stamp tolerance)."""

    image: ImageFrame
    depth: DepthFrame | None = None
    right: ImageFrame | None = None


@dataclass
class ReadStats:
    """What reading found; the map builder prints it, tests check it."""

    images_read: int = 0
    images_corrupt: int = 0
    poses_read: int = 0
    poses_dropped: int = 0
    damaged: bool = False
    warnings: list[str] = field(default_factory=list)


def _stamp_ns(header: Any, fallback_ns: int) -> int:
    stamp = int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
    return stamp if stamp > 0 else int(fallback_ns)


class BagReader:
    """An opened bag: ``topics``, raw ``messages()``, decoded ``images()`` and ``poses()``.

    ``path`` is a rosbag2 directory, a single ``.mcap`` / ``.db3`` file, a ROS 1 ``.bag`` file
    or a directory of split ``.bag`` files. ``storage`` names what was found: ``sqlite3``,
    ``mcap`` or ``rosbag1``. ``unreadable`` maps a topic whose messages cannot be decoded (a
    ROS 1 connection with an unusable message definition) to the reason; its messages are
    never delivered, and asking for it by name is a :class:`BagError`.
    """

    def __init__(self, path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 typestore: Any | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise BagError(f"bag {self.path} does not exist; expected a rosbag2 directory "
                           "(with metadata.yaml and .db3/.mcap files), a .mcap/.db3 file or a "
                           "ROS 1 .bag file")
        self.max_pixels = max_pixels
        self.stats = ReadStats()
        self._default_typestore = typestore or default_typestore()
        self._any: Any | None = None
        self._salvage: _Salvage | None = None
        self._ros1: Ros1Bag | None = None
        self._ros1_types: Ros1Types | None = None
        self.storage = "unknown"
        self.topics: dict[str, str] = {}
        self.message_counts: dict[str, int] = {}
        self.unreadable: dict[str, str] = {}
        self._open()

    # -- opening --------------------------------------------------------------------------------

    def _open(self) -> None:
        from rosbags.highlevel import AnyReader

        if is_ros1_bag(self.path):
            self._open_ros1()
            return
        try:
            reader = AnyReader([self.path], default_typestore=self._default_typestore)
            reader.open()
        except Exception as exc:  # rosbags raises several unrelated types for broken bags
            reason = f"rosbags cannot open it ({type(exc).__name__}: {exc})"
            lenient = self._check_mcap_profiles()
            if lenient:
                self._open_salvage(reason, damaged=False, note=lenient)
            else:
                self._open_salvage(reason)
            return
        self._any = reader
        self.storage = self._detect_storage()
        for conn in reader.connections:
            self.topics.setdefault(conn.topic, conn.msgtype)
            self.message_counts[conn.topic] = self.message_counts.get(conn.topic, 0) + \
                int(conn.msgcount)

    def _open_ros1(self) -> None:
        bag = Ros1Bag(ros1_files(self.path), self.warn)
        self.storage = "rosbag1"
        self.stats.damaged = bag.damaged
        if not bag.connections:
            bag.close()
            raise BagError(f"ROS 1 bag {self.path} is damaged and no topic could be recovered "
                           "from it; the recording is unusable (re-record it, or repair it with "
                           "'rosbag reindex' where ROS 1 is installed)")
        self._ros1 = bag
        self._ros1_types = Ros1Types(bag.connections, self._default_typestore, self.warn)
        for conn in bag.connections:
            self.topics.setdefault(conn.topic, conn.msgtype)
            known = self.message_counts.get(conn.topic, 0)
            self.message_counts[conn.topic] = -1 if conn.count < 0 or known < 0 else \
                known + conn.count
            reason = self._ros1_types.unreadable.get(conn.msgtype)
            if reason is not None and conn.topic not in self.unreadable:
                self.unreadable[conn.topic] = reason
                self.warn(f"topic {conn.topic} ({conn.msgtype}) of ROS 1 bag {self.path} cannot "
                          f"be decoded: {reason}; its messages are skipped, every other topic "
                          "is read")

    def _detect_storage(self) -> str:
        files = _storage_files(self.path)
        kinds = {"mcap" if f.suffix == ".mcap" else "sqlite3" for f in files}
        return kinds.pop() if len(kinds) == 1 else "unknown"

    def _check_mcap_profiles(self) -> str:
        """Refuse an MCAP that is not ROS 2 (another profile, or an intact file whose channels
        are not CDR) with a :class:`NotRos2BagError` naming what it is: such a file is not
        damaged, and salvaging it would only fail message by message. Returns a note when an
        intact MCAP merely leaves the profile empty but carries ROS 2 CDR channels (read as
        ROS 2, not damaged); empty when the normal damage path applies."""
        notes = []
        for f in _storage_files(self.path):
            if f.suffix != ".mcap":
                continue
            ident = mcap_identity(f)
            if ident is None:
                continue  # no readable header: damage, salvage decides
            foreign = ident.profile not in ("ros2", "")
            if not foreign and ident.intact and ident.foreign_encodings():
                foreign = True
            if foreign:
                raise NotRos2BagError(f"bag {self.path} is not a ROS 2 MCAP: "
                                      f"{ident.describe(f)}. vpr reads ROS 2 bags (MCAP profile "
                                      "'ros2' with CDR messages, or sqlite3) and ROS 1 .bag "
                                      "files; record the data through ROS 2 or convert it")
            if ident.profile == "" and ident.intact:
                notes.append(f"{f.name} leaves the MCAP profile empty but its channels are ROS 2"
                             " CDR; reading it as ROS 2")
        return "; ".join(notes) if notes and len(notes) == len(
            [f for f in _storage_files(self.path) if f.suffix == ".mcap"]) else ""

    def _open_salvage(self, reason: str, damaged: bool = True, note: str = "") -> None:
        files = _storage_files(self.path)
        if not files:
            raise BagError(f"bag {self.path} cannot be read: {reason}; and no .db3 or .mcap "
                           "storage file was found to salvage (is this a rosbag2 bag?)")
        if damaged:
            self.warn(f"bag {self.path} is damaged or incomplete: {reason}. Salvaging its "
                      f"storage files directly ({', '.join(f.name for f in files)}); messages "
                      "in the damaged part are lost")
        else:
            self.warn(note)
        self.stats.damaged = damaged
        salvage = _Salvage(files, self.warn)
        salvage.scan_topics()
        if not salvage.topics:
            raise BagError(f"bag {self.path} is damaged and no topic could be recovered from "
                           f"{', '.join(str(f) for f in files)}; the recording is unusable "
                           "(re-record it, or repair it with 'ros2 bag reindex' where ROS is "
                           "installed)")
        self._salvage = salvage
        self.storage = self._detect_storage()
        self.topics = dict(salvage.topics)
        self.message_counts = {t: -1 for t in self.topics}  # unknown until read

    def warn(self, message: str) -> None:
        """Log and record a warning once (several passes over a damaged bag meet it again)."""
        if message in self.stats.warnings:
            return
        self.stats.warnings.append(message)
        log.warning(message)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._ros1 is not None:
            self._ros1.close()
            self._ros1 = None
        if self._any is not None:
            try:
                self._any.close()
            except Exception:  # closing a half-broken reader must not mask the real error
                pass
            self._any = None

    def __enter__(self) -> "BagReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- topics ---------------------------------------------------------------------------------

    def describe_topics(self) -> str:
        """'topic (type)' for every topic, for error messages."""
        if not self.topics:
            return "(none)"
        return ", ".join(f"{t} ({m})" for t, m in sorted(self.topics.items()))

    def check_topic(self, topic: str, allowed: Sequence[str]) -> str:
        """The type of ``topic``, or a BagError when it is absent or of a type not in ``allowed``."""
        if topic not in self.topics:
            raise BagError(f"topic {topic} is not in bag {self.path}; available topics: "
                           f"{self.describe_topics()}")
        msgtype = self.topics[topic]
        if topic in self.unreadable:
            raise BagError(f"topic {topic} ({msgtype}) in bag {self.path} cannot be decoded: "
                           f"{self.unreadable[topic]}. Re-record it with the message package "
                           "installed, or pick another topic")
        if msgtype not in allowed:
            raise BagError(f"topic {topic} in bag {self.path} has type {msgtype}; expected one "
                           f"of {', '.join(allowed)} (pick another topic)")
        return msgtype

    # -- raw messages ---------------------------------------------------------------------------

    def messages(self, topics: Sequence[str] | None = None) -> Iterator[RawMessage]:
        """Every stored message of ``topics`` (all when None), in bag order.

        If rosbags fails part-way, reading continues from the storage files directly and
        skips what was already delivered, so a damaged region costs only its own messages.
        """
        wanted = set(self.topics if topics is None else topics)
        if self._ros1 is not None:
            yield from self._ros1_messages(wanted)
            return
        if self._salvage is not None:
            yield from self._salvage.messages(wanted, Counter())
            return
        assert self._any is not None
        conns = [c for c in self._any.connections if c.topic in wanted]
        if not conns:
            return
        delivered: Counter[tuple[str, int]] = Counter()
        per_topic: Counter[str] = Counter()
        problem = ""
        try:
            for conn, log_time, data in self._any.messages(connections=conns):
                delivered[(conn.topic, int(log_time))] += 1
                per_topic[conn.topic] += 1
                yield RawMessage(conn.topic, conn.msgtype, int(log_time), data)
        except Exception as exc:
            problem = (f"reading bag {self.path} failed after {sum(per_topic.values())} "
                       f"messages ({type(exc).__name__}: {exc})")
        else:
            # rosbags can stop early on damaged MCAP chunks without raising; the counts in the
            # bag's metadata tell us when that happened.
            short = {t: (per_topic[t], self.message_counts.get(t, 0)) for t in sorted(wanted)
                     if per_topic[t] < self.message_counts.get(t, 0)}
            if short:
                problem = (f"bag {self.path} delivered fewer messages than its metadata lists ("
                           + ", ".join(f"{t}: {got} of {want}" for t, (got, want) in
                                       short.items()) + ")")
        if problem:
            self.stats.damaged = True
            self.warn(f"{problem}; salvaging the rest from the storage files directly")
            salvage = _Salvage(_storage_files(self.path), self.warn)
            salvage.scan_topics()
            yield from salvage.messages(wanted, delivered)

    def _ros1_messages(self, wanted: set[str]) -> Iterator[RawMessage]:
        """ROS 1 messages converted to ROS 2 CDR; one that cannot be converted (corrupt) is
        still delivered, with ``error`` set, so frame counts and indexes stay true."""
        assert self._ros1 is not None and self._ros1_types is not None
        for topic in sorted(wanted & set(self.unreadable)):
            self.warn(f"skipping topic {topic}: {self.unreadable[topic]}")
        types = self._ros1_types
        for m in self._ros1.messages(wanted - set(self.unreadable)):
            try:
                data: bytes | memoryview = types.to_cdr(m.msgtype, m.data)
                error = ""
            except Exception as exc:  # corrupt bytes surface as many exception types
                data, error = m.data, (f"undecodable ROS 1 message ({type(exc).__name__}: "
                                       f"{exc})")
            yield RawMessage(m.topic, m.msgtype, m.log_time_ns, data, error)
        self.stats.damaged = self.stats.damaged or self._ros1.damaged

    def deserialize(self, message: RawMessage) -> Any:
        """The message as a rosbags dataclass (raises on corrupt bytes)."""
        if message.error:
            raise BagError(message.error)
        if self._ros1_types is not None:
            return self._ros1_types.store_for(message.msgtype).deserialize_cdr(
                bytes(message.data), message.msgtype)
        store = self._any.typestore if self._any is not None else self._default_typestore
        if message.msgtype not in store.types:
            store = self._default_typestore
        return store.deserialize_cdr(bytes(message.data), message.msgtype)

    # -- images ---------------------------------------------------------------------------------

    def images(self, topic: str) -> Iterator[ImageFrame]:
        """Decoded RGB frames of an Image or CompressedImage topic; corrupt frames are skipped
        with a warning and counted in ``stats.images_corrupt``."""
        self.check_topic(topic, IMAGE_TYPES)
        index = -1
        for message in self.messages([topic]):
            index += 1
            frame = self.decode_frame(message, index)
            if frame is not None:
                yield frame

    def decode_frame(self, message: RawMessage, index: int) -> ImageFrame | None:
        """One image message as an RGB frame; None (counted, warned) when it is corrupt."""
        try:
            msg = self.deserialize(message)
            if message.msgtype == IMAGE:
                rgb = decode_image(msg.height, msg.width, msg.encoding, msg.step, msg.data,
                                   msg.is_bigendian, self.max_pixels)
            else:
                rgb = decode_compressed(msg.format, msg.data, self.max_pixels)
            stamp = _stamp_ns(msg.header, message.log_time_ns)
            frame_id = str(msg.header.frame_id)
        except Exception as exc:  # corrupt bytes surface as many exception types
            self._skip(message, index, "frame", exc)
            return None
        self.stats.images_read += 1
        return ImageFrame(stamp, rgb, frame_id, index)

    def decode_depth_frame(self, message: RawMessage, index: int) -> DepthFrame | None:
        """One depth image message (16UC1 mm / 32FC1 m) in metres; None (counted as a corrupt
        frame, warned) when it is corrupt or of another encoding."""
        try:
            msg = self.deserialize(message)
            if message.msgtype != IMAGE:
                raise InputError(f"depth must be a raw sensor_msgs/Image, got {message.msgtype}")
            depth = decode_depth(msg.height, msg.width, msg.encoding, msg.step, msg.data,
                                 msg.is_bigendian, self.max_pixels)
            stamp = _stamp_ns(msg.header, message.log_time_ns)
        except Exception as exc:
            self._skip(message, index, "depth frame", exc)
            return None
        return DepthFrame(stamp, depth, index)

    def _skip(self, message: RawMessage, index: int, what: str, exc: Exception) -> None:
        self.stats.images_corrupt += 1
        reason = str(exc) if isinstance(exc, InputError) else \
            f"undecodable message ({type(exc).__name__}: {exc})"
        text = (f"skipping corrupt {what} #{index} on {message.topic} at bag time "
                f"{message.log_time_ns} ns: {reason}")
        if self.stats.images_corrupt <= _MAX_FRAME_WARNINGS:
            self.warn(text)
        else:
            log.debug(text)

    def synced_frames(self, topic: str, depth_topic: str | None = None,
                      right_topic: str | None = None, tolerance_ns: int = 20_000_000,
                      buffer: int = 30) -> Iterator[SyncedFrame]:
        """Frames of ``topic`` with the depth image and/or the right stereo image closest in
        stamp (within ``tolerance_ns``; None where there is none), in one pass over the bag.

        Partners arrive before or after their frame in bag order, so frames wait until every
        partner stream has passed their stamp (or ``buffer`` later messages have gone by);
        only ``buffer`` decoded partners per stream are kept, which bounds memory."""
        from collections import deque

        self.check_topic(topic, IMAGE_TYPES)
        streams = {k: t for k, t in (("depth", depth_topic), ("right", right_topic)) if t}
        for kind, t in streams.items():
            self.check_topic(t, (IMAGE,) if kind == "depth" else IMAGE_TYPES)
        recent: dict[str, deque[Any]] = {k: deque(maxlen=buffer) for k in streams}
        latest: dict[str, int] = {k: -1 for k in streams}
        pending: deque[tuple[ImageFrame, int]] = deque()
        indices: Counter[str] = Counter()
        seen = 0

        def partner(kind: str, stamp: int) -> Any:
            best = min(recent[kind], key=lambda p: abs(p.stamp_ns - stamp), default=None)
            return best if best is not None and abs(best.stamp_ns - stamp) <= tolerance_ns \
                else None

        def ready(frame: ImageFrame, since: int, final: bool) -> bool:
            return final or seen - since > buffer or all(
                latest[k] > frame.stamp_ns + tolerance_ns for k in streams)

        def release(final: bool) -> Iterator[SyncedFrame]:
            while pending and ready(pending[0][0], pending[0][1], final):
                frame, _ = pending.popleft()
                yield SyncedFrame(frame, partner("depth", frame.stamp_ns) if "depth" in streams
                                  else None,
                                  partner("right", frame.stamp_ns) if "right" in streams
                                  else None)

        by_topic = {topic: "image", **{t: k for k, t in streams.items()}}
        for message in self.messages(list(by_topic)):
            seen += 1
            kind = by_topic[message.topic]
            index = indices[kind]
            indices[kind] += 1
            if kind == "image":
                frame = self.decode_frame(message, index)
                if frame is not None:
                    pending.append((frame, seen))
            elif kind == "depth":
                depth = self.decode_depth_frame(message, index)
                if depth is not None:
                    recent["depth"].append(depth)
                    latest["depth"] = max(latest["depth"], depth.stamp_ns)
            else:
                right = self.decode_frame(message, index)
                if right is not None:
                    self.stats.images_read -= 1  # count main-topic frames only
                    recent["right"].append(right)
                    latest["right"] = max(latest["right"], right.stamp_ns)
            yield from release(False)
        yield from release(True)

    def camera_info(self, topic: str, name: str, mount: Sequence[float] | None = None,
                    base_frame: str = "") -> CameraModel:
        """The calibration a CameraInfo topic carries, from its first valid message; a later
        message with a different calibration is warned about (the first is used). BagError
        naming the problem when no message is a valid calibration."""
        self.check_topic(topic, (CAMERA_INFO,))
        first: CameraModel | None = None
        problem = ""
        for message in self.messages([topic]):
            try:
                model = CameraModel.from_camera_info(self.deserialize(message), name, mount,
                                                     base_frame)
            except Exception as exc:
                problem = problem or str(exc)
                continue
            if first is None:
                first = model
            elif (model.width, model.height, model.k, model.d) != \
                    (first.width, first.height, first.k, first.d):
                self.warn(f"{topic}: the calibration changes during the bag (first "
                          f"{first.width}x{first.height} fx={first.k[0]:.2f}, later "
                          f"{model.width}x{model.height} fx={model.k[0]:.2f}); using the first")
                break
        if first is None:
            raise BagError(f"no valid CameraInfo on {topic} in bag {self.path}"
                           + (f": {problem}" if problem else " (the topic has no messages)"))
        if problem:
            self.warn(f"{topic}: some CameraInfo messages are invalid ({problem}); using the "
                      "first valid one")
        return first

    def static_transforms(self, topic: str = TF_STATIC) -> TransformTree:
        """Every transform on ``/tf_static`` (empty when the bag has none)."""
        tree = TransformTree()
        if topic not in self.topics:
            return tree
        for message in self.messages([topic]):
            try:
                msg = self.deserialize(message)
                for tf in msg.transforms:
                    t, q = tf.transform.translation, tf.transform.rotation
                    tree.add(str(tf.header.frame_id), str(tf.child_frame_id),
                             (float(t.x), float(t.y), float(t.z), float(q.x), float(q.y),
                              float(q.z), float(q.w)))
            except Exception as exc:
                self.warn(f"skipping an unreadable {topic} message ({type(exc).__name__}: "
                          f"{exc})")
        return tree

    def stamps(self, topic: str) -> list[int]:
        """Header stamp of every message on ``topic``, in recording order, so stamp i belongs
        to the topic's i-th message (as :attr:`ImageFrame.index` and loop ground-truth
        matrices count them); a message without a stamp or that cannot be decoded keeps its
        place with its bag time."""
        if topic not in self.topics:
            self.check_topic(topic, ())
        out = []
        for message in self.messages([topic]):
            try:
                out.append(_stamp_ns(self.deserialize(message).header, message.log_time_ns))
            except Exception:  # corrupt bytes surface as many exception types
                out.append(int(message.log_time_ns))
        return out

    # -- poses ----------------------------------------------------------------------------------

    def poses(self, topic: str) -> PoseTrack:
        """All samples of an Odometry / PoseStamped / PoseWithCovarianceStamped / NavSatFix topic.

        NavSatFix becomes local ENU metres around the first valid fix (raw fixes kept in
        ``track.gnss``); fixes flagged 'no fix' and corrupt messages are dropped and counted.
        """
        msgtype = self.check_topic(topic, POSE_TYPES)
        stamps: list[int] = []
        positions: list[tuple[float, float, float]] = []
        quats: list[tuple[float, float, float, float]] = []
        fixes: list[tuple[float, float, float]] = []
        frame_id = ""
        dropped_before = self.stats.poses_dropped
        for message in self.messages([topic]):
            try:
                msg = self.deserialize(message)
                stamp = _stamp_ns(msg.header, message.log_time_ns)
                if msgtype == NAVSAT_FIX:
                    if int(msg.status.status) < 0:  # NO_FIX (-1) or UNKNOWN (-2)
                        self.stats.poses_dropped += 1
                        continue
                    fixes.append((float(msg.latitude), float(msg.longitude),
                                  float(msg.altitude)))
                else:
                    pose = msg.pose if msgtype == POSE_STAMPED else msg.pose.pose
                    p, q = pose.position, pose.orientation
                    position = (float(p.x), float(p.y), float(p.z))
                    quat = (float(q.x), float(q.y), float(q.z), float(q.w))
                    if not (np.isfinite(position).all() and np.isfinite(quat).all()
                            and np.linalg.norm(quat) > 1e-6):
                        self.stats.poses_dropped += 1
                        continue
                    positions.append(position)
                    quats.append(quat)
                stamps.append(stamp)
                frame_id = frame_id or str(msg.header.frame_id)
            except Exception as exc:  # corrupt bytes surface as many exception types
                self.stats.poses_dropped += 1
                text = (f"skipping corrupt pose message on {topic} at bag time "
                        f"{message.log_time_ns} ns ({type(exc).__name__}: {exc})")
                if self.stats.poses_dropped - dropped_before <= _MAX_FRAME_WARNINGS:
                    self.warn(text)
                else:
                    log.debug(text)
        if self.stats.poses_dropped > dropped_before:
            self.warn(f"dropped {self.stats.poses_dropped - dropped_before} pose message(s) on "
                       f"{topic} (corrupt, no fix or invalid values)")
        self.stats.poses_read += len(stamps)
        if msgtype == NAVSAT_FIX:
            return navsat_track(stamps, fixes if fixes else np.zeros((0, 3)), frame_id)
        if not stamps:
            return PoseTrack(np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 4)),
                             None, frame_id)
        return PoseTrack.from_samples(stamps, positions, quats, None, frame_id)


class NotRos2BagError(BagError):
    """An intact bag file that is not a ROS 2 recording (e.g. an MCAP of another profile)."""


@dataclass
class McapIdentity:
    """What an MCAP file says it is: its header's profile and library, the message encodings
    of its channels and the encodings of its schemas, and whether it ends with a footer."""

    profile: str
    library: str
    intact: bool
    message_encodings: dict[str, str] = field(default_factory=dict)   # topic -> encoding
    schema_encodings: set[str] = field(default_factory=set)

    def foreign_encodings(self) -> set[str]:
        """Message encodings other than CDR and schema encodings other than ROS 2's."""
        return ({e for e in self.message_encodings.values() if e != "cdr"}
                | {e for e in self.schema_encodings if e not in ("ros2msg", "ros2idl", "")})

    def describe(self, path: Path) -> str:
        topics = sorted(self.message_encodings.items())
        shown = ", ".join(f"{t} [{e}]" for t, e in topics[:4]) + \
            (f" and {len(topics) - 4} more" if len(topics) > 4 else "")
        return (f"{path.name} has profile {self.profile!r}"
                + (f" (written by {self.library!r})" if self.library else "")
                + (f", message encodings {', '.join(sorted(set(self.message_encodings.values())))}"
                   if topics else "")
                + (f", schema encodings {', '.join(sorted(self.schema_encodings))}"
                   if self.schema_encodings else "")
                + (f"; channels {shown}" if topics else "")
                + ("" if self.intact else "; the file is also cut off"))


def mcap_identity(path: Path) -> McapIdentity | None:
    """Profile, library, channel encodings and footer of an MCAP file (None: no readable
    header). Channels come from the summary section when there is one, else from walking the
    data section."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if head != _MCAP_MAGIC:
            return None
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            return None
    with buf:
        end = len(buf)
        try:
            if buf[8] != 0x01:
                return None
            (length,) = struct.unpack_from("<Q", buf, 9)
            cur = _Cursor(bytes(buf[17:17 + length]))
            profile, library = cur.string(), cur.string()
        except (IndexError, struct.error):
            return None
        # The file ends with the Footer record (opcode, length 20, 20 bytes) and the magic.
        footer = end - 37
        intact = footer >= 17 + length and buf[end - 8:end] == _MCAP_MAGIC and \
            buf[footer:footer + 9] == b"\x02\x14" + b"\x00" * 7
        walker = _McapWalker(path, {}, lambda _m: None, messages=False)
        start, stop = 17 + length, end
        if intact:
            (summary,) = struct.unpack_from("<Q", buf, footer + 9)
            if 17 + length <= summary < footer:
                start, stop = summary, footer
        for _ in walker.walk(buf, start, stop, False):
            pass
    encodings = {topic: walker.channel_encodings[cid]
                 for cid, (topic, _t) in walker.channels.items()
                 if cid in walker.channel_encodings}
    return McapIdentity(profile, library, intact, encodings,
                        set(walker.schema_encodings.values()))


def _storage_files(path: Path) -> list[Path]:
    """The storage files of a bag: listed in metadata.yaml when readable, else found by suffix."""
    if path.is_file():
        return [path] if path.suffix in (".mcap", ".db3") else []
    listed: list[Path] = []
    meta = path / "metadata.yaml"
    if meta.is_file():
        try:
            import yaml

            info = yaml.safe_load(meta.read_text())["rosbag2_bagfile_information"]
            listed = [path / Path(p).name for p in info.get("relative_file_paths", [])]
        except Exception:  # a broken metadata.yaml is one of the damages we salvage from
            listed = []
    listed = [p for p in listed if p.is_file() and p.suffix in (".mcap", ".db3")]
    if listed:
        return listed
    # Split recordings are name_0, name_1, ..., name_10: sort numbers as numbers.
    return sorted((p for p in path.iterdir() if p.is_file() and p.suffix in (".mcap", ".db3")),
                  key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)",
                                                                              p.name)])


# ------------------------------------------------------------------------------------ salvage

class _Salvage:
    """Read storage files without rosbags, stopping cleanly where the data is damaged."""

    def __init__(self, files: Sequence[Path], warn: Callable[[str], None]) -> None:
        self.files = list(files)
        self.warn = warn
        self.topics: dict[str, str] = {}

    def scan_topics(self) -> None:
        for f in self.files:
            try:
                if f.suffix == ".db3":
                    for _, name, msgtype in _sqlite_topics(f):
                        self.topics.setdefault(name, msgtype)
                else:
                    for _ in _mcap_records(f, self.topics, self.warn, messages=False):
                        pass
            except Exception as exc:
                self.warn(f"no topic list could be read from {f} ({type(exc).__name__}: {exc})")

    def messages(self, wanted: set[str],
                 skip: Counter[tuple[str, int]]) -> Iterator[RawMessage]:
        for f in self.files:
            if f.suffix == ".db3":
                source = _sqlite_messages(f, self.warn)
            else:
                source = _mcap_records(f, {}, self.warn, messages=True)
            for message in source:
                if message.topic not in wanted:
                    continue
                key = (message.topic, message.log_time_ns)
                if skip[key] > 0:
                    skip[key] -= 1
                    continue
                yield message


def _sqlite_connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    # A truncated file is shorter than its header says; SQLite then refuses to open it unless
    # writable_schema is on, which makes it trust the real file size (nothing is written).
    con.execute("PRAGMA writable_schema=ON")
    return con


def _sqlite_topics(path: Path) -> list[tuple[int, str, str]]:
    con = _sqlite_connect(path)
    try:
        return [(int(i), str(n), str(t))
                for i, n, t in con.execute("SELECT id, name, type FROM topics")]
    finally:
        con.close()


def _sqlite_messages(path: Path, warn: Callable[[str], None]) -> Iterator[RawMessage]:
    """Rows in rowid (write) order; past a damaged page, probe a bounded number of rowids
    further on, since a corrupt leaf page loses only the rows stored in it."""
    try:
        con = _sqlite_connect(path)
        topics = {i: (n, t) for i, n, t in _sqlite_topics(path)}
    except sqlite3.DatabaseError as exc:
        warn(f"{path}: the SQLite file is unreadable ({exc}); no message can be salvaged")
        return
    last_id, delivered, skipped_probe, bad_rows = 0, 0, 0, 0
    try:
        step = 1
        while True:
            query = "SELECT id, topic_id, timestamp, data FROM messages WHERE id >= ? ORDER BY id"
            failed = False
            try:
                for row_id, topic_id, stamp, data in con.execute(query, (last_id + step,)):
                    last_id, step = int(row_id), 1
                    if not (isinstance(topic_id, int) and isinstance(stamp, int)
                            and isinstance(data, bytes)):
                        bad_rows += 1  # a damaged page can yield rows of garbage columns
                        continue
                    name, msgtype = topics.get(topic_id, ("", ""))
                    if name:
                        delivered += 1
                        yield RawMessage(name, msgtype, int(stamp), data)
            except sqlite3.DatabaseError as exc:
                failed = True
                if skipped_probe == 0:
                    warn(f"{path}: damaged SQLite data after row {last_id} ({exc}); "
                         "skipping the damaged rows")
            if not failed:
                break
            skipped_probe += 1
            if skipped_probe > 16:
                warn(f"{path}: no readable rows after row {last_id}; salvaged {delivered} "
                     "messages before the damage")
                break
            step *= 2
    finally:
        con.close()
    if bad_rows:
        warn(f"{path}: skipped {bad_rows} damaged SQLite row(s) with invalid columns")


_MCAP_MAGIC = b"\x89MCAP0\r\n"


class _Cursor:
    """Little-endian field reader over bytes that raises IndexError past the end."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise IndexError("record ends early")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        return self.take(self.u32()).decode("utf-8", errors="replace")


def _mcap_records(path: Path, topics: dict[str, str], warn: Callable[[str], None],
                  messages: bool) -> Iterator[RawMessage]:
    """Walk an MCAP file's records front to back (format: mcap.dev/spec), filling ``topics``
    from Schema/Channel records and yielding Message records, including those inside chunks and
    inside a chunk cut short by the end of the file."""
    with path.open("rb") as fh:
        if fh.read(8) != _MCAP_MAGIC:
            warn(f"{path}: not an MCAP file (bad magic); nothing salvaged from it")
            return
        # Memory-mapped, so salvaging a multi-gigabyte recording does not load it whole.
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield from _McapWalker(path, topics, warn, messages).walk(data, 8, len(data), False)


# Opcodes the MCAP specification defines (Header .. DataEnd).
_MCAP_OPS = frozenset(range(0x01, 0x10))


class _McapWalker:
    """Record walker that survives damage: a record whose opcode or length is impossible is
    treated as garbage and the walk resynchronises on the next plausible Message record (known
    channel, length inside the buffer, followed by a valid opcode or the end)."""

    def __init__(self, path: Path, topics: dict[str, str], warn: Callable[[str], None],
                 messages: bool) -> None:
        self.path, self.topics, self.warn, self.messages = path, topics, warn, messages
        self.schemas: dict[int, str] = {}
        self.schema_encodings: dict[int, str] = {}
        self.channels: dict[int, tuple[str, str]] = {}
        self.channel_encodings: dict[int, str] = {}

    def walk(self, buf: Any, pos: int, end: int, nested: bool) -> Iterator[RawMessage]:
        where = "chunk" if nested else "file"
        while pos < end:
            if pos + 9 > end:
                self.warn(f"{self.path}: {where} ends inside a record header at byte {pos}; "
                          "the rest is lost")
                return
            op = buf[pos]
            (length,) = struct.unpack_from("<Q", buf, pos + 1)
            body_end = pos + 9 + length
            if op in (0x02, 0x0F) and not nested:  # footer / data end: data section is over
                return
            if op == 0x06 and not nested and body_end > end:
                yield from self.chunk(buf[pos + 9:end], pos, truncated=True)
                return
            if op not in _MCAP_OPS or body_end > end or (nested and op in (0x02, 0x06, 0x0F)):
                resume = skip_damage(self.path, where, pos, self.resync(buf, pos + 1, end),
                                     self.warn)
                if resume is None:
                    return
                pos = resume
                continue
            body = buf[pos + 9:body_end]
            if op == 0x06:
                yield from self.chunk(body, pos, truncated=False)
            else:
                try:
                    message = self.record(op, body)
                except (IndexError, struct.error) as exc:
                    self.warn(f"{self.path}: malformed record (op 0x{op:02x}) at byte {pos} of "
                              f"the {where}: {exc}")
                    message = None
                if message is not None:
                    yield message
            pos = body_end

    def resync(self, buf: Any, start: int, end: int) -> int | None:
        """Offset of the next plausible Message record at or after ``start``, or None."""
        pos = start
        while True:
            pos = buf.find(b"\x05", pos, end)
            if pos < 0 or pos + 11 > end:
                return None
            (length,) = struct.unpack_from("<Q", buf, pos + 1)
            (channel,) = struct.unpack_from("<H", buf, pos + 9)
            nxt = pos + 9 + length
            if length >= 22 and nxt <= end and channel in self.channels and (
                    nxt == end or buf[nxt] in _MCAP_OPS):
                return pos
            pos += 1

    def chunk(self, body: bytes, pos: int, truncated: bool) -> Iterator[RawMessage]:
        try:
            cur = _Cursor(body)
            cur.take(16)  # message start / end time
            uncompressed_size = cur.u64()
            cur.u32()  # CRC: not checked; damaged records are caught one by one instead
            compression = cur.string()
            size = cur.u64()
            payload = body[cur.pos:cur.pos + size]
        except IndexError:
            self.warn(f"{self.path}: chunk at byte {pos} is cut off before its data; "
                      "everything after it is lost")
            return
        inner = MCAP_CHUNKS.salvage(self.path, pos, payload, compression, uncompressed_size,
                                    truncated, self.warn)
        if inner is None:
            return
        yield from self.walk(inner, 0, len(inner), nested=True)

    def record(self, op: int, body: bytes) -> RawMessage | None:
        cur = _Cursor(body)
        if op == 0x03:  # Schema
            schema_id = cur.u16()
            self.schemas[schema_id] = cur.string()
            self.schema_encodings[schema_id] = cur.string()
        elif op == 0x04:  # Channel
            channel_id, schema_id = cur.u16(), cur.u16()
            topic = cur.string()
            self.channel_encodings[channel_id] = cur.string()
            msgtype = self.schemas.get(schema_id, "")
            self.channels[channel_id] = (topic, msgtype)
            if msgtype:
                self.topics.setdefault(topic, msgtype)
        elif op == 0x05 and self.messages:  # Message
            channel_id = cur.u16()
            cur.u32()  # sequence
            log_time = cur.u64()
            cur.u64()  # publish time
            topic, msgtype = self.channels.get(channel_id, ("", ""))
            if topic:
                return RawMessage(topic, msgtype, log_time, body[cur.pos:])
        return None
