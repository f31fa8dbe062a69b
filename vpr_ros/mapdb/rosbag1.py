"""ROS 1 bags (``.bag``, format 2.0) read directly, their messages handed on as ROS 2 CDR.

Much real robot data (EuRoC, TUM, KITTI conversions, the indoor datasets of the VPR
literature) ships as ROS 1 bags, and asking users to run ``rosbags-convert`` first is a step
they trip over. rosbags reads the format; what it leaves to us:

- **Wire format.** ROS 1 messages are serialised differently from ROS 2 CDR (no alignment, a
  ``seq`` in every Header). Every message is converted on the fly, byte-level, with rosbags'
  ``ros1_to_cdr`` against the ROS 2 definition of the type (the same conversion
  ``rosbags-convert`` does), so everything downstream (image decoding, pose reading,
  ``vpr bag play``, which publishes the bytes to ROS 2 as they come) sees ordinary CDR of the
  ROS 2 type. A standard type whose ROS 2 layout differs from its ROS 1 one is migrated field by
  field (rosbags' migration); a type ROS 2 does not know keeps the bag's own definition.
- **Message definitions.** A ROS 1 bag embeds each connection's definition. One that is empty,
  unparsable or refers to types it does not define makes only *that topic* unreadable (listed,
  with the reason, in :attr:`Ros1Bag.unreadable`): other topics are read as usual. Where the
  type is a standard ROS 1 type with the same md5sum, the standard definition is used instead.
- **Damage.** A recording killed mid-write has no index (``index_pos`` 0) and possibly a chunk
  cut short; rosbags refuses it. The records are then walked front to back: connection records
  give the topics, message records inside (partial) chunks give the messages, and a damaged
  stretch is skipped by resynchronising on the next plausible record.
"""

from __future__ import annotations

import heapq
import mmap
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from vpr_ros.errors import BagError
from vpr_ros.mapdb.bag_chunks import ROS1_CHUNKS, skip_damage

#: ROS 1 record opcodes (bag format 2.0).
OP_MSG_DATA, OP_BAG_HEADER, OP_INDEX_DATA, OP_CHUNK, OP_CHUNK_INFO, OP_CONNECTION = \
    0x02, 0x03, 0x04, 0x05, 0x06, 0x07
_OPS = frozenset((OP_MSG_DATA, OP_BAG_HEADER, OP_INDEX_DATA, OP_CHUNK, OP_CHUNK_INFO,
                  OP_CONNECTION))
_MAGIC = b"#ROSBAG V2.0\n"
#: A record header longer than this is garbage (real ones are well under 1 KiB, connection
#: records with long definitions keep them in the data part).
_MAX_HEADER = 1 << 16


@dataclass
class Ros1Connection:
    """One connection of a ROS 1 bag: what rosbags' index or a salvaged record says."""

    topic: str
    msgtype: str         # normalised to pkg/msg/Type, as rosbags does
    md5sum: str
    msgdef: str
    count: int = -1      # -1: unknown (salvaged)


def is_ros1_bag(path: Path) -> bool:
    """A ``.bag`` file, or a directory of ``.bag`` files (a split recording) and nothing of
    rosbag2 (no metadata.yaml, no .db3/.mcap)."""
    if path.is_file():
        return path.suffix == ".bag"
    if not path.is_dir() or (path / "metadata.yaml").exists():
        return False
    files = [p for p in path.iterdir() if p.is_file()]
    return any(p.suffix == ".bag" for p in files) and \
        not any(p.suffix in (".db3", ".mcap") for p in files)


def ros1_files(path: Path) -> list[Path]:
    """The bag files of a ROS 1 recording, split parts in numeric order."""
    import re

    if path.is_file():
        return [path]
    return sorted((p for p in path.iterdir() if p.is_file() and p.suffix == ".bag"),
                  key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)",
                                                                              p.name)])


# ------------------------------------------------------------------------------- type handling

def _named_types(store: Any, msgtype: str, seen: set[str] | None = None) -> set[str]:
    """Every type name ``msgtype`` refers to, transitively (KeyError on one not in ``store``)."""
    from rosbags.typesys.base import Nodetype

    seen = set() if seen is None else seen
    if msgtype in seen:
        return seen
    seen.add(msgtype)
    for _, desc in store.fielddefs[msgtype][1]:
        if desc[0] in (Nodetype.SEQUENCE, Nodetype.ARRAY):
            desc = desc[1][0]
        if desc[0] == Nodetype.NAME:
            _named_types(store, desc[1], seen)
    return seen


class Ros1Types:
    """Definitions of a ROS 1 bag's message types and their conversion to ROS 2 CDR.

    ``ros2`` is the ROS 2 typestore messages are converted to (the project's default, Kilted).
    ``unreadable`` maps a message type to the reason it cannot be decoded.
    """

    def __init__(self, connections: Sequence[Ros1Connection], ros2: Any,
                 warn: Callable[[str], None]) -> None:
        from rosbags.typesys import Stores, get_types_from_msg, get_typestore

        self.ros2 = ros2
        self.warn = warn
        self.unreadable: dict[str, str] = {}
        noetic = get_typestore(Stores.ROS1_NOETIC)
        defs: dict[str, Any] = {}
        first: dict[str, Ros1Connection] = {}
        for conn in connections:
            if conn.msgtype in first:
                continue
            first[conn.msgtype] = conn
            try:
                if not conn.msgdef.strip():
                    raise ValueError("the bag stores no message definition for it")
                defs.update(get_types_from_msg(conn.msgdef, conn.msgtype))
            except Exception as exc:  # rosbags' parser raises several types on bad text
                if conn.msgtype in noetic.fielddefs and \
                        noetic.generate_msgdef(conn.msgtype)[1] == conn.md5sum:
                    self.warn(f"message definition of {conn.msgtype} in the bag is unusable "
                              f"({_reason(exc)}); its md5sum is the standard ROS 1 type's, so "
                              "the standard definition is used")
                    defs.update({t: noetic.fielddefs[t]
                                 for t in _named_types(noetic, conn.msgtype)})
                else:
                    self.unreadable[conn.msgtype] = (
                        f"its message definition cannot be parsed ({_reason(exc)})")
        self.source = get_typestore(Stores.EMPTY)
        self._register(self.source, defs)
        header = ros2.fielddefs["std_msgs/msg/Header"]
        # ROS 1 definitions with the ROS 2 Header: rosbags' ros1_to_cdr then drops the seq.
        self.convert_store = get_typestore(Stores.EMPTY)
        self._register(self.convert_store, {**defs, "std_msgs/msg/Header": header})
        self._converters: dict[str, Callable[[bytes], bytes]] = {}
        self._cache: dict[str, object] = {}
        for msgtype, conn in first.items():
            if msgtype in self.unreadable:
                continue
            try:
                _named_types(self.source, msgtype)
                _named_types(self.convert_store, msgtype)
            except KeyError as exc:
                self.unreadable[msgtype] = (f"its message definition refers to {exc.args[0]}, "
                                            "which the bag does not define")
                continue
            if conn.md5sum and conn.md5sum != "*":
                have = self.source.generate_msgdef(msgtype)[1]
                if have != conn.md5sum:
                    self.warn(f"{msgtype}: the md5sum of the bag's definition ({have}) differs "
                              f"from the recorded one ({conn.md5sum}); reading with the "
                              "bag's definition")

    @staticmethod
    def _register(store: Any, defs: dict[str, Any]) -> None:
        for name, body in defs.items():  # one at a time: a clash costs only that type
            try:
                store.register({name: body})
            except Exception:  # an already registered, different definition: keep the first
                pass

    def store_for(self, msgtype: str) -> Any:
        """The typestore whose ``deserialize_cdr`` reads converted messages of ``msgtype``."""
        return self.ros2 if msgtype in self.ros2.fielddefs else self.convert_store

    def to_cdr(self, msgtype: str, data: bytes | memoryview) -> bytes:
        """ROS 1 bytes of ``msgtype`` as ROS 2 CDR (raises on corrupt bytes or an unreadable
        type)."""
        if msgtype in self.unreadable:
            raise BagError(f"{msgtype}: {self.unreadable[msgtype]}")
        convert = self._converters.get(msgtype)
        if convert is None:
            convert = self._converters[msgtype] = self._converter(msgtype)
        return bytes(convert(data))

    def _converter(self, msgtype: str) -> Callable[[bytes], Any]:
        from rosbags.convert.converter import is_same_wireformat, migrate_bytes

        if msgtype not in self.ros2.fielddefs or \
                is_same_wireformat(self.convert_store, self.ros2, msgtype, msgtype):
            return partial(self.convert_store.ros1_to_cdr, typename=msgtype)
        # Same type name, another layout in ROS 2: migrate field by field, as rosbags-convert.
        return partial(migrate_bytes, self.source, self.ros2, msgtype, msgtype, self._cache,
                       src_is2=False, dst_is2=True)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------ the bag

@dataclass(frozen=True)
class Ros1Message:
    """One stored message: topic, type, bag time, ROS 1 serialised bytes."""

    topic: str
    msgtype: str
    log_time_ns: int
    data: bytes | memoryview


class Ros1Bag:
    """The files of one ROS 1 recording, opened with rosbags (indexed) or salvaged.

    ``connections``, ``damaged``, ``messages(topics)``.
    """

    def __init__(self, files: Sequence[Path], warn: Callable[[str], None]) -> None:
        from rosbags.rosbag1 import Reader

        self.files = list(files)
        self.warn = warn
        self.damaged = False
        self._readers: list[Any] = []
        self._salvaged: list[_Ros1Walker] = []
        self.connections: list[Ros1Connection] = []
        for f in self.files:
            reader = Reader(f)
            try:
                reader.open()
            except Exception as exc:  # not indexed, damaged index, cut-off file, bad magic
                self.damaged = True
                self.warn(f"ROS 1 bag {f} is damaged or incomplete: rosbags cannot open it "
                          f"({_reason(exc)}). Salvaging its records directly; messages in the "
                          "damaged part are lost")
                walker = _Ros1Walker(f, warn)
                walker.scan()
                self._salvaged.append(walker)
                self.connections.extend(walker.connections.values())
                continue
            self._readers.append(reader)
            for conn in reader.connections:
                self.connections.append(Ros1Connection(
                    conn.topic, conn.msgtype, conn.digest, conn.msgdef.data, int(conn.msgcount)))

    def close(self) -> None:
        for reader in self._readers:
            try:
                reader.close()
            except Exception:  # closing must not mask the error that got us here
                pass
        self._readers = []

    def messages(self, topics: set[str]) -> Iterator[Ros1Message]:
        """Messages of ``topics`` from every file, in bag-time order across files (salvaged
        files in record order). A read failure part-way continues by walking that file's
        records, skipping what was delivered."""
        sources = [self._indexed(r, topics) for r in self._readers]
        sources += [w.messages(topics) for w in self._salvaged]
        yield from heapq.merge(*sources, key=lambda m: m.log_time_ns)

    def _indexed(self, reader: Any, topics: set[str]) -> Iterator[Ros1Message]:
        conns = [c for c in reader.connections if c.topic in topics]
        if not conns:
            return
        delivered: dict[tuple[str, int], int] = {}
        try:
            for conn, stamp, data in reader.messages(connections=conns):
                key = (conn.topic, int(stamp))
                delivered[key] = delivered.get(key, 0) + 1
                yield Ros1Message(conn.topic, conn.msgtype, int(stamp), data)
        except Exception as exc:
            self.damaged = True
            self.warn(f"reading ROS 1 bag {reader.path} failed after "
                      f"{sum(delivered.values())} messages ({_reason(exc)}); salvaging the "
                      "rest from its records directly")
            walker = _Ros1Walker(Path(reader.path), self.warn)
            for message in walker.messages(topics):
                key = (message.topic, message.log_time_ns)
                if delivered.get(key, 0) > 0:
                    delivered[key] -= 1
                    continue
                yield message


# ---------------------------------------------------------------------------------- salvaging

def _fields(header: bytes) -> dict[str, bytes] | None:
    """A record header's ``name=value`` fields, or None when it is not a well-formed header."""
    out: dict[str, bytes] = {}
    pos, end = 0, len(header)
    while pos < end:
        if pos + 4 > end:
            return None
        (size,) = struct.unpack_from("<I", header, pos)
        pos += 4
        if size < 2 or pos + size > end:
            return None
        field = header[pos:pos + size]
        eq = field.find(b"=")
        if eq <= 0:
            return None
        out[field[:eq].decode("ascii", errors="replace")] = bytes(field[eq + 1:])
        pos += size
    return out


def _u32(value: bytes) -> int:
    return struct.unpack("<I", value[:4])[0]


def _time(value: bytes) -> int:
    sec, nsec = struct.unpack("<II", value[:8])
    return sec * 1_000_000_000 + nsec


class _Ros1Walker:
    """Walk a ROS 1 bag's records front to back (format: wiki.ros.org/Bags/Format/2.0),
    collecting connections and yielding messages, including those of a chunk cut short by the
    end of the file; a damaged stretch is skipped up to the next plausible record."""

    def __init__(self, path: Path, warn: Callable[[str], None]) -> None:
        self.path, self.warn = path, warn
        self.connections: dict[int, Ros1Connection] = {}

    def scan(self) -> None:
        for _ in self._walk_file(messages=False):
            pass
        if not self.connections:
            self.warn(f"{self.path}: no connection record could be recovered")

    def messages(self, topics: set[str]) -> Iterator[Ros1Message]:
        for message in self._walk_file(messages=True):
            if message.topic in topics:
                yield message

    def _walk_file(self, messages: bool) -> Iterator[Ros1Message]:
        with self.path.open("rb") as fh:
            if fh.read(len(_MAGIC)) != _MAGIC:
                self.warn(f"{self.path}: not a ROS 1 bag of format 2.0 (bad magic); nothing "
                          "salvaged from it")
                return
            try:
                buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty mapping: nothing after the magic
                return
            with buf:
                yield from self._walk(buf, len(_MAGIC), len(buf), False, messages)

    def _record(self, buf: Any, pos: int, end: int
                ) -> tuple[dict[str, bytes], int, int, int] | None:
        """(fields, data start, data length, op) of a plausible record at ``pos``; data may
        run past ``end`` (a cut-off chunk), the header may not."""
        if pos + 4 > end:
            return None
        (hlen,) = struct.unpack_from("<I", buf, pos)
        if not 6 <= hlen <= _MAX_HEADER or pos + 8 + hlen > end:
            return None
        fields = _fields(bytes(buf[pos + 4:pos + 4 + hlen]))
        if fields is None or len(fields.get("op", b"")) != 1 or fields["op"][0] not in _OPS:
            return None
        (dlen,) = struct.unpack_from("<I", buf, pos + 4 + hlen)
        return fields, pos + 8 + hlen, dlen, fields["op"][0]

    def _resync(self, buf: Any, start: int, end: int) -> int | None:
        """The next offset after ``start`` where a plausible, complete record begins."""
        pos = start
        while True:
            k = buf.find(b"op=", pos, end)
            if k < 0:
                return None
            for s in range(max(start, k - 8), max(start, k - 8 - 300) - 1, -1):
                rec = self._record(buf, s, end)
                if rec is not None and rec[1] + rec[2] <= end:
                    return s
            pos = k + 3

    def _walk(self, buf: Any, pos: int, end: int, nested: bool,
              messages: bool) -> Iterator[Ros1Message]:
        where = "chunk" if nested else "file"
        while pos < end:
            rec = self._record(buf, pos, end)
            if (rec is None and end - pos < 8 + 6) or \
                    (rec is not None and rec[1] + rec[2] > end and not (
                        not nested and rec[3] == OP_CHUNK) and self._resync(
                            buf, pos + 1, end) is None):
                self.warn(f"{self.path}: the {where} ends inside a record at byte {pos}; the "
                          "rest is lost")
                return
            if rec is None or (rec[1] + rec[2] > end and (nested or rec[3] != OP_CHUNK)):
                resume = skip_damage(self.path, where, pos, self._resync(buf, pos + 1, end),
                                     self.warn)
                if resume is None:
                    return
                pos = resume
                continue
            fields, start, size, op = rec
            data_end = min(start + size, end)
            if op == OP_CHUNK and not nested:
                yield from self._chunk(fields, bytes(buf[start:data_end]), pos,
                                       start + size > end, messages)
            elif op == OP_CONNECTION:
                self._connection(fields, bytes(buf[start:data_end]))
            elif op == OP_MSG_DATA and messages:
                conn = self.connections.get(_u32(fields.get("conn", b"\xff\xff\xff\xff")))
                if conn is not None and "time" in fields:
                    yield Ros1Message(conn.topic, conn.msgtype, _time(fields["time"]),
                                      bytes(buf[start:data_end]))
            pos = start + size

    def _chunk(self, fields: dict[str, bytes], data: bytes, pos: int, cut: bool,
               messages: bool) -> Iterator[Ros1Message]:
        compression = fields.get("compression", b"none").decode("ascii", errors="replace")
        size = _u32(fields["size"]) if len(fields.get("size", b"")) >= 4 else None
        inner = ROS1_CHUNKS.salvage(self.path, pos, data, compression, size, cut, self.warn)
        if inner is None:
            return
        yield from self._walk(inner, 0, len(inner), True, messages)

    def _connection(self, fields: dict[str, bytes], data: bytes) -> None:
        from rosbags.rosbag1.reader import normalize
        from rosbags.typesys.msg import normalize_msgtype

        if len(fields.get("conn", b"")) < 4:
            return
        conn_id = _u32(fields["conn"])
        if conn_id in self.connections:
            return
        info = _fields(data) or {}
        topic = fields.get("topic", info.get("topic", b"")).decode("utf-8", errors="replace")
        msgtype = info.get("type", b"").decode("utf-8", errors="replace")
        if not topic or "/" not in msgtype:
            return
        self.connections[conn_id] = Ros1Connection(
            normalize(topic), normalize_msgtype(msgtype),
            info.get("md5sum", b"").decode("ascii", errors="replace"),
            info.get("message_definition", b"").decode("utf-8", errors="replace"))
