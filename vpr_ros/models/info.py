"""Figures a user compares models by: parameters, compute at the input size, descriptor size."""

from __future__ import annotations

from typing import Any

import torch

from vpr_ros.models.vpr_model import VPRModel


def count_params(module: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": int(total), "trainable": int(trainable)}


def gflops(model: VPRModel, size: tuple[int, int] | None = None) -> float:
    """Forward GFLOPs for one image (multiply-add counted as 2 FLOPs), by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w = size or model.input_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, h, w))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def model_summary(model: VPRModel, fingerprint: str | None = None,
                  with_flops: bool = True) -> dict[str, Any]:
    cfg = model.config
    out: dict[str, Any] = {
        "name": cfg.name,
        "backbone": {"name": cfg.backbone.name, "params": cfg.backbone.params,
                     "parameters": count_params(model.backbone)},
        "aggregator": {"name": cfg.aggregator.name, "params": cfg.aggregator.params,
                       "parameters": count_params(model.aggregator)},
        "parameters": count_params(model),
        "input": cfg.input.to_dict(),
        "descriptor_dim": model.descriptor_dim,
        "descriptor_bytes_fp32": model.descriptor_dim * 4,
    }
    if with_flops:
        out["gflops"] = round(gflops(model), 3)
    if fingerprint:
        out["fingerprint"] = fingerprint
    return out
