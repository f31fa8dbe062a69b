"""Our timm-based EfficientNet-Lite0 with the packaged ImageNet weights computes what the
weights package's own reference model (efficientnet_lite_pytorch) computes, on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_ros.errors import CheckpointError
from vpr_ros.models.backbones.efficientnet_lite import (EfficientNetLiteBackbone,
                                                         convert_lukemelas_state_dict,
                                                         packaged_weights_path)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _batch(images: list[np.ndarray], size: int = 224) -> torch.Tensor:
    import cv2

    arr = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR)
                    for im in images]).astype(np.float32) / 255.0
    return torch.from_numpy(((arr - MEAN) / STD).transpose(0, 3, 1, 2).copy())


def test_matches_reference_model_on_real_images(nordland_pairs) -> None:
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch",
                                  reason="reference package from requirements-dev.txt")
    summer, winter = nordland_pairs
    x = _batch(summer[:4] + winter[:4])
    ref = ref_pkg.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(packaged_weights_path("lite0"))).eval()
    ours = EfficientNetLiteBackbone(variant="lite0")
    ours.load_packaged_weights()
    ours.eval()
    with torch.no_grad():
        ref_feats = ref.extract_features(x)
        our_feats = ours(x).features
        ref_logits = ref(x)
        our_logits = torch.nn.functional.linear(
            our_feats.mean(dim=(2, 3)),
            *[t for k, t in sorted(_classifier(ours).items())][::-1])
    assert our_feats.shape == ref_feats.shape == (8, 1280, 7, 7)
    torch.testing.assert_close(our_feats, ref_feats, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(our_logits, ref_logits, atol=2e-3, rtol=1e-4)
    assert (our_logits.argmax(1) == ref_logits.argmax(1)).all()


def _classifier(bb: EfficientNetLiteBackbone) -> dict[str, torch.Tensor]:
    """The ImageNet classifier from the package file (ours drops it), for a logits check."""
    sd = torch.load(packaged_weights_path("lite0"), map_location="cpu", weights_only=True)
    conv = convert_lukemelas_state_dict(sd, bb.net)
    return {"bias": conv["classifier.bias"], "weight": conv["classifier.weight"]}


def test_frozen_backbone_keeps_batchnorm_statistics() -> None:
    bb = EfficientNetLiteBackbone(variant="lite0", trainable_stages=0)
    bb.load_packaged_weights()
    before = bb.net.bn2.running_mean.clone()
    bb.train()
    bb(torch.randn(2, 3, 96, 96))
    torch.testing.assert_close(bb.net.bn2.running_mean, before)
    assert not any(p.requires_grad for p in bb.parameters())


def test_partial_training_unfreezes_the_last_stages_only() -> None:
    bb = EfficientNetLiteBackbone(variant="lite0", trainable_stages=2)
    trainable = {n.split(".")[1] if n.startswith("net.blocks") else n.split(".")[1]
                 for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable == {"blocks", "conv_head", "bn2"}
    assert all(not p.requires_grad for p in bb.net.blocks[5].parameters())
    assert all(p.requires_grad for p in bb.net.blocks[6].parameters())


def test_foreign_checkpoint_is_refused() -> None:
    bb = EfficientNetLiteBackbone(variant="lite0")
    with pytest.raises(CheckpointError, match="unexpected key"):
        convert_lukemelas_state_dict({"features.0.weight": torch.zeros(1)}, bb.net)


def test_earlier_stage_features_are_the_full_trunks_intermediate_output() -> None:
    """``features: stage4`` (Lite0: 112 ch, stride 16) is the full network's blocks[4] output
    with the packaged weights, and the later stages are gone (no weights, no compute)."""
    full = EfficientNetLiteBackbone(variant="lite0")
    full.load_packaged_weights()
    cut = EfficientNetLiteBackbone(variant="lite0", features="stage4")
    cut.load_packaged_weights()
    full.eval()
    cut.eval()
    grabbed: dict[str, torch.Tensor] = {}
    full.net.blocks[4].register_forward_hook(lambda m, i, o: grabbed.__setitem__("x", o))
    x = torch.randn(2, 3, 112, 224)
    with torch.no_grad():
        full(x)
        out = cut(x).features
    assert (cut.out_channels, cut.stride) == (112, 16)
    assert out.shape == (2, 112, 7, 14)
    torch.testing.assert_close(out, grabbed["x"])
    assert len(cut.net.blocks) == 5
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in full.parameters()) / 4
    assert not any(p.requires_grad for p in cut.parameters())


@pytest.mark.parametrize("features, channels, stride", [("head", 1280, 32),
                                                        ("last_stage", 320, 32),
                                                        ("stage6", 320, 32), ("stage3", 80, 16),
                                                        ("stage2", 40, 8)])
def test_feature_stage_channels_and_stride(features: str, channels: int, stride: int) -> None:
    bb = EfficientNetLiteBackbone(variant="lite0", features=features)
    assert (bb.out_channels, bb.stride) == (channels, stride)
    assert bb(torch.randn(1, 3, 64, 128)).features.shape == (1, channels, 64 // stride,
                                                             128 // stride)


def test_unknown_feature_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="stage4"):
        EfficientNetLiteBackbone(variant="lite0", features="stage9")


def test_training_the_last_kept_stage_of_a_cut_trunk() -> None:
    bb = EfficientNetLiteBackbone(variant="lite0", features="stage4", trainable_stages=1)
    assert all(p.requires_grad for p in bb.net.blocks[4].parameters())
    assert not any(p.requires_grad for p in bb.net.blocks[3].parameters())
    # the stem stays frozen, as for the full trunk: stages 0-4 are the 5 trainable units
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        EfficientNetLiteBackbone(variant="lite0", features="stage4", trainable_stages=6)
