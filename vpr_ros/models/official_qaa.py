"""Import the official QAA release (``config.json`` + ``model.safetensors``) as a model directory.

The release stores ``{"model_config_dict": {backbone_arch, backbone_config, agg_arch,
agg_config}}`` (the Hugging Face mixin's layout; a bare inner dict is accepted too). Every field
is either honoured or explicitly known to be unused by the released forward pass; an unknown
field is refused, because silently ignoring a field is how an import ends up computing a
different function than the published model.

The imported model records the release's evaluation resize, ``interpolation:
bilinear_antialias`` (see :mod:`vpr_ros.runtime.float_resize`): VPR-methods-evaluation, which
runs the released models, resizes the normalised float tensor with torchvision's antialiased
bilinear ``Resize``. (The QAA repository's own ``QAA_demo.py`` applies the same filter to the
uint8 image, i.e. rounds its result to whole grey levels; the float transform is the one the
published evaluation code uses.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vpr_ros.errors import CheckpointError, ConfigError
from vpr_ros.models.checkpoints import dinov2_to_ours, load_exact, read_state_dict
from vpr_ros.models.config import ComponentConfig, InputConfig, ModelConfig
from vpr_ros.models.vpr_model import VPRModel, build_model
from vpr_ros.plain_data import read_json

# Fields of the release's config that its forward pass never reads (training-time knobs of the
# authors' framework). They are accepted so that real release files import, and listed in the
# README. Anything else unknown is an error.
UNUSED_BACKBONE_FIELDS = {"return_token", "num_clusters", "cluster_dim", "token_dim", "dropout",
                          "freeze", "divide_ratio", "divide", "multi_scale"}
UNUSED_AGG_FIELDS = {"dropout", "freeze", "divide_ratio", "divide", "proj_early",
                     "skip_connection", "score_norm"}
_ARCH = {"dinov2_vits14": ("vits14", 0), "dinov2_vitb14": ("vitb14", 0),
         "dinov2_vitl14": ("vitl14", 0), "dinov2_vitg14": ("vitg14", 0),
         "dinov2_vits14_reg": ("vits14", 4), "dinov2_vitb14_reg": ("vitb14", 4),
         "dinov2_vitl14_reg": ("vitl14", 4), "dinov2_vitg14_reg": ("vitg14", 4)}
_WIDTH = {"vits14": 384, "vitb14": 768, "vitl14": 1024, "vitg14": 1536}


def _refuse_unknown(where: str, data: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: field(s) {unknown} are not understood by this importer, so "
                          "the imported model could differ from the release. Known fields: "
                          f"{sorted(known)}. Please report the release that has them.")


def qaa_release_config(doc: dict[str, Any], source: str, input_size: int = 322) -> ModelConfig:
    """Translate a release ``config.json`` into our :class:`ModelConfig`."""
    cfg = doc.get("model_config_dict", doc) if isinstance(doc, dict) else None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object with 'model_config_dict'")
    _refuse_unknown(source, cfg, {"backbone_arch", "backbone_config", "agg_arch", "agg_config"})
    arch_name = cfg.get("backbone_arch")
    if arch_name not in _ARCH:
        raise ConfigError(f"{source}: backbone_arch {arch_name!r} is not one of {sorted(_ARCH)}")
    arch, registers = _ARCH[arch_name]
    bcfg = dict(cfg.get("backbone_config") or {})
    _refuse_unknown(f"{source}: backbone_config", bcfg,
                    {"num_trainable_blocks", "norm_layer", "domain_prompt"}
                    | UNUSED_BACKBONE_FIELDS)
    if bcfg.get("domain_prompt", "none") != "none":
        raise ConfigError(f"{source}: domain_prompt {bcfg['domain_prompt']!r} is not supported "
                          "(the released models use 'none')")
    if str(cfg.get("agg_arch", "")).lower() != "qaa":
        raise ConfigError(f"{source}: agg_arch {cfg.get('agg_arch')!r}: only QAA releases are "
                          "imported by 'qaa-hf'")
    acfg = dict(cfg.get("agg_config") or {})
    _refuse_unknown(f"{source}: agg_config", acfg,
                    {"num_channels", "num_clusters", "cluster_dim", "token_dim", "num_queries",
                     "feature_nheads", "score_nheads", "self_attn_out_norm", "out_norm",
                     "attn_arch"} | UNUSED_AGG_FIELDS)
    if acfg.get("attn_arch", "conv") != "conv":
        raise ConfigError(f"{source}: attn_arch {acfg['attn_arch']!r}: the released forward "
                          "only implements 'conv'")
    if int(acfg.get("num_channels", _WIDTH[arch])) != _WIDTH[arch]:
        raise ConfigError(f"{source}: num_channels {acfg['num_channels']} does not match "
                          f"{arch_name} (width {_WIDTH[arch]})")
    backbone = ComponentConfig("dinov2", {
        "arch": arch, "registers": registers,
        "trainable_blocks": int(bcfg.get("num_trainable_blocks", 2)),
        "final_norm": bool(bcfg.get("norm_layer", False))})
    aggregator = ComponentConfig("qaa", {
        "num_queries": int(acfg.get("num_queries", 256)),
        "num_clusters": int(acfg.get("num_clusters", 64)),
        "cluster_dim": int(acfg.get("cluster_dim", 128)),
        "feature_heads": int(acfg.get("feature_nheads", 16)),
        "score_heads": int(acfg.get("score_nheads", 16)),
        "token_dim": int(acfg.get("token_dim", 0)),
        "query_norm": bool(acfg.get("self_attn_out_norm", True)),
        "score_norm": bool(acfg.get("out_norm", False))})
    dim = aggregator.params["num_clusters"] * aggregator.params["cluster_dim"]
    # The release's evaluation transform (VPR-methods-evaluation, which runs the released QAA
    # models: ToTensor, Normalize, Resize([322, 322], antialias=True) -> bilinear on floats).
    inp = InputConfig(size=(input_size, input_size), interpolation="bilinear_antialias")
    return ModelConfig(backbone, aggregator, inp,
                       name=f"qaa_{arch}_{dim + aggregator.params['token_dim']}")


def release_state_to_ours(sd: dict) -> dict:
    """Release key names -> VPRModel key names (the aggregator's already match)."""
    out = {f"backbone.{k}": v for k, v in dinov2_to_ours(sd, prefix="backbone.model.").items()}
    for k, v in sd.items():
        if k.startswith("aggregator."):
            if k == "aggregator.dust_bin":
                continue  # unused by the released forward (see module docstring)
            out[k] = v
        elif not k.startswith("backbone.model."):
            raise CheckpointError(f"unexpected key {k!r} in the QAA release (expected only "
                                  "'backbone.model.*' and 'aggregator.*')")
    return out


def import_qaa_release(src: str | Path, input_size: int = 322) -> VPRModel:
    """Build our model from a release folder (config.json + model.safetensors)."""
    d = Path(src)
    cfg_path, weights = d / "config.json", d / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise CheckpointError(f"{d}: {p.name} is missing; a QAA release folder holds "
                                  "config.json and model.safetensors")
    doc = read_json(cfg_path, ConfigError, "use the release's own config.json")
    config = qaa_release_config(doc, str(cfg_path), input_size)
    model = build_model(config)
    load_exact(model, release_state_to_ours(read_state_dict(weights)), str(weights))
    return model
