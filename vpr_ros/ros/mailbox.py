"""A one-slot mailbox between the subscription callback and the encoder thread.

Why one slot and not a queue: a camera publishes faster than a CPU encodes, and a queue between
them only grows, so every answer would be about a frame further in the past. Place recognition
wants the *current* place: the callback drops the frame into the slot (replacing, and counting,
any frame the worker has not taken yet) and the worker always takes the newest one. Latency is
then bounded by one encode, whatever the input rate.

No ROS types here, so the policy is unit-testable without a middleware.
"""

from __future__ import annotations

import threading
from typing import Generic, Optional, TypeVar

T = TypeVar("T")


class Doorbell:
    """Rung by every :meth:`Mailbox.put` of the mailboxes that share it: one worker serving
    several cameras' mailboxes waits here for the first frame of any of them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._rings = 0

    def ring(self) -> None:
        with self._cond:
            self._rings += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: Optional[float]) -> int:
        """Block until rung more than ``seen`` times in total (or the timeout); returns the
        total so far."""
        with self._cond:
            if self._rings <= seen:
                self._cond.wait(timeout)
            return self._rings


class Mailbox(Generic[T]):
    """Thread-safe single slot: ``put`` overwrites, ``get`` takes (blocking with a timeout)."""

    def __init__(self, doorbell: Optional[Doorbell] = None) -> None:
        self._cond = threading.Condition()
        self._item: Optional[T] = None
        self._full = False
        self._closed = False
        self._doorbell = doorbell
        self.dropped = 0
        self.delivered = 0

    def put(self, item: T) -> Optional[T]:
        """Leave ``item`` for the worker; return the older, never-taken item it replaced."""
        with self._cond:
            old = self._item if self._full else None
            if self._full:
                self.dropped += 1
            self._item, self._full = item, True
            self._cond.notify()
        if self._doorbell is not None:
            self._doorbell.ring()
        return old

    def get(self, timeout: Optional[float] = None) -> Optional[T]:
        """The newest item, or ``None`` when the timeout passed or the mailbox was closed."""
        with self._cond:
            if not self._full and not self._closed:
                self._cond.wait(timeout)
            if not self._full:
                return None
            item, self._item, self._full = self._item, None, False
            self.delivered += 1
            return item

    def clear(self) -> int:
        """Discard a waiting item (deactivation); returns how many were discarded (0 or 1)."""
        with self._cond:
            had = int(self._full)
            self._item, self._full = None, False
            return had

    def close(self) -> None:
        """Wake a waiting ``get`` for good; later gets return immediately."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        """Accept waiting gets again (next activation)."""
        with self._cond:
            self._closed = False

    @property
    def pending(self) -> int:
        """0 or 1: whether a frame is waiting. Never more: that is the point."""
        with self._cond:
            return int(self._full)
