"""Which rclpy executor spins ``vpr_node``, and how to spin it.

Why a choice: the executor thread takes every camera message, dropped ones included. With
rclpy's ``SingleThreadedExecutor`` that costs 1.7-2.5 ms of Python per 640x480 frame at
15-100 Hz, 4.3-4.7 ms at 5 Hz with the timers (``vpr bench node``, column "executor CPU /
received"; the wait set is rebuilt in Python twice per message), and the encoder thread, which
shares the interpreter lock with it, blocked in 5-17 % of frames at 5-30 Hz. rclpy's
``EventsExecutor`` waits and dispatches in C++: 0.7-1.2 ms per frame (1.8 ms at 5 Hz), the
encoder thread blocked in 0-5 % of frames, and the node's p95 of everything but encode was
4.0-5.7 ms at 5-100 Hz instead of 4.4-8.6 ms in interleaved runs (docs/bench_node.md).

It is the default. rclpy marks it experimental, so the classic executor stays one argument
away (``vpr_node --executor single_threaded``, ``executor:=single_threaded`` in the launch
files); the lifecycle tests run under both, the route tests one each. One quirk is worked
around here: its ``spin()`` delivered no messages when called from a thread other than the
main one (tested), while ``spin_once`` in a loop does, from any thread, so both kinds are spun
that way.
"""

from __future__ import annotations

from typing import Any, Optional

SINGLE_THREADED = "single_threaded"
EVENTS = "events"
EXECUTORS = (SINGLE_THREADED, EVENTS)
#: What vpr_node, its launch files and the benchmark use unless told otherwise.
DEFAULT_EXECUTOR = EVENTS
#: How long one ``spin_once`` may wait: the loop re-checks the context this often, so a
#: shutdown is noticed within it.
SPIN_ONCE_TIMEOUT_S = 0.1


def make_executor(kind: str, context: Optional[Any] = None) -> Any:
    """A new executor of ``kind`` (one of :data:`EXECUTORS`) for ``context``."""
    if kind == SINGLE_THREADED:
        from rclpy.executors import SingleThreadedExecutor

        return SingleThreadedExecutor(context=context)
    if kind == EVENTS:
        from rclpy.experimental import EventsExecutor

        return EventsExecutor(context=context)
    raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")


def spin_until_shutdown(executor: Any, context: Any) -> None:
    """Spin ``executor`` until ``context`` shuts down (Ctrl-C, ``rclpy.shutdown``) or the
    executor is shut down; callable from any thread."""
    from rclpy.executors import ExternalShutdownException, ShutdownException

    try:
        while context.ok():
            executor.spin_once(timeout_sec=SPIN_ONCE_TIMEOUT_S)
    except (ShutdownException, ExternalShutdownException):
        pass
