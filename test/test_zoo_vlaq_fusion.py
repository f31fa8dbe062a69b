"""DC-VLAQ's DINOv2 + CLIP residual fusion backbone, end to end on a ViT-S-sized model with a
patch-16 CLIP (the path of the DINOv2-B + OpenAI ViT-B/16 config: CLIP's input resized to
DINOv2's grid): ``vpr model import dcvlaq`` with official-layout DINOv2 and OpenAI-layout CLIP
files of distinct random tensors, every tensor landing where the published layouts say, CLIP's
forward against timm's own CLIP, the whole imported model against an independent
reimplementation of the paper (DINOv2 from timm's blocks with the official token recipe, CLIP
from timm's converter, Eq. 4 fusion, Eq. 5-7 VLAQ), what trains and what stays frozen, and ONNX
export with onnxruntime parity."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vpr_ros.errors import CheckpointError, ConfigError
from vpr_ros.models.backbones.dinov2_clip_fusion import clip_to_ours, load_clip_weights
from vpr_ros.models.config import IMAGENET_MEAN, IMAGENET_STD
from vpr_ros.models.model_dir import load_model_dir
from test_dinov2 import _official_dinov2_state

WIDTH, LAYERS, PATCH, GRID = 384, 12, 16, 14       # the 'vits16' CLIP arch, 224 px pre-training

TINY = """\
name: tiny_dcvlaq
backbone:
  name: dinov2_clip_fusion
  params: {arch: vits14, clip_arch: vits16, clip_act: quick_gelu, zero_init_fusion: true}
aggregator: {name: vlaq, params: {num_blocks: 2, num_queries: 4, dim: 8}}
input: {size: [56, 70]}
"""


def openai_clip_state(width: int = WIDTH, layers: int = LAYERS, patch: int = PATCH,
                      grid: int = GRID) -> dict[str, torch.Tensor]:
    """A whole CLIP model in OpenAI/open_clip layout (random, distinct tensors): the visual
    tower under ``visual.``, plus text-tower keys the backbone must ignore."""
    def r(*shape: int, s: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape) * s

    v = "visual."
    sd = {v + "conv1.weight": r(width, 3, patch, patch), v + "class_embedding": r(width, s=0.1),
          v + "positional_embedding": r(1 + grid * grid, width, s=0.1),
          v + "ln_pre.weight": 1 + r(width, s=0.1), v + "ln_pre.bias": r(width),
          v + "ln_post.weight": 1 + r(width, s=0.1), v + "ln_post.bias": r(width),
          v + "proj": r(width, 512)}
    for i in range(layers):
        b = f"{v}transformer.resblocks.{i}."
        sd |= {b + "ln_1.weight": 1 + r(width, s=0.1), b + "ln_1.bias": r(width),
               b + "attn.in_proj_weight": r(3 * width, width), b + "attn.in_proj_bias": r(3 * width),
               b + "attn.out_proj.weight": r(width, width), b + "attn.out_proj.bias": r(width),
               b + "ln_2.weight": 1 + r(width, s=0.1), b + "ln_2.bias": r(width),
               b + "mlp.c_fc.weight": r(4 * width, width), b + "mlp.c_fc.bias": r(4 * width),
               b + "mlp.c_proj.weight": r(width, 4 * width), b + "mlp.c_proj.bias": r(width)}
    sd |= {"positional_embedding": r(77, 512), "token_embedding.weight": r(49, 512),
           "transformer.resblocks.0.ln_1.weight": r(512), "ln_final.weight": r(512),
           "text_projection": r(512, 512), "logit_scale": torch.tensor(4.6)}
    return sd


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory):
    """`vpr model import dcvlaq` of the tiny config, then loaded back from its directory."""
    from vpr_ros.cli.model_cmd import _import

    torch.manual_seed(5)
    d = tmp_path_factory.mktemp("dcvlaq")
    dino_sd = {k: v * 0.02 for k, v in _official_dinov2_state("vits14", 0).items()}
    clip_sd = openai_clip_state()
    torch.save(dino_sd, d / "dinov2_vits14_pretrain.pth")
    torch.save(clip_sd, d / "clip.pt")
    (d / "tiny.yaml").write_text(TINY)
    assert _import(argparse.Namespace(format="dcvlaq", src=str(d / "dinov2_vits14_pretrain.pth"),
                                      clip=str(d / "clip.pt"), config=str(d / "tiny.yaml"),
                                      output=str(d / "model"), size=322)) == 0
    model, meta = load_model_dir(d / "model")
    return model, meta, dino_sd, clip_sd, d


def test_both_halves_land_and_survive_the_model_directory(imported) -> None:
    model, meta, dino_sd, clip_sd, _ = imported
    assert meta.extra["clip_weights"].endswith("clip.pt") and meta.descriptor_dim == 2 * 4 * 8
    dino, clip = model.backbone.dino.state_dict(), model.backbone.clip.state_dict()
    for k, v in dino_sd.items():
        if k != "mask_token":
            torch.testing.assert_close(dino[k.replace("patch_embed.proj.", "patch_embed.")], v,
                                       rtol=0, atol=0, msg=k)
    v = "visual."
    pairs = {"patch_embed.proj.weight": v + "conv1.weight", "norm_pre.bias": v + "ln_pre.bias",
             "norm.weight": v + "ln_post.weight", "blocks.7.attn.qkv.weight":
             v + "transformer.resblocks.7.attn.in_proj_weight", "blocks.3.attn.proj.bias":
             v + "transformer.resblocks.3.attn.out_proj.bias", "blocks.11.mlp.fc2.weight":
             v + "transformer.resblocks.11.mlp.c_proj.weight", "blocks.0.norm2.weight":
             v + "transformer.resblocks.0.ln_2.weight"}
    for ours, theirs in pairs.items():
        torch.testing.assert_close(clip[ours], clip_sd[theirs], rtol=0, atol=0, msg=ours)
    torch.testing.assert_close(clip["cls_token"].flatten(), clip_sd[v + "class_embedding"])
    torch.testing.assert_close(clip["pos_embed"][0], clip_sd[v + "positional_embedding"])
    n_visual = sum(1 for k in clip_sd if k.startswith(v)) - 1          # minus the unused proj
    assert len(clip) == n_visual
    torch.testing.assert_close(model.backbone.fusion.weight, torch.zeros(WIDTH, WIDTH))


def _openai_name(ours: str) -> str:
    """Where a ClipVisionTower tensor sits in an OpenAI/open_clip file, written from the
    published layout (``visual.conv1``, ``ln_pre``, ``transformer.resblocks.N.{ln_1, attn.in_proj_*,
    attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post``)."""
    fixed = {"patch_embed.proj.weight": "conv1.weight", "cls_token": "class_embedding",
             "pos_embed": "positional_embedding", "norm_pre.weight": "ln_pre.weight",
             "norm_pre.bias": "ln_pre.bias", "norm.weight": "ln_post.weight",
             "norm.bias": "ln_post.bias"}
    if ours in fixed:
        return "visual." + fixed[ours]
    _, i, rest = ours.split(".", 2)
    block = {"norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias",
             "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
             "attn.proj.weight": "attn.out_proj.weight", "attn.proj.bias": "attn.out_proj.bias",
             "norm2.weight": "ln_2.weight", "norm2.bias": "ln_2.bias",
             "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
             "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias"}[rest]
    return f"visual.transformer.resblocks.{i}.{block}"


def test_every_clip_tensor_lands_where_the_published_layout_says(imported) -> None:
    model, _, _, clip_sd, _ = imported
    clip = model.backbone.clip.state_dict()
    used = set()
    for ours, value in clip.items():
        theirs = _openai_name(ours)
        used.add(theirs)
        want = clip_sd[theirs].reshape(value.shape)        # class/pos embedding gain a batch axis
        torch.testing.assert_close(value, want, rtol=0, atol=0, msg=f"{ours} <- {theirs}")
    visual = {k for k in clip_sd if k.startswith("visual.")}
    assert visual - used == {"visual.proj"}                 # the joint-embedding head only
    # distinct random tensors: a swapped pair of same-shaped tensors would have failed above
    assert not torch.equal(clip_sd["visual.ln_pre.bias"], clip_sd["visual.ln_post.bias"])


def _official_dinov2_tokens(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """DINOv2 patch tokens from timm's DINOv2 blocks loaded with the official file, with the
    official token recipe written out (interpolate_pos_encoding: bicubic, scale factor
    (n + 0.1) / 37, no antialias; final norm)."""
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                            img_size=518).eval()
    missing, unexpected = ref.load_state_dict({k: v for k, v in sd.items()
                                               if k != "mask_token"}, strict=False)
    assert not missing and not unexpected
    h0, w0 = x.shape[-2] // 14, x.shape[-1] // 14
    pos = sd["pos_embed"]
    patch = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((h0 + 0.1) / 37, (w0 + 0.1) / 37),
                          mode="bicubic", antialias=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    tokens = tokens.flatten(2).transpose(1, 2) + patch
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1) + pos[:, :1], tokens], dim=1)
    for blk in ref.blocks:
        t = blk(t)
    return ref.norm(t)[:, 1:]


def _paper_vlaq(z: torch.Tensor, blocks) -> torch.Tensor:
    """Eq. 5-7 and the concatenation + L2 of Sec. 3.3, token by token."""
    out = []
    for blk in blocks:
        zz = blk.proj(z)
        d = zz.shape[-1]
        for q in blk.queries:
            a = torch.softmax(torch.stack([q @ zz[j] / d ** 0.5 for j in range(len(zz))]), 0)
            out.append(sum(a[j] * (zz[j] - q) for j in range(len(zz))))
    g = torch.cat(out)
    return g / g.norm()


@pytest.mark.parametrize("vlaq_dim", [None, 8])
def test_imported_model_is_the_papers_fusion_and_vlaq(imported, tmp_path: Path,
                                                      vlaq_dim) -> None:
    """The imported model (weights from the two official files, a live fusion layer) against
    DINOv2 and CLIP computed independently and the paper's Eq. 4 and Eq. 5-7 written out;
    ``dim: null`` is the paper's VLAQ, ``dim: 8`` the projected variant."""
    from timm.models.vision_transformer import _convert_openai_clip
    from vpr_ros.cli.model_cmd import _import

    _, _, dino_sd, clip_sd, d = imported
    (tmp_path / "cfg.yaml").write_text(TINY.replace("dim: 8", f"dim: {vlaq_dim or 'null'}"))
    assert _import(argparse.Namespace(format="dcvlaq", src=str(d / "dinov2_vits14_pretrain.pth"),
                                      clip=str(d / "clip.pt"), config=str(tmp_path / "cfg.yaml"),
                                      output=str(tmp_path / "m"), size=322)) == 0
    model, meta = load_model_dir(tmp_path / "m")
    assert meta.descriptor_dim == 2 * 4 * (vlaq_dim or WIDTH)
    torch.manual_seed(9)
    with torch.no_grad():
        model.backbone.fusion.weight.copy_(torch.randn(WIDTH, WIDTH) * 0.05)
        model.backbone.fusion.bias.copy_(torch.randn(WIDTH) * 0.05)
    model.eval()
    x = torch.randn(2, 3, 56, 70)
    clip_ref = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0,
                                 patch_size=PATCH, embed_dim=WIDTH, num_heads=6, img_size=224,
                                 act_layer="quick_gelu", dynamic_img_size=True).eval()
    clip_ref.load_state_dict(_convert_openai_clip(clip_sd, clip_ref), strict=False)
    with torch.no_grad():
        got = model(x)
        raw = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) \
            + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        xc = (raw - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) \
            / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        xc = F.interpolate(xc, size=(4 * 16, 5 * 16), mode="bilinear", align_corners=False)
        x_d = F.normalize(_official_dinov2_tokens(dino_sd, x), dim=-1)
        x_c = F.normalize(clip_ref.forward_features(xc)[:, 1:], dim=-1)
        fc = model.backbone.fusion
        z = x_d + (x_c - x_d) @ fc.weight.T + fc.bias                     # Eq. 4
        want = torch.stack([_paper_vlaq(z[b], model.aggregator.blocks) for b in range(2)])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_clip_tower_computes_timms_clip_forward(imported) -> None:
    """Our tower with the OpenAI file equals timm's CLIP ViT loaded through timm's own
    OpenAI converter (positional embedding resampled from 14x14 to 4x5 by both)."""
    from timm.models.vision_transformer import _convert_openai_clip

    model, _, _, clip_sd, _ = imported
    ref = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0,
                            patch_size=PATCH, embed_dim=WIDTH, num_heads=6, img_size=224,
                            act_layer="quick_gelu", dynamic_img_size=True).eval()
    converted = _convert_openai_clip(clip_sd, ref)
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    assert not missing and set(unexpected) == {"head.weight", "head.bias"}
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.clip(x), ref.forward_features(x)[:, 1:],
                                   atol=1e-5, rtol=1e-4)


def test_fusion_formula_and_clip_normalisation(imported) -> None:
    model, *_ = imported
    bb = model.backbone.eval()
    with torch.no_grad():
        bb.fusion.weight.copy_(torch.randn(WIDTH, WIDTH) * 0.05)
        bb.fusion.bias.copy_(torch.randn(WIDTH) * 0.05)
    try:
        x = torch.randn(2, 3, 56, 70)
        raw = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) \
            + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        x_clip = (raw - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) \
            / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        x_clip = F.interpolate(x_clip, size=(4 * 16, 5 * 16), mode="bilinear",
                               align_corners=False)            # CLIP sees DINOv2's 4x5 grid
        with torch.no_grad():
            dino = bb.dino(x)
            d = F.normalize(dino.features.flatten(2).transpose(1, 2), dim=-1)
            c = F.normalize(bb.clip(x_clip), dim=-1)
            z = d + (c - d) @ bb.fusion.weight.T + bb.fusion.bias
            out = bb(x)
        assert out.features.shape == (2, WIDTH, 4, 5)
        torch.testing.assert_close(out.features.flatten(2).transpose(1, 2), z,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.cls_token, dino.cls_token)
    finally:
        with torch.no_grad():
            bb.fusion.weight.zero_()
            bb.fusion.bias.zero_()


def test_clip_frozen_dinov2_last_two_blocks_and_fusion_train(imported) -> None:
    model, *_ = imported
    model.train()
    try:
        assert not model.backbone.clip.training            # frozen tower stays in eval mode
        model.zero_grad(set_to_none=True)
        model(torch.randn(2, 3, 56, 70)).pow(2).sum().backward()
        bb = model.backbone
        assert all(p.grad is None and not p.requires_grad for p in bb.clip.parameters())
        for i in (10, 11):
            assert bb.dino.blocks[i].attn.qkv.weight.grad is not None
        assert all(p.grad is None for p in bb.dino.blocks[9].parameters())
        assert bb.fusion.weight.grad is not None and bb.fusion.weight.grad.abs().sum() > 0
        assert model.aggregator.blocks[0].queries.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_onnx_export_matches_torch_in_onnxruntime(imported, tmp_path: Path) -> None:
    """Through the project's exporter when present (its graph checks: no Resize, TensorRT op
    set, nothing image-independent left), else straight torch.onnx.export; then onnxruntime
    must match (cosine >= 0.9999) the unfixed model, whose CLIP resize is F.interpolate rather
    than the precomputed matrices the exported graph holds."""
    import onnxruntime as ort

    model, meta, *_ = imported
    model.eval()
    batch = torch.randn(3, 3, 56, 70)
    fusion = model.backbone.fusion
    with torch.no_grad():                    # a live CLIP branch (the import starts it at zero)
        fusion.weight.copy_(torch.randn(WIDTH, WIDTH) * 0.05)
        fusion.bias.copy_(torch.randn(WIDTH) * 0.05)
        dynamic = model(batch).numpy()
    path = tmp_path / "dcvlaq.onnx"
    try:
        from vpr_ros.export.onnx_export import export_model_onnx
    except ImportError:
        export_model_onnx = None
    if export_model_onnx is not None:
        export_model_onnx(model, path, model_fingerprint=meta.fingerprint, verify=False)
    else:
        model.fix_input_size()
        with torch.no_grad():
            torch.onnx.export(model, (batch[:2],), str(path), input_names=["images"],
                              output_names=["global"], opset_version=17, dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "global": {0: "batch"}})
    model.backbone.release_fixed_size()
    with torch.no_grad():
        fusion.weight.zero_()
        fusion.bias.zero_()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: batch.numpy()})[0]
    assert out.shape == dynamic.shape == (3, 64)
    cos = (out * dynamic).sum(1) / (np.linalg.norm(out, axis=1)
                                    * np.linalg.norm(dynamic, axis=1))
    assert cos.min() >= 0.9999, cos
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path)), data_prop=True).graph
    assert not {n.op_type for n in graph.node} & {"Resize", "Upsample"}
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == 64   # static width


def test_clip_files_of_the_wrong_shape_or_incomplete_are_named(imported, tmp_path: Path) -> None:
    model, *_ = imported
    tower = model.backbone.clip
    path = tmp_path / "clip_s14.pt"
    torch.save(openai_clip_state(patch=14, grid=16), path)
    with pytest.raises(CheckpointError, match=r"patch 14.*clip_arch 'vits16'.*set backbone\.params"
                                              r"\.clip_arch to 'vits14'"):
        load_clip_weights(tower, path)
    sd = clip_to_ours(openai_clip_state(layers=LAYERS))          # timm layout, one key short
    del sd["blocks.5.mlp.fc1.bias"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks\.5\.mlp\.fc1\.bias'\]"):
        load_clip_weights(tower, path)


def test_weights_backbone_names_both_halves_in_one_string(imported) -> None:
    """``weights.backbone: DINOV2:CLIP`` (what ``vpr model init --backbone-weights`` and a
    recipe's ``model.backbone_weights`` pass): each file lands in its half, in either order."""
    import os

    model, _, dino_sd, clip_sd, d = imported
    bb = model.backbone
    with torch.no_grad():
        bb.clip.blocks[4].mlp.fc1.weight.zero_()
        bb.dino.blocks[2].attn.proj.bias.zero_()
    bb.load_pretrained(os.pathsep.join([str(d / "clip.pt"), str(d / "dinov2_vits14_pretrain.pth")]))
    torch.testing.assert_close(bb.clip.blocks[4].mlp.fc1.weight,
                               clip_sd["visual.transformer.resblocks.4.mlp.c_fc.weight"])
    torch.testing.assert_close(bb.dino.blocks[2].attn.proj.bias, dino_sd["blocks.2.attn.proj.bias"])
    with pytest.raises(ConfigError, match="both clip weights"):
        bb.load_pretrained(os.pathsep.join([str(d / "clip.pt")] * 2))
