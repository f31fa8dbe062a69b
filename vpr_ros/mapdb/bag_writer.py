"""Write rosbag2 bags (sqlite3 or MCAP) and ROS 1 bags of camera images and poses (rosbags).

``ros2 bag`` is not available as a wheel, yet tests, the demo and benchmarks need real bags:
images of a route plus odometry / poses / GNSS, in every storage format a robot may have
recorded. Messages are built from the typestore's own classes and serialised to CDR (rosbag2)
or the ROS 1 wire format with ROS 1 (Noetic) definitions and a ``seq`` in every header, so the
files are what ``ros2 bag record`` / ``rosbag record`` write and any reader (ours, rosbags, ROS
itself) opens them.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from vpr_ros.errors import BagError, InputError
from vpr_ros.runtime.image_codec import encode_compressed, encode_image

Storage = Literal["sqlite3", "mcap", "rosbag1"]
STORAGES = ("sqlite3", "mcap", "rosbag1")

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
ODOMETRY = "nav_msgs/msg/Odometry"
POSE_STAMPED = "geometry_msgs/msg/PoseStamped"
POSE_WITH_COVARIANCE_STAMPED = "geometry_msgs/msg/PoseWithCovarianceStamped"
NAVSAT_FIX = "sensor_msgs/msg/NavSatFix"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
TF_MESSAGE = "tf2_msgs/msg/TFMessage"
TF_STATIC = "/tf_static"

POSE_TYPES = (ODOMETRY, POSE_STAMPED, POSE_WITH_COVARIANCE_STAMPED, NAVSAT_FIX)
IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)

# Short names accepted wherever a message type is asked for.
TYPE_ALIASES = {
    "image": IMAGE, "compressed": COMPRESSED_IMAGE, "odometry": ODOMETRY, "odom": ODOMETRY,
    "pose": POSE_STAMPED, "pose_cov": POSE_WITH_COVARIANCE_STAMPED, "navsat": NAVSAT_FIX,
}


def default_typestore() -> Any:
    """The rosbags typestore of the ROS distribution the project's wheels come from (Kilted)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def ros1_typestore() -> Any:
    """The rosbags typestore of ROS 1 Noetic (the definitions ROS 1 bags are written with)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS1_NOETIC)


def resolve_msgtype(name: str) -> str:
    """Full ``pkg/msg/Type`` name for an alias or a full name."""
    return TYPE_ALIASES.get(name, name)


class BagWriter:
    """Context manager writing one bag: a rosbag2 directory, or with ``storage="rosbag1"`` a
    single ROS 1 ``.bag`` file.

    ``add_image_topic`` / ``add_pose_topic`` declare topics; ``write_image``, ``write_pose``,
    ``write_navsat`` add messages. Each message's bag (receive) time defaults to its header
    stamp. ``write_raw`` writes arbitrary bytes, which tests use to plant corrupt messages.
    """

    def __init__(self, path: str | Path, storage: Storage = "sqlite3",
                 typestore: Any | None = None, compress_chunks: bool = False) -> None:
        """``compress_chunks`` zstd-compresses MCAP chunks, as ``ros2 bag record`` does with
        its compressed MCAP presets, and LZ4-compresses ROS 1 chunks (``rosbag record
        --lz4``); sqlite3 stores messages uncompressed."""
        from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer

        self.path = Path(path)
        if storage not in STORAGES:
            raise BagError(f"unknown bag storage {storage!r}; expected one of "
                           f"{', '.join(STORAGES)}")
        if self.path.exists():
            raise BagError(f"bag {self.path} already exists; bags are never overwritten"
                           " (choose a new path or delete the old bag)")
        if storage == "rosbag1" and self.path.suffix != ".bag":
            raise BagError(f"a ROS 1 bag is one file named *.bag; got {self.path} (add .bag)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.storage = storage
        self.ros1 = storage == "rosbag1"
        self.typestore = typestore or (ros1_typestore() if self.ros1 else default_typestore())
        self._seq: dict[str, int] = {}
        if self.ros1:
            from rosbags.rosbag1 import Writer as Writer1

            self._writer = Writer1(self.path)
            if compress_chunks:
                self._writer.set_compression(Writer1.CompressionFormat.LZ4)
        else:
            plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
            self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        if compress_chunks and storage == "sqlite3":
            raise BagError("compress_chunks applies to MCAP and ROS 1 bags (sqlite3 stores "
                           "messages uncompressed); pass storage='mcap' or 'rosbag1'")
        if compress_chunks and storage == "mcap":
            self._writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
        self._connections: dict[str, Any] = {}
        self._topic_types: dict[str, str] = {}
        self._image_options: dict[str, dict[str, Any]] = {}
        self._frame_ids: dict[str, tuple[str, str]] = {}
        self._open = False

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "BagWriter":
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        self._writer.open()
        self._open = True

    def close(self) -> None:
        """Finish the bag (rosbag2: writes metadata.yaml; ROS 1: the index); safe to call
        twice."""
        if self._open:
            self._open = False
            self._writer.close()

    # -- topics ---------------------------------------------------------------------------------

    def add_topic(self, topic: str, msgtype: str) -> None:
        """Declare a topic of any message type the typestore knows (for :meth:`write_raw`)."""
        msgtype = resolve_msgtype(msgtype)
        if topic in self._connections:
            raise BagError(f"topic {topic} was already added to {self.path}")
        if msgtype not in self.typestore.types:
            raise BagError(f"message type {msgtype!r} is unknown to the typestore; expected a "
                           "standard ROS message type such as sensor_msgs/msg/Image")
        self._connections[topic] = self._writer.add_connection(topic, msgtype,
                                                               typestore=self.typestore)
        self._topic_types[topic] = msgtype

    def add_image_topic(self, topic: str, *, compressed: bool = False, encoding: str = "rgb8",
                        compressed_format: str = "jpeg", jpeg_quality: int = 90,
                        frame_id: str = "camera") -> None:
        """An image topic: raw ``Image`` in ``encoding`` or ``CompressedImage`` jpeg/png."""
        self.add_topic(topic, COMPRESSED_IMAGE if compressed else IMAGE)
        self._image_options[topic] = {"encoding": encoding, "format": compressed_format,
                                      "quality": jpeg_quality}
        self._frame_ids[topic] = (frame_id, "")

    def add_pose_topic(self, topic: str, msgtype: str = ODOMETRY, *, frame_id: str = "map",
                       child_frame_id: str = "base_link") -> None:
        """A pose topic: Odometry, PoseStamped, PoseWithCovarianceStamped or NavSatFix."""
        msgtype = resolve_msgtype(msgtype)
        if msgtype not in POSE_TYPES:
            raise BagError(f"pose topic type {msgtype!r} is not supported; expected one of "
                           f"{', '.join(POSE_TYPES)}")
        self.add_topic(topic, msgtype)
        self._frame_ids[topic] = (frame_id, child_frame_id)

    # -- messages -------------------------------------------------------------------------------

    def _header(self, stamp_ns: int, frame_id: str, topic: str = "") -> Any:
        types = self.typestore.types
        sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
        stamp = types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)
        if any(name == "seq" for name, _ in self.typestore.fielddefs["std_msgs/msg/Header"][1]):
            # A ROS 1 header counts its messages per topic.
            seq = self._seq[topic] = self._seq.get(topic, -1) + 1
            return types["std_msgs/msg/Header"](seq=seq, stamp=stamp, frame_id=frame_id)
        return types["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)

    def _connection(self, topic: str, allowed: Sequence[str]) -> tuple[Any, str]:
        if topic not in self._connections:
            raise BagError(f"topic {topic} was not added to {self.path}; call add_image_topic "
                           "or add_pose_topic first")
        msgtype = self._topic_types[topic]
        if msgtype not in allowed:
            raise BagError(f"topic {topic} has type {msgtype}; this call writes "
                           f"{' or '.join(allowed)}")
        return self._connections[topic], msgtype

    def write_message(self, topic: str, msg: Any, log_time_ns: int) -> None:
        """Serialise a typestore message object (CDR, or ROS 1 for a ROS 1 bag) and write it."""
        conn = self._connections[topic]
        serialize = self.typestore.serialize_ros1 if self.ros1 else self.typestore.serialize_cdr
        data = serialize(msg, self._topic_types[topic])
        self._writer.write(conn, int(log_time_ns), data)

    def write_raw(self, topic: str, log_time_ns: int, data: bytes) -> None:
        """Write already serialised (or deliberately corrupt) bytes on a declared topic."""
        if topic not in self._connections:
            raise BagError(f"topic {topic} was not added to {self.path}")
        self._writer.write(self._connections[topic], int(log_time_ns), bytes(data))

    def write_image(self, topic: str, stamp_ns: int, rgb: np.ndarray,
                    log_time_ns: int | None = None) -> None:
        """Encode an (H, W, 3) uint8 RGB frame as the topic's message type and write it."""
        _, msgtype = self._connection(topic, IMAGE_TYPES)
        opts = self._image_options[topic]
        header = self._header(stamp_ns, self._frame_ids[topic][0], topic)
        types = self.typestore.types
        if msgtype == IMAGE:
            raw = encode_image(rgb, opts["encoding"])
            msg = types[IMAGE](header=header, height=raw.height, width=raw.width,
                               encoding=raw.encoding, is_bigendian=raw.is_bigendian,
                               step=raw.step, data=np.frombuffer(raw.data, dtype=np.uint8))
        else:
            fmt, data = encode_compressed(rgb, opts["format"], opts["quality"])
            msg = types[COMPRESSED_IMAGE](header=header, format=fmt,
                                          data=np.frombuffer(data, dtype=np.uint8))
        self.write_message(topic, msg, stamp_ns if log_time_ns is None else log_time_ns)

    def write_pose(self, topic: str, stamp_ns: int, position: Sequence[float],
                   orientation: Sequence[float] = (0.0, 0.0, 0.0, 1.0),
                   log_time_ns: int | None = None) -> None:
        """Write a pose (position m, orientation x, y, z, w) as the topic's pose message type."""
        _, msgtype = self._connection(topic, (ODOMETRY, POSE_STAMPED,
                                              POSE_WITH_COVARIANCE_STAMPED))
        if len(position) != 3 or len(orientation) != 4:
            raise InputError(f"write_pose needs a 3-vector and a 4-quaternion, got {position!r}"
                             f" and {orientation!r}")
        types = self.typestore.types
        frame_id, child = self._frame_ids[topic]
        pose = types["geometry_msgs/msg/Pose"](
            position=types["geometry_msgs/msg/Point"](*(float(v) for v in position)),
            orientation=types["geometry_msgs/msg/Quaternion"](*(float(v) for v in orientation)))
        header = self._header(stamp_ns, frame_id, topic)
        cov = types["geometry_msgs/msg/PoseWithCovariance"](pose=pose,
                                                            covariance=np.zeros(36, np.float64))
        if msgtype == ODOMETRY:
            vec = types["geometry_msgs/msg/Vector3"]
            twist = types["geometry_msgs/msg/TwistWithCovariance"](
                twist=types["geometry_msgs/msg/Twist"](linear=vec(0.0, 0.0, 0.0),
                                                       angular=vec(0.0, 0.0, 0.0)),
                covariance=np.zeros(36, np.float64))
            msg = types[ODOMETRY](header=header, child_frame_id=child, pose=cov, twist=twist)
        elif msgtype == POSE_STAMPED:
            msg = types[POSE_STAMPED](header=header, pose=pose)
        else:
            msg = types[POSE_WITH_COVARIANCE_STAMPED](header=header, pose=cov)
        self.write_message(topic, msg, stamp_ns if log_time_ns is None else log_time_ns)

    def write_navsat(self, topic: str, stamp_ns: int, latitude: float, longitude: float,
                     altitude: float = 0.0, status: int = 0,
                     log_time_ns: int | None = None) -> None:
        """Write a NavSatFix (degrees, metres; ``status`` -1 means no fix)."""
        self._connection(topic, (NAVSAT_FIX,))
        types = self.typestore.types
        msg = types[NAVSAT_FIX](
            header=self._header(stamp_ns, self._frame_ids[topic][0], topic),
            status=types["sensor_msgs/msg/NavSatStatus"](status=int(status), service=1),
            latitude=float(latitude), longitude=float(longitude), altitude=float(altitude),
            position_covariance=np.zeros(9, np.float64), position_covariance_type=0)
        self.write_message(topic, msg, stamp_ns if log_time_ns is None else log_time_ns)


    # -- cameras, depth and static transforms --------------------------------------------------

    def add_camera_info_topic(self, topic: str, frame_id: str = "camera") -> None:
        self.add_topic(topic, CAMERA_INFO)
        self._frame_ids[topic] = (frame_id, "")

    def write_camera_info(self, topic: str, stamp_ns: int, camera: Any,
                          p_tx: float = 0.0, log_time_ns: int | None = None) -> None:
        """A CameraInfo of a :class:`~vpr_ros.mapdb.camera.CameraModel` (or of raw fields:
        ``camera`` may be any object with width, height, k, d, distortion_model, so tests can
        write invalid ones). ``p_tx``: P[0, 3] (-fx * baseline for the right camera of a
        rectified stereo pair)."""
        self._connection(topic, (CAMERA_INFO,))
        types = self.typestore.types
        k = np.asarray(camera.k, dtype=np.float64).reshape(-1)
        p = np.zeros(12, np.float64)
        if k.size == 9:
            p[[0, 1, 2, 4, 5, 6, 10]] = k[[0, 1, 2, 3, 4, 5, 8]]
        p[3] = float(p_tx)
        model = getattr(camera, "distortion_model", "plumb_bob")
        # ROS 1 spells the matrices D, K, R, P; ROS 2 d, k, r, p.
        names = {n.lower(): n for n, _ in self.typestore.fielddefs[CAMERA_INFO][1]}
        matrices = {names["d"]: np.asarray(camera.d if len(camera.d) or model != "none"
                                           else (0.0,) * 5, dtype=np.float64),
                    names["k"]: k, names["r"]: np.eye(3).reshape(-1), names["p"]: p}
        msg = types[CAMERA_INFO](
            header=self._header(stamp_ns, self._frame_ids[topic][0], topic),
            height=int(camera.height), width=int(camera.width),
            distortion_model="plumb_bob" if model == "none" else str(model),
            **matrices, binning_x=0, binning_y=0,
            roi=types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0,
                                                          width=0, do_rectify=False))
        self.write_message(topic, msg, stamp_ns if log_time_ns is None else log_time_ns)

    def add_depth_topic(self, topic: str, encoding: str = "16UC1",
                        frame_id: str = "camera") -> None:
        """A depth image topic: ``16UC1`` millimetres or ``32FC1`` metres (REP 118)."""
        if encoding not in ("16UC1", "32FC1"):
            raise BagError(f"depth encoding {encoding!r}: expected 16UC1 or 32FC1")
        self.add_topic(topic, IMAGE)
        self._image_options[topic] = {"encoding": encoding, "depth": True}
        self._frame_ids[topic] = (frame_id, "")

    def write_depth(self, topic: str, stamp_ns: int, depth_m: np.ndarray,
                    log_time_ns: int | None = None) -> None:
        """Write (H, W) metres (NaN / <= 0: no reading, written as 0) in the topic's encoding."""
        self._connection(topic, (IMAGE,))
        encoding = self._image_options[topic]["encoding"]
        d = np.asarray(depth_m, dtype=np.float64)
        valid = np.isfinite(d) & (d > 0)
        if encoding == "16UC1":
            pixels = np.where(valid, np.clip(np.rint(d * 1000.0), 0, 65535), 0).astype("<u2")
        else:
            pixels = np.where(valid, d, 0.0).astype("<f4")
        h, w = pixels.shape
        types = self.typestore.types
        msg = types[IMAGE](header=self._header(stamp_ns, self._frame_ids[topic][0], topic),
                           height=h,
                           width=w, encoding=encoding, is_bigendian=0,
                           step=w * pixels.itemsize,
                           data=np.frombuffer(pixels.tobytes(), dtype=np.uint8))
        self.write_message(topic, msg, stamp_ns if log_time_ns is None else log_time_ns)

    def write_static_transforms(self, stamp_ns: int,
                                transforms: Sequence[tuple[str, str, Sequence[float]]]) -> None:
        """``/tf_static``: (parent, child, (tx, ty, tz, qx, qy, qz, qw)) each, one message."""
        if TF_STATIC not in self._connections:
            if TF_MESSAGE not in self.typestore.types:  # rosbags' Noetic store lacks tf2_msgs
                from rosbags.typesys import get_types_from_msg

                self.typestore.register(get_types_from_msg(
                    "geometry_msgs/TransformStamped[] transforms", TF_MESSAGE))
            self.add_topic(TF_STATIC, TF_MESSAGE)
        types = self.typestore.types
        out = []
        for parent, child, pose in transforms:
            tx, ty, tz, qx, qy, qz, qw = (float(v) for v in pose)
            out.append(types["geometry_msgs/msg/TransformStamped"](
                header=self._header(stamp_ns, parent), child_frame_id=child,
                transform=types["geometry_msgs/msg/Transform"](
                    translation=types["geometry_msgs/msg/Vector3"](tx, ty, tz),
                    rotation=types["geometry_msgs/msg/Quaternion"](qx, qy, qz, qw))))
        self.write_message(TF_STATIC, types[TF_MESSAGE](transforms=out), stamp_ns)


def write_route_bag(path: str | Path, frames: Iterable[tuple[int, np.ndarray]],
                    poses: Iterable[tuple[int, Sequence[float], Sequence[float]]] = (),
                    *, storage: Storage = "sqlite3", image_topic: str = "/camera/image_raw",
                    pose_topic: str | None = "/odom", pose_type: str = ODOMETRY,
                    compressed: bool = False, encoding: str = "rgb8") -> Path:
    """One-call bag of a route: ``frames`` (stamp_ns, rgb) and ``poses`` (stamp_ns, xyz, xyzw).

    Messages are written in bag-time order, interleaving images and poses as a recorder would.
    """
    events: list[tuple[int, int, Any]] = []
    for stamp, rgb in frames:
        events.append((int(stamp), 1, rgb))
    for stamp, position, orientation in poses:
        events.append((int(stamp), 0, (position, orientation)))
    events.sort(key=lambda e: (e[0], e[1]))
    with BagWriter(path, storage) as writer:
        writer.add_image_topic(image_topic, compressed=compressed, encoding=encoding)
        if pose_topic is not None:
            writer.add_pose_topic(pose_topic, pose_type)
        for stamp, kind, payload in events:
            if kind == 1:
                writer.write_image(image_topic, stamp, payload)
            elif pose_topic is not None:
                writer.write_pose(pose_topic, stamp, payload[0], payload[1])
    return Path(path)
