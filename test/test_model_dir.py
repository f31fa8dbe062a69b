"""Model directories and configs: round trips, fingerprints and every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vpr_ros.errors import CheckpointError, ConfigError
from vpr_ros.models import build_model, model_config_from_dict
from vpr_ros.models.config import load_yaml
from vpr_ros.models.model_dir import (compute_fingerprint, create_model_dir, load_model_dir,
                                      read_model_meta, save_model_dir)

SMALL = {"name": "tiny", "backbone": {"name": "dinov2", "params": {"arch": "vits14",
                                                                   "trainable_blocks": 1}},
         "aggregator": {"name": "qaa", "params": {"num_queries": 8, "num_clusters": 4,
                                                  "cluster_dim": 16, "feature_heads": 2,
                                                  "score_heads": 4}},
         "input": {"size": [56, 56]}}


@pytest.fixture()
def tiny_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(model_config_from_dict(SMALL))
    save_model_dir(model, tmp_path / "tiny")
    return tmp_path / "tiny"


def test_round_trip_and_fingerprint(tiny_dir: Path) -> None:
    model, meta = load_model_dir(tiny_dir)
    assert meta.descriptor_dim == 64 and meta.config.name == "tiny"
    fp = compute_fingerprint(tiny_dir)
    assert meta.fingerprint == fp and len(fp) == 24
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        a = model.eval()(x)
    with torch.no_grad():
        model.aggregator.queries_feature.queries.add_(1.0)
    save_model_dir(model, tiny_dir)
    assert compute_fingerprint(tiny_dir) != fp            # weights changed -> new fingerprint
    again, _ = load_model_dir(tiny_dir)
    with torch.no_grad():
        b = again.eval()(x)
    assert not torch.allclose(a, b)


def test_all_model_configs_in_the_repo_build() -> None:
    root = Path(__file__).resolve().parents[1] / "config" / "models"
    dims = {}
    for path in sorted(root.glob("*.yaml")):
        cfg = model_config_from_dict(load_yaml(path), source=str(path))
        with torch.device("meta"):
            dims[path.stem] = build_model(cfg).descriptor_dim
    assert dims["qaa_dinov2b_8192"] == 8192 and dims["qaa_dinov2b_1024"] == 1024
    assert dims["gem_effnetlite0"] == 1280


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c["backbone"].update(name="resnet9000"), "unknown backbone 'resnet9000'"),
    (lambda c: c["aggregator"].update(name="netvlad++"), "unknown aggregator 'netvlad\\+\\+'"),
    (lambda c: c["aggregator"]["params"].update(clusters=3), "unknown parameter.*clusters"),
    (lambda c: c.update(input={"size": [57, 56]}), "multiples of 14"),
    (lambda c: c.update(input={"size": [56, 56], "resize": "squash"}), "input.resize"),
    (lambda c: c.update(optimiser="adam"), "unknown key.*optimiser"),
    (lambda c: c.pop("aggregator"), "'aggregator' section is missing"),
])
def test_bad_configs_name_the_problem(mutate, message) -> None:
    cfg = json.loads(json.dumps(SMALL))
    mutate(cfg)
    with pytest.raises((ConfigError, Exception), match=message) as info:
        build_model(model_config_from_dict(cfg))
    assert "vpr_ros.errors" in type(info.value).__module__


def test_corrupt_model_json(tiny_dir: Path) -> None:
    (tiny_dir / "model.json").write_text('{"format": "vpr_ros.model", "version": 1, "backb')
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_model_meta(tiny_dir)
    (tiny_dir / "model.json").write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(ConfigError, match="not a vpr_ros model"):
        read_model_meta(tiny_dir)


def test_truncated_and_wrong_shaped_weights(tiny_dir: Path, tmp_path: Path) -> None:
    doc = json.loads((tiny_dir / "model.json").read_text())
    doc["aggregator"]["params"]["num_clusters"] = 8
    doc["descriptor_dim"] = 128
    (tiny_dir / "model.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"score\.conv\.weight.*\(4, 384, 1\)"):
        load_model_dir(tiny_dir)
    w = tiny_dir / "model.safetensors"
    w.write_bytes(w.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model_dir(tiny_dir)
    with pytest.raises(ConfigError, match="not a model directory"):
        load_model_dir(tmp_path / "nowhere")


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("backbone: {name: dinov2\n  params: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        create_model_dir(p, tmp_path / "out")
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        create_model_dir(p, tmp_path / "out")


def test_package_weights_only_for_efficientnet(tmp_path: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_text(json.dumps({**SMALL, "weights": {"backbone": "package"}}))
    with pytest.raises(ConfigError, match="no pip package ships DINOv2 weights"):
        create_model_dir(p, tmp_path / "out")
