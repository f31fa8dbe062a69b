"""``vpr_node``: the process entry point of :class:`~vpr_ros.ros.node.VprNode`.

Usage (ROS arguments as for any node)::

    vpr_node --ros-args --params-file config/vpr_localization.yaml \\
        -p model:=models/site -p map:=maps/site -r image:=/camera/image_raw

The node starts *unconfigured*, as lifecycle nodes do; a lifecycle manager (the launch files,
Nav2's lifecycle manager, ``ros2 lifecycle set``) drives it. With ``-p autostart:=true`` it
configures and activates itself, for machines without any of those.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything loads librcl: re-exec with the venv's ROS libraries on the loader path.
    from vpr_ros._bootstrap import ensure_ros_libs

    ensure_ros_libs()
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn

    from vpr_ros.ros.node import VprNode

    rclpy.init(args=list(argv) if argv is not None else sys.argv)
    node = VprNode()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        if node.get_parameter("autostart").value:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().error("autostart: configure failed (reason above); staying "
                                        "unconfigured")
            elif node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().error("autostart: activate failed; staying inactive")
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.shutdown_worker()
        executor.remove_node(node)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
