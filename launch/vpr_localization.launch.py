"""Relocalize in a prebuilt map: ``vpr_node`` in localization mode, configured and activated.

    ros2 launch vpr_ros vpr_localization.launch.py model:=/path/model map:=/path/map \
        camera_topic:=/camera/image_raw image_transport:=raw

This file only wires files and remaps: every tunable lives in ``config/vpr_localization.yaml``
(pass another with ``params_file:=``). The node is a lifecycle node; with ``autostart:=true``
(default) the launch drives it through configure and activate, otherwise a lifecycle manager
(e.g. Nav2's) does. Remap ``/vpr_node/relocalization`` to ``/initialpose`` to seed AMCL.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, RegisterEventHandler
from launch.conditions import IfCondition
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.substitutions import FindPackageShare
from lifecycle_msgs.msg import Transition

CONFIG = "vpr_localization.yaml"


def generate_launch_description() -> LaunchDescription:
    autostart = LaunchConfiguration("autostart")
    args = [
        DeclareLaunchArgument("model", description="model directory, .onnx file or TensorRT "
                              "engine (the map's model)"),
        DeclareLaunchArgument("map", description="map directory built with `vpr map build`"),
        DeclareLaunchArgument("camera_topic", default_value="/camera/image_raw",
                              description="camera topic remapped onto the node's 'image'"),
        DeclareLaunchArgument("image_transport", default_value="raw",
                              choices=["raw", "compressed"],
                              description="raw: sensor_msgs/Image; compressed: "
                              "sensor_msgs/CompressedImage"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution(
            [FindPackageShare("vpr_ros"), "config", CONFIG]),
            description="node parameters (ROS params file)"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="configure and activate the node on launch"),
    ]
    node = LifecycleNode(
        package="vpr_ros", executable="vpr_node", name="vpr_node", namespace="",
        output="screen",
        parameters=[LaunchConfiguration("params_file"),
                    {"model": LaunchConfiguration("model"), "map": LaunchConfiguration("map"),
                     "image_transport": LaunchConfiguration("image_transport")}],
        remappings=[("image", LaunchConfiguration("camera_topic"))],
    )
    configure = EmitEvent(
        event=ChangeState(lifecycle_node_matcher=matches_action(node),
                          transition_id=Transition.TRANSITION_CONFIGURE),
        condition=IfCondition(autostart))
    activate_when_configured = RegisterEventHandler(
        OnStateTransition(
            target_lifecycle_node=node, start_state="configuring", goal_state="inactive",
            entities=[EmitEvent(event=ChangeState(
                lifecycle_node_matcher=matches_action(node),
                transition_id=Transition.TRANSITION_ACTIVATE))]),
        condition=IfCondition(autostart))
    return LaunchDescription([*args, node, activate_when_configured, configure])
