"""DINOv2 backbone: sizes, freezing, the official positional-embedding resize, fixed-size mode,
and official checkpoint layouts landing in the right parameters."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from vpr_ros.errors import CheckpointError, ConfigError, ModelError
from vpr_ros.models import build_model, model_config_from_dict
from vpr_ros.models.backbones.dinov2 import DinoV2Backbone, interpolate_pos_embed
from vpr_ros.models.checkpoints import dinov2_to_ours, load_dinov2_weights


@pytest.fixture(scope="module")
def vits() -> DinoV2Backbone:
    torch.manual_seed(0)
    return DinoV2Backbone(arch="vits14", trainable_blocks=2).eval()


def test_any_multiple_of_14_and_shapes(vits: DinoV2Backbone) -> None:
    with torch.no_grad():
        for h, w in [(224, 224), (322, 322), (98, 154)]:
            out = vits(torch.randn(1, 3, h, w))
            assert out.features.shape == (1, 384, h // 14, w // 14)
            assert out.cls_token.shape == (1, 384)


def test_size_not_multiple_of_14_is_a_clear_error(vits: DinoV2Backbone) -> None:
    with pytest.raises(ModelError, match="multiples of 14"):
        vits(torch.randn(1, 3, 225, 224))
    cfg = {"backbone": {"name": "dinov2", "params": {"arch": "vits14"}},
           "aggregator": {"name": "gem"}, "input": {"size": [300, 300]}}
    with pytest.raises(ModelError, match="294x294"):
        build_model(model_config_from_dict(cfg))


def test_only_last_blocks_train() -> None:
    bb = DinoV2Backbone(arch="vits14", trainable_blocks=3)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in bb.named_parameters()
                 if p.requires_grad and n.startswith("blocks.")}
    assert trainable == {"blocks.9", "blocks.10", "blocks.11"}
    assert not bb.pos_embed.requires_grad and not bb.patch_embed.weight.requires_grad
    bb.train()
    out = bb(torch.randn(2, 3, 56, 56))
    out.features.sum().backward()
    assert bb.blocks[11].attn.qkv.weight.grad is not None
    assert bb.blocks[0].attn.qkv.weight.grad is None


def official_interpolation(pos: torch.Tensor, h0: int, w0: int) -> torch.Tensor:
    """DINOv2's own recipe written out independently (square grids)."""
    n = pos.shape[1] - 1
    m = int(math.sqrt(n))
    patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((w0 + 0.1) / m, (h0 + 0.1) / m), mode="bicubic",
                          antialias=False)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], 1)


def test_pos_embed_resize_follows_official_recipe() -> None:
    pos = torch.randn(1, 1 + 37 * 37, 16)
    torch.testing.assert_close(interpolate_pos_embed(pos, (23, 23)),
                               official_interpolation(pos, 23, 23))
    assert interpolate_pos_embed(pos, (37, 37)) is pos


def upstream_register_interpolation(pos: torch.Tensor, h0: int, w0: int) -> torch.Tensor:
    """The register releases' resize written out independently: facebookresearch/dinov2 builds
    ``dinov2_*_reg`` with ``interpolate_antialias=True, interpolate_offset=0.0``, i.e. bicubic
    to the output size itself, antialiased."""
    m = int(math.sqrt(pos.shape[1] - 1))
    patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(h0, w0), mode="bicubic", antialias=True)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], 1)


@pytest.mark.parametrize("grid", [(23, 23), (16, 16), (16, 23), (54, 54)])
def test_register_models_resize_their_pos_embed_as_upstream(grid) -> None:
    """Register checkpoints get the antialiased, offset-free resize; the others keep the plain
    releases' (0.1 offset, no antialias). The two really differ at these sizes, so a backbone
    that used the wrong one for either kind fails here."""
    torch.manual_seed(0)
    plain = DinoV2Backbone(arch="vits14", registers=0)
    reg = DinoV2Backbone(arch="vits14", registers=4)
    with torch.no_grad():
        reg.pos_embed.copy_(plain.pos_embed)
        pos = plain.pos_embed.detach()
        expected_reg = upstream_register_interpolation(pos, *grid)
        expected_plain = (official_interpolation(pos, *grid) if grid[0] == grid[1] else
                          interpolate_pos_embed(pos, grid))
        torch.testing.assert_close(reg._pos_for(grid), expected_reg, rtol=0, atol=1e-6)
        torch.testing.assert_close(plain._pos_for(grid), expected_plain, rtol=0, atol=1e-6)
        assert (expected_reg - expected_plain).abs().max() > 1e-2
        # the precomputed (export) embedding is the same resize
        reg.fix_input_size((grid[0] * 14, grid[1] * 14))
        torch.testing.assert_close(reg._pos_for(grid), expected_reg, rtol=0, atol=1e-6)
        # at the pre-training grid both use the stored embedding as it is (upstream too)
        assert reg._resized_pos((37, 37)) is reg.pos_embed


def test_register_model_forward_uses_the_register_resize() -> None:
    """The tokens the blocks see: patch embedding + the upstream register resize, registers
    inserted after the class token without positional embedding."""
    torch.manual_seed(1)
    bb = DinoV2Backbone(arch="vits14", registers=4).eval()
    x = torch.randn(1, 3, 322, 322)
    with torch.no_grad():
        tokens, grid = bb.prepare_tokens(x)
        patches = bb.patch_embed(x).flatten(2).transpose(1, 2)
        pos = upstream_register_interpolation(bb.pos_embed, 23, 23)
        expected = torch.cat([bb.cls_token + pos[:, :1], bb.register_tokens,
                              patches + pos[:, 1:]], dim=1)
    assert grid == (23, 23)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-6)


def test_fixed_size_mode_equals_dynamic(vits: DinoV2Backbone) -> None:
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        dynamic = vits(x).features
        vits.fix_input_size((224, 224))
        fixed = vits(x).features
        with pytest.raises(ModelError, match="fixed to 224x224"):
            vits(torch.randn(1, 3, 322, 322))
    vits.release_fixed_size()
    torch.testing.assert_close(fixed, dynamic)


def _official_dinov2_state(arch: str, registers: int) -> dict[str, torch.Tensor]:
    """A state dict in facebookresearch/dinov2 layout, every tensor distinct (random)."""
    names = {"vits14": "vit_small_patch14", "vitb14": "vit_base_patch14"}
    ref = timm.create_model(f"{names[arch]}_{'reg4_' if registers else ''}dinov2",
                            pretrained=False, num_classes=0)
    dim = ref.embed_dim
    sd = {"cls_token": torch.randn(1, 1, dim), "pos_embed": torch.randn(1, 1 + 37 * 37, dim),
          "mask_token": torch.randn(1, dim)}
    if registers:
        sd["register_tokens"] = torch.randn(1, registers, dim)
    for k, v in ref.state_dict().items():
        if k.startswith(("blocks.", "norm.", "patch_embed.")):
            sd[k] = torch.randn_like(v)
    return sd


@pytest.mark.parametrize("registers", [0, 4])
def test_official_dinov2_checkpoint_lands_in_the_right_parameters(tmp_path, registers) -> None:
    sd = _official_dinov2_state("vits14", registers)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    bb = DinoV2Backbone(arch="vits14", registers=registers)
    load_dinov2_weights(bb, path)
    ours = bb.state_dict()
    for k, v in sd.items():
        if k == "mask_token":
            continue
        ours_key = k.replace("patch_embed.proj.", "patch_embed.")
        torch.testing.assert_close(ours[ours_key], v, msg=f"{k} -> {ours_key}")
    assert len(ours) == len(sd) - 1


def test_wrong_arch_and_missing_keys_are_named(tmp_path) -> None:
    sd = _official_dinov2_state("vits14", 0)
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="registers"):
        load_dinov2_weights(DinoV2Backbone(arch="vits14", registers=4), path)
    del sd["blocks.3.attn.qkv.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"blocks\.3\.attn\.qkv\.weight"):
        load_dinov2_weights(DinoV2Backbone(arch="vits14"), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_dinov2_weights(DinoV2Backbone(arch="vits14"), path)


def test_giant_swiglu_and_chunked_keys_map_onto_our_module() -> None:
    """ViT-g's fused SwiGLU (w12/w3) and FSDP-chunked block names map 1:1 onto our keys
    (checked on the meta device: shapes only, no 4 GB allocation)."""
    with torch.device("meta"):
        bb = DinoV2Backbone(arch="vitg14")
    ours = {k: tuple(v.shape) for k, v in bb.state_dict().items()}
    official: dict[str, tuple] = {}
    for k, shape in ours.items():
        name = k.replace("patch_embed.", "patch_embed.proj.").replace(".mlp.fc1.", ".mlp.w12.")
        name = name.replace(".mlp.fc2.", ".mlp.w3.")
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            name = name.replace(f"blocks.{i}.", f"blocks.{i // 10}.{i}.", 1)  # 4 chunks
        official[name] = shape
    official["mask_token"] = (1, 1536)
    mapped = dinov2_to_ours({k: torch.empty(s, device="meta") for k, s in official.items()})
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ours
    assert "blocks.39.mlp.fc1.weight" in mapped and ours["blocks.39.mlp.fc1.weight"][0] == 8192


def test_unknown_arch_is_a_config_error() -> None:
    cfg = {"backbone": {"name": "dinov2", "params": {"arch": "vitx14"}},
           "aggregator": {"name": "gem"}, "input": {"size": [224, 224]}}
    with pytest.raises(ConfigError, match="vitx14"):
        build_model(model_config_from_dict(cfg))
