"""The fused numba shrink must give OpenCV's INTER_AREA bytes, normalised, bit for bit.

Maps are built and queried through the same ``preprocess_batch``; if the faster path changed a
single grey level, descriptors of maps built before it would drift from live queries. So every
test compares against the OpenCV path (one ``cv2.resize(..., INTER_AREA)`` on uint8, then the
normalisation table), on camera sizes and awkward ones, and on images that stress rounding."""

from __future__ import annotations

import numpy as np
import pytest

from vpr_ros.runtime import area_resize
from vpr_ros.runtime.preprocess import Preprocessing, normalisation_table, preprocess_batch
from vpr_ros.runtime.torch_preprocess import area_weights

pytestmark = pytest.mark.skipif(not area_resize.AVAILABLE,
                                reason="numba is not installed: preprocessing uses OpenCV only")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CAMERA_SIZES = [(480, 640), (480, 752), (480, 848), (720, 1280), (768, 1024), (479, 641),
                (333, 1000), (376, 672), (900, 225), (1080, 1920)]
NETWORK_SIZES = [(224, 224), (322, 322), (112, 224), (210, 280), (224, 112)]


def _images(h: int, w: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([128 + 100 * np.sin(xx / 7.0 + yy / 13.0), 128 + 90 * np.cos(xx / 5.0),
                       yy * 255.0 / h], -1) + rng.normal(0, 12, (h, w, 3))
    return {
        "noise": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "smooth": np.clip(smooth, 0, 255).astype(np.uint8),
        "ramp": np.stack([(xx * 3) % 256, (yy * 5) % 256, (xx + yy) % 256], -1).astype(np.uint8),
        "black_white": (np.where(((xx // 3 + yy // 2) % 2)[..., None] == 1, 255, 0)
                        * np.ones(3)).astype(np.uint8),
    }


def _opencv_path(images: list[np.ndarray], prep: Preprocessing,
                 monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(area_resize, "AVAILABLE", False)
        return preprocess_batch(images, prep)


@pytest.mark.parametrize("src", CAMERA_SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_fused_shrink_equals_the_opencv_path(src: tuple[int, int],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fractional shrink, whether or not ``applies`` picks the kernel for its size."""
    rng = np.random.default_rng(src[0] * 7 + src[1])
    images = list(_images(*src, rng).values())
    checked = 0
    for size in NETWORK_SIZES:
        if src[0] <= size[0] or src[1] <= size[1] or src[0] % size[0] == 0 \
                or src[1] % size[1] == 0:
            continue
        prep = Preprocessing(size=size, mean=MEAN, std=STD)
        lut = normalisation_table(MEAN, STD)
        fast = np.empty((len(images), 3, *size), np.float32)
        for i, img in enumerate(images):
            area_resize.shrink_normalised(img, size, (0, 0), lut, fast[i])
        ref = _opencv_path(images, prep, monkeypatch)
        mismatched = np.count_nonzero(fast != ref)
        assert mismatched == 0, f"{src} -> {size}: {mismatched} values differ from OpenCV's"
        if area_resize.applies(src, size):   # and preprocess_batch really takes it
            np.testing.assert_array_equal(preprocess_batch(images, prep), ref)
        checked += 1
    assert checked >= 2


def test_centre_crop_and_strided_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-contiguous view (a flipped, cropped camera frame) and the centre-crop policy."""
    frame = _images(600, 900, np.random.default_rng(3))["smooth"]
    view = frame[60:540, ::-1][:, 100:740]                     # 480x640, negative stride
    assert not view.flags.c_contiguous
    for policy in ("stretch", "center_crop"):
        prep = Preprocessing(size=(224, 224), mean=MEAN, std=STD, resize=policy)
        np.testing.assert_array_equal(preprocess_batch([view], prep),
                                      _opencv_path([np.ascontiguousarray(view)], prep,
                                                   monkeypatch))


def test_which_resizes_take_the_fused_path() -> None:
    assert area_resize.applies((480, 640), (224, 224))
    assert area_resize.applies((1080, 1920), (210, 280))
    assert not area_resize.applies((1080, 1920), (322, 322))  # OpenCV's two threads win there
    assert not area_resize.applies((448, 448), (224, 224))    # whole factors: OpenCV's integer
    assert not area_resize.applies((376, 672), (224, 112))    # path, which rounds differently
    assert not area_resize.applies((200, 300), (224, 224))    # grows: INTER_LINEAR
    assert not area_resize.applies((224, 224), (224, 224))


@pytest.mark.parametrize("src,dst", [(640, 224), (480, 224), (641, 322), (1000, 7), (9, 4)])
def test_taps_are_the_coverage_of_each_output_cell(src: int, dst: int) -> None:
    """Independent of the table's own code: the overlap of output cell [i*s, (i+1)*s) with
    each source pixel [j, j+1), over the cell width (OpenCV drops slivers under 1e-3)."""
    starts, index, weight = area_resize.area_taps(src, dst)
    dense = np.zeros((dst, src))
    for i in range(dst):
        for k in range(starts[i], starts[i + 1]):
            dense[i, index[k]] += weight[k]
    s = src / dst
    lo = np.arange(dst)[:, None] * s
    overlap = np.clip(np.minimum(lo + s, np.arange(1, src + 1)) - np.maximum(lo, np.arange(src)),
                      0, None)
    np.testing.assert_allclose(dense, overlap / s, atol=2e-3 / s)
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, atol=1e-6)
    assert weight.dtype == np.float32 and np.all(np.diff(index[starts[:-1]]) >= 0)
    np.testing.assert_allclose(area_weights(src, dst), dense, atol=1e-7)   # the GPU twin's


def test_warm_up_compiles_both_kernels() -> None:
    area_resize.warm_up()
    combine_rows, normalise_levels = area_resize.kernels()
    assert combine_rows.signatures and normalise_levels.signatures


def test_preprocess_batch_takes_the_kernel_only_where_it_applies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = area_resize.shrink_normalised

    def spy(img, resized_hw, crop, lut, out):  # type: ignore[no-untyped-def]
        calls.append(resized_hw)
        real(img, resized_hw, crop, lut, out)

    monkeypatch.setattr(area_resize, "shrink_normalised", spy)
    frame = np.zeros((480, 640, 3), np.uint8)
    preprocess_batch([frame, frame], Preprocessing(size=(224, 224), mean=MEAN, std=STD))
    preprocess_batch([frame], Preprocessing(size=(322, 322), mean=MEAN, std=STD))
    preprocess_batch([frame[:448, :448]], Preprocessing(size=(224, 224), mean=MEAN, std=STD))
    assert calls == [(224, 224), (224, 224)]
