"""Import the official BoQ DINOv2 release (``dinov2_12288.pth``) as a model directory.

The release (``amaralibey/Bag-of-Queries``, torch.hub ``get_trained_boq``) is the state dict of
``VPRModel(backbone=DinoV2(), aggregator=BoQ(...))``:

* ``backbone.dino.<facebookresearch/dinov2 keys>`` (the torch.hub ViT: ``cls_token``,
  ``pos_embed``, ``mask_token``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``);
* ``aggregator.<keys of the released boq.py>`` (``proj_c``, ``norm_input``, ``boqs.N.{encoder,
  queries, self_attn, norm_q, cross_attn, norm_out}``, ``fc``), which are our names as they are.

The configuration is read from the tensor shapes (projection width and kernel, queries, layers,
row dim, DINOv2 size); the rest is fixed by the release's code and stated here: heads =
projection // 64, the last 2 DINOv2 blocks trained, and **no final DINOv2 LayerNorm** (the
release's ``DinoV2.forward`` runs the blocks and drops the class token without ``dino.norm``;
its ``norm`` tensors stay in the file and are loaded but unused, ``final_norm: false``). The
release evaluates at 322 x 322 (ImageNet normalisation) with the transform its README
prescribes, antialiased bicubic on the float tensor, recorded as ``interpolation:
bicubic_antialias``. ``mask_token`` is dropped (masked
pre-training only). The ResNet-50 release is refused: there is no ResNet backbone here.

The file is read with ``torch.load(weights_only=True)``: no code in it is ever run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from vpr_ros.errors import CheckpointError
from vpr_ros.models.checkpoints import dinov2_to_ours, infer_dinov2_arch, load_exact, \
    read_state_dict
from vpr_ros.models.config import ComponentConfig, InputConfig, ModelConfig
from vpr_ros.models.vpr_model import VPRModel, build_model

BACKBONE_PREFIX = "backbone.dino."
AGG_PREFIX = "aggregator."
RELEASE_INPUT_SIZE = 322


def _need(sd: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{source}: key {key!r} is missing; this is not a BoQ release "
                              "checkpoint (expected 'backbone.dino.*' and 'aggregator.*' keys, "
                              "as in dinov2_12288.pth)")
    return sd[key]


def boq_release_config(sd: Mapping[str, torch.Tensor], source: str,
                       input_size: int = RELEASE_INPUT_SIZE) -> ModelConfig:
    """The :class:`ModelConfig` of a release state dict, read from its tensor shapes."""
    if any(k.startswith("backbone.net.") for k in sd):
        raise CheckpointError(f"{source}: this is the ResNet-50 BoQ release; vpr_ros has no "
                              "ResNet backbone. Import the DINOv2 release (dinov2_12288.pth).")
    dino = {k[len(BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(BACKBONE_PREFIX)}
    if not dino:
        raise CheckpointError(f"{source}: no 'backbone.dino.*' keys; this is not the DINOv2 "
                              "BoQ release (dinov2_12288.pth)")
    try:
        found = infer_dinov2_arch(dino)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: backbone.dino.*: {exc}") from exc
    proj = _need(sd, "aggregator.proj_c.weight", source)
    queries = _need(sd, "aggregator.boqs.0.queries", source)
    fc = _need(sd, "aggregator.fc.weight", source)
    width = int(dino["cls_token"].shape[-1])
    if proj.dim() != 4 or proj.shape[1] != width or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"{source}: aggregator.proj_c.weight has shape "
                              f"{tuple(proj.shape)}; expected (P, {width}, k, k) for DINOv2 "
                              f"{found['arch']}")
    layers = sorted({int(m.group(1)) for k in sd
                     if (m := re.match(r"aggregator\.boqs\.(\d+)\.", k))})
    if layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: BoQ blocks {layers} are not numbered 0..N-1")
    num_queries = int(queries.shape[1])
    if fc.shape[1] != len(layers) * num_queries:
        raise CheckpointError(f"{source}: aggregator.fc.weight has shape {tuple(fc.shape)}, but "
                              f"{len(layers)} blocks x {num_queries} queries need "
                              f"{len(layers) * num_queries} inputs")
    backbone = ComponentConfig("dinov2", {"arch": found["arch"], "registers": found["registers"],
                                          "trainable_blocks": 2, "final_norm": False})
    aggregator = ComponentConfig("boq", {"proj_channels": int(proj.shape[0]),
                                         "num_queries": num_queries, "num_layers": len(layers),
                                         "row_dim": int(fc.shape[0]),
                                         "proj_kernel": int(proj.shape[-1])})
    dim = int(proj.shape[0]) * int(fc.shape[0])
    # The README's evaluation transform: ToTensor, Resize(bicubic, antialias=True), Normalize.
    inp = InputConfig(size=(input_size, input_size), interpolation="bicubic_antialias")
    return ModelConfig(backbone, aggregator, inp,
                       name=f"boq_{found['arch']}_{dim}")


def release_state_to_ours(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Release key names -> VPRModel key names; any other prefix is a named error."""
    out = {f"backbone.{k}": v for k, v in dinov2_to_ours(sd, prefix=BACKBONE_PREFIX).items()}
    for key, value in sd.items():
        if key.startswith(AGG_PREFIX):
            out[key] = value
        elif not key.startswith(BACKBONE_PREFIX):
            raise CheckpointError(f"{source}: unexpected key {key!r} (a BoQ release holds only "
                                  "'backbone.dino.*' and 'aggregator.*')")
    return out


def import_boq(src: str | Path, input_size: int = RELEASE_INPUT_SIZE) -> VPRModel:
    """Build our model from the release ``.pth`` (or a safetensors copy of it)."""
    sd = read_state_dict(src)
    config = boq_release_config(sd, str(src), input_size)
    state = release_state_to_ours(sd, str(src))
    # Keys and shapes are checked against a meta-device skeleton first, so a file that does not
    # fit is refused at once, before the real backbone is allocated and initialised.
    with torch.device("meta"):
        skeleton = build_model(config)
    load_exact(skeleton, {k: v.to("meta") for k, v in state.items()}, str(src))
    model = build_model(config)
    load_exact(model, state, str(src))
    return model
