"""The bond nav2_lifecycle_manager expects from every node it manages.

Nav2's lifecycle manager, after activating a node, creates a bond (ROS's ``bond`` package:
``bond/msg/Status`` heartbeats on the topic ``bond``, bond id = the node's name) and waits for
the node's side of it; a node that never answers fails the bring-up ("Server vpr_node was
unable to be reached after 4.00s by bond"), and one whose heartbeats stop later makes the
manager reset every node it manages. Nav2's own servers create their side at activate (period
0.1 s) and drop it at deactivate; :class:`ManagerBond` does the same for ``vpr_node`` with
ROS's Python implementation, ``bondpy``, where it is installed (any ROS 2 installation with
Nav2 has it). Where it is not (the pip wheels of ROS 2 ship no ``bond`` package), nothing is
formed, one log line says so, and the manager must be told not to expect bonds
(``bond_timeout: 0.0`` in its parameters).

A bond that breaks after it was formed (the manager died or cannot be reached) is reported as
an error in the log and in ``/diagnostics`` (``bond: broken``); the node keeps running, with
its model, map and state: losing the manager is not a reason to stop recognising places.
A bond that never forms (the node is not managed by Nav2, or the manager has bonds off) is one
warning, not an error.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any, Callable, Optional

#: The parameter ROS's bondpy declares on the node the first time a heartbeat times out.
_DISABLE_PARAM = "bond_disable_heartbeat_timeout"

#: States reported in /diagnostics (``bond`` key).
OFF, UNAVAILABLE, WAITING, FORMED, BROKEN, NOT_FORMED = (
    "off", "unavailable", "waiting", "formed", "broken", "not_formed")

_BONDPY: list[Any] = []  # [module or None], resolved once per process


def load_bondpy() -> Optional[Any]:
    """ROS's ``bondpy.bondpy`` module, or None where it is not installed.

    PyPI has an unrelated package also called ``bondpy``; only a module with ROS's ``Bond``
    class whose ``bond.msg`` messages import counts."""
    if not _BONDPY:
        module = None
        try:
            candidate = importlib.import_module("bondpy.bondpy")
            importlib.import_module("bond.msg")
            if callable(getattr(candidate, "Bond", None)):
                module = candidate
        except Exception:  # not installed, or something else under that name
            module = None
        _BONDPY.append(module)
    return _BONDPY[0]


class ManagerBond:
    """This node's side of the bond with nav2_lifecycle_manager: started at activate, broken
    cleanly at deactivate, cleanup and shutdown. ``state`` is one of the constants above."""

    def __init__(self, node: Any, log: Callable[[str, str], None]) -> None:
        self.node = node
        self.log = log  # (level, message)
        self.state = OFF
        self._bond: Any = None
        self._lock = threading.Lock()
        self._said_unavailable = False
        self._formed = False

    def start(self, topic: str, heartbeat_period_s: float, heartbeat_timeout_s: float) -> None:
        """Form the bond (id = node name) unless the period is 0 or bondpy is missing."""
        self.stop()
        if heartbeat_period_s <= 0.0:
            self.state = OFF
            return
        bondpy = load_bondpy()
        if bondpy is None:
            self.state = UNAVAILABLE
            if not self._said_unavailable:
                self._said_unavailable = True
                self.log("info", "no bond with nav2_lifecycle_manager: ROS's bondpy is not "
                         "installed here (the pip wheels of ROS 2 have no bond package). Under "
                         "Nav2's lifecycle manager set its parameter bond_timeout: 0.0, or "
                         "install ros-<distro>-bondpy")
            return
        # bondpy declares this parameter on the node at each heartbeat timeout; declaring it a
        # second time (a later activation) would raise inside bondpy's timer thread.
        if self.node.has_parameter(_DISABLE_PARAM):
            self.node.undeclare_parameter(_DISABLE_PARAM)
        with self._lock:
            self._formed = False
            bond = bondpy.Bond(topic, self.node.get_name(), self.node,
                               on_broken=self._on_broken, on_formed=self._on_formed)
            bond.heartbeat_period = heartbeat_period_s
            bond.heartbeat_timeout = heartbeat_timeout_s
            bond.start()
            self._bond = bond
            self.state = WAITING
        self.log("info", f"bond to the lifecycle manager started on {topic} (id "
                 f"{self.node.get_name()}, heartbeat {heartbeat_period_s:g} s)")

    def stop(self) -> None:
        """Break the bond cleanly (the manager sees a deliberate end, not a timeout)."""
        with self._lock:
            bond, self._bond = self._bond, None
        if bond is not None:
            try:
                bond.shutdown()
            except Exception as exc:  # a half-torn-down context must not fail a transition
                self.log("warning", f"closing the bond failed: {type(exc).__name__}: {exc}")
        if self.state in (WAITING, FORMED, BROKEN, NOT_FORMED):
            self.state = OFF

    def _on_formed(self) -> None:
        self._formed = True
        self.state = FORMED
        self.log("info", "bond with the lifecycle manager formed")

    def _on_broken(self) -> None:
        with self._lock:
            current = self._bond
        if current is None:  # our own stop(): a deliberate end
            return
        if not self._formed:
            self.state = NOT_FORMED
            self.log("warning", "no lifecycle manager formed the bond (not managed by Nav2, or "
                     "its bond_timeout is 0.0): running without one")
            return
        self.state = BROKEN
        self.log("error", "the bond with the lifecycle manager broke: no heartbeat within the "
                 "timeout (the manager stopped or cannot be reached). vpr_node stays in its "
                 "state and keeps its model, map and results; re-activate it to form a new "
                 "bond")
