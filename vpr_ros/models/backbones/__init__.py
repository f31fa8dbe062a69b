"""Backbones: images -> dense features. Importing registers them."""

from vpr_ros.models.backbones import dinov2, efficientnet_lite  # noqa: F401
from vpr_ros.models.backbones import dinov2_side_adapter  # noqa: F401
from vpr_ros.models.backbones import dinov2_clip_fusion  # noqa: F401
from vpr_ros.models.backbones import dinov2_adapter  # noqa: F401
