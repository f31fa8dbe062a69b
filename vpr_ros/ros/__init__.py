"""The ROS 2 side of vpr_ros: rclpy nodes, message conversions and ``vpr bag play``.

This is the only package that imports rclpy; everything below it (models, maps, localization)
is plain Python and runs without ROS. Importing this package itself imports nothing from ROS,
so its pure helpers stay usable (and testable) where rclpy cannot be loaded.
"""
