"""The torch preprocessing twin against the numpy/OpenCV path it must reproduce.

The twin runs on the CPU here (its arithmetic does not depend on the device); on a CUDA machine
the last test repeats the comparison on the GPU."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from vpr_ros.errors import InputError
from vpr_ros.runtime.preprocess import Preprocessing, preprocess_batch
from vpr_ros.runtime.torch_preprocess import TorchPreprocessor, resize_plan

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in grey levels (undoing the normalisation)."""
    return np.abs(a - b) * (np.asarray(STD)[None, :, None, None] * 255.0)


def _frame(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), (5, 5), 2)


# (source HxW, network HxW, policy, OpenCV method the plan must pick, max fraction of pixels
# allowed one grey level off). Exact cases: whole-factor area, mixed grow/shrink, no resize.
CASES = [
    ((32, 64), (224, 224), "stretch", "linear", 0.01),       # Nordland-size frames: upscale
    ((100, 130), (98, 98), "stretch", "area", 0.005),         # non-integer shrink
    ((480, 640), (322, 322), "stretch", "area", 0.005),
    ((448, 448), (224, 224), "stretch", "area_int", 0.0),     # 2x2 blocks, rounds half up
    ((896, 448), (224, 224), "stretch", "area_int", 0.0),     # 4x2 blocks, half to even
    ((448, 224), (224, 224), "stretch", "area_int", 0.0),     # 2x1 blocks
    ((100, 1000), (224, 224), "stretch", "linear", 0.0),      # INTER_AREA with a growing axis
    ((224, 224), (224, 224), "stretch", "identity", 0.0),
    ((480, 640), (224, 224), "center_crop", "area", 0.005),
    ((32, 64), (112, 112), "center_crop", "linear", 0.01),
]


@pytest.mark.parametrize("src,dst,policy,mode,frac", CASES)
def test_twin_matches_opencv_path(src, dst, policy, mode, frac) -> None:
    prep = Preprocessing(dst, MEAN, STD, policy)
    assert resize_plan(src, prep).mode == mode
    frames = [_frame(src, 0), _frame(src, 1)]
    ref = preprocess_batch(frames, prep)
    got = TorchPreprocessor(prep)(frames).numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    lv = _levels(ref, got)
    assert lv.max() <= 1.0 + 1e-3          # never more than one grey level
    assert (lv > 0.5).mean() <= frac       # and on a tiny fraction of pixels at most


def test_twin_on_real_images_and_mixed_sizes(nordland_pairs) -> None:
    summer, winter = nordland_pairs
    prep = Preprocessing((224, 224), MEAN, STD, "stretch")
    frames = summer[:4] + [np.ascontiguousarray(cv2.resize(winter[0], (640, 480)))]
    ref = preprocess_batch(frames, prep)
    got = TorchPreprocessor(prep)(frames).numpy()   # two sizes in one batch
    lv = _levels(ref, got)
    assert lv.max() <= 1.0 + 1e-3 and (lv > 0.5).mean() < 0.01
    # uint8 torch tensors (frames decoded on the device) give the same result as arrays
    as_tensor = TorchPreprocessor(prep)(torch.from_numpy(np.stack(summer[:4]))).numpy()
    np.testing.assert_array_equal(as_tensor, got[:4])


def test_twin_refuses_bad_input() -> None:
    twin = TorchPreprocessor(Preprocessing((56, 56), MEAN, STD))
    with pytest.raises(InputError, match="dtype uint8"):
        twin([np.zeros((20, 20, 3), np.float32)])
    with pytest.raises(InputError, match="dtype uint8"):
        twin([torch.zeros((20, 20, 3))])
    with pytest.raises(InputError, match=r"shape \(H, W, 3\)"):
        twin([torch.zeros((20, 20), dtype=torch.uint8)])
    with pytest.raises(InputError, match="empty batch"):
        twin([])
    with pytest.raises(InputError, match="empty image"):
        twin([np.zeros((0, 5, 3), np.uint8)])


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU here: the on-GPU run of the twin needs one (its CPU run "
                    "above checks the same arithmetic)")
def test_twin_on_cuda_matches_cpu_twin() -> None:
    prep = Preprocessing((322, 322), MEAN, STD, "stretch")
    frames = [_frame((480, 640), 2), _frame((32, 64), 3)]
    cpu = TorchPreprocessor(prep)(frames).numpy()
    gpu = TorchPreprocessor(prep, "cuda")(frames).cpu().numpy()
    assert _levels(cpu, gpu).max() <= 1.0 + 1e-3
    assert (_levels(preprocess_batch(frames, prep), gpu) > 0.5).mean() < 0.01


@pytest.mark.parametrize("size,policy", [((224, 224), "stretch"), ((112, 224), "center_crop")])
def test_normalisation_table_equals_the_formula_bit_for_bit(size, policy) -> None:
    """The lookup-table normalisation must give exactly (v - 255 mean) / (255 std) in float32,
    or maps built before it would no longer match the node's descriptors."""
    from vpr_ros.runtime.preprocess import resize_image

    prep = Preprocessing(size=size, mean=MEAN, std=STD, resize=policy)
    images = [_frame((480, 640), 1), _frame((32, 64), 2), _frame(size, 3)]
    images[0][:2, :2] = [[0, 255, 128], [255, 0, 1]]  # both extreme levels present
    got = preprocess_batch(images, prep)
    ref = np.stack([resize_image(im, prep) for im in images]).astype(np.float32)
    ref = (ref - np.asarray(MEAN, np.float32) * np.float32(255.0)) * (
        np.float32(1.0) / (np.asarray(STD, np.float32) * np.float32(255.0)))
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (3, 3, *size)
    np.testing.assert_array_equal(got, ref.transpose(0, 3, 1, 2))


def test_batch_equals_one_opencv_call_and_the_formula() -> None:
    """preprocess_batch on camera-sized frames must equal one INTER_AREA call followed by the
    normalisation formula: the contract maps are built with, whatever the implementation."""
    prep = Preprocessing(size=(224, 224), mean=MEAN, std=STD, resize="stretch")
    images = [_frame((480, 640), 11), _frame((1080, 1920), 12), _frame((481, 640), 13)]
    got = preprocess_batch(images, prep)
    for i, im in enumerate(images):
        small = cv2.resize(im, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32)
        ref = (small - np.asarray(MEAN, np.float32) * np.float32(255.0)) * (
            np.float32(1.0) / (np.asarray(STD, np.float32) * np.float32(255.0)))
        np.testing.assert_array_equal(got[i], ref.transpose(2, 0, 1))



def test_read_only_frames_at_network_size_are_normalised_bit_for_bit() -> None:
    """Frames decoded from ROS messages are read-only views of the message buffer; one already
    at the network size skips the resize and goes straight to the lookup."""
    prep = Preprocessing(size=(224, 224), mean=MEAN, std=STD, resize="stretch")
    frame = _frame((224, 224), 31)
    view = np.frombuffer(frame.tobytes(), np.uint8).reshape(frame.shape)
    assert not view.flags.writeable
    ref = (frame.astype(np.float32) - np.asarray(MEAN, np.float32) * np.float32(255.0)) * (
        np.float32(1.0) / (np.asarray(STD, np.float32) * np.float32(255.0)))
    np.testing.assert_array_equal(preprocess_batch([view], prep)[0], ref.transpose(2, 0, 1))
