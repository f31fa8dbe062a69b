"""The per-frame work of the node, without ROS: encode -> search -> sequence -> decide -> grow
the map.

Kept apart from the rclpy node so the order of operations (which the decision state machines
depend on: exclusion before search, every query fed, insertion after the decision) is one piece
of code that the node, the benchmark and tests share, and so each stage can be timed on its
own. Thread safety: the encoder thread calls :meth:`Pipeline.decide`; services (save, reset,
relocalize) come from the executor thread; one lock serialises everything that touches the map
or the state machines.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np

from vpr_ros.errors import ConfigError
from vpr_ros.localization import (Candidate, Hypothesis, KeyframeTrack, LoopClosure,
                                  LoopClosureDetector, Relocalization, Relocalizer,
                                  SearchExclusion, SequenceMatcher, Verifier, build_hypotheses,
                                  candidates_from_columns)
from vpr_ros.localization.cameras import merge_cameras
from vpr_ros.localization.metric_pose import MetricPose
from vpr_ros.localization.verification_stage import (CamerasVerification, FrameVerification,
                                                     VerificationStage)
from vpr_ros.mapdb import Exclusion, Keyframe, PlaceMap
from vpr_ros.mapdb.camera import CameraModel
from vpr_ros.mapdb.local_rerank import search_reranked
from vpr_ros.mapdb.model_outputs import ModelOutputs
from vpr_ros.mapdb.poses import Pose
from vpr_ros.ros.diagnostics import FrameTiming, Stopwatch
from vpr_ros.ros.params import NodeSettings
from vpr_ros.runtime.encoder import Encoder, check_descriptors, check_outputs
from vpr_ros.runtime.local_features import LocalFeatures

LOCALIZATION = "localization"
LOOP_CLOSURE = "loop_closure"


def default_session_name(now: Optional[datetime] = None) -> str:
    """``live-<UTC time>``: unique per run, sortable, readable in ``vpr map info``."""
    now = now or datetime.now(timezone.utc)
    return "live-" + now.strftime("%Y%m%dT%H%M%SZ")


def limit_blas_threads(threads: int) -> str:
    """Cap the BLAS thread pools of this process (0: leave them); returns what was done, for
    the log. Uses threadpoolctl, which the pinned requirements bring (through scikit-learn)."""
    if threads <= 0:
        return "BLAS threads: library default"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return "BLAS threads: not limited (threadpoolctl is not installed)"
    threadpool_limits(limits=int(threads), user_api="blas")
    return f"BLAS threads: {threads}"


def host_preprocessing(encoder: Encoder) -> bool:
    """Whether ``encode`` is the shared host path: ``preprocess`` (numpy/OpenCV) then inference.

    True for backends that keep :meth:`Encoder.encode` and for every CPU backend; a GPU backend
    that overrides ``encode`` (preprocessing on the device) is called as a whole instead.
    """
    return type(encoder).encode is Encoder.encode or "cpu" in str(encoder.backend).split("-")


def encode_one(encoder: Encoder, rgb: np.ndarray, timing: FrameTiming) -> np.ndarray:
    """One frame -> (1, D) descriptor, timing preprocessing and inference separately.

    When preprocessing happens inside a backend's own ``encode`` (on the GPU) the split is not
    observable from outside: the whole call is timed as ``encode`` and ``preprocess`` is NaN,
    rather than bypassing the backend's own path.
    """
    watch = Stopwatch(timing)
    if not host_preprocessing(encoder):
        out = encoder.encode([rgb])
        watch.lap("encode")
        timing.preprocess = float("nan")
        return out
    batch = encoder.preprocess([rgb])
    watch.lap("preprocess")
    out = check_descriptors(np.asarray(encoder._encode_batch(batch), dtype=np.float32),
                            batch.shape[0], encoder.dim, encoder.backend)
    watch.lap("encode")
    return out


@dataclass
class Query:
    """One frame's encoder outputs: the (1, D) descriptor, and where the map uses them the
    hash head's (1, bytes) codes and the (1, H, W, C) local features; for geometric
    verification the frame itself (``image``, not copied), its camera's calibration and, for a
    live keyframe's 3-D points, its registered depth in metres."""

    descriptor: np.ndarray
    codes: Optional[np.ndarray] = None
    local: Optional[np.ndarray] = None
    image: Optional[np.ndarray] = None
    camera: Optional[CameraModel] = None
    depth_m: Optional[np.ndarray] = None


def encode_query(encoder: Encoder, rgb: np.ndarray, timing: FrameTiming,
                 extras: tuple[str, ...] = ()) -> Query:
    """:func:`encode_one`, plus the extra outputs named in ``extras`` ("binary", "local") from
    the same forward pass; with no extras it is exactly :func:`encode_one`."""
    if not extras:
        return Query(encode_one(encoder, rgb, timing))
    watch = Stopwatch(timing)
    if not host_preprocessing(encoder):
        outs = encoder.encode_all([rgb])
        watch.lap("encode")
        timing.preprocess = float("nan")
    else:
        batch = encoder.preprocess([rgb])
        watch.lap("preprocess")
        outs = check_outputs(encoder._encode_all_batch(batch), batch.shape[0], encoder.dim,
                             encoder.backend)
        watch.lap("encode")
    return Query(outs["global"], outs.get("binary") if "binary" in extras else None,
                 outs.get("local") if "local" in extras else None)


@dataclass
class FrameOutcome:
    """What one frame led to; the node turns it into messages."""

    stamp_ns: int
    candidates: list[Candidate]
    hypotheses: list[Hypothesis] = field(default_factory=list)
    relocalization: Optional[Relocalization] = None
    closure: Optional[LoopClosure] = None
    inserted_id: Optional[int] = None
    query_position: Optional[tuple[float, float, float]] = None
    closure_query_position: Optional[tuple[float, float, float]] = None
    #: Several cameras: the camera that found each candidate keyframe (by id) and how many
    #: cameras found its place; empty with one camera.
    camera_of: dict[int, str] = field(default_factory=dict)
    votes: dict[int, int] = field(default_factory=dict)
    #: This frame's geometric verification (None when verification is off).
    verification: Optional[FrameVerification | CamerasVerification] = None
    #: The query robot's map pose from a verified PnP relocalization (None: keyframe pose).
    metric_pose: Optional[MetricPose] = None


class Pipeline:
    """Encoder + map + sequence matcher + the decision state machine of the node's mode.

    ``verifier``: the optional verification stage handed to the detector / relocalizer (see
    :data:`~vpr_ros.localization.hypotheses.Verifier`); None: accept without it.
    """

    def __init__(self, encoder: Encoder, place_map: PlaceMap, settings: NodeSettings,
                 session: str, outputs: Optional[ModelOutputs] = None) -> None:
        self.encoder = encoder
        self.map = place_map
        self.settings = settings
        self.mode = settings.node.mode
        self.top_k = settings.node.top_k
        self.session = session
        outputs = outputs or ModelOutputs()
        # Extras are computed only where the map uses them: a model without a hash head or a
        # local head, or a map without codes or local features, runs exactly as before.
        has_local = place_map.local_grid is not None and outputs.local_grid is not None
        self.rerank_top_n = settings.rerank.local_top_k if has_local else 0
        extras = []
        if place_map.model_codes:
            extras.append("binary")
        if has_local and (self.rerank_top_n > 0 or self.mode != LOCALIZATION):
            extras.append("local")
        self.extras: tuple[str, ...] = tuple(extras)
        self.lock = threading.RLock()
        self.relocalizer: Optional[Relocalizer] = None
        self.detector: Optional[LoopClosureDetector] = None
        self.verifier: Optional[Verifier] = None
        #: Geometric verification against the map's keypoints (ConfigError at construction
        #: when verification is on and the map cannot be verified against).
        self.verification: Optional[VerificationStage] = None
        if settings.verification.enabled:
            self.verification = VerificationStage(settings.verification, place_map,
                                                  settings.camera.mount)
        self.camera_name = settings.camera.name
        self._registered_cameras: set[tuple[str, str]] = set()
        seq = settings.sequence
        if self.mode == LOCALIZATION:
            self.relocalizer = Relocalizer(settings.relocalizer, sequence_length=seq.length)
        else:
            self.detector = LoopClosureDetector(settings.loop_closure, session=session,
                                                sequence_length=seq.length)
        self.track = KeyframeTrack()
        self._sync_track()
        self.matcher = SequenceMatcher(seq, self.track, self._descriptors_of)
        # Several cameras: one matcher per camera, created at its first frame: each follows its
        # camera's own stream of frames (its sequence evidence, its frame scores normalised
        # against its own similarity to the map), and the track keeps each camera's keyframes
        # in their own order, so a path walks one camera's views.
        self._camera_matchers: dict[str, SequenceMatcher] = {}
        self.notes = check_sequence_fit(self.track, settings, self.mode)

    def _descriptors_of(self, ids: np.ndarray) -> np.ndarray:
        return self.map.descriptors()[ids]

    def _sync_track(self) -> None:
        """Append the keyframes the map gained since the last frame (the live session's)."""
        n, start = len(self.map), len(self.track)
        if n > start:
            rows = np.arange(start, n)
            table = self.map.keyframe_table
            sessions, stamps, positions, _ = table.pose_columns(rows)
            self.track.extend(sessions, stamps, positions, table.text_rows("camera", rows))

    # -- per frame --------------------------------------------------------------------------

    def encode(self, rgb: np.ndarray, timing: FrameTiming) -> Query:
        query = encode_query(self.encoder, rgb, timing, self.extras)
        query.image = rgb
        return query

    def search(self, query: Query, exclude: Optional[Exclusion] = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of the map for one query: with the query's hash codes where the map searches
        model codes, then mutual-NN re-ranking of the top ``rerank.local_top_k`` where the map
        stores local features."""
        return search_reranked(self.map, query.descriptor, self.top_k, self.rerank_top_n,
                               query_local=query.local, exclude=exclude,
                               query_codes=query.codes)

    def _exclusion(self, stamp_ns: int
                   ) -> tuple[Optional[SearchExclusion], Optional[Exclusion]]:
        """The loop-closure detector's search exclusion at ``stamp_ns`` (the sequence matcher's
        form and the map search's); (None, None) when relocalizing: nothing is excluded."""
        if self.detector is None:
            return None, None
        rule = self.detector.search_exclusion(stamp_ns)
        return rule, Exclusion(**rule.as_kwargs())

    def decide(self, stamp_ns: int, query: Query, pose: Optional[tuple[Pose, str]],
               image_frame_id: str, timing: FrameTiming) -> FrameOutcome:
        """Search the map and run the mode's decision; in loop-closure mode maybe insert the
        frame as a keyframe of the live session."""
        with self.lock:
            watch = Stopwatch(timing)
            rule, exclusion = self._exclusion(stamp_ns)
            ids, scores = self.search(query, exclusion)
            table = self.map.keyframe_table
            candidates = candidates_from_columns(ids[0], scores[0], table.pose_columns)
            watch.lap("search")
            position = pose[0].position if pose is not None else None
            self._sync_track()
            result = self.matcher.update(stamp_ns, query.descriptor, ids[0], position=position,
                                         exclusion=rule)
            hypotheses = _hypotheses(table, candidates, result, self.matcher.config.enabled)
            watch.lap("sequence")
            outcome = FrameOutcome(stamp_ns, candidates, hypotheses, query_position=position)
            verifier: Optional[Verifier] = self.verifier
            if self.verification is not None and query.image is not None:
                outcome.verification = self.verification.frame(query.image, query.camera)
                verifier = outcome.verification
            if self.relocalizer is not None:
                outcome.relocalization = self.relocalizer.update(stamp_ns, hypotheses,
                                                                 verifier=verifier)
                self._metric_relocalization(outcome)
            else:
                self._loop_closure(outcome, query, pose, image_frame_id, verifier)
            watch.lap("decision")
            self._verification_done(outcome, timing)
            return outcome

    def decide_cameras(self, stamp_ns: int, queries: list[tuple[str, Query]],
                       pose: Optional[tuple[Pose, str]], image_frame_id: str,
                       timing: FrameTiming) -> FrameOutcome:
        """:meth:`decide` for the frames of several cameras taken together (stamp: the newest
        of them): each camera's query is searched and scored on its own, the hypotheses are
        merged (:func:`~vpr_ros.localization.cameras.merge_cameras`, node parameters
        ``cameras_*``) and the mode's decision runs once on the merged list. In loop-closure
        mode an inserted keyframe is inserted for every camera, each naming its camera. One
        camera: exactly :meth:`decide`."""
        if len(queries) == 1:
            return self.decide(stamp_ns, queries[0][1], pose, image_frame_id, timing)
        node = self.settings.node
        with self.lock:
            watch = Stopwatch(timing)
            rule, exclusion = self._exclusion(stamp_ns)
            table = self.map.keyframe_table
            searched = []
            for camera, query in queries:
                ids, scores = self.search(query, exclusion)
                searched.append((camera, query, ids[0],
                                 candidates_from_columns(ids[0], scores[0], table.pose_columns)))
            watch.lap("search")
            position = pose[0].position if pose is not None else None
            self._sync_track()
            per_camera, per_camera_frames = [], []
            for camera, query, ids, candidates in searched:
                matcher = self._camera_matchers.get(camera)
                if matcher is None:
                    matcher = self._camera_matchers[camera] = SequenceMatcher(
                        self.settings.sequence, self.track, self._descriptors_of)
                result = matcher.update(stamp_ns, query.descriptor, ids, position=position,
                                        exclusion=rule)
                per_camera.append((camera, _hypotheses(table, candidates, result,
                                                       matcher.config.enabled)))
                per_camera_frames.append((camera, build_hypotheses(
                    candidates, result, candidates_from_columns, False)))
            min_score = self.settings.relocalizer.min_score if self.relocalizer is not None \
                else self.settings.loop_closure.min_score

            def merge(pool: list) -> Any:
                return merge_cameras(pool, node.cameras_merge, node.cameras_vote_bonus,
                                     node.cameras_place_radius_m,
                                     int(node.cameras_place_window_s * 1e9), min_score)
            merged = merge(per_camera)
            # ~/candidates shows this moment's search results (merged over the cameras), as
            # with one camera; the decision runs on the sequence evidence where it is on.
            shown = merge(per_camera_frames) if self.matcher.config.enabled else merged
            watch.lap("sequence")
            ranked = [h.candidate for h in shown.hypotheses][:self.top_k]
            outcome = FrameOutcome(stamp_ns, ranked, merged.hypotheses, query_position=position,
                                   camera_of={**shown.camera_of, **merged.camera_of},
                                   votes={**shown.votes, **merged.votes})
            verifier: Optional[Verifier] = self.verifier
            if self.verification is not None:
                frames = {camera: self.verification.frame(q.image, q.camera)
                          for camera, q in queries if q.image is not None}
                outcome.verification = CamerasVerification(frames, merged.camera_of,
                                                           queries[0][0])
                verifier = outcome.verification
            if self.relocalizer is not None:
                outcome.relocalization = self.relocalizer.update(stamp_ns, merged.hypotheses,
                                                                 verifier=verifier)
                self._metric_relocalization(outcome)
            else:
                assert self.detector is not None
                outcome.closure = self.detector.process(stamp_ns, merged.hypotheses,
                                                        query_position=position,
                                                        verifier=verifier)
                self._insert_cameras(outcome, queries, pose, image_frame_id)
            watch.lap("decision")
            self._verification_done(outcome, timing)
            return outcome

    def _insert_cameras(self, outcome: FrameOutcome, queries: list[tuple[str, Query]],
                        pose: Optional[tuple[Pose, str]], image_frame_id: str) -> None:
        """Loop-closure mode, several cameras: the keyframe policy decides on the first
        camera's frame; when it inserts, every camera's frame becomes a keyframe of the live
        session naming its camera (a place is then findable from any of them)."""
        assert self.detector is not None
        stamp = outcome.stamp_ns
        position = pose[0].position if pose is not None else None
        orientation = pose[0].orientation if pose is not None else None
        if not self.detector.should_insert(stamp, position, orientation,
                                           queries[0][1].descriptor).insert:
            return
        frames = outcome.verification.frames \
            if isinstance(outcome.verification, CamerasVerification) else {}
        for camera, query in queries:
            kf = Keyframe(session=self.session, stamp_ns=int(stamp),
                          frame_id=pose[1] if pose is not None else image_frame_id,
                          position=position, orientation=orientation,
                          source_topic=camera, camera=camera)
            keypoints = None
            if self.map.keypoint_kind is not None:
                frame = frames.get(camera)
                if frame is None:
                    keypoints = [LocalFeatures.empty(self.map.keypoint_kind)]
                else:
                    self._register_camera(query.camera, camera)
                    keypoints = [frame.keyframe_keypoints(query.depth_m,
                                                          self.settings.camera.depth_max_m)]
            new_id = int(self.map.add(
                query.descriptor, [kf],
                binary_codes=query.codes if self.map.model_codes else None,
                local_features=query.local if self.map.local_grid is not None else None,
                keypoints=keypoints)[0])
            self.detector.mark_inserted(new_id, stamp, position, orientation, query.descriptor)
            if outcome.inserted_id is None:
                outcome.inserted_id = new_id
        self._sync_track()
        if outcome.closure is not None:
            outcome.closure_query_position = position

    def _loop_closure(self, outcome: FrameOutcome, query: Query,
                      pose: Optional[tuple[Pose, str]], image_frame_id: str,
                      verifier: Optional[Verifier] = None) -> None:
        assert self.detector is not None
        descriptor = query.descriptor
        stamp = outcome.stamp_ns
        position = pose[0].position if pose is not None else None
        outcome.closure = self.detector.process(stamp, outcome.hypotheses,
                                                query_position=position, verifier=verifier)
        orientation = pose[0].orientation if pose is not None else None
        decision = self.detector.should_insert(stamp, position, orientation, descriptor)
        if decision.insert:
            kf = Keyframe(session=self.session, stamp_ns=int(stamp),
                          frame_id=pose[1] if pose is not None else image_frame_id,
                          position=position, orientation=orientation,
                          source_topic="live", camera=self.camera_name)
            keypoints = None
            if self.map.keypoint_kind is not None:
                keypoints = [self._live_keypoints(outcome, query)]
            new_id = int(self.map.add(
                descriptor, [kf], binary_codes=query.codes if self.map.model_codes else None,
                local_features=query.local if self.map.local_grid is not None else None,
                keypoints=keypoints)[0])
            self.detector.mark_inserted(new_id, stamp, position, orientation, descriptor)
            self._sync_track()
            outcome.inserted_id = new_id
        if outcome.closure is not None:
            outcome.closure_query_position = position

    def _metric_relocalization(self, outcome: FrameOutcome) -> None:
        """The PnP pose of an accepted relocalization, where verification made one."""
        if outcome.relocalization is None or outcome.verification is None:
            return
        assert self.verification is not None
        outcome.metric_pose = self.verification.metric_pose(outcome.verification.accepted,
                                                            outcome.verification.camera)
        self.verification.counts["relocalizations_metric" if outcome.metric_pose
                                 else "relocalizations_keyframe_pose"] += 1

    def _verification_done(self, outcome: FrameOutcome, timing: FrameTiming) -> None:
        """Count the frame's verdicts and time its verification stages (taken out of the
        decision stage, which is left with the gates and state machines)."""
        fv = outcome.verification
        if fv is None:
            return
        assert self.verification is not None
        self.verification.record(fv)  # type: ignore[arg-type]
        timing.extract, timing.match, timing.estimate = fv.extract_s, fv.match_s, fv.estimate_s
        timing.decision = max(0.0, timing.decision - fv.extract_s - fv.match_s
                              - fv.estimate_s)

    def _register_camera(self, camera: Optional[CameraModel], name: str) -> None:
        """Record the live session's calibration of camera ``name`` once (a recalibration
        mid-session is a MapMismatchError: the keyframes already stored used the first)."""
        if camera is None or camera.name != name:
            return
        key = (self.session, name)
        if key not in self._registered_cameras:
            self.map.add_camera(self.session, camera)
            self._registered_cameras.add(key)

    def _live_keypoints(self, outcome: FrameOutcome, query: Query) -> LocalFeatures:
        """Keypoints of a frame becoming a live keyframe (with 3-D points from its depth), and
        its camera's calibration registered for the live session."""
        fv = outcome.verification
        if not isinstance(fv, FrameVerification) or query.image is None:
            return LocalFeatures.empty(self.map.keypoint_kind)
        self._register_camera(query.camera, self.camera_name)
        return fv.keyframe_keypoints(query.depth_m, self.settings.camera.depth_max_m)

    # -- services ---------------------------------------------------------------------------

    def rearm_relocalizer(self) -> bool:
        """One-shot relocalize: the next consistent match publishes a pose again."""
        with self.lock:
            if self.relocalizer is None:
                return False
            self.relocalizer.reset()
            return True

    def reset_session(self, session: str) -> None:
        """A new run starts: loop-closure history and recent keyframes are forgotten, new
        keyframes go to ``session`` (old ones stay in the map and become loop candidates)."""
        with self.lock:
            self.session = session
            if self.detector is not None:
                self.detector.reset(session=session)
            if self.relocalizer is not None:
                self.relocalizer.reset()
            self._reset_matchers()

    def _reset_matchers(self) -> None:
        self.matcher.reset()
        for matcher in self._camera_matchers.values():
            matcher.reset()

    def time_jump(self) -> None:
        """The clock restarted: a relocalization streak across the jump means nothing. The
        loop-closure detector handles a backwards stamp itself (and must keep its recent
        keyframes excluded, so it is not reset here)."""
        with self.lock:
            if self.relocalizer is not None:
                self.relocalizer.reset()
            self._reset_matchers()

    def save(self, path: str) -> int:
        """Atomic save of the map (the live session included); returns the keyframe count."""
        with self.lock:
            self.map.save(path)
            return len(self.map)

    def map_size(self) -> int:
        return len(self.map)

    def counters(self) -> list[tuple[str, str]]:
        """The decision stages' counters as diagnostics key/values (cumulative)."""
        with self.lock:
            from vpr_ros.localization.sequence import SequenceStats

            st = SequenceStats()  # summed over the matchers (one per camera with several)
            for m in (self.matcher, *self._camera_matchers.values()):
                for name, value in vars(m.stats).items():
                    setattr(st, name, getattr(st, name) + value)
            values = [("sequence_length", str(self.matcher.config.length)),
                      ("sequence_frames", str(st.frames)),
                      ("sequence_resets", str(st.resets)),
                      ("sequence_odometry_fallbacks", str(st.odometry_fallbacks)),
                      ("sequence_short_frames", str(st.short_frames)),
                      ("sequence_reordered_keyframes", str(self.track.reordered)),
                      ("sequence_sessions_without_positions",
                       str(self.track.sessions_without_positions())),
                      ("sequence_sessions_without_stamps",
                       str(self.track.sessions_without_stamps))]
            if self.detector is not None:
                ds = self.detector.stats
                values += [(f"loop_closure.{k}", str(v)) for k, v in vars(ds).items()]
            if self.relocalizer is not None:
                values += [(f"relocalization.rejected_{k}", str(v))
                           for k, v in self.relocalizer.rejected.items()]
            values.append(("verification_enabled", str(self.verification is not None).lower()))
            if self.verification is not None:
                values += self.verification.counters()
            return values


def _hypotheses(table: Any, candidates: list[Candidate], result: Any, sequence: bool
                ) -> list[Hypothesis]:
    """A camera's hypotheses from its search candidates and sequence result, sequence-matched
    places resolved to candidates through the map's keyframe ``table`` (its pose columns)."""
    return build_hypotheses(
        candidates, result,
        lambda h_ids, cos: candidates_from_columns(h_ids, cos, table.pose_columns), sequence)


def describe_sequence(settings: NodeSettings) -> str:
    """One log phrase saying how decisions use sequence evidence."""
    seq = settings.sequence
    if not seq.enabled:
        return "single-frame decisions (sequence.length 1)"
    how = "travelled distance where odometry and keyframe positions exist, else time" \
        if seq.use_odometry else "time"
    return (f"sequence matching over {seq.length} frames (aligned by {how}; speeds "
            f"{seq.speed_min:g}-{seq.speed_max:g}{', both directions' if seq.reverse else ''})")


def check_sequence_fit(track: KeyframeTrack, settings: NodeSettings, mode: str) -> list[str]:
    """Configure-time checks of sequence matching against the map; returns notes for the log.

    Localization in a prebuilt map whose every session is shorter than ``sequence.min_steps``
    could never gather enough evidence: refused with the fix named. Odometry asked for but
    sessions without positions, and sessions without usable stamps, are documented fallbacks
    (time alignment; keyframe order as the time axis), said here and counted in diagnostics.
    """
    seq = settings.sequence
    notes: list[str] = []
    if not seq.enabled:
        return notes
    sizes = track.session_sizes()
    if mode == LOCALIZATION and sizes and max(sizes.values()) < seq.effective_min_steps:
        raise ConfigError(
            f"sequence.min_steps = {seq.effective_min_steps} but the longest session of the map "
            f"has {max(sizes.values())} keyframes, so no path could ever gather enough "
            "evidence; lower sequence.min_steps (and sequence.length), or set "
            "sequence.length: 1 for single-frame matching")
    short = [name for name, n in sizes.items() if n < seq.length]
    if short:
        notes.append(f"{len(short)} of {len(sizes)} map sessions have fewer keyframes than "
                     f"sequence.length = {seq.length}: their paths are shorter (missing steps "
                     "count as no evidence)")
    unposed = track.sessions_without_positions()
    if seq.use_odometry and settings.node.pose_type != "none" and unposed:
        notes.append(f"{unposed} map session(s) have no keyframe positions: sequences there are "
                     "aligned by time over the speed range, not by travelled distance")
    if track.sessions_without_stamps:
        notes.append(f"{track.sessions_without_stamps} map session(s) have no distinct "
                     "keyframe stamps: their keyframe order is used as the time axis (1 s per "
                     "keyframe)")
    return notes
