"""Backbones: images -> dense features. Importing registers them."""

from vpr_ros.models.backbones import dinov2, efficientnet_lite  # noqa: F401
