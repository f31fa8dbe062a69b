"""Importing the official BoQ DINOv2 release layout (``dinov2_12288.pth``): the configuration is
read from the tensor shapes, every tensor lands in its parameter, the imported directory
reloads bit for bit, and a damaged or foreign file is refused with the offending key named."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from vpr_ros.errors import CheckpointError
from vpr_ros.models.model_dir import load_model_dir
from vpr_ros.models.official_boq import import_boq
from test_dinov2 import _official_dinov2_state
from test_zoo_boq import reference_boq

C, P, Q, LAYERS, ROWS, K = 384, 128, 6, 2, 4, 3      # ViT-S release-shaped, small BoQ


def _mha(prefix: str, dim: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.in_proj_weight": torch.randn(3 * dim, dim) * 0.05,
            f"{prefix}.in_proj_bias": torch.randn(3 * dim) * 0.1,
            f"{prefix}.out_proj.weight": torch.randn(dim, dim) * 0.05,
            f"{prefix}.out_proj.bias": torch.randn(dim) * 0.1}


def _norm(prefix: str, dim: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.rand(dim) + 0.5, f"{prefix}.bias": torch.randn(dim) * 0.1}


def release_aggregator_state() -> dict[str, torch.Tensor]:
    """The released boq.py's names and shapes, written out (not taken from our module)."""
    sd = {"aggregator.proj_c.weight": torch.randn(P, C, K, K) * 0.02,
          "aggregator.proj_c.bias": torch.randn(P) * 0.1,
          "aggregator.fc.weight": torch.randn(ROWS, LAYERS * Q) * 0.2,
          "aggregator.fc.bias": torch.randn(ROWS) * 0.1}
    sd |= _norm("aggregator.norm_input", P)
    for i in range(LAYERS):
        b = f"aggregator.boqs.{i}"
        sd |= _mha(f"{b}.encoder.self_attn", P)
        sd |= {f"{b}.encoder.linear1.weight": torch.randn(4 * P, P) * 0.05,
               f"{b}.encoder.linear1.bias": torch.randn(4 * P) * 0.1,
               f"{b}.encoder.linear2.weight": torch.randn(P, 4 * P) * 0.05,
               f"{b}.encoder.linear2.bias": torch.randn(P) * 0.1,
               f"{b}.queries": torch.randn(1, Q, P)}
        sd |= _norm(f"{b}.encoder.norm1", P) | _norm(f"{b}.encoder.norm2", P)
        sd |= _mha(f"{b}.self_attn", P) | _norm(f"{b}.norm_q", P)
        sd |= _mha(f"{b}.cross_attn", P) | _norm(f"{b}.norm_out", P)
    return sd


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    sd = {f"backbone.dino.{k}": v * 0.02 for k, v in _official_dinov2_state("vits14", 0).items()}
    sd |= release_aggregator_state()
    path = tmp_path_factory.mktemp("boq") / "dinov2_12288.pth"
    torch.save(sd, path)
    return path, sd


def test_import_through_the_cli_lands_every_tensor(release, tmp_path) -> None:
    from vpr_ros.cli.model_cmd import _import

    path, sd = release
    out = tmp_path / "boq"
    assert _import(argparse.Namespace(format="boq", src=str(path), output=str(out), size=56,
                                      config=None, clip=None)) == 0
    model, meta = load_model_dir(out)
    assert meta.extra["format"] == "boq" and meta.descriptor_dim == P * ROWS
    assert meta.config.backbone.params == {"arch": "vits14", "registers": 0,
                                           "trainable_blocks": 2, "final_norm": False}
    assert meta.config.aggregator.params == {"proj_channels": P, "num_queries": Q,
                                             "num_layers": LAYERS, "row_dim": ROWS,
                                             "proj_kernel": K}
    ours = model.state_dict()
    for key, value in sd.items():
        if key == "backbone.dino.mask_token":
            continue
        name = key.replace("backbone.dino.", "backbone.").replace("patch_embed.proj.",
                                                                  "patch_embed.")
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0, msg=name)
    assert len(ours) == len(sd) - 1

    model.eval()
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        feats = model.backbone(x).features
        # the release's DinoV2 runs the blocks and drops the class token, without the final norm
        tokens, (h, w) = model.backbone.prepare_tokens(x)
        for blk in model.backbone.blocks:
            tokens = blk(tokens)
        torch.testing.assert_close(feats, tokens[:, 1:].transpose(1, 2).reshape(2, C, h, w))
        torch.testing.assert_close(model(x), reference_boq(model.aggregator, feats),
                                   atol=2e-5, rtol=1e-4)


def test_missing_tensor_is_named(release, tmp_path) -> None:
    _, sd = release
    broken = dict(sd)
    del broken["aggregator.boqs.1.norm_q.bias"]
    path = tmp_path / "missing.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match=r"missing keys \['aggregator\.boqs\.1\.norm_q\.bias"):
        import_boq(path)


def test_unexpected_key_is_named(release, tmp_path) -> None:
    _, sd = release
    path = tmp_path / "extra.pth"
    torch.save(sd | {"head.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"unexpected key 'head\.weight'"):
        import_boq(path)


def test_foreign_and_inconsistent_files_are_refused(release, tmp_path) -> None:
    _, sd = release
    path = tmp_path / "w.pth"
    torch.save({"backbone.net.0.weight": torch.zeros(64, 3, 7, 7)}
               | {k: v for k, v in sd.items() if k.startswith("aggregator.")}, path)
    with pytest.raises(CheckpointError, match="ResNet-50 BoQ release"):
        import_boq(path)
    torch.save(sd | {"aggregator.fc.weight": torch.zeros(ROWS, 7)}, path)
    with pytest.raises(CheckpointError, match=r"aggregator\.fc\.weight has shape \(4, 7\)"):
        import_boq(path)
    torch.save({k: v for k, v in sd.items() if k != "aggregator.boqs.0.queries"}, path)
    with pytest.raises(CheckpointError, match=r"'aggregator\.boqs\.0\.queries' is missing"):
        import_boq(path)
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        import_boq(path)
