"""The node's outputs as standard ROS messages, so consumers need no package of ours.

- ``~/relocalization``: ``geometry_msgs/PoseWithCovarianceStamped`` (remappable to Nav2/AMCL
  ``initialpose``).
- ``~/loop_closure``: ``std_msgs/Float64MultiArray`` whose single layout dimension is labelled
  with the comma-separated field names (:data:`LOOP_CLOSURE_FIELDS`); query and match stamps
  come first, the convention LIO-SAM-style back ends read external loop detections in.
- ``~/candidates``: ``sensor_msgs/PointCloud2`` with one typed point per ranked candidate
  (:data:`CANDIDATE_DTYPE`), packed with a numpy structured array (no sensor_msgs_py wheel).
- ``~/markers``: ``visualization_msgs/MarkerArray`` for RViz.

Decoders for the two custom layouts (:func:`parse_loop_closure`, :func:`cloud_to_array`) live
here too, next to their encoders, for tests, the benchmark and any Python consumer.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from builtin_interfaces.msg import Duration, Time
from geometry_msgs.msg import Point, PoseWithCovarianceStamped
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Float64MultiArray, MultiArrayDimension, MultiArrayLayout
from visualization_msgs.msg import Marker, MarkerArray

from vpr_ros.errors import InputError
from vpr_ros.localization import Candidate, LoopClosure, Relocalization
from vpr_ros.ros.conversions import NS_PER_S, ns_to_stamp_fields

NAN = float("nan")

#: Every field of a ``~/loop_closure`` message, in order. Stamps are seconds (float64 keeps
#: ~0.2 us at today's epoch); ids are exact in float64 up to 2**53; unknown values are NaN
#: (match pose of a keyframe without one; sequence score in single-frame matching) or -1
#: (query not inserted as a keyframe). New fields are only ever appended.
LOOP_CLOSURE_FIELDS: tuple[str, ...] = (
    "query_stamp_s", "match_stamp_s", "score", "match_keyframe_id", "consistent_count",
    "query_keyframe_id", "match_x", "match_y", "match_z",
    "match_qx", "match_qy", "match_qz", "match_qw",
    "sequence_score", "margin", "sequence_steps", "camera",
    # geometric verification: the query camera's pose in the match keyframe's camera frame
    # (X_match = R X_query + t), metric (1) or a unit direction (0), and its 6x6 covariance
    # row-major over [x, y, z, rx, ry, rz] (rotation vector, match camera frame); NaN when
    # unverified or when only a fundamental matrix was possible (uncalibrated camera)
    "verified", "inliers", "rel_tx", "rel_ty", "rel_tz", "rel_qx", "rel_qy", "rel_qz", "rel_qw",
    "rel_metric", *(f"cov_{i}{j}" for i in range(6) for j in range(6)),
)

#: Every field of a ``~/relocalization_status`` message: the evidence behind the pose on
#: ``~/relocalization`` with the same stamp. ``verified``: 1 when geometric verification
#: confirmed the match; ``metric``: 1 when the pose is the PnP pose of the query (else the
#: matched keyframe's pose); ``method``: 0 none, 1 fundamental, 2 essential, 3 PnP.
RELOCALIZATION_STATUS_FIELDS: tuple[str, ...] = (
    "stamp_s", "keyframe_id", "score", "consistent_count", "verified", "metric", "method",
    "inliers", "error_px",
)
_METHOD_CODES = {"fundamental": 1.0, "essential": 2.0, "pnp": 3.0}

#: One ``~/candidates`` point. x, y, z first and float32 so RViz draws them; stamp float64.
CANDIDATE_DTYPE = np.dtype([
    ("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
    ("qx", "<f4"), ("qy", "<f4"), ("qz", "<f4"), ("qw", "<f4"),
    ("score", "<f4"), ("keyframe_id", "<u4"), ("stamp", "<f8"), ("rank", "<u4"),
    ("camera", "<i2"),
])

_POINTFIELD_TYPES = {
    np.dtype("<f4"): PointField.FLOAT32, np.dtype("<f8"): PointField.FLOAT64,
    np.dtype("<u4"): PointField.UINT32, np.dtype("<i4"): PointField.INT32,
    np.dtype("<u1"): PointField.UINT8, np.dtype("<u2"): PointField.UINT16,
    np.dtype("<i1"): PointField.INT8, np.dtype("<i2"): PointField.INT16,
}
_NUMPY_TYPES = {v: k for k, v in _POINTFIELD_TYPES.items()}


def to_time(ns: int) -> Time:
    sec, nanosec = ns_to_stamp_fields(ns)
    return Time(sec=sec, nanosec=nanosec)


# ------------------------------------------------------------------------------ relocalization

def relocalization_msg(reloc: Relocalization, frame_id: str) -> PoseWithCovarianceStamped:
    """Map pose of the accepted match, stamped with the *query* frame's stamp."""
    if reloc.position is None or reloc.orientation is None or reloc.covariance is None:
        raise InputError(f"relocalization to keyframe {reloc.keyframe_id} has no pose (the map "
                         "was built without a pose topic); nothing to publish as a pose")
    msg = PoseWithCovarianceStamped()
    msg.header.stamp = to_time(reloc.stamp_ns)
    msg.header.frame_id = frame_id
    p, q = msg.pose.pose.position, msg.pose.pose.orientation
    p.x, p.y, p.z = (float(v) for v in reloc.position)
    q.x, q.y, q.z, q.w = (float(v) for v in reloc.orientation)
    msg.pose.covariance = [float(v) for v in reloc.covariance]
    return msg


# -------------------------------------------------------------------------------- loop closure

def loop_closure_layout() -> MultiArrayLayout:
    n = len(LOOP_CLOSURE_FIELDS)
    return MultiArrayLayout(dim=[MultiArrayDimension(label=",".join(LOOP_CLOSURE_FIELDS),
                                                     size=n, stride=n)], data_offset=0)


def verification_values(v: Any) -> list[float]:
    """``verified, inliers, rel_t*, rel_q*, rel_metric, cov_*`` of a verification verdict
    (:class:`~vpr_ros.localization.verification.Verification`, or None: unverified)."""
    if v is None or not getattr(v, "verified", False):
        return [0.0, float(getattr(v, "inliers", 0) or 0)] + [NAN] * 8 + [NAN] * 36
    pose = v.pose
    if pose is None:  # verified by a fundamental matrix: no pose
        return [1.0, float(v.inliers)] + [NAN] * 8 + [NAN] * 36
    return [1.0, float(v.inliers), *(float(x) for x in pose.translation),
            *(float(x) for x in pose.rotation), 1.0 if pose.metric else 0.0,
            *(float(x) for x in pose.covariance)]


def loop_closure_msg(closure: LoopClosure, query_keyframe_id: Optional[int],
                     camera: int = 0) -> Float64MultiArray:
    """``camera``: index (in the node's ``cameras``) of the camera whose frame found the
    match; -1 unknown."""
    pos = closure.match_position or (NAN, NAN, NAN)
    quat = closure.match_orientation or (NAN, NAN, NAN, NAN)
    values = [closure.query_stamp_ns / NS_PER_S, closure.match_stamp_ns / NS_PER_S,
              float(closure.score), float(closure.match_id), float(closure.consistent_count),
              float(-1 if query_keyframe_id is None else query_keyframe_id), *pos, *quat,
              float(closure.sequence_score), float(closure.margin), float(closure.sequence_steps),
              float(camera),
              *verification_values(closure.verification)]
    return Float64MultiArray(layout=loop_closure_layout(), data=[float(v) for v in values])


#: One row per candidate verified in a frame on ``~/verification``; ``method`` as in
#: :data:`RELOCALIZATION_STATUS_FIELDS`, ``accepted`` 1 for the one the decision took.
VERIFICATION_FIELDS: tuple[str, ...] = (
    "stamp_s", "keyframe_id", "verified", "method", "matches", "inliers", "inlier_ratio",
    "error_px", "match_ms", "estimate_ms",
)


def verification_msg(stamp_ns: int, results: Sequence[Any]) -> Float64MultiArray:
    """A frame's verdicts as rows of :data:`VERIFICATION_FIELDS` (layout: dim 0 = rows
    labelled ``candidates``, dim 1 = fields labelled with their names)."""
    n = len(VERIFICATION_FIELDS)
    data: list[float] = []
    for r in results:
        data += [stamp_ns / NS_PER_S, float(r.keyframe_id), 1.0 if r.verified else 0.0,
                 _METHOD_CODES.get(r.method, 0.0), float(r.matches), float(r.inliers),
                 float(r.inlier_ratio), float(r.error_px), 1e3 * float(r.match_s),
                 1e3 * float(r.estimate_s)]
    layout = MultiArrayLayout(dim=[
        MultiArrayDimension(label="candidates", size=len(results), stride=len(results) * n),
        MultiArrayDimension(label=",".join(VERIFICATION_FIELDS), size=n, stride=n)],
        data_offset=0)
    return Float64MultiArray(layout=layout, data=data)


def parse_verification(msg: Any) -> list[dict[str, float]]:
    """Rows of a ``~/verification`` message as field -> value dicts."""
    if len(msg.layout.dim) != 2:
        raise InputError("verification message needs a 2-D layout (candidates x fields)")
    names = msg.layout.dim[1].label.split(",")
    data = list(msg.data)
    n = len(names)
    return [dict(zip(names, data[i:i + n])) for i in range(0, len(data), n)]


def relocalization_status_msg(reloc: Relocalization, accepted: Any, metric: bool
                              ) -> Float64MultiArray:
    """The evidence of a published relocalization (:data:`RELOCALIZATION_STATUS_FIELDS`)."""
    verified = accepted is not None and getattr(accepted, "verified", False)
    values = [reloc.stamp_ns / NS_PER_S, float(reloc.keyframe_id), float(reloc.score),
              float(reloc.consistent_count), 1.0 if verified else 0.0, 1.0 if metric else 0.0,
              _METHOD_CODES.get(accepted.method, 0.0) if verified else 0.0,
              float(accepted.inliers) if verified else 0.0,
              float(accepted.error_px) if verified else NAN]
    n = len(RELOCALIZATION_STATUS_FIELDS)
    layout = MultiArrayLayout(dim=[MultiArrayDimension(
        label=",".join(RELOCALIZATION_STATUS_FIELDS), size=n, stride=n)], data_offset=0)
    return Float64MultiArray(layout=layout, data=[float(v) for v in values])


def parse_loop_closure(msg: Any) -> dict[str, float]:
    """Field name -> value, read from the message's own layout labels (not a fixed order)."""
    if not msg.layout.dim:
        raise InputError("loop closure message has no layout dimension; expected one labelled "
                         "with the field names")
    names = msg.layout.dim[0].label.split(",")
    data = list(msg.data)[msg.layout.data_offset:]
    if len(names) != len(data):
        raise InputError(f"loop closure layout names {len(names)} fields but carries "
                         f"{len(data)} values")
    return dict(zip(names, (float(v) for v in data)))


# ---------------------------------------------------------------------------------- candidates

def candidates_array(candidates: Sequence[Candidate],
                     cameras: Optional[Sequence[int]] = None) -> np.ndarray:
    """Ranked candidates (best first) as a :data:`CANDIDATE_DTYPE` array; NaN pose when
    unknown (RViz skips NaN points). ``cameras``: per candidate, the index of the camera that
    found it (default 0: one camera)."""
    arr = np.zeros(len(candidates), dtype=CANDIDATE_DTYPE)
    for rank, c in enumerate(candidates):
        pos = c.position or (NAN, NAN, NAN)
        quat = c.orientation or (NAN, NAN, NAN, NAN)
        camera = cameras[rank] if cameras is not None else 0
        arr[rank] = (*pos, *quat, c.score, c.id, c.stamp_ns / NS_PER_S, rank, camera)
    return arr


def array_to_cloud(arr: np.ndarray, stamp_ns: int, frame_id: str) -> PointCloud2:
    """A structured array (little-endian, packed) -> an unorganised PointCloud2 (height 1)."""
    fields = []
    for name in arr.dtype.names or ():
        dt, offset = arr.dtype.fields[name][:2]
        if dt not in _POINTFIELD_TYPES:
            raise InputError(f"cloud field {name} has dtype {dt}, which PointCloud2 cannot type")
        fields.append(PointField(name=name, offset=int(offset), datatype=_POINTFIELD_TYPES[dt],
                                 count=1))
    msg = PointCloud2()
    msg.header.stamp = to_time(stamp_ns)
    msg.header.frame_id = frame_id
    msg.height, msg.width = 1, int(arr.shape[0])
    msg.fields = fields
    msg.is_bigendian = False
    msg.point_step = int(arr.dtype.itemsize)
    msg.row_step = msg.point_step * msg.width
    msg.is_dense = bool(arr.shape[0] == 0 or all(
        np.isfinite(arr[n]).all() for n in ("x", "y", "z") if n in (arr.dtype.names or ())))
    msg.data = np.ascontiguousarray(arr).tobytes()
    return msg


def candidates_cloud(candidates: Sequence[Candidate], stamp_ns: int, frame_id: str,
                     cameras: Optional[Sequence[int]] = None) -> PointCloud2:
    """``~/candidates``: header = query stamp + map frame; one point per ranked candidate
    (``camera``: which of the node's cameras found it)."""
    return array_to_cloud(candidates_array(candidates, cameras), stamp_ns, frame_id)


def cloud_to_array(msg: Any) -> np.ndarray:
    """Decode a PointCloud2 with scalar fields into a structured array (any field order)."""
    if msg.is_bigendian:
        raise InputError("big-endian point clouds are not supported")
    names, formats, offsets = [], [], []
    for f in msg.fields:
        if f.datatype not in _NUMPY_TYPES or f.count != 1:
            raise InputError(f"cloud field {f.name}: datatype {f.datatype} x{f.count} is not a "
                             "scalar type this decoder handles")
        names.append(f.name)
        formats.append(_NUMPY_TYPES[f.datatype])
        offsets.append(f.offset)
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets,
                      "itemsize": msg.point_step})
    count = msg.width * msg.height
    return np.frombuffer(bytes(msg.data), dtype=dtype, count=count)


# ------------------------------------------------------------------------------------- markers

def _colour(score: float, low: float) -> ColorRGBA:
    """Red (score at or below ``low``) to green (score 1)."""
    t = 0.0 if not math.isfinite(score) else min(1.0, max(0.0, (score - low) / max(1e-6, 1 - low)))
    return ColorRGBA(r=1.0 - t, g=t, b=0.1, a=0.9)


def _marker(ns: str, kind: int, stamp_ns: int, frame_id: str, scale: float,
            lifetime_s: float = 0.0) -> Marker:
    m = Marker()
    m.header.stamp = to_time(stamp_ns)
    m.header.frame_id = frame_id
    m.ns, m.id, m.type, m.action = ns, 0, kind, Marker.ADD
    m.pose.orientation.w = 1.0
    m.scale.x = m.scale.y = m.scale.z = scale
    m.color = ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0)
    sec, nanosec = divmod(int(lifetime_s * NS_PER_S), NS_PER_S)
    m.lifetime = Duration(sec=sec, nanosec=nanosec)
    return m


def _point(xyz: Iterable[float]) -> Point:
    x, y, z = (float(v) for v in xyz)
    return Point(x=x, y=y, z=z)


def frame_markers(candidates: Sequence[Candidate], query_position: Optional[Sequence[float]],
                  stamp_ns: int, frame_id: str, min_score: float) -> MarkerArray:
    """Per frame: the posed candidates (spheres coloured by score) and, when the query's own
    pose is known, lines from it to each of them."""
    posed = [c for c in candidates if c.position is not None]
    spheres = _marker("candidates", Marker.SPHERE_LIST, stamp_ns, frame_id, 0.4)
    spheres.points = [_point(c.position) for c in posed]  # type: ignore[arg-type]
    spheres.colors = [_colour(c.score, min_score) for c in posed]
    lines = _marker("query_to_candidates", Marker.LINE_LIST, stamp_ns, frame_id, 0.05)
    if query_position is not None and posed:
        for c in posed:
            lines.points.extend([_point(query_position), _point(c.position)])  # type: ignore
            colour = _colour(c.score, min_score)
            lines.colors.extend([colour, colour])
    else:
        lines.action = Marker.DELETE
    return MarkerArray(markers=[spheres, lines])


def closures_marker(segments: Sequence[tuple[Sequence[float], Sequence[float]]], stamp_ns: int,
                    frame_id: str) -> Marker:
    """All accepted loop closures so far (query position -> match position), in yellow."""
    m = _marker("loop_closures", Marker.LINE_LIST, stamp_ns, frame_id, 0.08)
    m.color = ColorRGBA(r=1.0, g=0.85, b=0.0, a=1.0)
    for a, b in segments:
        m.points.extend([_point(a), _point(b)])
    return m


def relocalization_marker(reloc: Relocalization, frame_id: str) -> Marker:
    """An arrow at the accepted relocalization pose."""
    m = _marker("relocalization", Marker.ARROW, reloc.stamp_ns, frame_id, 1.0)
    m.scale.y = m.scale.z = 0.25
    m.color = ColorRGBA(r=0.1, g=0.5, b=1.0, a=1.0)
    if reloc.position is not None and reloc.orientation is not None:
        m.pose.position = _point(reloc.position)
        m.pose.orientation.x, m.pose.orientation.y, m.pose.orientation.z, \
            m.pose.orientation.w = (float(v) for v in reloc.orientation)
    return m


def keyframes_marker(positions: np.ndarray, stamp_ns: int, frame_id: str,
                     max_points: int) -> Marker:
    """Map keyframe positions as points (NaN rows = keyframes without a pose, skipped),
    evenly subsampled to ``max_points``."""
    m = _marker("keyframes", Marker.POINTS, stamp_ns, frame_id, 0.15)
    m.color = ColorRGBA(r=0.6, g=0.6, b=0.6, a=0.8)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    pos = pos[np.isfinite(pos).all(axis=1)]
    if max_points <= 0:
        pos = pos[:0]
    elif len(pos) > max_points:
        pos = pos[np.linspace(0, len(pos) - 1, max_points).astype(np.int64)]
    m.points = [Point(x=x, y=y, z=z) for x, y, z in pos.tolist()]
    return m
