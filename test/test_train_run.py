"""Training runs end to end: a shortened Nordland recipe, resume, joint training, bad data.

Each run is a handful of optimizer steps on a few places so the suite stays fast on a CPU; the
code path is the full one (recipe -> readers -> sampler -> Lightning -> model directory).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from vpr_ros.cli import main
from vpr_ros.errors import InputError
from vpr_ros.train.config import load_train_config

REPO = Path(__file__).resolve().parents[1]
NORDLAND_RECIPE = REPO / "config" / "train" / "qaa_effnetlite0_nordland.yaml"
# 16 places (round(0.0045 * 3576)) and P = 16: every step sees the same places, so a few steps
# must lower the loss; one cached view per image (no augmentation) keeps it deterministic.
SHORT = ["data.train.0.split=[0.0, 0.0045]", "data.train.0.places_per_batch=16",
         "feature_cache.variants=1", "augment.randaugment=null", "scheduler.warmup=0",
         "optimizer.lr=1.0e-3", "trainer.max_steps=5", "trainer.progress_bar=false",
         "trainer.checkpoint_every_n_steps=5", "trainer.log_every_n_steps=1"]


def _sets(args: list[str]) -> list[str]:
    return [a for s in args for a in ("--set", s)]


# Retrieval validation on 17 held-out frames (winter -> summer, +-1 file), at the end.
VAL = ("data.val={database: 'nordland:summer', queries: 'nordland:winter', "
       "subset: [0.6, 0.605], tolerance: 1}")


@pytest.fixture(scope="module")
def nordland_run(nordland_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    rc = main(["train", "--config", str(NORDLAND_RECIPE), "-o", str(out), *_sets(SHORT + [VAL])])
    assert rc == 0
    return out


def test_short_nordland_recipe_gives_a_loadable_model_whose_loss_fell(nordland_run: Path,
                                                                     nordland_root: Path) -> None:
    from vpr_ros.datasets.nordland import load_images
    from vpr_ros.models.model_dir import load_model_dir
    from vpr_ros.runtime.torch_encoder import TorchEncoder

    summary = json.loads((nordland_run / "train_summary.json").read_text())
    losses = summary["losses"]
    assert summary["steps"] == 5 and len(losses) == 5
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.02, losses
    model, meta = load_model_dir(nordland_run / "model")
    assert meta.config.aggregator.name == "qaa" and meta.descriptor_dim == 1024
    assert meta.config.input.size == (112, 224)  # model.json records the test size
    assert meta.fingerprint == summary["fingerprint"]
    enc = TorchEncoder(model, meta)
    desc = enc.encode(load_images(nordland_root, "winter", [10, 20]))
    assert desc.shape == (2, 1024)
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-4)
    assert (nordland_run / "checkpoints" / "last.ckpt").is_file()
    val = summary["validation"]
    assert val["step"] == 5 and val["num_queries"] == 17  # round(3576 * [0.6, 0.605])
    assert val["ground_truth"] == "index tolerance +-1"
    assert 0.0 <= val["recall"]["R@1"] <= val["recall"]["R@5"] <= val["recall"]["R@10"] <= 1.0
    assert any((nordland_run / "tensorboard").rglob("events.out.tfevents.*"))


def test_resume_continues_from_the_last_checkpoint(nordland_run: Path) -> None:
    before = json.loads((nordland_run / "train_summary.json").read_text())
    rc = main(["train", "--config", str(NORDLAND_RECIPE), "-o", str(nordland_run),
               "--resume", "auto", *_sets(SHORT + ["trainer.max_steps=7"])])
    assert rc == 0
    after = json.loads((nordland_run / "train_summary.json").read_text())
    assert after["steps"] == 7 and len(after["losses"]) == 2  # only the two new steps ran
    assert after["fingerprint"] != before["fingerprint"]
    assert main(["train", "--config", str(NORDLAND_RECIPE), "-o", str(nordland_run),
                 "--resume", str(nordland_run / "missing.ckpt"), *_sets(SHORT)]) == 2


def _traversals(root: Path, names: tuple[str, ...], frames: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (frames, 8, 8, 3), dtype=np.uint8)
    for t, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(frames):
            img = cv2.resize(base[i], (48, 48), interpolation=cv2.INTER_NEAREST)
            noisy = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255)
            cv2.imwrite(str(root / name / f"f{i:03d}.png"), noisy.astype(np.uint8))
    return [str(root / n) for n in names]


def test_joint_training_two_datasets_with_an_extra_loss(tmp_path: Path) -> None:
    from vpr_ros.train.losses import register_loss
    from vpr_ros.train.run import train

    calls: list[int] = []

    @register_loss("test_descriptor_mean")
    class DescriptorMean:  # a method-specific extra loss, plugged in by name
        def __init__(self, scale: float = 1.0) -> None:
            self.scale = scale

        def __call__(self, outputs: dict, labels: torch.Tensor) -> torch.Tensor:
            calls.append(len(labels))
            return self.scale * outputs["global"].mean(dim=0).pow(2).sum()

    doc = {
        "model": {"config": {
            "backbone": {"name": "efficientnet_lite",
                         "params": {"variant": "lite0", "trainable_stages": 1}},
            "aggregator": {"name": "gem", "params": {"out_dim": 32}},
            "input": {"size": [64, 64]}, "weights": {"backbone": "package"}}},
        "data": {"train": [
            {"name": "first", "kind": "aligned", "places_per_batch": 4, "images_per_place": 2,
             "folders": _traversals(tmp_path / "a", ("day", "night"), 10, 0)},
            {"name": "second", "kind": "aligned", "places_per_batch": 3, "images_per_place": 3,
             "folders": _traversals(tmp_path / "b", ("x", "y", "z"), 8, 1),
             "split": [0.0, 0.5]}]},
        "augment": {"randaugment": {"num_ops": 2, "magnitude": 9}},
        "loss": {"extra": [{"name": "test_descriptor_mean", "weight": 0.5,
                            "params": {"scale": 2.0}}]},
        "optimizer": {"lr": 1e-3, "backbone_lr": 1e-5},
        "trainer": {"max_steps": 3, "progress_bar": False, "num_workers": 0,
                    "accumulate_grad_batches": 1},
        "output": str(tmp_path / "out")}
    (tmp_path / "joint.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_train_config(tmp_path / "joint.yaml")
    result = train(cfg)
    assert result.steps == 3
    # the extra loss ran once per dataset per step, on that dataset's P x K batch only
    assert calls == [8, 9] * 3
    from vpr_ros.models.model_dir import load_model_dir

    model, meta = load_model_dir(result.model_dir)
    assert meta.config.input.size == (64, 64) and meta.descriptor_dim == 32
    # the trainable head conv moved (backbone_lr group), the frozen stem did not
    from vpr_ros.models.model_dir import init_model

    torch.manual_seed(0)
    fresh = init_model(meta.config, {"backbone": "package"})
    head = "backbone.net.conv_head.weight"
    stem = "backbone.net.conv_stem.weight"
    assert not torch.equal(model.state_dict()[head], fresh.state_dict()[head])
    assert torch.equal(model.state_dict()[stem], fresh.state_dict()[stem])


def _bad_recipe(tmp_path: Path, **dataset) -> Path:
    folders = _traversals(tmp_path / "d", ("s", "w"), 6, 2)
    entry = {"name": "tiny", "kind": "aligned", "folders": folders, "places_per_batch": 2,
             "images_per_place": 2, **dataset}
    doc = {"model": {"config": str(REPO / "config/models/gem_effnetlite0.yaml")},
           "data": {"train": [entry]}, "trainer": {"max_steps": 1, "progress_bar": False},
           "output": str(tmp_path / "out")}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_training_never_runs_on_nothing(tmp_path: Path) -> None:
    from vpr_ros.train.data import read_place_set

    p = _bad_recipe(tmp_path, places_per_batch=4, split=[0.0, 0.5])
    cfg = load_train_config(p)
    with pytest.raises(InputError, match=r"tiny .*3 usable places, fewer than places_per_batch=4"):
        read_place_set(cfg.data.train[0], cfg)
    cfg = load_train_config(p, ["data.train.0.split=[0.0, 0.05]"])
    with pytest.raises(InputError, match="split .* is empty; widen the split"):
        read_place_set(cfg.data.train[0], cfg)
    utm = tmp_path / "utm"
    utm.mkdir()
    for i in range(6):  # six images 100 m apart: six places of one image each
        cv2.imwrite(str(utm / f"@{500000 + 100 * i}.00@4000000.00@@.jpg"),
                    np.full((16, 16, 3), 40 * i, np.uint8))
    doc = yaml.safe_load(p.read_text())
    doc["data"]["train"][0] = {"name": "sparse", "kind": "utm_folder", "path": str(utm),
                               "places_per_batch": 2, "images_per_place": 2}
    p.write_text(yaml.safe_dump(doc))
    cfg = load_train_config(p)
    with pytest.warns(UserWarning, match="6 of 6 places have fewer than images_per_place=2"):
        with pytest.raises(InputError, match="no place has at least images_per_place=2"):
            read_place_set(cfg.data.train[0], cfg)


def test_missing_and_unreadable_training_images(tmp_path: Path) -> None:
    from vpr_ros.train.data import read_place_set

    p = _bad_recipe(tmp_path)
    gone = tmp_path / "d" / "w" / "f003.png"
    broken = tmp_path / "d" / "s" / "f004.png"
    cfg = load_train_config(p, ["data.train.0.verify_images=true"])
    # The aligned reader lists what exists; corrupt the files after reading the folder.
    ps_ok = read_place_set(cfg.data.train[0], cfg)
    assert len(ps_ok) == 12
    broken.write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"f004.png \(unreadable\).*on_bad_image: skip"):
        read_place_set(cfg.data.train[0], cfg)
    cfg = load_train_config(p, ["data.train.0.verify_images=true",
                                "data.train.0.on_bad_image=skip"])
    with pytest.warns(UserWarning, match="f004.png"):
        with pytest.warns(UserWarning, match="1 of 6 places have fewer"):
            ps = read_place_set(cfg.data.train[0], cfg)
    assert len(ps) == 10 and ps.num_places == 5  # the broken frame's place lost its pair
    gone.unlink()
    from vpr_ros.datasets.images import read_rgb

    with pytest.raises(InputError, match=r"f003.png: image file is missing"):
        read_rgb(gone)


def test_zero_steps_saves_the_initial_model_at_the_test_size(tmp_path: Path) -> None:
    """The "untrained" baseline of an experiment: same recipe, same seed, no step."""
    from vpr_ros.models.model_dir import load_model_dir

    out = tmp_path / "untrained"
    assert main(["train", "--config", str(NORDLAND_RECIPE), "-o", str(out),
                 "--set", "trainer.max_steps=0"]) == 0
    model, meta = load_model_dir(out / "model")
    assert meta.config.input.size == (112, 224) and meta.extra["steps"] == 0
    again = tmp_path / "again"
    assert main(["train", "--config", str(NORDLAND_RECIPE), "-o", str(again),
                 "--set", "trainer.max_steps=0"]) == 0
    twin, _ = load_model_dir(again / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 twin.state_dict().values()))  # seeded
    assert not (out / "cache").exists()  # no data was read
