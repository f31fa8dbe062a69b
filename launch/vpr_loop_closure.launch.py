"""Detect loop closures in the live run: ``vpr_node`` in loop-closure mode.

    ros2 launch vpr_ros vpr_loop_closure.launch.py model:=/path/model \
        camera_topic:=/camera/image_raw odom_topic:=/odom [map:=/path/live_map]

This file only wires files and remaps: every tunable lives in ``config/vpr_loop_closure.yaml``
(pass another with ``params_file:=``). ``map`` is optional: an existing map is extended (its
sessions become loop candidates), a missing one is where ``~/save_map`` writes the live map.
Closures come out on ``/vpr_node/loop_closure`` (std_msgs/Float64MultiArray, stamps first).
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

CONFIG = "vpr_loop_closure.yaml"


def generate_launch_description() -> LaunchDescription:
    autostart = LaunchConfiguration("autostart")
    args = [
        DeclareLaunchArgument("model", description="model directory, .onnx file or TensorRT "
                              "engine"),
        DeclareLaunchArgument("map", default_value="",
                              description="live map directory: loaded if it exists, else "
                              "where ~/save_map writes (empty: in memory only)"),
        DeclareLaunchArgument("camera_topic", default_value="/camera/image_raw",
                              description="camera topic remapped onto the node's 'image'"),
        DeclareLaunchArgument("image_transport", default_value="raw",
                              choices=["raw", "compressed"],
                              description="raw: sensor_msgs/Image; compressed: "
                              "sensor_msgs/CompressedImage"),
        DeclareLaunchArgument("odom_topic", default_value="/odom",
                              description="nav_msgs/Odometry giving keyframe poses, remapped "
                              "onto the node's 'odometry'"),
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
        remappings=[("image", LaunchConfiguration("camera_topic")),
                    ("odometry", LaunchConfiguration("odom_topic"))],
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
