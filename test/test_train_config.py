"""Training recipes: the shipped ones parse; bad ones fail with the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vpr_ros.errors import ConfigError
from vpr_ros.train.config import apply_overrides, load_train_config
from vpr_ros.train.module import lr_factor

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "config" / "train").glob("*.yaml"))


def _write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _minimal(**extra) -> dict:
    doc = {"model": {"config": str(REPO / "config/models/qaa_effnetlite0.yaml")},
           "data": {"train": [{"name": "n", "kind": "nordland", "images_per_place": 2}]},
           "trainer": {"max_steps": 3}}
    doc.update(extra)
    return doc


def test_shipped_recipes_parse() -> None:
    names = {p.name for p in RECIPES}
    assert {"qaa_dinov2b.yaml", "boq_dinov2b.yaml", "qaa_effnetlite0_nordland.yaml",
            "gem_effnetlite0_nordland.yaml"} <= names
    for p in RECIPES:
        cfg = load_train_config(p)
        assert cfg.data.train and cfg.name
    qaa = load_train_config(REPO / "config/train/qaa_dinov2b.yaml")
    assert [d.kind for d in qaa.data.train] == ["utm_folder", "gsv_cities", "msls"]
    assert (qaa.optimizer.lr, qaa.optimizer.backbone_lr, qaa.optimizer.weight_decay) == \
        (1e-5, 8e-6, 1e-3)
    assert qaa.model.train_size == (224, 224) and qaa.model.test_size == (322, 322)
    assert {(d.places_per_batch, d.images_per_place) for d in qaa.data.train} == {(30, 4)}
    assert (qaa.loss.alpha, qaa.loss.beta, qaa.loss.base, qaa.loss.miner.epsilon) == \
        (1.0, 50.0, 0.0, 0.1)


def test_unknown_keys_name_the_file_and_the_key(tmp_path: Path) -> None:
    p = _write(tmp_path, _minimal(optimiser={"lr": 1}))
    with pytest.raises(ConfigError, match=rf"{p}.*unknown key\(s\) \['optimiser'\]"):
        load_train_config(p)
    doc = _minimal()
    doc["data"]["train"][0]["placs_per_batch"] = 8
    with pytest.raises(ConfigError, match=r"data.train\[0\]: unknown key\(s\) \['placs_per_batch'\]"
                       r".*places_per_batch"):
        load_train_config(_write(tmp_path, doc))
    doc = _minimal(loss={"miner": {"epsilon": 0.1, "type": "hard"}})
    with pytest.raises(ConfigError, match=r"loss.miner: unknown key\(s\) \['type'\]"):
        load_train_config(_write(tmp_path, doc))


def test_bad_values_and_missing_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optimizer.lr = 'fast' must be a number"):
        load_train_config(_write(tmp_path, _minimal(optimizer={"lr": "fast"})))
    doc = _minimal()
    doc["data"]["train"][0]["split"] = [0.6, 0.2]
    with pytest.raises(ConfigError, match=r"split = \[0.6, 0.2\] must be \[start, end\]"):
        load_train_config(_write(tmp_path, doc))
    with pytest.raises(ConfigError, match="data.train lists no dataset"):
        load_train_config(_write(tmp_path, _minimal(data={"train": []})))
    with pytest.raises(ConfigError, match="set max_steps or max_epochs"):
        load_train_config(_write(tmp_path, _minimal(trainer={})))
    doc = _minimal()
    doc["data"]["train"][0]["images_per_place"] = 4  # 2 seasons x place_size 1 = 2 images
    with pytest.raises(ConfigError, match="raise place_size or lower images_per_place"):
        load_train_config(_write(tmp_path, doc))
    doc = _minimal()
    doc["data"]["train"][0]["cities"] = ["Rome"]
    with pytest.raises(ConfigError, match=r"\['cities'\] do not apply to kind 'nordland'"):
        load_train_config(_write(tmp_path, doc))
    doc = _minimal()
    doc["data"]["train"][0].update(kind="gsv_cities", path="/data/gsv", cities=[3])
    with pytest.raises(ConfigError, match=r"cities = \[3\] must be a list of city names"):
        load_train_config(_write(tmp_path, doc))
    with pytest.raises(ConfigError, match="exactly one of 'config'"):
        load_train_config(_write(tmp_path, _minimal(model={"train_size": [64, 64]})))
    yaml_1_1 = _minimal(optimizer={"lr": "1e-5"})  # YAML 1.1 reads 1e-5 as a string
    assert load_train_config(_write(tmp_path, yaml_1_1)).optimizer.lr == 1e-5


def test_overrides(tmp_path: Path) -> None:
    p = _write(tmp_path, _minimal())
    cfg = load_train_config(p, ["trainer.max_steps=7", "data.train.0.places_per_batch=5",
                                "augment.randaugment={num_ops: 1, magnitude: 3}"])
    assert cfg.trainer.max_steps == 7 and cfg.data.train[0].places_per_batch == 5
    assert cfg.augment.randaugment.num_ops == 1
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["trainer.max_steps"], "x")
    with pytest.raises(ConfigError, match="is a list"):
        load_train_config(p, ["data.train.3.places_per_batch=5"])


def test_unregistered_aggregator_fails_with_the_registry_error(tmp_path: Path) -> None:
    from vpr_ros.train.run import build_training_model

    doc = _minimal(model={"config": {"backbone": {"name": "efficientnet_lite",
                                                  "params": {"variant": "lite0"}},
                                     "aggregator": {"name": "not_registered_agg",
                                                    "params": {"dim": 3}},
                                     "weights": {"backbone": "none"}}})
    cfg = load_train_config(_write(tmp_path, doc))
    with pytest.raises(ConfigError, match=r"unknown aggregator 'not_registered_agg'; registered "
                                          r"aggregators are \[.*'qaa'"):
        build_training_model(cfg)


def test_warmup_then_multistep() -> None:
    f = [lr_factor(s, warmup=4, milestones=(6, 8), gamma=0.1) for s in range(10)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4:6] == [1.0, 1.0]
    assert f[6] == pytest.approx(0.1) and f[8] == pytest.approx(0.01)
