"""ament_python package: builds with colcon in a ROS 2 workspace and with pip in a venv."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "vpr_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    package_data={PACKAGE: ["py.typed"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/config/models", glob("config/models/*.yaml")),
        (f"share/{PACKAGE}/config/train", glob("config/train/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="vpr_ros developers",
    maintainer_email="vpr-ros@example.invalid",
    description="Learned visual place recognition (DINOv2 + QAA and its peers) for ROS 2",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "vpr = vpr_ros.cli:main",
            "vpr_node = vpr_ros.ros.node_main:main",
            "vpr_pose_graph = vpr_ros.ros.pose_graph_main:main",
        ],
    },
)
