"""sensor_msgs/Image and CompressedImage decoding: every encoding, every way a frame is bad."""

from __future__ import annotations

import array

import cv2
import numpy as np
import pytest

from vpr_ros.errors import InputError
from vpr_ros.runtime import image_codec as codec


def _gradient(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)


def _decode(raw: codec.RawImage, **kw) -> np.ndarray:
    return codec.decode_image(raw.height, raw.width, raw.encoding, raw.step, raw.data,
                              raw.is_bigendian, **kw)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings_round_trip_exactly(encoding: str) -> None:
    img = _gradient()
    out = _decode(codec.encode_image(img, encoding))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, img)


def test_bgr8_really_swaps_channels() -> None:
    # A pure-red pixel stored as bgr8 has its red value in the third byte.
    data = bytes([0, 0, 255] * 4)
    out = codec.decode_image(2, 2, "bgr8", 6, data)
    assert out[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("encoding", ["mono8", "8UC1", "mono16"])
def test_grey_encodings_give_three_equal_channels(encoding: str) -> None:
    img = _gradient()
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    out = _decode(codec.encode_image(img, encoding))
    np.testing.assert_array_equal(out[:, :, 0], grey)
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_mono16_uses_a_fixed_scale_in_both_byte_orders() -> None:
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    little = codec.decode_image(1, 4, "mono16", 8, values.astype("<u2").tobytes(), False)
    big = codec.decode_image(1, 4, "mono16", 8, values.astype(">u2").tobytes(), True)
    assert little[0, :, 0].tolist() == [0, 1, 255, 128]
    np.testing.assert_array_equal(little, big)


def test_depth_encodings_are_normalised_per_frame_and_ignore_invalid_pixels() -> None:
    depth = np.array([[0.0, 1.0, 2.0, np.nan, 3.0, np.inf]], dtype=np.float32)
    out = codec.decode_image(1, 6, "32FC1", 24, depth.tobytes())
    assert out[0, :, 0].tolist() == [0, 0, 128, 0, 255, 0]
    mm = np.array([[0, 1000, 3000]], dtype=np.uint16)
    out16 = codec.decode_image(1, 3, "16UC1", 6, mm.tobytes())
    assert out16[0, :, 0].tolist() == [0, 0, 255]
    flat = codec.decode_image(1, 2, "32FC1", 8, np.array([[2.0, 2.0]], np.float32).tobytes())
    assert flat[0, :, 0].tolist() == [255, 255]


@pytest.mark.parametrize("encoding", ["bayer_rggb8", "bayer_bggr8", "bayer_gbrg8",
                                      "bayer_grbg8"])
@pytest.mark.parametrize("colour", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 50)])
def test_bayer_patterns_restore_known_colours(encoding: str, colour: tuple) -> None:
    # A wrong pattern mapping swaps red and blue here, so this pins the ROS <-> OpenCV names.
    img = np.zeros((8, 8, 3), np.uint8)
    img[:] = colour
    out = _decode(codec.encode_image(img, encoding))
    assert out[3:5, 3:5].reshape(-1, 3).tolist() == [list(colour)] * 4


def test_bayer_mosaic_layout_matches_the_ros_name() -> None:
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 20, 30
    mosaic = np.frombuffer(codec.encode_image(img, "bayer_rggb8").data, np.uint8).reshape(2, 2)
    assert mosaic.tolist() == [[10, 20], [20, 30]]
    mosaic = np.frombuffer(codec.encode_image(img, "bayer_gbrg8").data, np.uint8).reshape(2, 2)
    assert mosaic.tolist() == [[20, 30], [10, 20]]


@pytest.mark.parametrize("encoding", ["yuv422", "uyvy", "yuv422_yuy2", "yuyv"])
def test_packed_yuv_round_trips_closely(encoding: str) -> None:
    img = _gradient()
    out = _decode(codec.encode_image(img, encoding))
    err = np.abs(out.astype(int) - img.astype(int))
    assert err.mean() < 2.0 and err.max() <= 8


def test_uyvy_and_yuyv_byte_orders_differ() -> None:
    img = _gradient()
    uyvy = codec.encode_image(img, "yuv422")
    out = codec.decode_image(uyvy.height, uyvy.width, "yuv422_yuy2", uyvy.step, uyvy.data)
    assert np.abs(out.astype(int) - img.astype(int)).mean() > 10


def test_row_padding_is_skipped() -> None:
    img = _gradient(5, 7)
    rows = np.zeros((5, 7 * 3 + 11), np.uint8)
    rows[:, :21] = img.reshape(5, 21)
    rows[:, 21:] = 99
    out = codec.decode_image(5, 7, "rgb8", 32, rows.tobytes())
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1",
                                      "bayer_rggb8", "yuv422", "yuyv", "mono16", "16UC1"])
def test_padded_rows_decode_like_packed_ones_into_a_new_array(encoding: str) -> None:
    """8-bit layouts are converted straight from a (possibly row-padded) view of the message:
    padding must never leak in, and the frame must not alias the message's buffer (the node
    keeps frames after the message is gone)."""
    packed = codec.encode_image(_gradient(6, 10), encoding)
    row = packed.step
    padded = np.full((6, row + 13), 77, np.uint8)
    padded[:, :row] = np.frombuffer(bytes(packed.data), np.uint8).reshape(6, row)
    want = _decode(packed)
    for data, step in ((np.frombuffer(bytes(packed.data), np.uint8), row),
                       (padded.reshape(-1), row + 13)):
        out = codec.decode_image(6, 10, encoding, step, data, packed.is_bigendian)
        np.testing.assert_array_equal(out, want)
        assert out.flags.c_contiguous and out.flags.writeable
        assert not np.shares_memory(out, data)


def test_channel_reorders_match_numpy_on_a_camera_sized_frame() -> None:
    """OpenCV's conversions replaced numpy's strided copies (70x faster for bgr8 at 640x480);
    same bytes."""
    rng = np.random.default_rng(5)
    bgra = rng.integers(0, 256, (480, 640, 4), dtype=np.uint8)
    flat = bgra.reshape(-1)
    bgr = np.ascontiguousarray(bgra[:, :, :3])
    np.testing.assert_array_equal(codec.decode_image(480, 640, "bgr8", 1920, bgr.reshape(-1)),
                                  bgr[:, :, ::-1])
    np.testing.assert_array_equal(codec.decode_image(480, 640, "bgra8", 2560, flat),
                                  bgra[:, :, 2::-1])
    np.testing.assert_array_equal(codec.decode_image(480, 640, "rgba8", 2560, flat),
                                  bgra[:, :, :3])
    grey = np.repeat(bgra[:, :, :1], 3, axis=2)
    np.testing.assert_array_equal(
        codec.decode_image(480, 640, "mono8", 640, np.ascontiguousarray(bgra[:, :, 0])), grey)


def test_rgb8_without_copy_is_a_read_only_view_of_packed_rows_only() -> None:
    img = _gradient(6, 10)
    data = array.array("B", img.tobytes())                  # what rclpy gives as Image.data
    view = codec.decode_image(6, 10, "rgb8", 30, data, copy=False)
    np.testing.assert_array_equal(view, img)
    assert np.shares_memory(view, np.frombuffer(data, np.uint8)) and not view.flags.writeable
    padded = np.zeros((6, 37), np.uint8)
    padded[:, :30] = img.reshape(6, 30)
    out = codec.decode_image(6, 10, "rgb8", 37, padded.reshape(-1), copy=False)
    np.testing.assert_array_equal(out, img)
    assert not np.shares_memory(out, padded)                  # padded rows: a packed copy
    bgr = codec.decode_image(6, 10, "bgr8", 30, data, copy=False)
    assert not np.shares_memory(bgr, np.frombuffer(data, np.uint8))


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "array", "ndarray"])
def test_any_buffer_type_is_accepted(kind: str) -> None:
    img = _gradient(4, 6)
    data = img.tobytes()
    wrapped = {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data),
               "array": array.array("B", data), "ndarray": np.frombuffer(data, np.uint8)}[kind]
    out = codec.decode_image(4, 6, "rgb8", 18, wrapped)
    np.testing.assert_array_equal(out, img)
    assert not np.shares_memory(out, np.frombuffer(data, np.uint8))


def test_unsupported_encoding_lists_the_supported_ones() -> None:
    with pytest.raises(InputError) as err:
        codec.decode_image(2, 2, "rgb16", 12, bytes(24))
    assert "rgb16" in str(err.value) and "bayer_rggb8" in str(err.value)
    assert "yuv422_yuy2" in str(err.value)


def test_truncated_data_is_refused() -> None:
    with pytest.raises(InputError, match="truncated.*1000 bytes.*expected step\\*height"):
        codec.decode_image(48, 64, "rgb8", 192, bytes(1000))


def test_step_smaller_than_a_row_is_refused() -> None:
    with pytest.raises(InputError, match="step 100 is smaller"):
        codec.decode_image(48, 64, "rgb8", 100, bytes(100 * 48))


@pytest.mark.parametrize("h,w", [(0, 64), (48, 0), (-1, 4)])
def test_empty_sizes_are_refused(h: int, w: int) -> None:
    with pytest.raises(InputError, match="must both be positive"):
        codec.decode_image(h, w, "rgb8", max(w, 0) * 3, b"")


def test_images_above_the_pixel_limit_are_refused_before_reading() -> None:
    with pytest.raises(InputError, match="above the limit of 50000000"):
        codec.decode_image(10000, 10000, "mono8", 10000, b"")
    with pytest.raises(InputError, match="above the limit of 100"):
        codec.decode_image(11, 10, "mono8", 10, bytes(110), max_pixels=100)


def test_odd_width_yuv_is_refused() -> None:
    with pytest.raises(InputError, match="even width"):
        codec.decode_image(2, 3, "yuv422", 6, bytes(12))


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_round_trip(fmt: str) -> None:
    img = _gradient()
    name, data = codec.encode_compressed(img, fmt)
    assert fmt in name
    out = codec.decode_compressed(name, data)
    err = np.abs(out.astype(int) - img.astype(int))
    assert out.shape == img.shape and err.mean() < (3.0 if fmt == "jpeg" else 0.01)


def test_compressed_grey_and_alpha_become_rgb() -> None:
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    ok, png = cv2.imencode(".png", grey)
    out = codec.decode_compressed("png", png.tobytes())
    np.testing.assert_array_equal(out[:, :, 1], grey)
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 2] = 200  # red in OpenCV's BGRA order
    ok, png = cv2.imencode(".png", bgra)
    assert codec.decode_compressed("png", png.tobytes())[0, 0].tolist() == [200, 0, 0]


def test_compressed_depth_png_is_normalised() -> None:
    depth = np.array([[0, 500, 1000]], np.uint16)
    ok, png = cv2.imencode(".png", depth)
    data = bytes(12) + png.tobytes()  # compressedDepth: 12-byte config header, then PNG
    out = codec.decode_compressed("16UC1; compressedDepth png", data)
    assert out[0, :, 0].tolist() == [0, 0, 255]


def test_undecodable_compressed_bytes_are_refused() -> None:
    with pytest.raises(InputError, match="could not be decoded"):
        codec.decode_compressed("jpeg", b"\xff\xd8 this is not a jpeg at all" * 3)
    _, data = codec.encode_compressed(_gradient(), "jpeg")
    with pytest.raises(InputError, match="could not be decoded"):
        codec.decode_compressed("jpeg", data[:40])
    with pytest.raises(InputError, match="no data"):
        codec.decode_compressed("jpeg", b"")


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_bombs_are_refused_from_the_header(fmt: str) -> None:
    _, data = codec.encode_compressed(_gradient(), fmt)  # 64x48 = 3072 pixels
    with pytest.raises(InputError, match="64x48 = 3072 pixels, above the limit of 3000"):
        codec.decode_compressed(fmt, data, max_pixels=3000)


def test_encode_refuses_non_rgb_input() -> None:
    with pytest.raises(InputError, match="HxWx3 uint8"):
        codec.encode_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="unknown compressed format"):
        codec.encode_compressed(_gradient(), "webp2")


def test_bytes_per_pixel() -> None:
    assert codec.bytes_per_pixel("rgb8") == 3
    assert codec.bytes_per_pixel("mono16") == 2
    assert codec.bytes_per_pixel("32FC1") == 4
    assert codec.bytes_per_pixel("yuv422") == 2
