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
