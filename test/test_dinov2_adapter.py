"""SelaVPR's adapter-tuned DINOv2 (CQVPR's backbone): the block formula of the release, zero-
initialised adapters leaving DINOv2 unchanged, official weights landing in the frozen part,
only the adapters training, and the 354.77 M parameters CQVPR's Table VII states for ViT-L."""

from __future__ import annotations

import pytest
import torch

from vpr_ros.errors import CheckpointError
from vpr_ros.models.backbones.dinov2 import DinoV2Backbone
from vpr_ros.models.backbones.dinov2_adapter import DinoV2AdapterBackbone
from test_dinov2 import _official_dinov2_state


def _randomise_adapters(bb: DinoV2AdapterBackbone) -> None:
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if ".adapter" in name:
                p.copy_(torch.randn_like(p) * 0.05)


def test_zero_initialised_adapters_leave_dinov2_unchanged() -> None:
    torch.manual_seed(0)
    plain = DinoV2Backbone(arch="vits14", trainable_blocks=0).eval()
    adapted = DinoV2AdapterBackbone(arch="vits14").eval()
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".adapter" in k for k in missing)
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x).features, plain(x).features)


def test_block_is_selavprs_serial_and_parallel_adapters() -> None:
    """x + ls1(serial(attn(norm1 x))), then + ls2(mlp(norm2 x) + 0.2 parallel(norm2 x)), with
    serial(y) = y + fc2(relu(fc1 y)) and parallel(y) = fc2(relu(fc1 y)): written out."""
    torch.manual_seed(1)
    bb = DinoV2AdapterBackbone(arch="vits14").eval()
    _randomise_adapters(bb)
    blk = bb.blocks[3]
    with torch.no_grad():  # released layer scales are O(1); timm initialises them at 1e-5
        blk.ls1.gamma.fill_(1.0)
        blk.ls2.gamma.fill_(1.0)
    x = torch.randn(2, 9, 384)

    def mlp(a, y):
        return a.D_fc2(torch.relu(a.D_fc1(y)))

    with torch.no_grad():
        y = blk.attn(blk.norm1(x))
        x1 = x + blk.ls1(y + mlp(blk.adapter1, y))
        h = blk.norm2(x1)
        want = x1 + blk.ls2(blk.mlp(h) + 0.2 * mlp(blk.adapter2, h))
        torch.testing.assert_close(blk(x), want)
        assert (blk(x) - (x1 + blk.ls2(blk.mlp(h)))).abs().max() > 1e-4  # adapters act


def test_official_weights_land_and_only_adapters_train(tmp_path) -> None:
    sd = _official_dinov2_state("vits14", 0)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    bb = DinoV2AdapterBackbone(arch="vits14")
    bb.load_pretrained(str(path))
    own = bb.state_dict()
    for k, v in sd.items():
        if k != "mask_token":
            torch.testing.assert_close(own[k.replace("patch_embed.proj.", "patch_embed.")], v,
                                       rtol=0, atol=0)
    assert torch.count_nonzero(own["blocks.0.adapter1.D_fc2.weight"]) == 0  # start: identity
    bb.train()
    bb(torch.randn(2, 3, 56, 56)).features.pow(2).sum().backward()
    for name, p in bb.named_parameters():
        assert p.requires_grad == (".adapter" in name), name
    assert bb.blocks[0].adapter1.D_fc2.weight.grad.abs().sum() > 0      # reaches block 0
    assert bb.blocks[0].attn.qkv.weight.grad is None
    del sd["blocks.2.mlp.fc1.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"blocks\.2\.mlp\.fc1\.weight"):
        DinoV2AdapterBackbone(arch="vits14").load_pretrained(str(path))


def test_vitl14_has_table_vii_parameter_count() -> None:
    with torch.device("meta"):
        bb = DinoV2AdapterBackbone(arch="vitl14")
    adapters = sum(p.numel() for n, p in bb.named_parameters() if ".adapter" in n)
    assert adapters == 24 * 2 * (1024 * 512 + 512 + 512 * 1024 + 1024)
    assert round(sum(p.numel() for p in bb.parameters()) / 1e6, 2) == 354.77
