"""Loop-closure messages as a back end reads them: by field label, never by position.

``vpr_node`` publishes each closure as a flat array whose layout label names every field; the
set of fields grows as the front end learns more (temporal evidence, geometric verification).
A consumer that indexed by position would silently read the wrong numbers the day a field is
added, so :func:`closure_from_fields` looks every value up by name and treats the optional
groups as a whole:

- ``query_stamp_s``, ``match_stamp_s`` (required): the two image stamps;
- ``score`` (optional): the place-recognition similarity;
- ``verified`` (optional, 1/0) and ``inliers``: the outcome of geometric verification;
- ``rel_tx rel_ty rel_tz rel_qx rel_qy rel_qz rel_qw`` (optional, all or nothing): the query
  camera's pose in the match keyframe's camera frame; ``rel_metric`` says whether the
  translation is metric (1) or only a unit direction (0);
- ``cov_00 .. cov_55`` (optional, all or nothing): its 6x6 covariance, row-major over
  (x, y, z, rx, ry, rz): translation offset and rotation vector, both in the match camera's
  frame (the graph converts it, :func:`~vpr_ros.slam.se3.match_frame_to_right_covariance`).

A group with a missing or non-finite member counts as absent (a front end that could not
verify a closure writes NaN there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

import gtsam
import numpy as np

from vpr_ros.errors import InputError
from vpr_ros.slam.se3 import pose3

NS_PER_S = 1_000_000_000
REL_FIELDS = ("rel_tx", "rel_ty", "rel_tz", "rel_qx", "rel_qy", "rel_qz", "rel_qw")
COV_FIELDS = tuple(f"cov_{i}{j}" for i in range(6) for j in range(6))


@dataclass(frozen=True)
class ClosureMeasurement:
    """One loop closure as published: stamps, evidence and (when verified) the relative pose
    of the query camera in the match camera's frame, with its covariance in ROS order."""

    query_stamp_ns: int
    match_stamp_ns: int
    score: float = math.nan
    verified: Optional[bool] = None
    inliers: Optional[int] = None
    relative: Optional[gtsam.Pose3] = field(default=None, compare=False)
    metric: bool = True
    covariance: Optional[np.ndarray] = field(default=None, compare=False)

    @property
    def has_transform(self) -> bool:
        return self.relative is not None


def _finite(fields: Mapping[str, float], name: str) -> Optional[float]:
    v = fields.get(name)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _stamp_ns(fields: Mapping[str, float], name: str) -> int:
    v = _finite(fields, name)
    if v is None or v < 0:
        have = ", ".join(sorted(fields)) or "none"
        raise InputError(f"loop closure has no usable {name} (fields: {have}); expected the "
                         "query and match image stamps in seconds, as vpr_node publishes them")
    return int(round(v * NS_PER_S))


def closure_from_fields(fields: Mapping[str, float]) -> ClosureMeasurement:
    """A :class:`ClosureMeasurement` from a field-name -> value mapping (see the module doc)."""
    q_ns, m_ns = _stamp_ns(fields, "query_stamp_s"), _stamp_ns(fields, "match_stamp_s")
    score = _finite(fields, "score")
    verified_v = _finite(fields, "verified")
    inliers_v = _finite(fields, "inliers")
    relative = None
    rel = [_finite(fields, n) for n in REL_FIELDS]
    if all(v is not None for v in rel):
        try:
            relative = pose3(rel[:3], rel[3:])
        except InputError:
            relative = None  # zero-length quaternion: no usable transform
    metric_v = _finite(fields, "rel_metric")
    cov = None
    cov_v = [_finite(fields, n) for n in COV_FIELDS]
    if all(v is not None for v in cov_v):
        cov = np.asarray(cov_v, dtype=np.float64).reshape(6, 6)
    return ClosureMeasurement(
        query_stamp_ns=q_ns, match_stamp_ns=m_ns,
        score=math.nan if score is None else score,
        verified=None if verified_v is None else verified_v >= 0.5,
        inliers=None if inliers_v is None else int(inliers_v),
        relative=relative,
        metric=True if metric_v is None else metric_v >= 0.5,
        covariance=cov)
