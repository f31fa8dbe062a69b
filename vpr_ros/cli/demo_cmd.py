"""``vpr demo``: the main job end to end (see :mod:`vpr_ros.demo.run`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the whole pipeline end to end (built-in scenario or your bag)",
        description="Record (or take) a route, build a map with `vpr map build`, run the real "
        "vpr_node fed by `vpr bag play` in localization and loop-closure modes, and report "
        "accuracy, loop-closure precision, latency and plots.")
    p.add_argument("-o", "--out", default="vpr_demo_out", help="output folder (default "
                   "./vpr_demo_out)")
    p.add_argument("--model", help="model directory (default: pretrained EfficientNet-Lite0 + "
                   "GeM made on the fly)")
    p.add_argument("--bag", help="your own recording (rosbag2 directory, .mcap/.db3 file or ROS 1 "
                   ".bag) instead of the built-in scenario")
    p.add_argument("--map-bag", help="with --bag: build the map from this bag (default: --bag)")
    p.add_argument("--image-topic", default="/camera/image_raw", help="with --bag: image topic")
    p.add_argument("--pose-topic", default=None, help="with --bag: odometry/pose topic (ground "
                   "truth for the report, keyframe poses for the map); optional")
    p.add_argument("--loop-gt", metavar="FILE", help="with --bag: loop ground truth of the bag "
                   "(for bags without poses): a CSV of query,match stamps (s or ns), or an "
                   "N x N boolean matrix over the image topic's frames as .npy or an image. "
                   "Without poses and without this, the report is counts only, labelled so")
    p.add_argument("--loop-gt-tolerance", type=int, default=2, metavar="FRAMES",
                   help="a closure within this many frames of a ground-truth loop (both ends) "
                   "is correct (default 2)")
    p.add_argument("--compressed", action="store_true", help="images as CompressedImage "
                   "(built-in scenario: record JPEG; your bag: the topic is compressed)")
    p.add_argument("--storage", choices=["sqlite3", "mcap", "rosbag1"], default="sqlite3",
                   help="storage of the built-in recordings (rosbag1: ROS 1 .bag files)")
    p.add_argument("--rate", type=float, default=2.0, help="bag playback speed (default 2)")
    p.add_argument("--backend", default="auto", help="node encoder backend (default auto)")
    p.add_argument("--radius", type=float, default=5.0,
                   help="a match is correct within this many metres of ground truth")
    p.add_argument("--quick", action="store_true", help="a smaller built-in scenario")
    p.add_argument("--node-param", action="append", default=[], metavar="NAME=VALUE",
                   help="a vpr_node parameter for every node run (repeatable), e.g. "
                   "verification.enabled=false or loop_closure.min_score=0.75")
    p.add_argument("--one-camera", action="store_true", help="built-in scenario: record and "
                   "use the front camera only (default: a rear camera too, and the report "
                   "compares relocalization with one camera and with both)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from vpr_ros.demo.run import DemoOptions, run_demo
    from vpr_ros.errors import ConfigError

    if not args.bag and (args.loop_gt or args.pose_topic or args.map_bag):
        raise ConfigError("--loop-gt, --pose-topic and --map-bag describe your own recording: "
                          "give it with --bag (the built-in scenario has its own ground truth)")

    run_demo(DemoOptions(
        out=Path(args.out), model=Path(args.model) if args.model else None,
        bag=Path(args.bag) if args.bag else None,
        map_bag=Path(args.map_bag) if args.map_bag else None,
        image_topic=args.image_topic,
        pose_topic=args.pose_topic if args.bag else "/odom",
        loop_gt=Path(args.loop_gt) if args.loop_gt else None,
        loop_gt_tolerance=args.loop_gt_tolerance,
        rate=args.rate, storage=args.storage, compressed=args.compressed,
        correct_radius_m=args.radius, backend=args.backend, quick=args.quick,
        rear_camera=not args.one_camera, node_params=_node_params(args.node_param)))
    return 0


def _node_params(items: list[str]) -> dict[str, str]:
    """NAME=VALUE pairs for the demo's ``-p NAME:=VALUE``: unknown names refused here, and a
    whole number for a floating-point parameter written as one (``0`` -> ``0.0``), since rclpy
    would refuse an integer there and the demo's user wrote a value, not a type."""
    import re

    from vpr_ros.errors import ConfigError
    from vpr_ros.ros.params import all_parameter_specs

    specs = {spec.name: spec for spec in all_parameter_specs()}
    names = set(specs)
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--node-param {item!r}: expected NAME=VALUE")
        if name.strip() not in names:
            raise ConfigError(f"--node-param {item!r}: vpr_node has no parameter "
                              f"{name.strip()!r} (see docs/parameters.md)")
        value = value.strip()
        if specs[name.strip()].type is float and re.fullmatch(r"[+-]?\d+", value):
            value += ".0"
        out[name.strip()] = value
    return out
