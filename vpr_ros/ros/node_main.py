"""``vpr_node``: the process entry point of :class:`~vpr_ros.ros.node.VprNode`.

Usage (ROS arguments as for any node)::

    vpr_node --ros-args --params-file config/vpr_localization.yaml \\
        -p model:=models/site -p map:=maps/site -r image:=/camera/image_raw

The node starts *unconfigured*, as lifecycle nodes do; a lifecycle manager (the launch files,
Nav2's lifecycle manager, ``ros2 lifecycle set``) drives it. With ``-p autostart:=true`` it
configures and activates itself, for machines without any of those.

``--executor single_threaded|events`` (before ``--ros-args``) picks the rclpy executor; the
default, ``events``, is rclpy's C++ ``EventsExecutor``: about half the executor CPU per camera
frame of the ``SingleThreadedExecutor``; see :mod:`vpr_ros.ros.executors`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything loads librcl: re-exec with the venv's ROS libraries on the loader path.
    from vpr_ros._bootstrap import ensure_ros_libs

    ensure_ros_libs()
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.utilities import remove_ros_args

    from vpr_ros.ros.executors import DEFAULT_EXECUTOR, EXECUTORS, make_executor, \
        spin_until_shutdown
    from vpr_ros.ros.node import VprNode

    args = list(argv) if argv is not None else list(sys.argv)
    parser = argparse.ArgumentParser(prog="vpr_node", description="VPR relocalization and "
                                     "loop-closure node (ROS arguments after --ros-args)")
    parser.add_argument("--executor", choices=EXECUTORS, default=DEFAULT_EXECUTOR,
                        help=f"rclpy executor that spins the node (default {DEFAULT_EXECUTOR}: "
                        "rclpy's C++ EventsExecutor, experimental in rclpy; single_threaded: "
                        "the classic Python one, about twice the CPU per camera frame)")
    options = parser.parse_args(remove_ros_args(args)[1:])
    rclpy.init(args=args)
    context = rclpy.get_default_context()
    node = VprNode()
    executor = make_executor(options.executor, context)
    executor.add_node(node)
    try:
        if node.get_parameter("autostart").value:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().error("autostart: configure failed (reason above); staying "
                                        "unconfigured")
            elif node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().error("autostart: activate failed; staying inactive")
        spin_until_shutdown(executor, context)
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
