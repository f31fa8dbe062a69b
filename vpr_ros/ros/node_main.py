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
from typing import Any, Callable, Optional, Sequence


def check_params_files(args: Sequence[str]) -> str | None:
    """Why a ``--params-file`` of ``args`` cannot be used (missing, unreadable, not YAML, not
    a mapping), or None. Checked before rcl parses the arguments, whose own failure is a
    C-level log line plus an exception that says little more than "failed to parse"."""
    from vpr_ros.errors import ConfigError
    from vpr_ros.plain_data import read_yaml

    for flag, path in zip(args, args[1:]):
        if flag != "--params-file":
            continue
        try:
            doc = read_yaml(path, ConfigError, "fix the params file")
        except ConfigError as exc:
            return str(exc)
        if not isinstance(doc, dict):
            return (f"{path}: a params file holds a mapping of node names to "
                    "ros__parameters (e.g. vpr_node: {ros__parameters: {top_k: 5}}), got "
                    f"{type(doc).__name__}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything loads librcl: re-exec with the venv's ROS libraries on the loader path.
    from vpr_ros._bootstrap import ensure_ros_libs

    ensure_ros_libs()
    import rclpy
    from rclpy.lifecycle import TransitionCallbackReturn

    from vpr_ros.ros.node import VprNode

    args = list(argv) if argv is not None else sys.argv
    problem = check_params_files(args)
    if problem:
        print(f"vpr_node: error: {problem}", file=sys.stderr)
        return 2
    try:
        rclpy.init(args=args)
    except Exception as exc:  # rcl's argument parser (a params file it cannot read, a bad -p)
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        print(f"vpr_node: error: cannot parse the ROS arguments ({first[:300]}); check "
              "--params-file (YAML: vpr_node: ros__parameters: ...) and -p NAME:=VALUE",
              file=sys.stderr)
        return 2

    def autostart(node: VprNode) -> None:
        if node.get_parameter("autostart").value:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().error("autostart: configure failed (reason above); staying "
                                        "unconfigured")
            elif node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().error("autostart: activate failed; staying inactive")

    return run_node("vpr_node", VprNode, on_start=autostart,
                    on_stop=lambda node: node.shutdown_worker())


def run_node(name: str, make_node: Callable[[], Any],
             on_start: Optional[Callable[[Any], None]] = None,
             on_stop: Optional[Callable[[Any], None]] = None) -> int:
    """Create a node (rclpy already initialised) and spin it until Ctrl-C or shutdown, then
    tear down: the process life every node entry point shares. A node that refuses its start
    parameters (a VPRError) is a one-line error and exit code 2, not a traceback. ``on_start``
    runs once the node is added to the executor, ``on_stop`` first on the way out."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    from vpr_ros.errors import VPRError

    try:
        node = make_node()
    except VPRError as exc:  # a parameter given at start that its declaration refuses
        print(f"{name}: error: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        if on_start is not None:
            on_start(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if on_stop is not None:
            on_stop(node)
        executor.remove_node(node)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
