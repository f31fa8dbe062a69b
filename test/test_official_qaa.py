"""Importing the official QAA release: every tensor lands in the right parameter, every config
field is honoured or refused, and the imported model computes the released forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vpr_ros.errors import CheckpointError, ConfigError
from vpr_ros.models.model_dir import load_model_dir, save_model_dir
from vpr_ros.models.official_qaa import import_qaa_release
from test_dinov2 import _official_dinov2_state

RELEASE_CONFIG = {"model_config_dict": {
    "backbone_arch": "dinov2_vits14",
    "backbone_config": {"num_trainable_blocks": 2, "return_token": True, "norm_layer": True,
                        "domain_prompt": "none", "dropout": 0.3, "freeze": "none"},
    "agg_arch": "QAA",
    "agg_config": {"num_channels": 384, "num_clusters": 8, "cluster_dim": 16, "token_dim": 0,
                   "num_queries": 12, "feature_nheads": 4, "score_nheads": 4, "attn_arch": "conv",
                   "skip_connection": "cross", "proj_early": False, "dropout": 0.3,
                   "divide_ratio": [1, 1, 1, 0], "divide": 1, "freeze": "none"}}}


def _release_aggregator_state(c: int, q: int, k: int, d: int) -> dict[str, torch.Tensor]:
    """Aggregator tensors with the released qaa.py names and shapes (random, distinct)."""
    def mha(prefix: str, dim: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.in_proj_weight": torch.randn(3 * dim, dim) * 0.1,
                f"{prefix}.in_proj_bias": torch.randn(3 * dim) * 0.1,
                f"{prefix}.out_proj.weight": torch.randn(dim, dim) * 0.1,
                f"{prefix}.out_proj.bias": torch.randn(dim) * 0.1}
    sd = {"aggregator.queries_feature.queries": torch.randn(1, q, d),
          "aggregator.queries_feature.norm_q.weight": torch.rand(d) + 0.5,
          "aggregator.queries_feature.norm_q.bias": torch.randn(d),
          "aggregator.queries_score.queries": torch.randn(1, q, c),
          "aggregator.queries_score.norm_q.weight": torch.rand(c) + 0.5,
          "aggregator.queries_score.norm_q.bias": torch.randn(c),
          "aggregator.score.norm_out.weight": torch.rand(c) + 0.5,
          "aggregator.score.norm_out.bias": torch.randn(c),
          "aggregator.score.conv.weight": torch.randn(k, c, 1) * 0.1,
          "aggregator.score.conv.bias": torch.randn(k),
          "aggregator.score.norm2_out.weight": torch.rand(k) + 0.5,
          "aggregator.score.norm2_out.bias": torch.randn(k),
          "aggregator.dust_bin": torch.tensor(1.0)}
    sd |= mha("aggregator.queries_feature.self_attn", d)
    sd |= mha("aggregator.queries_score.self_attn", c)
    sd |= mha("aggregator.score.cross_attn", c)
    return sd


@pytest.fixture()
def release_dir(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    sd = {f"backbone.model.{k}": v * 0.02 for k, v in _official_dinov2_state("vits14", 0).items()}
    sd |= _release_aggregator_state(384, 12, 8, 16)
    d = tmp_path / "QAA-128"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(RELEASE_CONFIG))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return d, sd


def released_forward(sd: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The released aggregator's arithmetic, restated from its published description with
    plain torch.nn.MultiheadAttention modules loaded from the release tensors."""
    def mha(prefix: str, dim: int, heads: int) -> torch.nn.MultiheadAttention:
        m = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        m.load_state_dict({k[len(prefix) + 1:]: v for k, v in sd.items()
                           if k.startswith(prefix + ".")})
        return m.eval()

    def bank(prefix: str, dim: int) -> torch.Tensor:
        q = sd[f"{prefix}.queries"]
        q = q + mha(f"{prefix}.self_attn", dim, 4)(q, q, q)[0]
        return F.layer_norm(q, (dim,), sd[f"{prefix}.norm_q.weight"], sd[f"{prefix}.norm_q.bias"])

    b = tokens.shape[0]
    f = bank("aggregator.queries_feature", 16).permute(0, 2, 1).repeat(b, 1, 1)  # (B, d, Q)
    q = bank("aggregator.queries_score", 384).repeat(b, 1, 1)
    out = mha("aggregator.score.cross_attn", 384, 4)(q, tokens, tokens)[0]
    out = F.layer_norm(out, (384,), sd["aggregator.score.norm_out.weight"],
                       sd["aggregator.score.norm_out.bias"])
    out = F.conv1d(out.permute(0, 2, 1), sd["aggregator.score.conv.weight"],
                   sd["aggregator.score.conv.bias"])            # (B, K, Q)
    p = out.unsqueeze(1).repeat(1, 16, 1, 1)                     # (B, d, K, Q)
    ff = f.unsqueeze(2).repeat(1, 1, 8, 1)                       # (B, d, K, Q)
    v = F.normalize((ff * p).sum(-1), p=2, dim=1).flatten(1)
    return F.normalize(v, p=2, dim=-1)


def test_every_tensor_lands_and_forward_matches_release(release_dir, tmp_path) -> None:
    d, sd = release_dir
    model = import_qaa_release(d, input_size=224).eval()
    ours = model.state_dict()
    for k, v in sd.items():
        if k in ("backbone.model.mask_token", "aggregator.dust_bin"):
            continue
        name = k.replace("backbone.model.", "backbone.").replace("patch_embed.proj.",
                                                                 "patch_embed.")
        torch.testing.assert_close(ours[name], v, msg=name)
    assert len(ours) == len(sd) - 2
    assert model.backbone.final_norm is True and model.descriptor_dim == 128
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
        tokens = model.backbone(x).features.flatten(2).transpose(1, 2)
        torch.testing.assert_close(out, released_forward(sd, tokens), atol=1e-5, rtol=1e-4)
    # and survives our model-directory round trip bit for bit
    fp = save_model_dir(model, tmp_path / "imported")
    # probe=False: these synthetic weights (a backbone scaled by 0.02) give every image nearly
    # one descriptor (cosine 0.99999), which the degeneracy probe rightly refuses.
    again, meta = load_model_dir(tmp_path / "imported", probe=False)
    assert meta.fingerprint == fp
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), out)


def test_unknown_release_field_is_refused(release_dir) -> None:
    d, _ = release_dir
    cfg = json.loads(json.dumps(RELEASE_CONFIG))
    cfg["model_config_dict"]["agg_config"]["temperature"] = 0.07
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="temperature"):
        import_qaa_release(d)


def test_variant_shape_mismatch_names_the_tensor(release_dir) -> None:
    d, _ = release_dir
    cfg = json.loads(json.dumps(RELEASE_CONFIG))
    cfg["model_config_dict"]["agg_config"]["num_clusters"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"aggregator\.score\.conv\.weight"):
        import_qaa_release(d)


def test_missing_and_truncated_files(release_dir) -> None:
    d, _ = release_dir
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        import_qaa_release(d)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        import_qaa_release(d)
