"""Active controllers (``set-controller BR tcp:IP:PORT``) against a controller socket the
test owns: the switch connects, reconnects with backoff when the controller is not there
yet or went away, closes a connection whose peer does not answer its inactivity probe
(and connects again), and ``show`` says whether each controller is connected; the fail
mode decides what guests' traffic does while no controller is connected: standalone
forwards by NORMAL (the rules kept, unused), secure keeps to the rules."""

from __future__ import annotations

import re
import socket
import time

from tests.harness import openflow as O
from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports
from tests.test_openflow_packets import MAC, udp


def wait_for(pred, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class FakeController:
    """The controller's end: accepts the switch's connections (each an O.Client)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.client: O.Client | None = None

    def accept(self, timeout: float = 15.0) -> O.Client:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        self.client = O.Client.over(conn)
        return self.client

    def closed_by_switch(self, timeout: float) -> bool:
        """True when the switch closes the connection (nothing is answered meanwhile)."""
        self.client.sock.settimeout(timeout)
        try:
            while True:
                self.client.recv()
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def forwarded(ports) -> bool:
    ports["a"].send_all([udp(MAC["a"], MAC["b"])] * 3)
    got = drain(ports["b"], 0.3)
    assert got in ([], [udp(MAC["a"], MAC["b"])] * 3), got
    return bool(got)


def test_active_controller_reconnect_probe_and_fail_modes(workdir):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))                 # reserved, not listening yet: refused
    port = lsock.getsockname()[1]
    config = ("add-br br0\nadd-port br0 a type=vhostuser queues=1\n"
              "add-port br0 b type=vhostuser queues=1\nadd-flow br0 priority=100,actions=drop\n"
              f"set-controller br0 tcp:127.0.0.1:{port} inactivity_probe=1000\n")
    ctl = FakeController(lsock)
    try:
        with switch_with_ports(workdir, config, "ab") as (run_dir, ports):
            def show():
                return processes.ctl(run_dir, "show")
            wait_for(lambda: "refused" in show(), what="a refused connection")
            assert re.search(rf'Controller "tcp:127\.0\.0\.1:{port}"  not connected: '
                             r'.*refused', show(), re.I), show()
            assert "fail_mode: standalone  (fail-open: forwarding by NORMAL)" in show()
            assert forwarded(ports)                 # no controller: NORMAL, not the rule
            # the controller comes: the switch connects (backoff at most 8 s)
            lsock.listen()
            ctl.accept()
            wait_for(lambda: f'tcp:127.0.0.1:{port}"  connected' in show(), what="connected")
            assert "fail-open" not in show()
            assert not forwarded(ports)             # the rules again: drop
            ctl.client.send(O.msg(O.FEATURES_REQUEST, xid=7))     # FEATURES on the active side
            t = xid = None
            while t != O.FEATURES_REPLY:                          # (a probe may come first)
                t, xid, body = ctl.client.recv()
            assert xid == 7
            # a controller that answers no probe is closed after 2 intervals, then the
            # switch connects again
            assert ctl.closed_by_switch(timeout=6.0)
            ctl.close()
            ctl.accept(timeout=10.0)
            wait_for(lambda: f'tcp:127.0.0.1:{port}"  connected' in show(), what="again")
            assert not forwarded(ports)
            # the controller goes: standalone fails open, secure keeps to the rules
            ctl.close()
            lsock.close()
            wait_for(lambda: "fail-open" in show(), what="fail-open")
            assert forwarded(ports)
            processes.ctl(run_dir, "set-fail-mode", "br0", "secure")
            assert "fail_mode: secure" in show() and "fail-open" not in show()
            assert not forwarded(ports)
            assert "standalone or secure" in processes.ctl(run_dir, "set-fail-mode", "br0",
                                                           "open", check=False)
            processes.ctl(run_dir, "set-fail-mode", "br0", "standalone")
            assert forwarded(ports)
            processes.ctl(run_dir, "del-controller", "br0")      # no controllers: rules
            assert not forwarded(ports)
    finally:
        lsock.close()
        ctl.close()
