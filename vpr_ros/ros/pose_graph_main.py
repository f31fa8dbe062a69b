"""``vpr_pose_graph``: the process entry point of :class:`~vpr_ros.ros.pose_graph_node.PoseGraphNode`.

Usage (ROS arguments as for any node)::

    vpr_pose_graph --ros-args --params-file config/vpr_pose_graph.yaml \\
        -r odometry:=/odom -r loop_closure:=/vpr_node/loop_closure

A parameter out of its range stops the node at start with a one-line error (exit code 2)
naming the parameter and its range.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything loads librcl: re-exec with the venv's ROS libraries on the loader path.
    from vpr_ros._bootstrap import ensure_ros_libs

    ensure_ros_libs()
    import rclpy

    from vpr_ros.ros.node_main import run_node
    from vpr_ros.ros.pose_graph_node import NODE_NAME, PoseGraphNode

    rclpy.init(args=list(argv) if argv is not None else sys.argv)
    return run_node(NODE_NAME, PoseGraphNode)


if __name__ == "__main__":
    sys.exit(main())
