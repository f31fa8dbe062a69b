"""A short history of odometry poses, queried for the pose at an image stamp.

Camera and odometry run on different clocks and rates, and the encoder thread looks a frame's
pose up only after encoding it, by which time the odometry samples on both sides of the image
stamp have usually arrived. So the pose is interpolated (position linearly, orientation by
slerp, the map builder's rule) between the bracketing samples when they are at most
``max_gap_s`` apart; otherwise the nearest sample is used when it lies within ``tolerance_s``
of the stamp; otherwise the frame has no pose. A wrong keyframe pose is worse than a missing one,
so nothing is extrapolated.
"""

from __future__ import annotations

import bisect
import threading
from typing import Optional

import numpy as np

from vpr_ros.mapdb.poses import Pose, slerp
from vpr_ros.ros.conversions import PoseSample

NS_PER_S = 1_000_000_000


class PoseBuffer:
    """Time-sorted pose samples of the last ``horizon_s``; thread-safe (callback adds, worker
    reads)."""

    def __init__(self, horizon_s: float, max_gap_s: float, tolerance_s: float,
                 time_jump_s: float = 1.0) -> None:
        self._horizon_ns = int(horizon_s * NS_PER_S)
        self._max_gap_ns = int(max_gap_s * NS_PER_S)
        self._tolerance_ns = int(tolerance_s * NS_PER_S)
        self._time_jump_ns = int(time_jump_s * NS_PER_S)
        self._stamps: list[int] = []
        self._samples: list[PoseSample] = []
        self._lock = threading.Lock()
        self.time_jumps = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._stamps)

    @property
    def frame_id(self) -> str:
        """Frame of the newest sample (the frame keyframe positions are expressed in)."""
        with self._lock:
            return self._samples[-1].frame_id if self._samples else ""

    def clear(self) -> None:
        with self._lock:
            self._stamps.clear()
            self._samples.clear()

    def add(self, sample: PoseSample) -> bool:
        """Insert a sample; returns False when it revealed a clock reset (history cleared).

        Slightly late samples are inserted in order; a repeated stamp replaces the old sample;
        a sample more than ``time_jump_s`` behind the newest means the clock restarted, and the
        old timeline's samples are dropped so they are never interpolated with the new ones.
        """
        stamp = int(sample.stamp_ns)
        with self._lock:
            jumped = bool(self._stamps) and self._stamps[-1] - stamp > self._time_jump_ns
            if jumped:
                self._stamps.clear()
                self._samples.clear()
                self.time_jumps += 1
            i = bisect.bisect_left(self._stamps, stamp)
            if i < len(self._stamps) and self._stamps[i] == stamp:
                self._samples[i] = sample
            else:
                self._stamps.insert(i, stamp)
                self._samples.insert(i, sample)
            cut = bisect.bisect_left(self._stamps, self._stamps[-1] - self._horizon_ns)
            if cut:
                del self._stamps[:cut]
                del self._samples[:cut]
            return not jumped

    def at(self, stamp_ns: int) -> Optional[tuple[Pose, str]]:
        """The pose at ``stamp_ns`` and its frame, or ``None`` when the buffer cannot say."""
        stamp = int(stamp_ns)
        with self._lock:
            n = len(self._stamps)
            if n == 0:
                return None
            i = bisect.bisect_left(self._stamps, stamp)
            if i < n and self._stamps[i] == stamp:
                s = self._samples[i]
                return Pose(s.position, s.orientation), s.frame_id
            before = self._samples[i - 1] if i > 0 else None
            after = self._samples[i] if i < n else None
        if before is not None and after is not None \
                and after.stamp_ns - before.stamp_ns <= self._max_gap_ns:
            t = (stamp - before.stamp_ns) / (after.stamp_ns - before.stamp_ns)
            pos = (1.0 - t) * np.asarray(before.position) + t * np.asarray(after.position)
            quat = slerp(np.asarray(before.orientation), np.asarray(after.orientation), t)
            return (Pose((float(pos[0]), float(pos[1]), float(pos[2])),
                         (float(quat[0]), float(quat[1]), float(quat[2]), float(quat[3]))),
                    after.frame_id)
        nearest = min((s for s in (before, after) if s is not None),
                      key=lambda s: abs(s.stamp_ns - stamp))
        if abs(nearest.stamp_ns - stamp) <= self._tolerance_ns:
            return Pose(nearest.position, nearest.orientation), nearest.frame_id
        return None
