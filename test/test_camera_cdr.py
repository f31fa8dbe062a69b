"""Camera messages read from serialized bytes equal rclpy's own deserialization, keep the pixels
in place, take the slow path only for other encapsulations, and refuse broken bytes clearly."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from vpr_ros.ros import conversions as conv  # noqa: E402
from vpr_ros.ros.camera_cdr import CameraMessageReader  # noqa: E402
from vpr_ros.runtime.image_codec import encode_compressed  # noqa: E402

MAX_PIXELS = 4096 * 4096


def _image(encoding: str = "bgr8", height: int = 5, width: int = 7, pad: int = 3) -> Image:
    """A small frame with padded rows, a stamp and a frame id."""
    channels = {"bgr8": 3, "rgb8": 3, "rgba8": 4, "mono8": 1}[encoding]
    step = width * channels + pad
    rng = np.random.default_rng(height * width)
    msg = Image(height=height, width=width, encoding=encoding, step=step,
                data=rng.integers(0, 256, step * height, dtype=np.uint8).tobytes())
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1_700_000_123, 456_789
    msg.header.frame_id = "camera_optical"
    return msg


def _same_header(read, msg) -> None:
    assert (read.header.stamp.sec, read.header.stamp.nanosec) == \
        (msg.header.stamp.sec, msg.header.stamp.nanosec)
    assert read.header.frame_id == msg.header.frame_id


@pytest.mark.parametrize("encoding", ["bgr8", "rgb8", "rgba8", "mono8"])
def test_image_fields_and_pixels_equal_rclpys_and_pixels_are_a_view(encoding: str) -> None:
    msg = _image(encoding)
    raw = serialize_message(msg)
    reader = CameraMessageReader(compressed=False)
    read = reader.read(raw)
    _same_header(read, msg)
    assert (read.height, read.width, read.encoding, read.step, read.is_bigendian) == \
        (msg.height, msg.width, msg.encoding, msg.step, msg.is_bigendian)
    assert bytes(read.data) == bytes(msg.data)
    assert not read.data.flags.writeable and not read.data.flags.owndata  # in the raw bytes
    assert reader.fallbacks == 0
    expected = conv.frame_to_rgb(deserialize_message(raw, Image), False, MAX_PIXELS)
    got = conv.frame_to_rgb(read, False, MAX_PIXELS, copy=False)
    np.testing.assert_array_equal(got, expected)


def test_compressed_image_round_trips() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    fmt, data = encode_compressed(rgb, "png")
    msg = CompressedImage(format=fmt, data=data)
    msg.header.stamp.sec, msg.header.frame_id = 42, "cam"
    read = CameraMessageReader(compressed=True).read(serialize_message(msg))
    _same_header(read, msg)
    assert read.format == fmt and bytes(read.data) == data
    np.testing.assert_array_equal(conv.frame_to_rgb(read, True, MAX_PIXELS), rgb)


def test_big_endian_cdr_is_read_directly() -> None:
    from vpr_ros.mapdb.bag_writer import IMAGE, default_typestore

    msg = _image("rgb8")
    store = default_typestore()
    big = bytes(store.serialize_cdr(store.deserialize_cdr(serialize_message(msg), IMAGE),
                                    IMAGE, little_endian=False))
    assert big[:2] == b"\x00\x00"
    reader = CameraMessageReader(compressed=False)
    read = reader.read(big)
    _same_header(read, msg)
    assert (read.width, read.step) == (msg.width, msg.step) and bytes(read.data) == bytes(msg.data)
    assert reader.fallbacks == 0


def test_other_encapsulations_go_through_rclpy() -> None:
    msg = _image("rgb8")
    xcdr2 = b"\x00\x07\x00\x00" + serialize_message(msg)[4:]  # plain XCDR2, little endian
    reader = CameraMessageReader(compressed=False)
    read = reader.read(xcdr2)
    assert reader.fallbacks == 1
    _same_header(read, msg)
    assert (read.width, read.height) == (msg.width, msg.height)
    assert bytes(read.data) == bytes(msg.data)


@pytest.mark.parametrize("cut", [0, 3, 30, -5])
def test_truncated_or_garbled_bytes_are_a_corrupt_frame(cut: int) -> None:
    raw = serialize_message(_image("rgb8"))
    broken = raw[:cut] if cut else b""
    with pytest.raises(conv.FrameError) as err:
        CameraMessageReader(compressed=False).read(broken)
    assert err.value.kind == conv.CORRUPT_IMAGE
    assert "sensor_msgs/msg/Image" in str(err.value) and "skipped" in str(err.value)


def test_an_impossible_string_length_is_a_corrupt_frame() -> None:
    garbled = b"\x00\x01\x00\x00" + b"\x00" * 8 + b"\xff" * 32
    with pytest.raises(conv.FrameError) as err:
        CameraMessageReader(compressed=False).read(garbled)
    assert err.value.kind == conv.CORRUPT_IMAGE
