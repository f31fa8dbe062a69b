"""Run the reference pose-graph back end beside vpr_node in loop-closure mode.

    ros2 launch vpr_ros vpr_pose_graph.launch.py odom_topic:=/odom \
        loop_closure_topic:=/vpr_node/loop_closure

This file only wires files and remaps: every tunable lives in ``config/vpr_pose_graph.yaml``
(pass another with ``params_file:=``). The corrected path comes out on
``/vpr_pose_graph/path``, the map -> odom correction on ``/vpr_pose_graph/map_to_odom`` (and on
/tf where tf2_ros is installed). Start ``vpr_loop_closure.launch.py`` for the closures.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

CONFIG = "vpr_pose_graph.yaml"


def generate_launch_description() -> LaunchDescription:
    args = [
        DeclareLaunchArgument("odom_topic", default_value="/odom",
                              description="nav_msgs/Odometry of the robot, remapped onto the "
                              "node's 'odometry'"),
        DeclareLaunchArgument("loop_closure_topic", default_value="/vpr_node/loop_closure",
                              description="std_msgs/Float64MultiArray closures of vpr_node, "
                              "remapped onto the node's 'loop_closure'"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution(
            [FindPackageShare("vpr_ros"), "config", CONFIG]),
            description="node parameters (ROS params file)"),
    ]
    node = Node(
        package="vpr_ros", executable="vpr_pose_graph", name="vpr_pose_graph", namespace="",
        output="screen",
        parameters=[LaunchConfiguration("params_file")],
        remappings=[("odometry", LaunchConfiguration("odom_topic")),
                    ("loop_closure", LaunchConfiguration("loop_closure_topic"))],
    )
    return LaunchDescription([*args, node])
