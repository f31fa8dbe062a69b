"""vpr_node managed the way nav2_lifecycle_manager manages its servers: a separate vpr_node
process driven over real DDS through the standard lifecycle services (lifecycle_msgs
ChangeState by transition id, then GetState to confirm, as the manager's service client does),
in the manager's order: startup (configure, activate), pause (deactivate), resume (a second
activate), reset (deactivate, cleanup), startup again, shutdown (deactivate, cleanup,
unconfigured-shutdown). Frames are processed exactly while active.

The bond: where ROS's bondpy is installed, the test takes the manager's side of the bond and
checks that it forms at activate, ends cleanly at deactivate, and that a manager that goes
silent is reported as an error while the node keeps processing. Where bondpy is not
installed (the pip wheels), the node says once that it forms no bond."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 Python packages (ros-kilted-* wheels)")

from test_node_common import (REPO, UNVERIFIED_ARGS, RosProbe, build_lap_map,  # noqa: E402
                              image_msg, make_route, start_node,
                              stop_process)

TOPIC = "/vpr_nav2_test/image"

# lifecycle_msgs/msg/Transition ids and the state each one must end in (what the manager
# checks with GetState after every ChangeState).
CONFIGURE, CLEANUP, ACTIVATE, DEACTIVATE, UNCONFIGURED_SHUTDOWN = 1, 2, 3, 4, 5
GOAL = {CONFIGURE: "inactive", CLEANUP: "unconfigured", ACTIVATE: "active",
        DEACTIVATE: "inactive", UNCONFIGURED_SHUTDOWN: "finalized"}


@pytest.fixture(scope="module")
def route():
    return make_route(frames_per_lap=8, radius_m=6.4, out_px=96)


@pytest.fixture(scope="module")
def lap_map(model96: Path, route, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lap_map(model96, route, 0, tmp_path_factory.mktemp("nav2") / "map")


class Manager:
    """The lifecycle manager's side: one node name, transitions by id, state confirmed."""

    def __init__(self, probe: RosProbe) -> None:
        self.probe = probe
        self.log: list[tuple[int, str]] = []

    def change(self, transition: int) -> bool:
        from lifecycle_msgs.srv import ChangeState

        req = ChangeState.Request()
        req.transition.id = transition
        ok = bool(self.probe.call(ChangeState, "/vpr_node/change_state", req, 120.0,
                                  attempt_s=60.0, retry=False).success)
        state = self.probe.state()
        self.log.append((transition, state))
        return ok and state == GOAL[transition]

    def startup(self) -> bool:
        return self.change(CONFIGURE) and self.change(ACTIVATE)

    def pause(self) -> bool:
        return self.change(DEACTIVATE)

    def resume(self) -> bool:
        return self.change(ACTIVATE)

    def reset(self) -> bool:
        return self.change(DEACTIVATE) and self.change(CLEANUP)

    def shutdown(self) -> bool:
        return self.change(DEACTIVATE) and self.change(CLEANUP) and \
            self.change(UNCONFIGURED_SHUTDOWN)


@pytest.fixture()
def managed(model96: Path, lap_map: Path, tmp_path: Path) -> Iterator[tuple[Manager, Path]]:
    """vpr_node as its own process (as Nav2's launch runs it), unconfigured, waiting."""
    from diagnostic_msgs.msg import DiagnosticArray

    log = tmp_path / "vpr_node.log"
    proc = start_node(["--ros-args", "--params-file",
                       str(REPO / "config" / "vpr_localization.yaml"),
                       "-p", f"model:={model96}", "-p", f"map:={lap_map}", "-p", "threads:=1",
                       "-p", "diagnostics_period_s:=0.2", *UNVERIFIED_ARGS,
                       "-r", f"image:={TOPIC}"], log)
    probe = RosProbe()
    probe.record("/diagnostics", DiagnosticArray)
    try:
        assert probe.spin_until(lambda: proc.poll() is not None or probe.latest_status()
                                is not None, 120), log.read_text()
        assert proc.poll() is None, log.read_text()
        yield Manager(probe), log
    finally:
        probe.close()
        stop_process(proc)


def _processed(probe: RosProbe) -> int:
    status = probe.latest_status()
    return int(status["frames_processed"]) if status else -1


def _feed(probe: RosProbe, pub, route, frames: list[int]) -> None:
    for i in frames:
        pub.publish(image_msg(route.images[i], route.stamps_ns[i]))
        probe.spin_for(0.15)


def test_the_managers_order_of_transitions_with_a_second_activate(managed, route) -> None:
    from sensor_msgs.msg import Image

    manager, log = managed
    probe = manager.probe
    pub = probe.publisher(TOPIC, Image, reliable=True)
    lap2 = route.frames(lap=1)

    assert manager.startup(), manager.log
    assert probe.spin_until(lambda: pub.get_subscription_count() == 1, 20)
    _feed(probe, pub, route, lap2[:3])
    assert probe.spin_until(lambda: _processed(probe) >= 3, 60), probe.latest_status()

    assert manager.pause(), manager.log                       # deactivate
    assert probe.spin_until(lambda: pub.get_subscription_count() == 0, 20)
    before = _processed(probe)
    _feed(probe, pub, route, lap2[3:5])                       # nobody listens
    probe.spin_for(1.0)
    assert _processed(probe) == before

    assert manager.resume(), manager.log                      # the second activate
    assert probe.spin_until(lambda: pub.get_subscription_count() == 1, 20)
    _feed(probe, pub, route, lap2[5:8])
    assert probe.spin_until(lambda: _processed(probe) >= before + 3, 60), \
        probe.latest_status()
    status = probe.latest_status()
    assert status["lifecycle_state"] == "active" and status["errors_total"] == "0"

    assert manager.reset(), manager.log                       # deactivate + cleanup
    assert probe.spin_until(lambda: probe.latest_status()["lifecycle_state"]
                            == "unconfigured", 20)
    assert manager.startup(), manager.log                     # bring-up after a reset
    assert manager.shutdown(), manager.log                    # ... unconfigured shutdown
    assert [state for _, state in manager.log] == [
        "inactive", "active", "inactive", "active", "inactive", "unconfigured",
        "inactive", "active", "inactive", "unconfigured", "finalized"]

    text = log.read_text()
    from vpr_ros.ros.nav2_bond import load_bondpy

    if load_bondpy() is None:
        # Three activations, one explanation: what to set in the manager instead.
        assert text.count("no bond with nav2_lifecycle_manager") == 1, text
        assert "bond_timeout: 0.0" in text


def test_a_transition_the_lifecycle_does_not_allow_is_refused_not_fatal(managed) -> None:
    manager, log = managed
    assert not manager.change(ACTIVATE)          # activate from unconfigured: refused
    assert manager.probe.state() == "unconfigured"
    assert manager.startup() and manager.shutdown(), manager.log


# ----------------------------------------------------------------------------- with bondpy

@pytest.fixture()
def bondpy():
    from vpr_ros.ros.nav2_bond import load_bondpy

    module = load_bondpy()
    if module is None:
        pytest.skip("ROS's bondpy is not installed (the ros-kilted pip wheels have no bond "
                    "package); the bond is tested where ROS 2 with Nav2 is installed")
    return module


def test_the_bond_forms_at_activate_ends_at_deactivate_and_a_silent_manager_is_an_error(
        managed, bondpy, route) -> None:
    from sensor_msgs.msg import Image

    manager, log = managed
    probe = manager.probe
    assert manager.startup()
    # The manager's side, as nav2_lifecycle_manager creates it after activate.
    bond = bondpy.Bond("bond", "vpr_node", probe.node)
    bond.heartbeat_period = 0.1
    bond.heartbeat_timeout = 4.0
    bond.start()
    assert probe.spin_until(lambda: bond.wait_until_formed(0.05), 10)
    assert probe.spin_until(lambda: probe.latest_status()["bond"] == "formed", 10)

    assert manager.pause()                      # the node ends its side cleanly...
    assert probe.spin_until(bond.is_broken, 10)  # ...which the manager sees at once
    bond.shutdown()

    assert manager.resume()                     # a new bond for the new activation
    silent = bondpy.Bond("bond", "vpr_node", probe.node)
    silent.start()
    assert probe.spin_until(lambda: silent.wait_until_formed(0.05), 10)
    silent.pub.destroy()                        # the manager goes silent (no break message)
    silent.sub.destroy()
    assert probe.spin_until(lambda: probe.latest_status()["bond"] == "broken", 30)
    assert probe.latest_status()["lifecycle_state"] == "active"
    pub = probe.publisher(TOPIC, Image, reliable=True)
    assert probe.spin_until(lambda: pub.get_subscription_count() == 1, 20)
    before = _processed(probe)
    _feed(probe, pub, route, route.frames(lap=1)[:2])
    assert probe.spin_until(lambda: _processed(probe) >= before + 2, 60)  # still working
    assert "bond with the lifecycle manager broke" in log.read_text()
    time.sleep(0.1)
