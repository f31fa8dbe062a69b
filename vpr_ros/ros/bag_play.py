"""``vpr bag play``: publish a rosbag's messages through rclpy with their recorded timing.

``ros2 bag`` has no wheel, yet the node has to be exercised on recordings wherever the project
runs. Messages are published as the serialised CDR bytes stored in the bag (rclpy's raw
publish), so nothing is decoded and re-encoded on the way: subscribers get exactly what was
recorded. Timing follows the bag (receive) timestamps, scaled by ``rate``; a slow publisher
never accumulates delay silently, it just catches up without sleeping. Damaged bags play what
the reader salvages (see :mod:`vpr_ros.mapdb.bag_reader`). ROS 1 bags play too: the reader
hands their messages on converted to ROS 2 CDR, so what is published is the ROS 2 message;
a ROS 1 message that cannot be converted (corrupt) is skipped and counted, and a topic whose
definition the bag does not carry usably is not played (said at the start).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from vpr_ros.errors import BagError, ConfigError
from vpr_ros.mapdb.bag_reader import BagReader, RawMessage

log = logging.getLogger(__name__)

QOS_CHOICES = ("reliable", "sensor")


@dataclass(frozen=True)
class PlayOptions:
    """How to play: speed, which topics, from where, how often, with which publisher QoS."""

    rate: float = 1.0
    topics: Sequence[str] | None = None
    loop: bool = False
    start_offset_s: float = 0.0
    qos: str = "reliable"
    wait_subscribers_s: float = 0.0
    #: topic -> subscribers to wait for (default one per topic): a topic several nodes listen
    #: to (the demo's odometry: vpr_node and the pose graphs) is played once all are matched
    min_subscribers: Mapping[str, int] = field(default_factory=dict)
    node_name: str = "vpr_bag_player"

    def __post_init__(self) -> None:
        if not (self.rate > 0):
            raise ConfigError(f"--rate must be > 0, got {self.rate}")
        if not (self.start_offset_s >= 0):
            raise ConfigError(f"--start-offset must be >= 0 seconds, got {self.start_offset_s}")
        if self.qos not in QOS_CHOICES:
            raise ConfigError(f"--qos {self.qos!r} is not one of {', '.join(QOS_CHOICES)}")
        if not (self.wait_subscribers_s >= 0):
            raise ConfigError(f"--wait-subscribers must be >= 0 seconds, got "
                              f"{self.wait_subscribers_s}")
        for topic, n in self.min_subscribers.items():
            if not (isinstance(n, int) and n >= 1):
                raise ConfigError(f"--min-subscribers {topic}={n!r}: the count must be an "
                                  "integer >= 1")


@dataclass
class PlayStats:
    """Counts of one play: messages per topic, loops done, topics skipped and why."""

    published: dict[str, int] = field(default_factory=dict)
    skipped_topics: dict[str, str] = field(default_factory=dict)
    corrupt: dict[str, int] = field(default_factory=dict)  # not published: undecodable
    loops: int = 0
    wall_s: float = 0.0


def playback_schedule(messages: Iterable[RawMessage], rate: float,
                      start_offset_ns: int = 0) -> Iterator[tuple[float, RawMessage]]:
    """(seconds after playback start, message) for each message at or after the bag's first
    timestamp + ``start_offset_ns``; bag time gaps are divided by ``rate``."""
    first: int | None = None
    for message in messages:
        if first is None:
            first = message.log_time_ns
        offset = message.log_time_ns - first - start_offset_ns
        if offset < 0:
            continue
        yield offset / 1e9 / rate, message


def message_class(msgtype: str) -> Any:
    """The rclpy message class for ``pkg/msg/Type`` (installed message packages only)."""
    parts = msgtype.split("/")
    if len(parts) != 3 or parts[1] != "msg":
        raise BagError(f"message type {msgtype!r} is not of the form pkg/msg/Type")
    try:
        from rosidl_runtime_py.utilities import get_message  # a ROS install has it

        return get_message(msgtype)
    except ImportError:
        pass
    except (AttributeError, ModuleNotFoundError, ValueError) as exc:
        raise BagError(f"message type {msgtype} is not installed ({exc})") from exc
    try:
        return getattr(importlib.import_module(f"{parts[0]}.msg"), parts[2])
    except (ImportError, AttributeError) as exc:
        raise BagError(f"message type {msgtype} is not installed in this environment "
                       f"(pip install ros-<distro>-{parts[0].replace('_', '-')}); its topic "
                       "cannot be played") from exc


def publisher_qos(kind: str) -> Any:
    """Reliable (depth 100, what ros2 bag play offers by default) or sensor-data best effort."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

    if kind == "sensor":
        return qos_profile_sensor_data
    return QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


def play_bag(bag: str | Path, options: PlayOptions | None = None,
             stop: threading.Event | None = None,
             on_publish: Callable[[RawMessage], None] | None = None) -> PlayStats:
    """Publish the bag (see the module docstring) until it ends, or forever with ``loop``,
    or until ``stop`` is set. Runs its own rclpy context, so it can share a process with
    other nodes."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    options = options or PlayOptions()
    stop = stop or threading.Event()
    stats = PlayStats()
    started = time.monotonic()
    with BagReader(bag) as reader:
        topics = list(options.topics) if options.topics else sorted(reader.topics)
        missing = [t for t in topics if t not in reader.topics]
        if missing:
            raise BagError(f"topic(s) {', '.join(missing)} not in bag {bag}; available "
                           f"topics: {reader.describe_topics()}")
        classes: dict[str, Any] = {}
        for topic in topics:
            if topic in reader.unreadable:
                stats.skipped_topics[topic] = reader.unreadable[topic]
                log.warning("skipping %s: %s", topic, reader.unreadable[topic])
                continue
            try:
                classes[topic] = message_class(reader.topics[topic])
            except BagError as exc:
                stats.skipped_topics[topic] = str(exc)
                log.warning("skipping %s: %s", topic, exc)
        if not classes:
            raise BagError(f"none of the topics {topics} of bag {bag} can be played: "
                           + "; ".join(stats.skipped_topics.values()))
        context = rclpy.Context()
        # Python's own SIGINT handling (KeyboardInterrupt) so Ctrl-C ends playback cleanly.
        rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
        node = None
        publishers = {}
        try:
            node = rclpy.create_node(options.node_name, context=context)
            qos = publisher_qos(options.qos)
            publishers = {t: node.create_publisher(cls, t, qos) for t, cls in classes.items()}
            _wait_for_subscribers(publishers, options.wait_subscribers_s, stop,
                                  options.min_subscribers)
            while not stop.is_set():
                _play_once(reader, list(publishers), publishers, options, stop, stats,
                           on_publish)
                stats.loops += 1
                if not options.loop:
                    break
        finally:
            _drain(publishers)
            if node is not None:
                node.destroy_node()
            context.try_shutdown()
    stats.wall_s = time.monotonic() - started
    return stats


def _drain(publishers: dict[str, Any], timeout_s: float = 2.0) -> None:
    """Let reliable subscribers acknowledge what was published before the node goes away.

    Destroying the participant right after the last ``publish`` drops samples still in flight,
    so the last messages of a bag (or those before a Ctrl-C) were sometimes never delivered.
    Best-effort publishers return at once; the wait is bounded so a vanished subscriber cannot
    hold the exit."""
    from rclpy.duration import Duration

    deadline = time.monotonic() + timeout_s
    for topic, pub in publishers.items():
        left = max(0.0, deadline - time.monotonic())
        try:
            if not pub.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9))):
                log.warning("%s: not every subscriber acknowledged the last messages within "
                            "%.1f s", topic, timeout_s)
        except Exception as exc:  # an rmw without the call must not turn an exit into a crash
            log.debug("%s: wait_for_all_acked unavailable (%s)", topic, exc)
            return


def _wait_for_subscribers(publishers: dict[str, Any], timeout_s: float,
                          stop: threading.Event,
                          min_subscribers: Mapping[str, int] | None = None) -> None:
    """Give DDS discovery time to match subscribers (one per topic, or ``min_subscribers``),
    so the first messages are not lost."""
    if timeout_s <= 0:
        return
    deadline = time.monotonic() + timeout_s
    need = dict(min_subscribers or {})

    def short(t: str, p: Any) -> bool:
        return p.get_subscription_count() < need.get(t, 1)
    while time.monotonic() < deadline and not stop.is_set():
        if not any(short(t, p) for t, p in publishers.items()):
            return
        time.sleep(0.02)
    waiting = [t for t, p in publishers.items() if short(t, p)]
    if waiting:
        log.warning("no subscriber on %s after %.1f s; playing anyway", ", ".join(waiting),
                    timeout_s)


def _play_once(reader: BagReader, topics: list[str], publishers: dict[str, Any],
               options: PlayOptions, stop: threading.Event, stats: PlayStats,
               on_publish: Callable[[RawMessage], None] | None) -> None:
    start = time.monotonic()
    schedule = playback_schedule(reader.messages(topics), options.rate,
                                 int(round(options.start_offset_s * 1e9)))
    for due, message in schedule:
        delay = start + due - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        if stop.is_set():
            return
        if message.error:
            count = stats.corrupt[message.topic] = stats.corrupt.get(message.topic, 0) + 1
            if count <= 5:
                log.warning("%s: not publishing the message at bag time %d ns: %s",
                            message.topic, message.log_time_ns, message.error)
            continue
        publishers[message.topic].publish(bytes(message.data))
        stats.published[message.topic] = stats.published.get(message.topic, 0) + 1
        if on_publish is not None:
            on_publish(message)
