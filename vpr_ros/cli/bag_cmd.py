"""``vpr bag play|info``: replay a rosbag into ROS 2 (no ``ros2 bag`` needed) and list its topics."""

from __future__ import annotations

import argparse
import signal
import threading
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bag", help="play a rosbag through ROS 2; list a bag's topics")
    bsub = p.add_subparsers(dest="bag_command", metavar="ACTION")
    bsub.required = True

    play = bsub.add_parser(
        "play", help="publish a bag's messages with their recorded timing",
        description="Publish the messages of a rosbag2 bag (sqlite3 or MCAP) or a ROS 1 bag "
        "through rclpy, timed by their recorded bag timestamps divided by --rate (ROS 1 "
        "messages are converted to their ROS 2 types). Ctrl-C stops.")
    play.add_argument("bag", help="rosbag2 directory, a single .mcap / .db3 file, or a ROS 1 "
                      ".bag file")
    play.add_argument("--rate", type=float, default=1.0,
                      help="playback speed factor (2 = twice as fast; default 1)")
    play.add_argument("--topics", nargs="+", metavar="TOPIC",
                      help="play only these topics (default: all)")
    play.add_argument("--loop", action="store_true", help="start over at the end, until Ctrl-C")
    play.add_argument("--start-offset", type=float, default=0.0, metavar="S",
                      help="skip the first S seconds of the bag")
    play.add_argument("--qos", choices=["reliable", "sensor"], default="reliable",
                      help="publisher QoS: reliable (default, depth 100) or sensor "
                           "(best effort, depth 5)")
    play.add_argument("--wait-subscribers", type=float, default=0.0, metavar="S",
                      help="wait up to S seconds for a subscriber on every topic before "
                           "starting (so the first messages are not lost to discovery)")
    play.add_argument("--min-subscribers", action="append", default=[], metavar="TOPIC=N",
                      help="with --wait-subscribers: wait for N subscribers on TOPIC instead of "
                           "one (a topic several nodes listen to); repeatable")
    play.set_defaults(func=_play)

    info = bsub.add_parser("info", help="storage, topics, types and message counts of a bag")
    info.add_argument("bag", help="rosbag2 directory, a single .mcap / .db3 file, or a ROS 1 "
                      ".bag file")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)


def _topic_counts(items: list[str]) -> dict[str, int]:
    from vpr_ros.errors import ConfigError

    out = {}
    for item in items:
        topic, sep, n = item.rpartition("=")
        if not sep or not topic or not n.strip().isdigit():
            raise ConfigError(f"--min-subscribers {item!r}: expected TOPIC=N, e.g. /odom=3")
        out[topic] = int(n)
    return out


def _play(args: argparse.Namespace) -> int:
    from vpr_ros.ros.bag_play import PlayOptions, play_bag

    options = PlayOptions(rate=args.rate, topics=args.topics, loop=args.loop,
                          start_offset_s=args.start_offset, qos=args.qos,
                          wait_subscribers_s=args.wait_subscribers,
                          min_subscribers=_topic_counts(args.min_subscribers))
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def first_ctrl_c(signum, frame) -> None:
        # Ctrl-C stops playback through the loop's own stop flag: an exception raised at an
        # arbitrary bytecode could land inside an rclpy finaliser and be swallowed there, which
        # left the player running. A second Ctrl-C interrupts at once.
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    in_main = threading.current_thread() is threading.main_thread()  # signal.signal needs it
    if in_main:
        signal.signal(signal.SIGINT, first_ctrl_c)
    try:
        stats = play_bag(args.bag, options, stop=stop)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    if stop.is_set():
        raise KeyboardInterrupt  # reported by the CLI as "interrupted", exit status 130
    total = sum(stats.published.values())
    per_topic = ", ".join(f"{t}: {n}" for t, n in sorted(stats.published.items()))
    corrupt = sum(stats.corrupt.values())
    print(f"published {total} messages in {stats.wall_s:.1f} s ({per_topic or 'none'})"
          + (f"; skipped {', '.join(stats.skipped_topics)}" if stats.skipped_topics else "")
          + (f"; {corrupt} undecodable message(s) not published" if corrupt else ""))
    return 0


def _info(args: argparse.Namespace) -> int:
    from vpr_ros.mapdb.bag_reader import BagReader

    with BagReader(args.bag) as reader:
        data = {"bag": str(args.bag), "storage": reader.storage,
                "damaged": reader.stats.damaged,
                "topics": {t: {"type": m, "messages": reader.message_counts.get(t, -1),
                               **({"unreadable": reader.unreadable[t]}
                                  if t in reader.unreadable else {})}
                           for t, m in sorted(reader.topics.items())}}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"bag      {data['bag']} ({data['storage']}"
          + (", DAMAGED: partly salvaged" if data["damaged"] else "") + ")")
    width = max((len(t) for t in data["topics"]), default=0)
    for topic, entry in data["topics"].items():
        count = entry["messages"] if entry["messages"] >= 0 else "?"
        print(f"  {topic:<{width}}  {entry['type']}  ({count} messages)"
              + (f"  UNREADABLE: {entry['unreadable']}" if "unreadable" in entry else ""))
    return 0
