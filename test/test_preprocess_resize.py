"""The shrink by axes (float32, one axis at a time) must be OpenCV's INTER_AREA bit for bit.

Maps are built and queried through the same ``resize_image``; if the faster path changed a
single grey level, descriptors of maps built before it would drift from live queries. So the
test compares against one ``cv2.resize(..., INTER_AREA)`` call on uint8, the reference every
existing map was built with, on camera sizes and awkward ones, and on images that stress
rounding (noise, smooth gradients, periodic ramps hitting exact half levels)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vpr_ros.runtime.preprocess import (Preprocessing, _area_by_axes, preprocess_batch,
                                        resize_image, separable_area_pays)

CAMERA_SIZES = [(480, 640), (480, 752), (480, 848), (720, 1280), (768, 1024), (479, 641),
                (333, 1000), (376, 672), (900, 225), (1024, 1280), (224, 1000)]
NETWORK_SIZES = [(224, 224), (322, 322), (112, 224), (210, 280), (224, 112), (224, 322)]


def _images(h: int, w: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([128 + 100 * np.sin(xx / 7.0 + yy / 13.0), 128 + 90 * np.cos(xx / 5.0),
                       yy * 255.0 / h], -1) + rng.normal(0, 12, (h, w, 3))
    return {
        "noise": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "smooth": np.clip(smooth, 0, 255).astype(np.uint8),
        "ramp": np.stack([(xx * 3) % 256, (yy * 5) % 256, (xx + yy) % 256], -1).astype(np.uint8),
        "extremes": np.where(((xx // 3 + yy // 2) % 2)[..., None] == 1, 255, 0).astype(np.uint8)
        * np.ones(3, np.uint8),
    }


@pytest.mark.parametrize("src", CAMERA_SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_shrink_by_axes_equals_opencv_in_one_call(src: tuple[int, int]) -> None:
    rng = np.random.default_rng(src[0] * 7 + src[1])
    checked = 0
    for name, img in _images(*src, rng).items():
        for h, w in NETWORK_SIZES:
            if src[0] < h or src[1] < w or src[0] % h == 0 or src[1] % w == 0:
                continue  # whole factors never take the path (next tests)
            ref = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
            ours = _area_by_axes(img, h, w)
            assert ours.dtype == np.uint8 and ours.shape == (h, w, 3)
            diff = np.abs(ours.astype(int) - ref.astype(int))
            assert diff.max() == 0, (f"{name} {src} -> {(h, w)}: {np.count_nonzero(diff)} pixels "
                                     f"differ from OpenCV (max {diff.max()})")
            checked += 1
    assert checked >= 4


def test_the_common_camera_case_takes_the_faster_path() -> None:
    """640x480 -> 224x224 (the node benchmark, most VGA cameras into a ViT-S/14)."""
    assert separable_area_pays(480, 640, 224, 224)
    assert separable_area_pays(720, 1280, 322, 322)


@pytest.mark.parametrize("src,dst", [
    ((448, 448), (224, 224)),      # whole factors: OpenCV's integer path, rounds half up
    ((376, 672), (224, 112)),      # whole factor on x only: that pass alone would round so
    ((2048, 2448), (224, 224)),    # 5 MP: the float copy costs more than it saves
    ((480, 640), (322, 322)),      # under 4x in area: no gain measured
    ((200, 300), (224, 224)),      # grows along one axis
])
def test_other_resizes_stay_single_opencv_calls(src: tuple[int, int], dst: tuple[int, int]
                                                ) -> None:
    assert not separable_area_pays(*src, *dst)
    img = _images(*src, np.random.default_rng(0))["noise"]
    prep = Preprocessing(size=dst, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    shrinking = src[0] * src[1] > dst[0] * dst[1]
    ref = cv2.resize(img, dst[::-1], interpolation=cv2.INTER_AREA if shrinking
                     else cv2.INTER_LINEAR)
    np.testing.assert_array_equal(resize_image(img, prep), ref)


def test_preprocessing_output_unchanged_for_strided_and_cropped_frames() -> None:
    """A non-contiguous view (a flipped or cropped camera frame) and the centre-crop policy go
    through the same path and still equal the one-call reference."""
    rng = np.random.default_rng(3)
    frame = _images(600, 900, rng)["smooth"]
    view = frame[60:540, ::-1][:, 100:740]                     # 480x640, negative stride
    assert not view.flags.c_contiguous
    prep = Preprocessing(size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ref = cv2.resize(np.ascontiguousarray(view), (224, 224), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(resize_image(view, prep), ref)

    crop = Preprocessing(size=(224, 224), mean=prep.mean, std=prep.std, resize="center_crop")
    resized = cv2.resize(np.ascontiguousarray(view), (299, 224), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(resize_image(view, crop), resized[:, 37:261])

    lut_ref = (ref.astype(np.float32) - np.float32(255) * np.asarray(prep.mean, np.float32)) \
        * (np.float32(1) / (np.asarray(prep.std, np.float32) * np.float32(255)))
    np.testing.assert_array_equal(preprocess_batch([view], prep)[0], lut_ref.transpose(2, 0, 1))
