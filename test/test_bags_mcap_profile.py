"""An MCAP file that is intact but not a ROS 2 recording (another profile, or channels that are
not CDR) is reported as what it is, not as a damaged bag; real damage keeps the salvage path.

The foreign files are written here record by record following the MCAP specification
(mcap.dev/spec), as a protobuf- or JSON-logging tool writes them."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.mapdb.bag_reader import BagReader, NotRos2BagError, mcap_identity
from vpr_ros.mapdb.bag_writer import write_route_bag

S = 1_000_000_000
T0 = 1_700_000_000 * S
MAGIC = b"\x89MCAP0\r\n"


def _s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<I", len(data)) + data


def _rec(op: int, body: bytes) -> bytes:
    return struct.pack("<BQ", op, len(body)) + body


def foreign_mcap(path: Path, profile: str, message_encoding: str = "json",
                 schema_encoding: str = "jsonschema", messages: int = 5,
                 summary: bool = True) -> Path:
    """An intact MCAP: header, one schema, two channels, messages, data end, an optional
    summary section (schema + channels again), footer."""
    schema = _rec(0x03, struct.pack("<H", 1) + _s("pose") + _s(schema_encoding)
                  + _s('{"type": "object"}'))
    channels = b"".join(_rec(0x04, struct.pack("<HH", cid, 1) + _s(topic)
                             + _s(message_encoding) + struct.pack("<I", 0))
                        for cid, topic in ((1, "/pose"), (2, "/camera/meta")))
    out = MAGIC + _rec(0x01, _s(profile) + _s("test-logger 1.0")) + schema + channels
    for i in range(messages):
        payload = json.dumps({"x": i}).encode()
        out += _rec(0x05, struct.pack("<HIQQ", 1 + i % 2, i, T0 + i * S, T0 + i * S) + payload)
    out += _rec(0x0F, struct.pack("<I", 0))
    summary_start = len(out) if summary else 0
    if summary:
        out += schema + channels
    out += _rec(0x02, struct.pack("<QQI", summary_start, 0, 0)) + MAGIC
    path.write_bytes(out)
    return path


@pytest.mark.parametrize("profile", ["protobuf", "ros1", "foxglove"])
def test_a_foreign_profile_is_named_not_called_damaged(tmp_path: Path, profile: str) -> None:
    f = foreign_mcap(tmp_path / "log.mcap", profile)
    with pytest.raises(NotRos2BagError) as err:
        BagReader(f)
    text = str(err.value)
    assert f"not a ROS 2 MCAP: log.mcap has profile '{profile}'" in text
    assert "test-logger 1.0" in text and "/pose [json]" in text
    assert "damaged" not in text.lower() and "cut off" not in text


def test_ros2_profile_with_non_cdr_channels_is_not_ros2(tmp_path: Path) -> None:
    f = foreign_mcap(tmp_path / "odd.mcap", "ros2", message_encoding="protobuf",
                     schema_encoding="protobuf", summary=False)
    ident = mcap_identity(f)
    assert ident is not None and ident.intact and ident.profile == "ros2"
    assert ident.foreign_encodings() == {"protobuf"}
    with pytest.raises(NotRos2BagError, match="message encodings protobuf"):
        BagReader(f)


def test_a_foreign_mcap_inside_a_rosbag2_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    foreign_mcap(folder / "run_0.mcap", "protobuf")
    with pytest.raises(NotRos2BagError, match="profile 'protobuf'"):
        BagReader(folder)


def test_a_cut_off_foreign_mcap_is_still_named_by_its_profile(tmp_path: Path) -> None:
    f = foreign_mcap(tmp_path / "cut.mcap", "protobuf")
    os.truncate(f, f.stat().st_size - 60)
    with pytest.raises(NotRos2BagError, match="profile 'protobuf'.*also cut off"):
        BagReader(f)


def test_vpr_bag_info_says_what_the_file_is(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    from vpr_ros.cli import main

    f = foreign_mcap(tmp_path / "log.mcap", "protobuf")
    assert main(["bag", "info", str(f)]) == 2
    err = capsys.readouterr().err
    assert "not a ROS 2 MCAP: log.mcap has profile 'protobuf'" in err
    assert "DAMAGED" not in err and "Traceback" not in err


def test_real_damage_to_a_ros2_mcap_keeps_the_salvage_path(tmp_path: Path) -> None:
    frame = np.zeros((8, 8, 3), np.uint8)
    bag = write_route_bag(tmp_path / "r", [(T0 + i * S, frame + i) for i in range(30)],
                          pose_topic=None, storage="mcap")
    storage = bag / "r.mcap"
    ident = mcap_identity(storage)
    assert ident is not None and ident.profile == "ros2" and ident.intact
    assert ident.message_encodings == {"/camera/image_raw": "cdr"}
    os.truncate(storage, storage.stat().st_size // 2)
    with BagReader(bag) as reader:
        frames = list(reader.images("/camera/image_raw"))
    assert reader.stats.damaged and 3 <= len(frames) < 30


def test_an_empty_profile_with_ros2_cdr_channels_reads_as_ros2(tmp_path: Path) -> None:
    """The spec allows an empty profile; a writer that leaves it empty but stores ROS 2 CDR
    with ros2msg schemas (what rosbags writes, profile blanked here) is read, not damaged."""
    frame = np.full((8, 8, 3), 7, np.uint8)
    bag = write_route_bag(tmp_path / "e", [(T0 + i * S, frame) for i in range(4)],
                          pose_topic=None, storage="mcap")
    storage = bag / "e.mcap"
    data = bytearray(storage.read_bytes())
    at = data.index(b"\x04\x00\x00\x00ros2")  # the header's profile string
    data[at:at + 8] = b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"  # "" and an empty library...
    # ...keeping the record length: the header record now holds "", "", and 4 spare bytes.
    assert mcap_identity(storage) is not None
    storage.write_bytes(bytes(data))
    ident = mcap_identity(storage)
    assert ident is not None and ident.profile == "" and ident.intact
    with BagReader(bag) as reader:
        assert len(list(reader.images("/camera/image_raw"))) == 4
    assert not reader.stats.damaged
    assert any("profile empty" in w for w in reader.stats.warnings)
