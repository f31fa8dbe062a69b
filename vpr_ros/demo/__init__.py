"""The built-in end-to-end scenario: a rendered route driven twice, as a real rosbag."""
