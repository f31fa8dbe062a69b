"""vpr_ros: learned visual place recognition for ROS 2 robots.

The library below ``vpr_ros.ros`` never imports rclpy, so models, maps, training and evaluation
work (and are tested) without ROS.
"""

__version__ = "0.1.0"
