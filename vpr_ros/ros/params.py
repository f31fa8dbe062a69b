"""Every tunable of ``vpr_node``, declared once: name, default, type, range, description.

The node's own settings live in :class:`NodeConfig`, built with the same ``param()`` machinery
as the decision configs, so one declaration gives validation (ConfigError naming the field and
its range), the ROS parameter declaration (``ParameterDescriptor`` with a
``FloatingPointRange`` / ``IntegerRange`` and a description) and the defaults written to
``config/*.yaml``. The decision layers' tunables are not restated here: they come from
``LoopClosureConfig.parameter_specs()``, ``RelocalizerConfig.parameter_specs()`` and
``SequenceConfig.parameter_specs()`` under the prefixes ``loop_closure.``, ``relocalization.``
and ``sequence.`` (sequence matching serves both modes).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from vpr_ros.errors import ConfigError
from vpr_ros.localization import LoopClosureConfig, ParamSpec, RelocalizerConfig, SequenceConfig
from vpr_ros.localization.params import (Tunables, param, renamed_specs, require, require_choices,
                                         validate)
from vpr_ros.localization.verification import ESTIMATORS, VerificationConfig

MODES = ("localization", "loop_closure")
TRANSPORTS = ("raw", "compressed")
RELIABILITIES = ("best_effort", "reliable")
POSE_TYPES = ("none", "odometry", "pose")
INDEX_KINDS = ("auto", "flat", "hnsw", "ivfpq", "binary")
CAMERA_MERGES = ("vote", "best")
_TOPIC = re.compile(r"^[~/]?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")

#: Allowed values of the string parameters (ROS ranges only exist for numbers).
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES, "image_transport": TRANSPORTS,
    "qos_reliability": RELIABILITIES, "pose_type": POSE_TYPES, "map_index": INDEX_KINDS,
    "cameras_merge": CAMERA_MERGES,
    "verification.estimator": ESTIMATORS,
    "verification.local_features": ("sift", "orb", "akaze"),
}

LOOP_PREFIX = "loop_closure."
RELOC_PREFIX = "relocalization."
RERANK_PREFIX = "rerank."
SEQUENCE_PREFIX = "sequence."
VERIFY_PREFIX = "verification."
CAMERA_PREFIX = "camera."

INT_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class NodeConfig(Tunables):
    """The node's own tunables (topics are fixed relative names; remap them at launch)."""

    autostart: bool = param(
        False, "configure and activate at start-up (for running without a lifecycle manager "
        "or ros2 launch); read once, when the process starts")
    mode: str = param(
        "localization", "localization: relocalize in a prebuilt map (~/relocalization); "
        "loop_closure: detect revisits in the live run, growing a live map (~/loop_closure)")
    model: str = param(
        "", "encoder to load at configure: model directory, .onnx file or TensorRT engine")
    backend: str = param(
        "auto", "inference backend: auto (on the CPU the fastest backend x precision measured "
        "on this host whose descriptors match fp32, cached per model and host; with a GPU the "
        "fastest GPU backend), or torch, onnxruntime, openvino, tensorrt, optionally with a "
        "precision: torch:bf16, onnxruntime:int8, openvino:bf16, openvino:fp16, ...")
    device: str = param("cpu", "encoder device: cpu, cuda or cuda:N; for openvino also its "
                        "device names (GPU, GPU.1, NPU)")
    threads: int = param(0, "encoder CPU threads (0: the backend's default)", 0, 256)
    blas_threads: int = param(
        1, "threads the map search's BLAS may use, process-wide (0: the library default). One "
        "is fastest for single-frame searches when the encoder and other nodes share the cores: "
        "a multi-threaded matrix-vector product can stall for tens of ms waiting for a "
        "descheduled thread", 0, 256)
    warmup: bool = param(
        True, "encode a blank frame and run one search at configure, so the first real frame "
        "does not pay for lazy initialisation")
    map: str = param(
        "", "map directory, loaded at configure with the model's fingerprint (localization: "
        "required; loop_closure: optional start map); ~/save_map writes here")
    map_index: str = param(
        "auto", "index of a new live map (loop_closure without a map file): auto (binary over "
        "the model's hash codes for a model with a hash head, else flat), flat, hnsw, ivfpq or "
        "binary")
    map_gpu_min_keyframes: int = param(
        20_000, "search a flat or binary map on a GPU once it holds this many keyframes, where a "
        "GPU build of faiss sees one (results stay those of the CPU search; a GPU error, e.g. "
        "GPU memory short, falls back to the CPU, reason in /diagnostics map_search); 0: never",
        0, INT_MAX)
    map_gpu_device: int = param(0, "GPU (faiss device number) of the map search", 0, 64)
    session: str = param(
        "", "session name of the live run's keyframes (loop_closure); empty: live-<UTC time>")
    image_transport: str = param(
        "raw", "message type on topic 'image': raw (sensor_msgs/Image) or compressed "
        "(sensor_msgs/CompressedImage)")
    qos_reliability: str = param(
        "best_effort", "camera and pose subscription reliability: best_effort (sensor data, "
        "matches every publisher) or reliable")
    qos_depth: int = param(
        5, "subscription queue depth; the encoder only ever takes the newest frame", 1, 1000)
    pose_type: str = param(
        "none", "pose input giving keyframe poses: none, odometry (nav_msgs/Odometry on "
        "'odometry') or pose (geometry_msgs/PoseStamped on 'pose')")
    pose_buffer_s: float = param(
        5.0, "pose history kept for looking up the pose at an image stamp (s)", 0.1, 600.0)
    pose_max_gap_s: float = param(
        0.5, "interpolate only between pose samples at most this far apart (s)", 0.001, 60.0)
    pose_tolerance_s: float = param(
        0.1, "outside or between too distant samples, use the nearest sample if it is this "
        "close to the image stamp (s)", 0.0, 10.0)
    map_frame: str = param(
        "map", "frame_id of ~/relocalization, ~/candidates and ~/markers (the map's frame)")
    top_k: int = param(5, "candidates searched, decided on and published per frame", 1, 100)
    max_pixels: int = param(
        50_000_000, "frames with more pixels are refused (corrupt header, wrong camera mode)",
        1, INT_MAX)
    time_jump_s: float = param(
        1.0, "a stamp this far behind the previous frame is a clock reset (bag restart, sim "
        "time): state restarts; a smaller step back is a late frame and is dropped (s)",
        0.0, 1.0e6)
    log_throttle_s: float = param(
        5.0, "each kind of per-frame error is logged at most once per this period (s)",
        0.0, 3600.0)
    diagnostics_period_s: float = param(
        1.0, "period of the /diagnostics status (s)", 0.05, 60.0)
    diagnostics_window: int = param(
        300, "latency percentiles cover the last N processed frames", 1, 1_000_000)
    publish_candidates: bool = param(True, "publish ~/candidates (top-K of every frame)")
    publish_markers: bool = param(True, "publish ~/markers (matches, closures, keyframes)")
    markers_max_keyframes: int = param(
        2000, "keyframe points drawn in ~/markers (evenly subsampled above this)", 0, INT_MAX)
    markers_keyframes_period_s: float = param(
        5.0, "how often the keyframe points marker is refreshed (s)", 0.1, 3600.0)
    cameras: str = param(
        "", "several cameras: their image topics, comma-separated (e.g. "
        "'/front/image_raw,/rear/image_raw'); each frame is searched on its own and the "
        "candidates merged (cameras_merge), outputs and /diagnostics name the camera. Empty: "
        "one camera on the topic 'image' (remap it)")
    cameras_merge: str = param(
        "vote", "merge of several cameras' candidates: vote (a place found by several cameras "
        "gains cameras_vote_bonus of evidence per further camera) or best (best evidence "
        "only)")
    cameras_vote_bonus: float = param(
        0.5, "evidence a place gains for each further camera that found it (standard "
        "deviations of the frame's similarity to the map, the unit of single-frame scores)",
        0.0, 100.0)
    cameras_place_radius_m: float = param(
        2.0, "two cameras' matches are the same place when their keyframes are this close",
        0.0, 1000.0)
    cameras_place_window_s: float = param(
        0.5, "without keyframe positions: same place when the keyframes are of one session and "
        "this close in time (the cameras of a mapping run fire together) (s)", 0.0, 3600.0)
    cameras_sync_s: float = param(
        0.05, "several cameras: after one camera's frame arrives, wait up to this long for the "
        "others, so frames of the same moment are decided on together (s)", 0.0, 10.0)
    bond_heartbeat_period_s: float = param(
        0.1, "heartbeat period of the bond with nav2_lifecycle_manager, formed at activate "
        "where ROS's bondpy is installed (Nav2's servers use 0.1 s); 0: no bond (then set "
        "the manager's bond_timeout to 0.0)", 0.0, 10.0)
    bond_heartbeat_timeout_s: float = param(
        4.0, "the bond counts as broken after this long without the manager's heartbeat "
        "(Nav2's servers use 4 s); vpr_node then reports an error and keeps running (s)",
        0.1, 600.0)
    bond_topic: str = param(
        "bond", "topic of the bond with nav2_lifecycle_manager (Nav2: 'bond'; the bond id "
        "is the node's name)")

    def __post_init__(self) -> None:
        validate(self)
        # a prefixed section's choice is checked by that section's own config
        require_choices(self, {k: v for k, v in CHOICES.items() if "." not in k})
        topics = self.camera_topics
        for topic in topics:
            require(bool(_TOPIC.match(topic)), f"parameter cameras: {topic!r} is not a valid "
                    "topic name")
        require(len(set(topics)) == len(topics), f"parameter cameras names a topic twice: "
                f"{self.cameras!r}")

    @property
    def camera_topics(self) -> list[str]:
        """The camera topics: the ``cameras`` list, or the one relative topic ``image``."""
        topics = [t.strip() for t in self.cameras.split(",") if t.strip()]
        return topics or ["image"]


@dataclass(frozen=True)
class RerankConfig(Tunables):
    """Second-stage re-ranking of the map search (``rerank.*`` parameters)."""

    local_top_k: int = param(
        5, "re-rank the global top N candidates by mutual nearest neighbours of local features "
        "when the map stores them (models with a local head, e.g. CQVPR); 0: off. Each "
        "candidate costs an (L x L x C) product (L local locations): about 10 ms for a "
        "25x25x128 grid on one CPU core, so N is a latency budget (the papers re-rank 100, "
        "offline)", 0, 1000)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class CameraConfig(Tunables):
    """The live camera's calibration, mount and depth (``camera.*`` parameters).

    The calibration comes from ``sensor_msgs/CameraInfo`` on the node-relative topic
    ``camera_info`` (remap it beside ``image``); the mount is given here because a robot's
    static transforms are not read by the node (no tf2 wheel): the same numbers as its
    ``base_link -> camera optical frame`` transform."""

    use_camera_info: bool = param(
        True, "subscribe to camera_info (sensor_msgs/CameraInfo): calibrated verification "
        "(essential matrix, PnP); a frame whose size differs from it is refused (counted)")
    use_depth: bool = param(
        False, "subscribe to depth (sensor_msgs/Image 16UC1 mm or 32FC1 m, registered to the "
        "camera): live keyframes of loop_closure mode get 3-D points (metric closures later)")
    depth_max_m: float = param(
        40.0, "depth readings farther than this give no 3-D point (m)", 0.1, 1000.0)
    sync_tolerance_s: float = param(
        0.05, "a depth image pairs with a frame when their stamps differ by at most this (s)",
        0.0, 10.0)
    name: str = param(
        "", "this camera's name in the map (keyframes' camera); empty: the image topic")
    mount_known: bool = param(
        False, "whether mount_* give the camera optical frame's pose in the robot base frame; "
        "false: the matched keyframe camera's mount is used (same robot and camera)")
    mount_x: float = param(0.0, "camera mount: x of the optical frame in base frame (m)",
                           -1000.0, 1000.0)
    mount_y: float = param(0.0, "camera mount: y (m)", -1000.0, 1000.0)
    mount_z: float = param(0.0, "camera mount: z (m)", -1000.0, 1000.0)
    mount_qx: float = param(-0.5, "camera mount: rotation quaternion x (optical frame: z "
                            "forward, x right, y down)", -1.0, 1.0)
    mount_qy: float = param(0.5, "camera mount: rotation quaternion y", -1.0, 1.0)
    mount_qz: float = param(-0.5, "camera mount: rotation quaternion z", -1.0, 1.0)
    mount_qw: float = param(0.5, "camera mount: rotation quaternion w", -1.0, 1.0)

    def __post_init__(self) -> None:
        validate(self)
        if self.mount_known:
            require(sum(v * v for v in (self.mount_qx, self.mount_qy, self.mount_qz,
                                        self.mount_qw)) > 1e-6,
                    "camera.mount_q* is a zero quaternion; give the mount's rotation")

    @property
    def mount(self) -> tuple[float, ...] | None:
        """(x, y, z, qx, qy, qz, qw) or None when not known."""
        if not self.mount_known:
            return None
        return (self.mount_x, self.mount_y, self.mount_z, self.mount_qx, self.mount_qy,
                self.mount_qz, self.mount_qw)


def all_parameter_specs() -> list[ParamSpec]:
    """Node, relocalization, loop-closure, sequence, re-rank, verification and camera tunables
    with their full (prefixed) names."""
    out = list(NodeConfig.parameter_specs())
    for prefix, cls in ((RELOC_PREFIX, RelocalizerConfig), (LOOP_PREFIX, LoopClosureConfig),
                        (SEQUENCE_PREFIX, SequenceConfig), (RERANK_PREFIX, RerankConfig),
                        (VERIFY_PREFIX, VerificationConfig), (CAMERA_PREFIX, CameraConfig)):
        out.extend(renamed_specs(cls, lambda name: prefix + name))
    return out


@dataclass(frozen=True)
class NodeSettings:
    """All five configs, read from the node's parameters at configure."""

    node: NodeConfig
    relocalizer: RelocalizerConfig
    loop_closure: LoopClosureConfig
    rerank: RerankConfig = RerankConfig()
    sequence: SequenceConfig = SequenceConfig()
    verification: VerificationConfig = VerificationConfig()
    camera: CameraConfig = CameraConfig()


def settings_from_values(values: Mapping[str, Any]) -> NodeSettings:
    """Split flat, prefixed parameter values into validated configs (ConfigError on bad ones)."""
    node: dict[str, Any] = {}
    reloc: dict[str, Any] = {}
    loop: dict[str, Any] = {}
    rerank: dict[str, Any] = {}
    sequence: dict[str, Any] = {}
    verify: dict[str, Any] = {}
    camera: dict[str, Any] = {}
    for name, value in values.items():
        if name.startswith(VERIFY_PREFIX):
            verify[name[len(VERIFY_PREFIX):]] = value
        elif name.startswith(CAMERA_PREFIX):
            camera[name[len(CAMERA_PREFIX):]] = value
        elif name.startswith(RELOC_PREFIX):
            reloc[name[len(RELOC_PREFIX):]] = value
        elif name.startswith(RERANK_PREFIX):
            rerank[name[len(RERANK_PREFIX):]] = value
        elif name.startswith(SEQUENCE_PREFIX):
            sequence[name[len(SEQUENCE_PREFIX):]] = value
        elif name.startswith(LOOP_PREFIX):
            loop[name[len(LOOP_PREFIX):]] = value
        else:
            node[name] = value
    return NodeSettings(NodeConfig.from_mapping(node), RelocalizerConfig.from_mapping(reloc),
                        LoopClosureConfig.from_mapping(loop), RerankConfig.from_mapping(rerank),
                        SequenceConfig.from_mapping(sequence),
                        VerificationConfig.from_mapping(verify),
                        CameraConfig.from_mapping(camera))


#: Parameters every rclpy node has (or takes from a params file) besides its own.
ROS_BUILTIN_PARAMETERS = ("use_sim_time", "start_type_description_service")


def expected_text(spec: ParamSpec, choices: Mapping[str, tuple[str, ...]] | None = None
                  ) -> str:
    """What a parameter accepts, for error messages: type, range or choices (``choices``:
    default vpr_node's)."""
    choices = CHOICES if choices is None else choices
    kind = {bool: "true or false", int: "an integer", float: "a floating-point number",
            str: "a string"}.get(spec.type, spec.type.__name__)
    if spec.name in choices:
        return f"one of {', '.join(choices[spec.name])}"
    if spec.low is not None or spec.high is not None:
        low = "-inf" if spec.low is None else spec.low
        high = "inf" if spec.high is None else spec.high
        return f"{kind} in [{low}, {high}]"
    return kind


def check_value(spec: ParamSpec, value: Any) -> str | None:
    """Why ``value`` is not acceptable for ``spec`` (type, range, choices), or None. rclpy
    checks types and ranges of declared parameters itself; this adds the string choices, so
    ``ros2 param set`` of an unknown mode is refused when it is made, not at configure."""
    allowed = CHOICES.get(spec.name)
    if allowed is not None and value not in allowed:
        return f"parameter {spec.name} = {value!r} must be {expected_text(spec)}"
    return None


def unknown_parameters(given: Any, specs: list[ParamSpec]) -> list[str]:
    """Names among ``given`` (parameter names a params file or ``-p`` set for this node) that
    the node does not declare, with the declared name each is closest to, if any."""
    import difflib

    declared = {s.name for s in specs}
    out = []
    for name in sorted(set(given) - declared):
        if name in ROS_BUILTIN_PARAMETERS or name.startswith("qos_overrides."):
            continue
        close = difflib.get_close_matches(name, sorted(declared), n=1, cutoff=0.75)
        out.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return out


def declare_specs(node: Any, specs: list[ParamSpec],
                  choices: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Declare every spec on ``node``. A value given at start (params file, ``-p``) that does
    not fit its declaration is a ConfigError naming the parameter and what it accepts: rclpy's
    own exception would end the process in a traceback. An integer given for a floating-point
    parameter (``-p x:=0``) gets the spelling that works: ROS does not convert it."""
    from rclpy.exceptions import ParameterException

    overrides = getattr(node, "_parameter_overrides", {})
    for spec in specs:
        try:
            node.declare_parameter(spec.name, spec.default, descriptor_for(spec, choices))
        except ParameterException as exc:
            given = getattr(overrides.get(spec.name), "value", None)
            hint = ""
            if spec.type is float and isinstance(given, int) and not isinstance(given, bool):
                hint = (f"; write {float(given)!r}: ROS does not convert an integer to a "
                        "floating-point parameter")
            raise ConfigError(f"parameter {spec.name} = {given!r} is invalid: expected "
                              f"{expected_text(spec, choices)} "
                              f"({spec.description.split(';')[0]}){hint}") from exc


def descriptor_for(spec: ParamSpec, choices: Mapping[str, tuple[str, ...]] | None = None
                   ) -> Any:
    """The ``rcl_interfaces/ParameterDescriptor`` of a spec: type, description, range
    (``choices``: allowed values of string parameters; default: vpr_node's)."""
    from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                    ParameterType)

    desc = ParameterDescriptor(name=spec.name, description=spec.description)
    if spec.type is bool:
        desc.type = ParameterType.PARAMETER_BOOL
    elif spec.type is int:
        desc.type = ParameterType.PARAMETER_INTEGER
        low = int(spec.low) if spec.low is not None else -INT_MAX - 1
        high = int(spec.high) if spec.high is not None else INT_MAX
        desc.integer_range = [IntegerRange(from_value=low, to_value=high, step=1)]
    elif spec.type is float:
        desc.type = ParameterType.PARAMETER_DOUBLE
        low_f = float(spec.low) if spec.low is not None else -sys.float_info.max
        high_f = float(spec.high) if spec.high is not None else sys.float_info.max
        desc.floating_point_range = [FloatingPointRange(from_value=low_f, to_value=high_f,
                                                        step=0.0)]
    elif spec.type is str:
        desc.type = ParameterType.PARAMETER_STRING
        allowed = (CHOICES if choices is None else choices).get(spec.name)
        if allowed:
            desc.additional_constraints = "one of: " + ", ".join(allowed)
    else:
        raise TypeError(f"parameter {spec.name} has unsupported type {spec.type.__name__}")
    return desc
