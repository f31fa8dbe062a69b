"""The releases' evaluation resize (``input.interpolation``) against the upstream transforms.

References are torchvision pipelines written as the releases write them (PIL image in):
VPR-methods-evaluation, which evaluates the released QAA models, ``ToTensor -> Normalize ->
Resize([322, 322], antialias=True)``; BoQ's README ``ToTensor -> Resize(bicubic,
antialias=True) -> Normalize``. The project's CPU path, its torch twin and a model imported from
a release must give the same network input within 1e-5 on real images: the shared Nordland
thumbnails (enlarged), VPR-methods-evaluation's own street photos and EuRoC camera frames
(shrunk), where those public data sets are present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from vpr_ros.datasets.images import list_images, read_rgb
from vpr_ros.datasets.public_data import find_dataset, missing_reason
from vpr_ros.errors import BackendError, ConfigError
from vpr_ros.models.config import model_config_from_dict
from vpr_ros.export.artifact import ArtifactMeta
from vpr_ros.runtime.onnx_encoder import artifact_preprocessing
from vpr_ros.runtime.preprocess import Preprocessing, preprocess_batch
from vpr_ros.runtime.torch_preprocess import TorchPreprocessor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOL = 1e-5


def vpr_methods_evaluation(size: tuple[int, int]) -> T.Compose:
    """VPR-methods-evaluation's test transform (test_dataset.py) with ``--image_size H W``."""
    return T.Compose([T.ToTensor(), T.Normalize(mean=list(MEAN), std=list(STD)),
                      T.Resize(size=list(size), antialias=True)])


def boq_readme(size: tuple[int, int]) -> T.Compose:
    """The transform BoQ's README prescribes for its released models."""
    return T.Compose([T.ToTensor(),
                      T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.Normalize(mean=list(MEAN), std=list(STD))])


UPSTREAM = {"bilinear_antialias": vpr_methods_evaluation, "bicubic_antialias": boq_readme}


def _reference(images: list[np.ndarray], interpolation: str, size: tuple[int, int]
               ) -> np.ndarray:
    tf = UPSTREAM[interpolation](size)
    return torch.stack([tf(Image.fromarray(img)) for img in images]).numpy()


def _street_photos() -> list[np.ndarray]:
    root = find_dataset("vpr_methods_toy")
    if root is None:
        pytest.skip(missing_reason("vpr_methods_toy", "gmberton/VPR-methods-evaluation "
                                   "toy_dataset/ (database/*.jpg, queries/*.jpg)"))
    paths = list_images(root / "queries") + list_images(root / "database")[:3]
    return [read_rgb(p) for p in paths]


def _euroc_frames() -> list[np.ndarray]:
    root = find_dataset("euroc_micro")
    if root is None:
        pytest.skip(missing_reason("euroc_micro", "MIT-SPARK/Kimera-VIO tests/data/"
                                   "MicroEurocDataset (mav0/cam0/data/*.png)"))
    return [read_rgb(p) for p in list_images(root / "mav0" / "cam0" / "data")[:3]]


@pytest.fixture(scope="module", params=["nordland", "street", "euroc"])
def real_images(request) -> list[np.ndarray]:
    if request.param == "nordland":
        summer, winter = request.getfixturevalue("nordland_pairs")
        return summer[:4] + winter[:4]
    return _street_photos() if request.param == "street" else _euroc_frames()


@pytest.mark.parametrize("interpolation", sorted(UPSTREAM))
@pytest.mark.parametrize("size", [(322, 322), (224, 224)])
def test_cpu_path_and_twin_equal_the_upstream_transform(real_images, interpolation, size
                                                        ) -> None:
    ref = _reference(real_images, interpolation, size)
    prep = Preprocessing(size, MEAN, STD, "stretch", interpolation)
    cpu = preprocess_batch(real_images, prep)
    twin = TorchPreprocessor(prep, "cpu")(real_images).numpy()
    assert cpu.shape == ref.shape == (len(real_images), 3, *size) and cpu.dtype == np.float32
    assert np.abs(cpu - ref).max() <= TOL
    assert np.abs(twin - ref).max() <= TOL
    # OpenCV's uint8 resize (the project's own models) is a different input: what the policy
    # field is for.
    opencv = preprocess_batch(real_images, Preprocessing(size, MEAN, STD, "stretch"))
    assert np.abs(opencv - ref).mean() > 10 * TOL


def _release_input(interpolation: str):
    if interpolation == "bilinear_antialias":
        from vpr_ros.models.official_qaa import qaa_release_config

        doc = {"model_config_dict": {"backbone_arch": "dinov2_vitb14", "agg_arch": "QAA",
                                     "backbone_config": {"num_trainable_blocks": 2},
                                     "agg_config": {"num_channels": 768}}}
        return qaa_release_config(doc, "config.json").input
    import torch as _t
    from vpr_ros.models.official_boq import boq_release_config

    sd = {"backbone.dino.cls_token": _t.zeros(1, 1, 768),
          "backbone.dino.pos_embed": _t.zeros(1, 1 + 37 * 37, 768),
          "aggregator.proj_c.weight": _t.zeros(384, 768, 3, 3),
          "aggregator.boqs.0.queries": _t.zeros(1, 64, 384),
          "aggregator.boqs.1.queries": _t.zeros(1, 64, 384),
          "aggregator.fc.weight": _t.zeros(32, 128)}
    return boq_release_config(sd, "dinov2_12288.pth").input


@pytest.mark.parametrize("interpolation", sorted(UPSTREAM))
def test_release_imports_record_their_evaluation_transform(interpolation) -> None:
    """QAA imports take VPR-methods-evaluation's bilinear, BoQ imports the README's bicubic,
    and the recorded policy is what the runtime then applies."""
    inp = _release_input(interpolation)
    assert (inp.size, inp.resize, inp.interpolation) == ((322, 322), "stretch", interpolation)
    rng = np.random.default_rng(0)
    img = np.ascontiguousarray(rng.integers(0, 256, (540, 960, 3), dtype=np.uint8))
    got = preprocess_batch([img], Preprocessing.from_input_config(inp))
    assert np.abs(got - _reference([img], interpolation, (322, 322))).max() <= TOL


def test_model_json_without_the_field_keeps_opencv_and_the_field_round_trips() -> None:
    base = {"backbone": {"name": "dinov2"}, "aggregator": {"name": "gem"},
            "input": {"size": [224, 224], "resize": "stretch"}}
    assert model_config_from_dict(base).input.interpolation == "opencv"
    for value in ("opencv", "bilinear_antialias", "bicubic_antialias"):
        doc = json.loads(json.dumps(model_config_from_dict(
            {**base, "input": {**base["input"], "interpolation": value}}).to_dict()))
        assert doc["input"]["interpolation"] == value
        assert model_config_from_dict(doc).input.interpolation == value
    with pytest.raises(ConfigError, match="input.interpolation: 'lanczos'"):
        model_config_from_dict({**base, "input": {**base["input"], "interpolation": "lanczos"}})


def test_existing_model_directory_keeps_behaviour_and_fingerprint(tmp_path, effnet_gem_model_dir
                                                                   ) -> None:
    """A model directory whose model.json predates the field: same fingerprint before and after
    loading, OpenCV preprocessing."""
    from vpr_ros.models.model_dir import CONFIG_FILE, read_model_meta
    from vpr_ros.runtime.encoder import load_encoder

    old = tmp_path / "old"
    old.mkdir()
    for f in effnet_gem_model_dir.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    doc = json.loads((old / CONFIG_FILE).read_text())
    del doc["input"]["interpolation"]
    (old / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    before = read_model_meta(old).fingerprint
    enc = load_encoder(old, backend="torch")
    assert enc.preprocessing.interpolation == "opencv"
    assert enc.fingerprint == before == read_model_meta(old).fingerprint


def test_export_metadata_records_the_policy_and_old_files_read_as_opencv() -> None:
    meta = ArtifactMeta(fingerprint="f", model_fingerprint="f", model_name="m",
                        descriptor_dim=8, input_size=(322, 322), mean=MEAN, std=STD,
                        resize="stretch", interpolation="bicubic_antialias")
    back = ArtifactMeta.from_props(meta.to_props(), "x.onnx")
    assert back.interpolation == "bicubic_antialias"
    assert artifact_preprocessing(back) == Preprocessing((322, 322), MEAN, STD, "stretch",
                                               "bicubic_antialias")
    props = meta.to_props()
    del props["interpolation"]
    assert ArtifactMeta.from_props(props, "old.onnx").interpolation == "opencv"
    props["interpolation"] = json.dumps("lanczos")
    with pytest.raises(BackendError, match="interpolation 'lanczos'"):
        ArtifactMeta.from_props(props, "new.onnx")


def test_training_transform_equals_the_runtime_for_release_policies(nordland_pairs) -> None:
    """Un-augmented training images are what the runtime feeds the model."""
    from vpr_ros.models.config import InputConfig
    from vpr_ros.train.data import ImageTransform

    summer, _ = nordland_pairs
    for interpolation in UPSTREAM:
        inp = InputConfig(size=(112, 224), interpolation=interpolation)
        tf = ImageTransform(inp, (112, 224))
        got = torch.stack([tf(img, augment=False) for img in summer[:3]]).numpy()
        ref = preprocess_batch(summer[:3], Preprocessing.from_input_config(inp))
        assert np.abs(got - ref).max() <= TOL


def test_center_crop_geometry_is_shared(tmp_path) -> None:
    """The float policies crop where the OpenCV one does (same window, same scale)."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    prep = Preprocessing((224, 224), MEAN, STD, "center_crop", "bilinear_antialias")
    got = preprocess_batch([img], prep)
    # resize the whole frame to cover 224x224 (299x224 ... here 224 rows x 299 cols), then crop
    full = preprocess_batch([img], Preprocessing((224, 299), MEAN, STD, "stretch",
                                                 "bilinear_antialias"))
    np.testing.assert_array_equal(got, full[:, :, :, 37:37 + 224])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("interpolation", sorted(UPSTREAM))
def test_twin_on_cuda_equals_upstream(nordland_pairs, interpolation) -> None:
    images = _street_photos() if find_dataset("vpr_methods_toy") else nordland_pairs[0][:4]
    prep = Preprocessing((322, 322), MEAN, STD, "stretch", interpolation)
    got = TorchPreprocessor(prep, "cuda")(images).cpu().numpy()
    assert np.abs(got - _reference(images, interpolation, (322, 322))).max() <= TOL


def test_cpu_backends_encode_a_release_policy_model_alike(tmp_path, nordland_pairs) -> None:
    """One model recording the BoQ transform, opened by PyTorch and by ONNX Runtime (exported
    on demand): both preprocess with the recorded policy (the same array), the ONNX graph takes
    the resized tensor, and the descriptors agree."""
    import yaml

    from vpr_ros.models.model_dir import create_model_dir
    from vpr_ros.runtime.encoder import load_encoder

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "models"
                          / "gem_effnetlite0.yaml").read_text())
    cfg["input"] = {"size": [96, 128], "interpolation": "bicubic_antialias"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    meta = create_model_dir(tmp_path / "m.yaml", tmp_path / "model")
    assert meta.config.input.interpolation == "bicubic_antialias"
    images = nordland_pairs[0][:3]
    torch_enc = load_encoder(tmp_path / "model", backend="torch")
    onnx_enc = load_encoder(tmp_path / "model", backend="onnxruntime")
    assert torch_enc.preprocessing == onnx_enc.preprocessing
    assert onnx_enc.preprocessing.interpolation == "bicubic_antialias"
    np.testing.assert_array_equal(torch_enc.preprocess(images), onnx_enc.preprocess(images))
    ref = _reference(images, "bicubic_antialias", (96, 128))
    assert np.abs(onnx_enc.preprocess(images) - ref).max() <= TOL
    a, b = torch_enc.encode(images), onnx_enc.encode(images)
    assert (a * b).sum(1).min() >= 0.9999
