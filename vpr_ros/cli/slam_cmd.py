"""``vpr eval slam``: loop closures into the reference pose graph on a user's bag, trajectory
error with evo (see :mod:`vpr_ros.demo.slam_run`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register_slam(esub: argparse._SubParsersAction) -> None:
    s = esub.add_parser(
        "slam", help="ATE of odometry vs the pose graph fed by vpr_node's loop closures",
        description="Play a bag (`vpr bag play`) into the real vpr_node in loop-closure mode and "
        "vpr_pose_graph beside it, then measure the absolute trajectory error (evo APE, SE(3) "
        "alignment) of the odometry alone and of the optimised graph against a ground-truth "
        "topic; print the table and write trajectories.png. With --plant-wrong-closure a second "
        "pose graph runs the same run with one wrong closure added.")
    s.add_argument("--bag", required=True, help="rosbag2 directory (sqlite3 or MCAP)")
    s.add_argument("--image-topic", required=True, help="camera topic (Image or "
                   "CompressedImage; see --compressed)")
    s.add_argument("--odom-topic", required=True, help="the robot's odometry (nav_msgs/Odometry)")
    s.add_argument("--gt-topic", required=True, help="ground-truth poses (Odometry or "
                   "PoseStamped) the errors are measured against")
    s.add_argument("--camera-info-topic", help="sensor_msgs/CameraInfo of the camera (default: "
                   "the image topic's sibling camera_info when the bag has it): verified "
                   "closures then carry the relative camera pose")
    s.add_argument("--depth-topic", help="registered depth image (16UC1 mm or 32FC1 m): live "
                   "keyframes get 3-D points, so relative poses are metric (PnP)")
    s.add_argument("--model", help="model directory (default: pretrained EfficientNet-Lite0 + "
                   "GeM made on the fly)")
    s.add_argument("-o", "--out", default="vpr_slam_out", help="output folder (default "
                   "./vpr_slam_out): trajectories.png, slam.json, logs")
    s.add_argument("--compressed", action="store_true", help="the image topic is "
                   "sensor_msgs/CompressedImage")
    s.add_argument("--rate", type=float, default=1.0, help="bag playback speed (default 1: "
                   "as recorded)")
    s.add_argument("--backend", default="auto", help="vpr_node encoder backend (default auto)")
    s.add_argument("--exclusion-window-s", type=float, default=30.0,
                   help="loop_closure.exclusion_window_s of vpr_node: longer than any stretch "
                   "on which the robot sees the same street twice (default 30)")
    s.add_argument("--radius", type=float, default=5.0,
                   help="a closure is correct when its two ends are this close by ground truth")
    s.add_argument("--plant-wrong-closure", action="store_true",
                   help="also run a second pose graph with one planted wrong closure")
    s.add_argument("--graph-param", action="append", default=[], metavar="NAME=VALUE",
                   help="override one vpr_pose_graph parameter (repeatable), e.g. "
                   "robust_kernel=cauchy; see config/vpr_pose_graph.yaml")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_slam)


def _graph_params(items: list[str]) -> dict[str, object]:
    """NAME=VALUE pairs, checked against the node's declared parameters and ranges."""
    import yaml

    from vpr_ros.errors import ConfigError
    from vpr_ros.ros.pose_graph_params import all_parameter_specs, settings_from_values

    specs = {s.name: s for s in all_parameter_specs()}
    out: dict[str, object] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in specs:
            raise ConfigError(f"--graph-param {item!r}: expected NAME=VALUE with NAME one of "
                              f"{', '.join(sorted(specs))}")
        value = yaml.safe_load(text)
        if specs[name].type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[name] = value
    settings_from_values({**{n: s.default for n, s in specs.items()}, **out})  # ranges
    return out


def _slam(args: argparse.Namespace) -> int:
    from vpr_ros.demo.slam_run import format_slam, run_slam

    res = run_slam(Path(args.bag), image_topic=args.image_topic, odom_topic=args.odom_topic,
                   gt_topic=args.gt_topic, out=Path(args.out),
                   model=Path(args.model) if args.model else None, rate=args.rate,
                   backend=args.backend, compressed=args.compressed,
                   exclusion_window_s=args.exclusion_window_s, radius_m=args.radius,
                   plant=args.plant_wrong_closure, graph_params=_graph_params(args.graph_param),
                   camera_info_topic=args.camera_info_topic, depth_topic=args.depth_topic,
                   log=(lambda _m: None) if args.json else print)
    print(json.dumps(res, indent=2) if args.json else "\n".join(format_slam(res)))
    return 0
