"""Which camera frames become map keyframes.

A 30 Hz camera on a slow robot sees nearly the same place in hundreds of consecutive frames;
storing all of them bloats the map and floods the top-K of every query with one place. A frame
becomes a keyframe once the robot has travelled ``distance_m`` (path length, so a zig-zag
counts) or turned ``rotation_deg`` since the last keyframe. Without a pose for the frame, time
is all there is: one keyframe every ``interval_s``. ``max_interval_s`` optionally adds a
keyframe while standing still (scenes that change in place), and ``min_interval_s`` caps the
rate when moving fast.

The selector is a small state machine fed one frame at a time, so map building streams a bag
without holding its images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from vpr_ros.errors import ConfigError
from vpr_ros.mapdb.poses import Quat, Vec3, rotation_angle_deg

# Thresholds are met "within rounding": ten steps of 0.1 m sum to 0.9999999999999999 m.
_EPS = 1e-9


@dataclass(frozen=True)
class KeyframePolicy:
    """Thresholds for keyframe selection; defaults match ``config/map_build.yaml``."""

    distance_m: float = 1.0
    rotation_deg: float = 15.0
    interval_s: float = 1.0
    max_interval_s: float | None = None
    min_interval_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("distance_m", "rotation_deg", "interval_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"keyframes.{name} must be a positive number, got {value!r}")
        if not (isinstance(self.min_interval_s, (int, float)) and self.min_interval_s >= 0):
            raise ConfigError("keyframes.min_interval_s must be >= 0, got "
                              f"{self.min_interval_s!r}")
        if self.max_interval_s is not None and not (
                isinstance(self.max_interval_s, (int, float)) and self.max_interval_s > 0):
            raise ConfigError("keyframes.max_interval_s must be a positive number or null, got "
                              f"{self.max_interval_s!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "KeyframePolicy":
        """Build from the ``keyframes:`` section of a config; unknown keys are refused."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown keyframes option(s) {unknown}; expected some of "
                              f"{sorted(known)}")
        return cls(**dict(values))


class KeyframeSelector:
    """Feed frames in time order with :meth:`accept`; it answers whether each is a keyframe."""

    def __init__(self, policy: KeyframePolicy | None = None) -> None:
        self.policy = policy or KeyframePolicy()
        self._last_kf_stamp: int | None = None
        self._last_kf_orientation: Quat | None = None
        self._prev_position: Vec3 | None = None
        self._travelled = 0.0

    def accept(self, stamp_ns: int, position: Vec3 | None = None,
               orientation: Quat | None = None) -> bool:
        """True if this frame should become a keyframe (and then the state is reset to it)."""
        policy = self.policy
        if position is not None:
            if self._prev_position is not None:
                self._travelled += math.dist(self._prev_position, position)
            first_pose = self._prev_position is None
            self._prev_position = tuple(float(v) for v in position)  # type: ignore[assignment]
        else:
            first_pose = False
        if self._last_kf_stamp is None:
            return self._take(stamp_ns, orientation)
        elapsed = (int(stamp_ns) - self._last_kf_stamp) * 1e-9
        if elapsed < policy.min_interval_s - _EPS:
            return False
        if position is None:
            take = elapsed >= policy.interval_s - _EPS
        else:
            rotated = 0.0
            if orientation is not None and self._last_kf_orientation is not None:
                rotated = rotation_angle_deg(self._last_kf_orientation, orientation)
            take = (first_pose
                    or self._travelled >= policy.distance_m - _EPS
                    or rotated >= policy.rotation_deg - _EPS
                    or (policy.max_interval_s is not None
                        and elapsed >= policy.max_interval_s - _EPS))
        return self._take(stamp_ns, orientation) if take else False

    def _take(self, stamp_ns: int, orientation: Quat | None) -> bool:
        self._last_kf_stamp = int(stamp_ns)
        if orientation is not None:
            self._last_kf_orientation = tuple(float(v) for v in orientation)  # type: ignore
        self._travelled = 0.0
        return True


def select_keyframes(stamps_ns: Sequence[int],
                     positions: Sequence[Vec3 | None] | None = None,
                     orientations: Sequence[Quat | None] | None = None,
                     policy: KeyframePolicy | None = None) -> list[int]:
    """Indices of the keyframes among frames given in time order (batch form of the selector)."""
    selector = KeyframeSelector(policy)
    chosen = []
    for i, stamp in enumerate(stamps_ns):
        pos = positions[i] if positions is not None else None
        quat = orientations[i] if orientations is not None else None
        if selector.accept(stamp, pos, quat):
            chosen.append(i)
    return chosen
