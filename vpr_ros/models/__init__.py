"""Shared PyTorch model definitions: backbones, aggregators, VPRModel, registry, checkpoints."""

from vpr_ros.models.config import ModelConfig, model_config_from_dict
from vpr_ros.models.vpr_model import VPRModel, build_model

__all__ = ["ModelConfig", "VPRModel", "build_model", "model_config_from_dict"]
