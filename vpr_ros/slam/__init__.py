"""A reference SLAM back end for the loop closures: a gtsam pose graph optimised with iSAM2.

No ROS types (the ``vpr_pose_graph`` node in :mod:`vpr_ros.ros` converts messages), so the
graph is usable and testable offline. Above :mod:`vpr_ros.localization` in the layering: it
reads closures as the node publishes them and imports only the parameter machinery below.
"""

from vpr_ros.slam.closures import ClosureMeasurement, closure_from_fields
from vpr_ros.slam.config import PoseGraphConfig
from vpr_ros.slam.pose_graph import LoopFactorInfo, PoseGraph

__all__ = ["ClosureMeasurement", "LoopFactorInfo", "PoseGraph", "PoseGraphConfig",
           "closure_from_fields"]
