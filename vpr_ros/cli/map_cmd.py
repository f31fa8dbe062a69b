"""``vpr map build|info|merge|plot``: turn rosbags into maps, inspect, combine and draw them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

INDEX_CHOICES = ["auto", "flat", "hnsw", "ivfpq", "binary"]
KEYPOINT_CHOICES = ("sift", "orb", "akaze", "none")


def _pose7(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 7 comma-separated numbers "
                                         "x,y,z,qx,qy,qz,qw") from None
    if len(values) != 7:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 7 numbers x,y,z,qx,qy,qz,qw, got "
                                         f"{len(values)}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("map", help="build maps from rosbags; inspect, merge and plot them")
    msub = p.add_subparsers(dest="map_command", metavar="ACTION")
    msub.required = True

    build = msub.add_parser(
        "build", help="a map from a rosbag (sqlite3, MCAP or ROS 1 .bag): keyframes + "
        "descriptors",
        description="Read a rosbag2 or ROS 1 bag, interpolate poses at image stamps, select keyframes "
        "by distance/rotation/time, encode them in batches and save the map atomically. "
        "Without --pose-topic the map is stamps-only.")
    build.add_argument("bag", help="rosbag2 directory, a single .mcap / .db3 file, or a ROS 1 "
                       ".bag file (read directly, no conversion step)")
    build.add_argument("--image-topic", required=True, nargs="+", action="extend",
                       metavar="TOPIC",
                       help="sensor_msgs/Image or CompressedImage topic; several cameras: "
                       "several topics (each keyframe records its camera, keyframes are "
                       "selected per camera)")
    build.add_argument("--pose-topic", help="nav_msgs/Odometry, geometry_msgs/PoseStamped, "
                       "PoseWithCovarianceStamped or sensor_msgs/NavSatFix topic")
    build.add_argument("--model", required=True, help="model directory (vpr model init)")
    build.add_argument("-o", "--output", required=True, help="map directory to write")
    build.add_argument("--index", choices=INDEX_CHOICES,
                       help="search index of a new map (default: from the config, auto = "
                       "binary over the model's hash codes for a model with a hash head, "
                       "flat otherwise; binary uses the model's codes when it has any)")
    build.add_argument("--no-local-grid", "--no-local-features", dest="no_local_grid",
                       action="store_true",
                       help="do not store the model's dense local grid (a model with a local "
                       "head, e.g. CQVPR, otherwise keeps it for re-ranking: float16, "
                       "H*W*C*2 bytes per keyframe)")
    build.add_argument("--local-features", choices=list(KEYPOINT_CHOICES),
                       help="keypoints stored per keyframe for geometric verification "
                       "(default: from the config, sift; none: no verification against this map)")
    build.add_argument("--max-keypoints", type=int, help="strongest keypoints kept per keyframe "
                       "(default: from the config, 1000)")
    build.add_argument("--camera-info-topic", help="sensor_msgs/CameraInfo of the camera "
                       "(default: the image topic's sibling camera_info when the bag has it; "
                       "'' for none)")
    build.add_argument("--depth-topic", nargs="+", metavar="[IMAGE_TOPIC=]DEPTH_TOPIC",
                       help="aligned depth image (16UC1 mm or 32FC1 m) giving keypoints 3-D "
                       "points; with several --image-topic, one IMAGE_TOPIC=DEPTH_TOPIC per "
                       "camera that has depth")
    build.add_argument("--stereo-right-topic", help="right camera of a stereo pair giving "
                       "keypoints 3-D points (its CameraInfo: sibling camera_info)")
    build.add_argument("--stereo-right-camera-info-topic",
                       help="CameraInfo of the right camera (default: its sibling camera_info)")
    build.add_argument("--base-frame", default="base_link",
                       help="robot frame of the odometry poses; the camera's mount is looked up "
                       "from it on /tf_static (default base_link)")
    build.add_argument("--camera-to-robot", type=_pose7, metavar="X,Y,Z,QX,QY,QZ,QW",
                       help="pose of the camera optical frame in the robot base frame "
                       "(overrides /tf_static)")
    build.add_argument("--batch-size", type=int, help="images per encoder pass (default: "
                       "from the config, 16)")
    build.add_argument("--session", help="session name of this bag's keyframes (default: the "
                       "bag's name)")
    build.add_argument("--config", help="map build YAML (default: built-in values, the same "
                       "as config/map_build.yaml)")
    build.add_argument("--append", action="store_true",
                       help="add to the existing map at --output as a new session")
    build.add_argument("--backend", default="auto",
                       help="encoder backend: auto (default: the fastest measured on this host "
                       "for batches, whose descriptors match fp32), torch, onnxruntime, "
                       "openvino, tensorrt, optionally with a precision (openvino:bf16, ...)")
    build.add_argument("--device", default="cpu", help="encoder device, e.g. cpu or cuda")
    build.add_argument("--json", action="store_true", help="print the summary as JSON")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)

    info = msub.add_parser("info", help="keyframes, sessions, model, index, size of a map")
    info.add_argument("map", help="map directory")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)

    merge = msub.add_parser("merge", help="combine maps of the same model into a new one")
    merge.add_argument("maps", nargs="+", help="two or more map directories")
    merge.add_argument("-o", "--output", required=True, help="new map directory")
    merge.set_defaults(func=_merge)

    plot = msub.add_parser("plot", help="draw a map's keyframes (one colour per session)")
    plot.add_argument("map", help="map directory")
    plot.add_argument("-o", "--output", required=True, help="PNG file to write")
    plot.add_argument("--title", help="plot title (default: counts and model)")
    plot.set_defaults(func=_plot)


def _build(args: argparse.Namespace) -> int:
    from vpr_ros.mapdb.build import build_map, load_build_config
    from vpr_ros.runtime.encoder import load_encoder

    from vpr_ros.errors import ConfigError
    from vpr_ros.mapdb.camera_rig import SensorOptions

    config = load_build_config(args.config).replace(
        index=args.index, batch_size=args.batch_size,
        local_features=False if args.no_local_grid else None,
        keypoints=args.local_features, max_keypoints=args.max_keypoints)
    depth_topic, depth_topics = None, None
    if args.depth_topic:
        pairs = [d.split("=", 1) for d in args.depth_topic]
        if all(len(p) == 2 for p in pairs):
            depth_topics = {image: depth for image, depth in pairs}
        elif len(pairs) == 1 and len(pairs[0]) == 1:
            depth_topic = pairs[0][0]
        else:
            raise ConfigError("--depth-topic: give one DEPTH_TOPIC, or IMAGE_TOPIC=DEPTH_TOPIC "
                              "for each camera that has depth")
    sensors = SensorOptions(camera_info_topic=args.camera_info_topic,
                            depth_topic=depth_topic, depth_topics=depth_topics,
                            right_topic=args.stereo_right_topic,
                            right_camera_info_topic=args.stereo_right_camera_info_topic,
                            base_frame=args.base_frame, camera_mount=args.camera_to_robot)
    def encoder() -> Any:  # loaded only once the bag and its topics are known to be fine
        return load_encoder(args.model, backend=args.backend, device=args.device,
                            objective="throughput")

    _, summary = build_map(args.bag, args.image_topic, encoder, args.output,
                           pose_topic=args.pose_topic, session=args.session, config=config,
                           append=args.append, progress=not args.no_progress,
                           sensors=sensors)
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(summary.format())
    return 0


#: How ``vpr map info`` names where a binary index's codes come from.
_CODE_SOURCE_TEXT = {"model": "the model's hash head", "pca": "a PCA of the map",
                     "itq": "a PCA of the map + ITQ rotation", "simhash": "a random projection"}


def _format_info(info: dict[str, Any]) -> str:
    sessions = ", ".join(f"{name} ({n})" for name, n in info["sessions"].items()) or "none"
    index = info["index"]
    index_text = index.get("kind", "?") if isinstance(index, dict) else str(index)
    if isinstance(index, dict) and index.get("kind") == "binary":
        source = _CODE_SOURCE_TEXT.get(index.get("codes"), str(index.get("codes")))
        if index.get("trained") is False:
            source += ", not trained yet: exact search"
        index_text += (f" ({index.get('bits')}-bit codes from {source}; "
                       f"{index.get('stages', 'hamming -> exact')}, re-rank "
                       f"{index.get('rerank')})")
    local = info.get("local_features")
    local_text = "none" if not local else \
        (f"{' x '.join(str(v) for v in local['grid'])} {local['dtype']} per keyframe, "
         f"{local['bytes'] / 1e6:.2f} MB (mutual-NN re-ranking)")
    kp = info.get("keypoints")
    keypoint_text = "none (no geometric verification)" if not kp else (
        f"{kp['kind']}, {kp['per_keyframe']:g} per keyframe ({kp['rows']} in all, "
        f"{kp['bytes'] / 1e6:.2f} MB); 3-D points for {100 * kp['with_points']:.0f}% of them"
        + ("" if kp["points"] else " (no depth or stereo: essential matrix only)"))
    cameras = info.get("cameras") or []
    camera_text = "; ".join(
        f"{c['session']}:{c['name']} {c['width']}x{c['height']} f={c['k'][0]:.1f} "
        f"{c['distortion_model']}{'' if c.get('mount') else ' (no mount)'}" for c in cameras
    ) or "none (uncalibrated)"
    lines = [
        f"map          {info['path']}",
        f"keyframes    {info['count']} in {len(info['sessions'])} session(s): {sessions}",
        f"descriptors  {info['dim']}-D {info['storage_dtype']}, index {index_text}",
        f"local feats  {local_text}",
        f"keypoints    {keypoint_text}",
        f"cameras      {camera_text}",
        f"model        fingerprint {info['fingerprint']}",
        f"poses        {'yes' if info['has_poses'] else 'no (stamps only)'}; "
        f"GNSS {'yes' if info['has_gnss'] else 'no'}",
    ]
    if info.get("stamp_range_ns"):
        start, end = info["stamp_range_ns"]
        lines.append(f"time         {start * 1e-9:.3f} .. {end * 1e-9:.3f} s "
                     f"({(end - start) * 1e-9:.1f} s)")
    if "disk_bytes" in info:
        lines.append(f"on disk      {info['disk_bytes'] / 1e6:.2f} MB")
    lines.append(f"updated      {info['updated']} (created {info['created']})")
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    from vpr_ros.mapdb.place_map import PlaceMap

    info = PlaceMap.load(args.map).info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(_format_info(info))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from vpr_ros.errors import InputError, MapError
    from vpr_ros.mapdb.place_map import PlaceMap

    if len(args.maps) < 2:
        raise InputError("merge needs at least two maps; got one (copy the directory instead)")
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MapError(f"{out} already exists; merge writes a new map: choose a new path")
    merged = PlaceMap.load(args.maps[0], mmap=False)
    for path in args.maps[1:]:
        other = PlaceMap.load(path)
        clash = sorted(set(other.sessions()) & set(merged.sessions()))
        if clash:
            print(f"note: session(s) {clash} of {path} also exist in the maps before it; "
                  "their keyframes are merged into the same session name", file=sys.stderr)
        merged.merge(other)
    merged.save(out)
    print(f"wrote {out}: {len(merged)} keyframes, sessions "
          f"{', '.join(merged.sessions())}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from vpr_ros.mapdb.place_map import PlaceMap
    from vpr_ros.mapdb.plot import plot_map

    path = plot_map(PlaceMap.load(args.map), args.output, title=args.title)
    print(f"wrote {path}")
    return 0
