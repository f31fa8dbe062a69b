"""The model directory: ``model.json`` (config + metadata) and ``model.safetensors``.

A model is a directory so that every artifact made from it (ONNX file, TensorRT engine, map)
can record its **fingerprint**, the SHA-256 of both files, and refuse to mix with another model.
Writes are atomic (temp files + rename) so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from vpr_ros import __version__
from vpr_ros.errors import CheckpointError, ConfigError
from vpr_ros.models.config import (LEGACY_DEFAULTS, ComponentConfig, ModelConfig, check_types,
                                   load_yaml, model_config_from_dict)
from vpr_ros.models.vpr_model import VPRModel, build_model
from vpr_ros.paths import check_output_dir
from vpr_ros.plain_data import read_json

FORMAT = "vpr_ros.model"
FORMAT_VERSION = 1
CONFIG_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ModelMeta:
    """What a model directory says about itself, without building the model."""

    path: Path
    config: ModelConfig
    descriptor_dim: int
    fingerprint: str
    extra: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def compute_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over the hashes of model.json and model.safetensors (24 hex chars)."""
    d = Path(model_dir)
    joint = _sha256(d / CONFIG_FILE) + _sha256(d / WEIGHTS_FILE)
    return hashlib.sha256(joint.encode()).hexdigest()[:24]


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _with_params(comp: ComponentConfig, extra: Mapping[str, Any]) -> ComponentConfig:
    missing = {k: v for k, v in extra.items() if k not in comp.params}
    return ComponentConfig(comp.name, {**comp.params, **missing}) if missing else comp


def recorded_config(model: VPRModel) -> ModelConfig:
    """``model.config`` with every parameter listed in :data:`LEGACY_DEFAULTS` for its
    components written out at the value the built module has. Why: such a parameter changed
    meaning (a layout corrected to follow its paper), and its *absence* from a model.json means
    the layout that model was made with; so every new model.json states it."""
    cfg = model.config
    parts = {}
    for kind, module in (("backbone", model.backbone), ("aggregator", model.aggregator)):
        comp = getattr(cfg, kind)
        keys = LEGACY_DEFAULTS.get((kind, comp.name), {})
        parts[kind] = _with_params(comp, {k: getattr(module, k) for k in keys})
    return ModelConfig(parts["backbone"], parts["aggregator"], cfg.input, cfg.name)


def with_legacy_defaults(config: ModelConfig) -> ModelConfig:
    """A model.json's config with :data:`LEGACY_DEFAULTS` filled in where it does not state
    them: the model is built as it was when that file was written (the file itself, and so the
    fingerprint, stay as they are)."""
    parts = {kind: _with_params(getattr(config, kind),
                                LEGACY_DEFAULTS.get((kind, getattr(config, kind).name), {}))
             for kind in ("backbone", "aggregator")}
    return ModelConfig(parts["backbone"], parts["aggregator"], config.input, config.name)


def save_model_dir(model: VPRModel, out: str | Path, extra: Mapping[str, Any] | None = None
                   ) -> str:
    """Write ``model`` to ``out`` and return its fingerprint."""
    from safetensors.torch import save_file

    d = Path(out)
    check_output_dir(d, "a model directory")
    d.mkdir(parents=True, exist_ok=True)
    model.config = recorded_config(model)
    doc = {"format": FORMAT, "version": FORMAT_VERSION, **model.config.to_dict(),
           "descriptor_dim": model.descriptor_dim, "vpr_ros_version": __version__,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "extra": dict(extra or {})}
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write(d / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
    _atomic_write(d / CONFIG_FILE,
                  lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    return compute_fingerprint(d)


def read_model_meta(model_dir: str | Path) -> ModelMeta:
    """Parse and validate ``model.json`` (no torch work)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ConfigError(f"{d}: not a model directory (expected a folder with {CONFIG_FILE} "
                          f"and {WEIGHTS_FILE}; make one with `vpr model init`)")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise ConfigError(f"{d}: {name} is missing; this is not a complete model directory")
    doc = read_json(d / CONFIG_FILE, ConfigError,
                    "restore the file or re-create the model directory")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{d / CONFIG_FILE}: not a vpr_ros model description "
                          f"(format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{d / CONFIG_FILE}: model format version {doc.get('version')!r}; this "
                          f"vpr_ros reads version {FORMAT_VERSION}")
    check_types(str(d / CONFIG_FILE), doc, {"extra": (dict,), "vpr_ros_version": (str,),
                                            "created": (str,)})
    extra = doc.pop("extra", {}) or {}
    for k in ("vpr_ros_version", "created"):
        doc.pop(k, None)
    config = with_legacy_defaults(model_config_from_dict(doc, source=str(d / CONFIG_FILE)))
    dim = doc.get("descriptor_dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise ConfigError(f"{d / CONFIG_FILE}: descriptor_dim missing or invalid ({dim!r})")
    return ModelMeta(path=d, config=config, descriptor_dim=dim,
                     fingerprint=compute_fingerprint(d), extra=dict(extra))


def load_model_dir(model_dir: str | Path, map_location: str = "cpu", probe: bool = True
                   ) -> tuple[VPRModel, ModelMeta]:
    """Build the model of a directory and load its weights (strict, with named errors), then
    run the degeneracy probe (:mod:`vpr_ros.models.degeneracy`; ``probe=False`` for callers
    that probe the encoder they wrap the model in)."""
    from vpr_ros.models.checkpoints import load_exact, read_state_dict

    meta = read_model_meta(model_dir)
    model = build_model(meta.config)
    state = read_state_dict(meta.path / WEIGHTS_FILE)
    load_exact(model, state, str(meta.path / WEIGHTS_FILE))
    if model.descriptor_dim != meta.descriptor_dim:
        raise CheckpointError(f"{meta.path}: model.json says descriptor_dim "
                              f"{meta.descriptor_dim} but the model produces "
                              f"{model.descriptor_dim}")
    if probe:
        from vpr_ros.models.degeneracy import probe_model

        probe_model(model, str(meta.path))
    return model.to(map_location), meta


def init_model(config: ModelConfig, weights: Mapping[str, Any] | None = None) -> VPRModel:
    """A new model from a config, with backbone weights from a file or a package if named."""
    model = build_model(config)
    source = (weights or {}).get("backbone")
    if source not in (None, "none", "random"):
        model.backbone.load_pretrained(str(source))
    return model


def create_model_dir(config_path: str | Path, out: str | Path,
                     backbone_weights: str | None = None, seed: int = 0) -> ModelMeta:
    """``vpr model init``: config YAML -> model directory (seeded random aggregator)."""
    data = load_yaml(config_path)
    check_output_dir(Path(out), "a model directory")
    if not isinstance(data.get("weights") or {}, dict):
        raise ConfigError(f"{config_path}: 'weights' must be a mapping such as "
                          "{backbone: package}")
    weights = dict(data.get("weights") or {})
    if backbone_weights is not None:
        weights["backbone"] = backbone_weights
    bad = sorted(set(weights) - {"backbone"})
    if bad:
        raise ConfigError(f"{config_path}: weights: unknown key(s) {bad}; only 'backbone'")
    if isinstance(weights.get("backbone"), str) and weights["backbone"] not in (
            "package", "none", "random"):
        p = Path(weights["backbone"]).expanduser()
        if not p.is_absolute():
            p = Path(config_path).parent / p if (Path(config_path).parent / p).exists() else p
        weights["backbone"] = str(p)
    config = model_config_from_dict(data, source=str(config_path))
    torch.manual_seed(seed)
    model = init_model(config, weights)
    save_model_dir(model, out, extra={"init_config": str(config_path),
                                      "backbone_weights": str(weights.get("backbone", "none"))})
    return read_model_meta(out)
