"""``vpr_node``: the rclpy lifecycle node that recognises places in a live camera stream.

Lifecycle, because loading a model and a map takes seconds and may fail: *configure* does that
slow work once (and fails cleanly, with the reason in the log and in ``/diagnostics``, on a
missing file or a model/map mismatch); *activate* subscribes; *deactivate* unsubscribes and
keeps the model loaded so re-activation is instant; *cleanup* releases everything.

Threads: the executor thread runs subscription callbacks (which only stamp-check a message and
drop it in a one-slot :class:`~vpr_ros.ros.mailbox.Mailbox`), services, timers and lifecycle
transitions; one encoder thread takes the newest frame, decodes, encodes, searches, decides and
publishes. A camera faster than the encoder therefore costs dropped (counted) frames, never
growing latency. Every per-frame failure is caught, counted by kind, logged throttled, and the
node carries on with the next frame.

Topics (relative names, remap at launch): subscribes ``image`` (Image or CompressedImage),
``odometry`` (nav_msgs/Odometry) or ``pose`` (geometry_msgs/PoseStamped); publishes
``~/relocalization``, ``~/loop_closure``, ``~/candidates``, ``~/markers`` and ``/diagnostics``;
serves ``~/save_map``, ``~/relocalize`` and ``~/reset_session`` (std_srvs/Trigger).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from vpr_ros.errors import ConfigError, MapError, VPRError
from vpr_ros.mapdb.camera import CameraModel, sibling_topic
from vpr_ros.mapdb.model_outputs import ModelOutputs, index_spec_for
from vpr_ros.ros import conversions as conv
from vpr_ros.ros import messages
from vpr_ros.ros.camera_cdr import CameraMessageReader
from vpr_ros.ros.diagnostics import (FrameTiming, LogThrottle, NodeIdentity, NodeStats, RateMeter,
                                     Stopwatch, diagnostic_array)
from vpr_ros.ros.mailbox import Doorbell, Mailbox
from vpr_ros.ros.nav2_bond import ManagerBond
from vpr_ros.ros.params import (NodeConfig, NodeSettings, all_parameter_specs, check_value,
                                declare_specs, settings_from_values, unknown_parameters)
from vpr_ros.ros.pipeline import (LOCALIZATION, FrameOutcome, Pipeline, default_session_name,
                                  describe_sequence, limit_blas_threads)
from vpr_ros.ros.pose_buffer import PoseBuffer
from vpr_ros.runtime import area_resize

NODE_NAME = "vpr_node"
#: Header stamps further than this from the receive wall time are not wall-clock stamps (a
#: replayed bag, sim time): the transport latency is then reported as NaN.
_TRANSPORT_PLAUSIBLE_S = 60.0
#: How many accepted loop closures ~/markers keeps drawing.
_MAX_CLOSURE_SEGMENTS = 500


@dataclass
class _Pending:
    """A received camera message waiting for the encoder thread."""

    msg: Any
    stamp_ns: int
    received: float  # perf_counter seconds
    received_wall_ns: int
    camera: int = 0  # index into the node's cameras


@dataclass
class _Camera:
    """One camera's intake: its topic, mailbox, message reader, stamp checks and counters."""

    index: int
    topic: str  # as configured ('image' for the single remappable camera)
    mailbox: Mailbox[_Pending]
    reader: Optional[CameraMessageReader] = None
    last_stamp_ns: Optional[int] = None
    jump_pending: bool = False
    received: int = 0
    processed: int = 0
    dropped: int = 0
    errors: int = 0
    found: int = 0  # decisions (relocalizations, closures) whose match this camera found
    silent_said: bool = False
    #: Its name in the map (keyframes' camera), latest valid calibration (camera_info) and
    #: last few depth images (decoded only when their frame becomes a live keyframe).
    name: str = ""
    model: Optional[CameraModel] = None
    depth: deque = field(default_factory=lambda: deque(maxlen=8))


class VprNode(LifecycleNode):
    """See the module docstring; parameters are listed by :func:`all_parameter_specs`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._specs = all_parameter_specs()
        self._declare_parameters()
        self.stats = NodeStats()
        self.identity = NodeIdentity()
        self._throttle = LogThrottle(5.0)
        self._doorbell = Doorbell()
        self._cameras: list[_Camera] = [_Camera(0, "image", Mailbox())]
        self._last_group_stamp_ns: Optional[int] = None
        self._settings: Optional[NodeSettings] = None
        self.pipeline: Optional[Pipeline] = None
        self._poses: Optional[PoseBuffer] = None
        self._session_base = ""
        self._session_count = 0
        self._state_lock = threading.Lock()
        self._worker: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._input_subs: list[Any] = []
        self._info_subs: list[Any] = []  # camera_info and depth of each camera
        self._pubs: dict[str, Any] = {}
        self._closure_segments: list[tuple[tuple[float, ...], tuple[float, ...]]] = []
        self._keyframes_timer: Any = None
        self._in_rate, self._out_rate = RateMeter(), RateMeter()
        self._blas_note = ""
        self._bond = ManagerBond(self, self._bond_log)

        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(
            float(self.get_parameter("diagnostics_period_s").value), self._publish_diagnostics)
        self.create_service(Trigger, "~/save_map", self._srv_save_map)
        self.create_service(Trigger, "~/relocalize", self._srv_relocalize)
        self.create_service(Trigger, "~/reset_session", self._srv_reset_session)

    # ----------------------------------------------------------------------------- parameters

    def _declare_parameters(self) -> None:
        """Declare every tunable; a value given at start (params file, ``-p``) that does not fit
        its declaration is a ConfigError naming the parameter and what it accepts (rclpy's
        own exception would end the process in a traceback). Names given for this node that it
        does not declare are warned about (rclpy ignores them silently: a misspelt name leaves
        the default in force). Then the values are validated together as configure will."""
        declare_specs(self, self._specs)
        unknown = unknown_parameters(getattr(self, "_parameter_overrides", {}), self._specs)
        if unknown:
            self.get_logger().warning(
                f"ignoring unknown parameter(s) for {self.get_name()}: {', '.join(unknown)}; "
                "check their spelling in the params file or -p arguments")
        settings_from_values(self._parameter_values())  # ConfigError: a bad choice or rule
        self.add_on_set_parameters_callback(self._check_parameter_update)

    def _check_parameter_update(self, params: list[Any]) -> Any:
        """Refuse a ``ros2 param set`` of a value its declaration does not allow (choices)."""
        from rcl_interfaces.msg import SetParametersResult

        by_name = {s.name: s for s in self._specs}
        for p in params:
            spec = by_name.get(p.name)
            reason = check_value(spec, p.value) if spec is not None else None
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------------------ lifecycle

    def _parameter_values(self) -> dict[str, Any]:
        return {s.name: self.get_parameter(s.name).value for s in self._specs}

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load model and map; any failure is logged with its reason and returns FAILURE."""
        self.identity.problem = ""
        try:
            settings = settings_from_values(self._parameter_values())
            pipeline = self._load(settings)
        except VPRError as exc:
            return self._configure_failed(str(exc))
        except Exception as exc:  # a bug, not a user error: keep the traceback
            return self._configure_failed(f"unexpected {type(exc).__name__}: {exc}\n"
                                          + traceback.format_exc())
        cfg = settings.node
        self._settings, self.pipeline = settings, pipeline
        self._throttle = LogThrottle(cfg.log_throttle_s)
        # Counters describe this configuration (model, map, camera): they restart with it.
        self.stats = NodeStats(window=cfg.diagnostics_window)
        self._in_rate, self._out_rate = RateMeter(), RateMeter()
        self._poses = PoseBuffer(cfg.pose_buffer_s, cfg.pose_max_gap_s, cfg.pose_tolerance_s,
                                 cfg.time_jump_s) if cfg.pose_type != "none" else None
        self._session_base, self._session_count = pipeline.session, 0
        self._reset_diagnostics_timer(cfg.diagnostics_period_s)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self._pubs = {
            "relocalization": self.create_lifecycle_publisher(
                PoseWithCovarianceStamped, "~/relocalization", reliable),
            "loop_closure": self.create_lifecycle_publisher(
                Float64MultiArray, "~/loop_closure", reliable),
            "candidates": self.create_lifecycle_publisher(PointCloud2, "~/candidates", reliable),
            "markers": self.create_lifecycle_publisher(MarkerArray, "~/markers", reliable),
            "relocalization_status": self.create_lifecycle_publisher(
                Float64MultiArray, "~/relocalization_status", reliable),
            "verification": self.create_lifecycle_publisher(
                Float64MultiArray, "~/verification", reliable),
        }
        self._keyframes_timer = self.create_timer(cfg.markers_keyframes_period_s,
                                                  self._publish_keyframes)
        enc, pmap = pipeline.encoder, pipeline.map
        self.identity = NodeIdentity(
            lifecycle_state="inactive", mode=cfg.mode, backend=enc.backend,
            backend_choice=getattr(enc, "backend_choice", ""),
            backend_note=getattr(enc, "backend_note", ""), fingerprint=enc.fingerprint,
            map_path=cfg.map, map_size=len(pmap), map_search=pmap.search_device,
            session=pipeline.session if cfg.mode != LOCALIZATION else "")
        self.get_logger().info(
            f"configured: mode {cfg.mode}, encoder {enc.backend} "
            f"{('(' + enc.backend_note + ') ') if getattr(enc, 'backend_note', '') else ''}"
            f"(fingerprint "
            f"{enc.fingerprint}, {enc.dim}-D, input {enc.input_size}), map "
            f"{cfg.map or '(new live map)'} with {len(pmap)} keyframes (index {pmap.index_kind}"
            f"{' over the model hash codes' if pmap.model_codes else ''}; local re-rank of the "
            f"top {pipeline.rerank_top_n if pipeline.rerank_top_n else 'none'}; search on "
            f"{pmap.search_device}); {self._blas_note}; {describe_sequence(settings)}")
        for note in pipeline.notes:
            self.get_logger().warning(f"sequence matching: {note}")
        stage = pipeline.verification
        if stage is None:
            self.get_logger().warning("geometric verification is off (verification.enabled "
                                      "false): closures and relocalizations are unverified")
        else:
            self.get_logger().info(
                f"geometric verification: {pmap.keypoint_kind} keypoints, estimator "
                f"{stage.config.estimator}, up to {stage.config.max_candidates} candidates in "
                f"{stage.config.time_budget_ms:g} ms per frame; map "
                f"{'with' if pmap.has_keypoint_points else 'without'} 3-D points "
                f"({'PnP' if pmap.has_keypoint_points else 'essential matrix'}); camera "
                f"'{pipeline.camera_name}'")
        return TransitionCallbackReturn.SUCCESS

    def _configure_failed(self, reason: str) -> TransitionCallbackReturn:
        self.get_logger().error(f"configure failed: {reason}")
        self.identity = NodeIdentity(lifecycle_state="unconfigured",
                                     problem=f"configure failed: {reason.splitlines()[0]}")
        return TransitionCallbackReturn.FAILURE

    def _load(self, settings: NodeSettings) -> Pipeline:
        from vpr_ros.runtime.encoder import load_encoder

        cfg = settings.node
        if not cfg.model:
            raise ConfigError("parameter 'model' is empty; set it to a model directory (vpr "
                              "model init), an .onnx file or a TensorRT engine")
        if not Path(cfg.model).exists():
            raise ConfigError(f"model {cfg.model} does not exist; check the parameter 'model' "
                              "(a model directory, .onnx file or TensorRT engine)")
        self._blas_note = limit_blas_threads(cfg.blas_threads)
        options: dict[str, Any] = {"threads": cfg.threads} if cfg.threads else {}
        encoder = load_encoder(cfg.model, backend=cfg.backend, device=cfg.device, **options)
        outputs = ModelOutputs.probe(encoder)
        place_map = self._open_map(
            cfg, encoder, outputs,
            settings.verification.local_features if settings.verification.enabled else None)
        place_map.use_gpu(cfg.map_gpu_min_keyframes, cfg.map_gpu_device)
        session = cfg.session or default_session_name()
        if cfg.mode != LOCALIZATION and session in place_map.sessions():
            raise MapError(f"session '{session}' already exists in the map {cfg.map}; set the "
                           "parameter 'session' to a new name (or leave it empty for a dated "
                           "one)")
        pipeline = Pipeline(encoder, place_map, settings, session, outputs)
        if not pipeline.camera_name:
            pipeline.camera_name = self.resolve_topic_name("image")
        if place_map.local_grid is not None and outputs.local_grid is None:
            self.get_logger().warning(
                f"the map stores local features but the model {cfg.model} has no 'local' "
                "output: no re-ranking (use the model directory or an export with the local "
                "head)")
        if cfg.warmup:
            area_resize.warm_up()  # the camera-frame shrink kernels: compiled or loaded now
            h, w = encoder.input_size
            blank = np.zeros((int(h), int(w), 3), dtype=np.uint8)
            pipeline.search(pipeline.encode(blank, FrameTiming(0)))
            if pipeline.verification is not None:  # the detector objects are made lazily
                pipeline.verification.extractor.extract(np.zeros((64, 64), np.uint8))
        return pipeline

    @staticmethod
    def _open_map(cfg: NodeConfig, encoder: Any, outputs: ModelOutputs,
                  keypoints: Optional[str] = None) -> Any:
        """The prebuilt map (checked against the model: fingerprint, dim, hash codes, local
        grid) or a new live map laid out for the model (``map_index``; local features when
        the model has a local head)."""
        from vpr_ros.mapdb import PlaceMap

        path = Path(cfg.map) if cfg.map else None
        if cfg.mode == LOCALIZATION:
            if path is None:
                raise ConfigError("localization mode needs a map: set the parameter 'map' to a "
                                  "map directory built with `vpr map build`")
            if not path.exists():
                where = "" if path.is_absolute() else \
                    f" (looked at {path.absolute()}: a relative path is taken from the node's " \
                    "working directory; give launch files an absolute one)"
                raise MapError(f"map {path} does not exist{where}; build it with `vpr map build "
                               "BAG --image-topic T --pose-topic P --model MODEL -o MAP` or fix "
                               "the parameter 'map'")
            place_map = PlaceMap.load(path, expected_fingerprint=encoder.fingerprint)
        elif path is not None and path.exists():
            place_map = PlaceMap.load(path, expected_fingerprint=encoder.fingerprint, mmap=False)
        else:
            return PlaceMap.create(encoder.dim, encoder.fingerprint,
                                   index=index_spec_for(cfg.map_index, outputs),
                                   local_grid=outputs.local_grid, keypoints=keypoints)
        place_map.check_compatible(encoder.fingerprint, encoder.dim)
        place_map.check_outputs(outputs, need_local=cfg.mode != LOCALIZATION)
        return place_map

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe and start the encoder thread."""
        assert self._settings is not None
        cfg = self._settings.node
        qos = QoSProfile(
            depth=cfg.qos_depth, history=HistoryPolicy.KEEP_LAST,
            durability=DurabilityPolicy.VOLATILE,
            reliability=ReliabilityPolicy.RELIABLE if cfg.qos_reliability == "reliable"
            else ReliabilityPolicy.BEST_EFFORT)
        image_type = CompressedImage if cfg.image_transport == "compressed" else Image
        topics = cfg.camera_topics
        self._doorbell = Doorbell()
        # Serialized camera messages: see vpr_ros/ros/camera_cdr.py for why.
        self._cameras = [_Camera(i, topic, Mailbox(self._doorbell if len(topics) > 1 else None),
                                 CameraMessageReader(cfg.image_transport == "compressed"))
                         for i, topic in enumerate(topics)]
        self._last_group_stamp_ns = None
        self._stop.clear()
        self._worker = threading.Thread(target=self._worker_loop, name="vpr_encoder",
                                        daemon=True)
        self._worker.start()
        self._input_subs = [
            self.create_subscription(image_type, cam.topic,
                                     lambda raw, cam=cam: self._on_image(raw, cam), qos, raw=True)
            for cam in self._cameras]
        extra = self._settings.camera
        single = len(self._cameras) == 1
        for cam in self._cameras:
            # one camera: the remappable relative topics camera_info and depth; several: the
            # siblings of each image topic (/ns/image_raw -> /ns/camera_info, /ns/depth)
            cam.name = self.pipeline.camera_name if single and self.pipeline else cam.topic
            if extra.use_camera_info:
                self._info_subs.append(self.create_subscription(
                    CameraInfo, "camera_info" if single else sibling_topic(cam.topic),
                    lambda m, cam=cam: self._on_camera_info(m, cam), qos))
            if extra.use_depth:
                self._info_subs.append(self.create_subscription(
                    Image, "depth" if single else sibling_topic(cam.topic, "depth"),
                    lambda m, cam=cam: cam.depth.append((conv.stamp_to_ns(m.header.stamp), m)),
                    qos))
        if cfg.pose_type == "odometry":
            self._input_subs.append(self.create_subscription(
                Odometry, "odometry", lambda m: self._on_pose(m, conv.odometry_to_pose), qos))
        elif cfg.pose_type == "pose":
            self._input_subs.append(self.create_subscription(
                PoseStamped, "pose", lambda m: self._on_pose(m, conv.pose_stamped_to_pose), qos))
        self.identity.lifecycle_state = "active"
        cams = self._input_subs[:len(self._cameras)]
        self.identity.cameras = ",".join(sub.topic_name for sub in cams)
        self.get_logger().info(
            f"active: subscribed to {', '.join(sub.topic_name for sub in cams)} "
            f"({image_type.__name__}, {cfg.qos_reliability})"
            + (f"; {len(cams)} cameras merged by {cfg.cameras_merge}" if len(cams) > 1 else ""))
        # Last: nav2_lifecycle_manager waits for the bond right after this transition.
        self._bond.start(cfg.bond_topic, cfg.bond_heartbeat_period_s,
                         cfg.bond_heartbeat_timeout_s)
        self.identity.bond = self._bond.state
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Unsubscribe and stop the encoder thread; model and map stay loaded."""
        self._stop_bond()
        self._drop_subscriptions()
        self._stop_worker()
        self.identity.lifecycle_state = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release model, map, publishers: back to unconfigured."""
        self._stop_bond()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_bond()
        self._drop_subscriptions()
        self._stop_worker()
        self._release()
        self.identity.lifecycle_state = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error("error in a lifecycle transition; releasing everything")
        self._stop_bond()
        self._drop_subscriptions()
        self._stop_worker()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_bond(self) -> None:
        self._bond.stop()
        self.identity.bond = self._bond.state

    def _bond_log(self, level: str, message: str) -> None:
        """The bond's reports: logged, and its state shown in /diagnostics."""
        self.identity.bond = self._bond.state
        getattr(self.get_logger(), level)(message)

    def _drop_subscriptions(self) -> None:
        for sub in self._input_subs + self._info_subs:
            self.destroy_subscription(sub)
        self._input_subs, self._info_subs = [], []

    def _stop_worker(self) -> None:
        self._stop.set()
        for cam in self._cameras:
            cam.mailbox.close()
        self._doorbell.ring()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            self._worker = None
        for cam in self._cameras:
            self._drop(cam, cam.mailbox.clear())  # frames left waiting: never processed

    def _release(self) -> None:
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._pubs = {}
        if self._keyframes_timer is not None:
            self.destroy_timer(self._keyframes_timer)
            self._keyframes_timer = None
        self.pipeline = None
        self._settings = None
        self._poses = None
        self._closure_segments = []
        self.identity = NodeIdentity(lifecycle_state="unconfigured")

    def _reset_diagnostics_timer(self, period_s: float) -> None:
        if abs(self._diag_timer.timer_period_ns - period_s * 1e9) > 1:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = self.create_timer(period_s, self._publish_diagnostics)

    @property
    def pending_frames(self) -> int:
        """Frames waiting for the encoder thread: 0 or 1 per camera, by construction (the
        mailboxes)."""
        return sum(cam.mailbox.pending for cam in self._cameras)

    def shutdown_worker(self) -> None:
        """Stop the encoder thread (process exit without a lifecycle shutdown)."""
        self._drop_subscriptions()
        self._stop_worker()

    # -------------------------------------------------------------------------------- inputs

    def _on_image(self, raw: bytes, cam: _Camera) -> None:
        """Executor thread: read the serialized message (pixels stay a view of ``raw``), stamp
        and header checks, then into the camera's mailbox. Nothing slow (no pixel work) happens
        here.

        Every received frame ends in exactly one of processed, dropped or errors (so
        ``received = processed + dropped + errors`` once nothing is in flight): a frame that
        arrives while the node cannot take it is dropped, and an unexpected exception here is
        counted as an internal error instead of ending the executor."""
        self.stats.count("received")
        cam.received += 1
        try:
            self._take_image(raw, cam)
        except Exception as exc:  # a bug, not a bad frame: keep the node and the traceback
            self._frame_error(conv.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}\n"
                              + traceback.format_exc(), cam)

    def _take_image(self, raw: bytes, cam: _Camera) -> None:
        received, received_wall = time.perf_counter(), time.time_ns()
        settings, reader = self._settings, cam.reader
        if settings is None or reader is None:  # a delivery racing a transition
            self._drop(cam)
            return
        fallbacks = reader.fallbacks
        try:
            msg = reader.read(raw)
        except conv.FrameError as exc:
            self._frame_error(exc.kind, str(exc), cam)
            return
        if fallbacks == 0 and reader.fallbacks == 1:  # said once per activation
            self.get_logger().info("camera messages are not plain CDR; reading them with "
                                   "rclpy's deserializer (slower, same result)")
        stamp = conv.stamp_to_ns(msg.header.stamp)
        kind = conv.classify_stamp(stamp, cam.last_stamp_ns,
                                   int(settings.node.time_jump_s * conv.NS_PER_S))
        if kind == conv.STAMP_BACKWARDS:
            assert cam.last_stamp_ns is not None
            self._frame_error(kind, f"frame stamp {stamp * 1e-9:.6f} s is not after the "
                              f"previous frame's {cam.last_stamp_ns * 1e-9:.6f} s (late, "
                              "reordered or repeated frame); dropped", cam)
            return
        if kind == conv.TIME_JUMP:
            # Not an error of this frame (it is processed): an event, counted on its own.
            assert cam.last_stamp_ns is not None
            self.stats.count("time_jumps")
            self._log_throttled(kind, "warning", f"frame stamp jumped back from "
                                f"{cam.last_stamp_ns * 1e-9:.3f} s to {stamp * 1e-9:.3f} s: a "
                                "clock reset (bag restarted, sim time); restarting "
                                "relocalization agreement and the pose history")
            cam.jump_pending = True
        cam.last_stamp_ns = stamp
        try:
            conv.check_frame(msg, settings.node.image_transport == "compressed",
                             settings.node.max_pixels)
        except conv.FrameError as exc:
            self._frame_error(exc.kind, str(exc), cam)
            return
        if cam.mailbox.put(_Pending(msg, stamp, received, received_wall, cam.index)) \
                is not None:
            self._drop(cam)

    def _drop(self, cam: _Camera, n: int = 1) -> None:
        """Count ``n`` frames of ``cam`` that will never be processed (replaced in the mailbox,
        too late, or left behind by a transition)."""
        if n:
            self.stats.count("dropped", n)
            cam.dropped += n

    def _on_camera_info(self, msg: Any, cam: _Camera) -> None:
        """Executor thread: keep the camera's latest valid calibration; an invalid one (zeros,
        NaN, an unknown distortion model) is counted and the previous one kept."""
        settings = self._settings
        if settings is None:
            return
        try:
            model = CameraModel.from_camera_info(msg, cam.name or cam.topic,
                                                 settings.camera.mount)
        except VPRError as exc:
            self._frame_error(conv.CAMERA_INFO_INVALID, f"camera_info of {cam.topic} refused: "
                              f"{exc}")
            return
        if model != cam.model:
            if cam.model is not None:
                self.get_logger().warning(
                    f"camera_info of {cam.topic} changed: {cam.model.width}x{cam.model.height} "
                    f"fx={cam.model.k[0]:.2f} -> {model.width}x{model.height} "
                    f"fx={model.k[0]:.2f}")
            cam.model = model

    def _depth_for(self, cam: _Camera, stamp_ns: int, shape: tuple[int, ...]
                   ) -> Optional[np.ndarray]:
        """The camera's registered depth image (metres) nearest to a frame's stamp, or None
        (no depth within the tolerance; one of the wrong encoding or size is counted)."""
        settings = self._settings
        if settings is None or not settings.camera.use_depth or not cam.depth:
            return None
        from vpr_ros.runtime.image_codec import decode_depth

        tol = int(settings.camera.sync_tolerance_s * conv.NS_PER_S)
        stamp, msg = min(list(cam.depth), key=lambda d: abs(d[0] - stamp_ns))
        if abs(stamp - stamp_ns) > tol:
            return None
        try:
            depth = decode_depth(msg.height, msg.width, msg.encoding, msg.step, msg.data,
                                 msg.is_bigendian, settings.node.max_pixels)
        except VPRError as exc:
            self._frame_error(conv.DEPTH_INVALID, f"depth of {cam.topic} refused: {exc}")
            return None
        if depth.shape != tuple(shape[:2]):
            self._frame_error(conv.DEPTH_INVALID, f"depth image is {depth.shape[1]}x"
                              f"{depth.shape[0]} but the camera image is {shape[1]}x{shape[0]};"
                              " depth must be registered to the camera (no 3-D points)")
            return None
        return depth

    def _on_pose(self, msg: Any, convert: Any) -> None:
        if self._poses is None:
            return
        try:
            sample = convert(msg)
        except conv.FrameError as exc:
            self._frame_error(exc.kind, str(exc))
            return
        if not self._poses.add(sample):
            self.get_logger().warning("pose stamps jumped back (clock reset): pose history "
                                      "cleared")

    # ------------------------------------------------------------------------ encoder thread

    def _worker_loop(self) -> None:
        rings = 0
        while not self._stop.is_set():
            if len(self._cameras) == 1:
                item = self._cameras[0].mailbox.get(timeout=0.25)
                group = [item] if item is not None else []
            else:
                group, rings = self._next_group(rings)
            if self._stop.is_set():  # a transition stops the thread: the frames are not used
                for item in group:
                    self._drop(self._cameras[item.camera])
                continue
            if not group:
                continue
            try:
                self._process(group)
            except conv.FrameError as exc:
                self._frame_error(exc.kind, str(exc), *self._cameras_of(group))
            except Exception as exc:  # never let one frame kill the thread
                self._frame_error(conv.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}\n"
                                  + traceback.format_exc(), *self._cameras_of(group))

    def _cameras_of(self, group: list[_Pending]) -> list[_Camera]:
        return [self._cameras[item.camera] for item in group]

    def _next_group(self, rings: int) -> tuple[list[_Pending], int]:
        """Several cameras: wait for a frame from any camera, give the others
        ``cameras_sync_s`` to deliver theirs, then take the newest frame of each. A frame older
        than the last decision's stamp arrived too late to be decided on and is dropped."""
        rings = self._doorbell.wait(rings, 0.25)
        if not any(cam.mailbox.pending for cam in self._cameras):
            return [], rings
        settings = self._settings
        sync_s = settings.node.cameras_sync_s if settings is not None else 0.0
        deadline = time.perf_counter() + sync_s
        while time.perf_counter() < deadline and not self._stop.is_set() and \
                not all(cam.mailbox.pending for cam in self._cameras):
            rings = self._doorbell.wait(rings, max(0.0, deadline - time.perf_counter()))
        group = []
        for cam in self._cameras:
            item = cam.mailbox.get(timeout=0)
            if item is None:
                continue
            if self._last_group_stamp_ns is not None and item.stamp_ns < \
                    self._last_group_stamp_ns:
                self._drop(cam)
                continue
            group.append(item)
        return group, rings

    def _process(self, group: list[_Pending]) -> None:
        pipeline, settings = self.pipeline, self._settings
        if pipeline is None or settings is None:  # released while the frame waited
            for item in group:
                self._drop(self._cameras[item.camera])
            return
        cfg = settings.node
        first = min(group, key=lambda item: item.received)
        stamp = max(item.stamp_ns for item in group)
        timing = FrameTiming(stamp)
        watch = Stopwatch(timing)
        timing.wait = time.perf_counter() - first.received
        transport = (first.received_wall_ns - first.stamp_ns) / conv.NS_PER_S
        if abs(transport) < _TRANSPORT_PLAUSIBLE_S:
            timing.transport = transport
        jumped = [self._cameras[item.camera] for item in group
                  if self._cameras[item.camera].jump_pending]
        if jumped:
            for cam in jumped:
                cam.jump_pending = False
            pipeline.time_jump()
            self._last_group_stamp_ns = None
            if self._poses is not None:
                self._poses.clear()
        # No copy of a raw rgb8 frame: item.msg outlives every use of it, and nothing writes
        # into a camera frame.
        rgbs = [conv.frame_to_rgb(item.msg, cfg.image_transport == "compressed",
                                  cfg.max_pixels, copy=False) for item in group]
        kept = []
        for item, rgb in zip(group, rgbs):
            model = self._cameras[item.camera].model
            if model is not None and rgb.shape[:2] != (model.height, model.width):
                self._frame_error(conv.CAMERA_INFO_MISMATCH, (
                    f"frame of {self._cameras[item.camera].topic} is {rgb.shape[1]}x"
                    f"{rgb.shape[0]} but its camera_info says {model.width}x{model.height}: "
                    "the calibration does not belong to these images (resized stream, wrong "
                    "camera_info remap); frame refused"), self._cameras[item.camera])
                continue
            kept.append((item, rgb))
        if not kept:
            return
        group, rgbs = [k[0] for k in kept], [k[1] for k in kept]
        watch.lap("conversion")
        queries = []
        for item, rgb in zip(group, rgbs):
            cam = self._cameras[item.camera]
            one = FrameTiming(item.stamp_ns) if len(group) > 1 else timing
            try:
                query = pipeline.encode(rgb, one)
            except VPRError as exc:
                raise conv.FrameError(conv.ENCODER_ERROR, f"encoding failed: {exc}") from exc
            query.camera = cam.model
            if pipeline.mode != LOCALIZATION and settings.camera.use_depth:
                query.depth_m = self._depth_for(cam, item.stamp_ns, rgb.shape)
            queries.append((cam.topic, query))
            if one is not timing:  # several cameras: the stages add up
                timing.preprocess += one.preprocess
                timing.encode += one.encode
        pose = self._poses.at(stamp) if self._poses is not None else None
        try:
            outcome = pipeline.decide_cameras(stamp, queries, pose,
                                              group[0].msg.header.frame_id, timing)
        except VPRError as exc:
            raise conv.FrameError(conv.SEARCH_ERROR, f"map search failed: {exc}") from exc
        self._last_group_stamp_ns = stamp
        watch = Stopwatch(timing)
        try:
            self._publish(outcome, cfg)
        except Exception as exc:
            raise conv.FrameError(conv.PUBLISH_ERROR, f"publishing failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        watch.lap("publish")
        timing.total = time.perf_counter() - first.received
        self.identity.map_size = pipeline.map_size()
        self.identity.map_search = pipeline.map.search_device
        for item in group:
            self._cameras[item.camera].processed += 1
        self.stats.frame(timing)

    def _camera_index(self, outcome: FrameOutcome, keyframe_id: int) -> int:
        """Index (in the node's cameras) of the camera that found ``keyframe_id``; one camera:
        0; unknown: -1."""
        if len(self._cameras) == 1:
            return 0
        topic = outcome.camera_of.get(int(keyframe_id))
        for cam in self._cameras:
            if cam.topic == topic:
                return cam.index
        return -1

    def _publish(self, outcome: FrameOutcome, cfg: NodeConfig) -> None:
        pubs = self._pubs
        if not pubs:
            return
        frame = cfg.map_frame
        if cfg.publish_candidates:
            pubs["candidates"].publish(messages.candidates_cloud(
                outcome.candidates, outcome.stamp_ns, frame,
                [self._camera_index(outcome, c.id) for c in outcome.candidates]))
        extra_markers = []
        fv = outcome.verification
        if fv is not None and fv.results and \
                pubs["verification"].get_subscription_count() > 0:
            pubs["verification"].publish(messages.verification_msg(outcome.stamp_ns,
                                                                   fv.results))
        reloc = outcome.relocalization
        if reloc is not None:
            self._credit(outcome, reloc.keyframe_id)
            metric = outcome.metric_pose
            if metric is not None:  # the verified PnP pose of the query robot, not the keyframe's
                reloc = dataclasses.replace(reloc, position=metric.position,
                                            orientation=metric.orientation,
                                            has_orientation=True, covariance=metric.covariance)
            accepted = outcome.verification.accepted if outcome.verification else None
            pubs["relocalization_status"].publish(
                messages.relocalization_status_msg(reloc, accepted, metric is not None))
            if reloc.has_pose:
                pubs["relocalization"].publish(messages.relocalization_msg(reloc, frame))
                self.stats.count("relocalizations")
                extra_markers.append(messages.relocalization_marker(reloc, frame))
            else:
                self.stats.count("relocalizations_without_pose")
                self._log_throttled("relocalization_without_pose", "warning",
                                    f"recognised keyframe {reloc.keyframe_id} (score "
                                    f"{reloc.score:.3f}) but the map has no pose for it (built "
                                    "without --pose-topic): no pose published")
        if outcome.closure is not None:
            closure = outcome.closure
            camera = self._camera_index(outcome, closure.match_id)
            self._credit(outcome, closure.match_id)
            pubs["loop_closure"].publish(messages.loop_closure_msg(closure, outcome.inserted_id,
                                                                   camera))
            self.stats.count("loop_closures")
            if outcome.closure_query_position is not None and closure.match_position is not None:
                self._closure_segments.append((outcome.closure_query_position,
                                               closure.match_position))
                del self._closure_segments[:-_MAX_CLOSURE_SEGMENTS]
            extra_markers.append(messages.closures_marker(self._closure_segments,
                                                          outcome.stamp_ns, frame))
        if outcome.inserted_id is not None:
            self.stats.count("keyframes_inserted")
        markers_pub = pubs["markers"]
        if cfg.publish_markers and markers_pub.get_subscription_count() > 0:
            min_score = (self._settings.relocalizer.min_score if cfg.mode == LOCALIZATION
                         else self._settings.loop_closure.min_score) if self._settings else 0.0
            arr = messages.frame_markers(outcome.candidates, outcome.query_position,
                                         outcome.stamp_ns, frame, min_score)
            arr.markers.extend(extra_markers)
            markers_pub.publish(arr)

    def _publish_keyframes(self) -> None:
        """Timer: the map's keyframe positions as points (only when someone listens)."""
        pipeline, settings, pub = self.pipeline, self._settings, self._pubs.get("markers")
        if pipeline is None or settings is None or pub is None or not settings.node.publish_markers:
            return
        if self.identity.lifecycle_state != "active" or pub.get_subscription_count() == 0:
            return
        with pipeline.lock:
            positions = pipeline.map.keyframe_table.positions.copy()
        stamp = self.get_clock().now().nanoseconds
        marker = messages.keyframes_marker(positions, stamp, settings.node.map_frame,
                                           settings.node.markers_max_keyframes)
        pub.publish(MarkerArray(markers=[marker]))

    # --------------------------------------------------------------------- errors and logging

    def _credit(self, outcome: FrameOutcome, keyframe_id: int) -> None:
        """Count a decision for the camera that found its match; several cameras: log it."""
        index = self._camera_index(outcome, keyframe_id)
        if index < 0:
            return
        cam = self._cameras[index]
        cam.found += 1
        if len(self._cameras) > 1:
            votes = outcome.votes.get(int(keyframe_id), 1)
            self._log_throttled("camera_decision", "info",
                                f"match keyframe {keyframe_id} found by camera {cam.topic}"
                                + (f" (and {votes - 1} more)" if votes > 1 else ""))

    def _frame_error(self, kind: str, message: str, *cameras: _Camera) -> None:
        self.stats.error(kind)
        for cam in cameras:
            cam.errors += 1
        if len(self._cameras) > 1 and cameras:
            message = f"camera {', '.join(c.topic for c in cameras)}: {message}"
        self._log_throttled(kind, "warning", message)

    def _log_throttled(self, kind: str, level: str, message: str) -> None:
        held = self._throttle.check(kind)
        if held is None:
            return
        suffix = f" ({held} more '{kind}' suppressed in the last " \
                 f"{self._throttle.period_s:g} s)" if held else ""
        getattr(self.get_logger(), level)(f"[{kind}] {message}{suffix}")

    # ---------------------------------------------------------------------------- diagnostics

    def _publish_diagnostics(self) -> None:
        snap = self.stats.snapshot()
        input_hz = self._in_rate.update(snap.monotonic_s, snap.received)
        processed_hz = self._out_rate.update(snap.monotonic_s, snap.processed)
        pipeline = self.pipeline
        extra = pipeline.counters() if pipeline is not None else []
        extra += self._camera_values()
        self._diag_pub.publish(diagnostic_array(self.get_name(), self.get_clock().now().to_msg(),
                                                snap, self.identity, input_hz, processed_hz,
                                                extra))

    def _camera_values(self) -> list[tuple[str, str]]:
        """Per-camera counters for /diagnostics; with several cameras, one that delivers
        nothing while others do is named (a WARN status, and a log line with whether anything
        publishes on its topic at all)."""
        values = [("cameras", self.identity.cameras or ",".join(c.topic for c in self._cameras))]
        for cam in self._cameras:
            key = f"camera.{cam.topic}"
            values += [(f"{key}.frames_received", str(cam.received)),
                       (f"{key}.frames_processed", str(cam.processed)),
                       (f"{key}.frames_dropped", str(cam.dropped)),
                       (f"{key}.errors", str(cam.errors)),
                       (f"{key}.matches_found", str(cam.found))]
        silent = []
        if len(self._cameras) > 1 and self.identity.lifecycle_state == "active" and \
                any(c.received for c in self._cameras):
            for cam in self._cameras:
                if cam.received == 0:
                    sub = self._input_subs[cam.index] if cam.index < len(self._input_subs) \
                        else None
                    name = sub.topic_name if sub is not None else cam.topic
                    silent.append(name)
                    if not cam.silent_said:
                        cam.silent_said = True
                        publishers = self.count_publishers(name)
                        self.get_logger().warning(
                            f"camera {name} delivers no frames while the other cameras do ("
                            + ("nothing publishes on it: a wrong topic in the parameter "
                               "'cameras'?" if publishers == 0 else
                               f"{publishers} publisher(s), none received yet: QoS or "
                               "transport mismatch?")
                            + "); the other cameras are used without it")
        self.identity.silent_cameras = ",".join(silent)
        return values

    # ------------------------------------------------------------------------------- services

    def _srv_save_map(self, request: Any, response: Any) -> Any:
        pipeline, settings = self.pipeline, self._settings
        if pipeline is None or settings is None:
            response.success, response.message = False, "not configured: nothing to save"
        elif settings.node.mode == LOCALIZATION:
            response.success = False
            response.message = ("localization mode never changes the map; nothing to save "
                                "(~/save_map saves the live map of loop_closure mode)")
        elif not settings.node.map:
            response.success = False
            response.message = ("parameter 'map' is empty: set it to the directory to save the "
                                "live map to, then reconfigure")
        else:
            try:
                count = pipeline.save(settings.node.map)
            except VPRError as exc:
                response.success, response.message = False, f"save failed: {exc}"
            else:
                response.success = True
                response.message = f"saved {count} keyframes to {settings.node.map}"
                self.get_logger().info(response.message)
        return response

    def _srv_relocalize(self, request: Any, response: Any) -> Any:
        pipeline = self.pipeline
        if pipeline is None:
            response.success, response.message = False, "not configured"
        elif not pipeline.rearm_relocalizer():
            response.success = False
            response.message = "relocalization runs in localization mode only"
        else:
            response.success = True
            response.message = "relocalizer re-armed: the next consistent match publishes a pose"
        return response

    def _srv_reset_session(self, request: Any, response: Any) -> Any:
        pipeline = self.pipeline
        if pipeline is None:
            response.success, response.message = False, "not configured"
            return response
        self._session_count += 1
        session = f"{self._session_base}-{self._session_count}"
        pipeline.reset_session(session)
        for cam in self._cameras:
            cam.last_stamp_ns = None
        self._last_group_stamp_ns = None
        if self._poses is not None:
            self._poses.clear()
        if pipeline.mode != LOCALIZATION:
            self.identity.session = session
        response.success = True
        response.message = (f"new session '{session}'" if pipeline.mode != LOCALIZATION
                            else "relocalization state reset")
        self.get_logger().info(f"reset_session: {response.message}")
        return response
