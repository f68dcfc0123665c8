"""A real controller drives pyvhost: a MAC-learning switch written on os-ken (PyPI, in its
own venv: tests/harness/sdn.py) connected to the switch as an active controller
(``set-controller br0 tcp:...``), two ``pyvhost guest`` namespaces pinging through it.
The bridge starts with no rules, so every frame that gets through was programmed by the
controller (PACKET_IN, FLOW_MOD, PACKET_OUT). Controller stopped: in secure mode the
installed rules keep the pinging pair going but nothing new is learned (ARP after a flush
fails); in standalone mode the switch fails open (NORMAL). Controller restarted: the
switch reconnects, the controller resyncs (deletes and reinstalls) and forwarding follows
it again."""

from __future__ import annotations

import re

import pytest

from tests.harness import processes, sdn
from tests.harness.limits import time_limit
from tests.harness.netns import available, sh
from tests.test_guest import two_guests

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason="needs root, ip and /dev/net/tun")]


@pytest.fixture(scope="module")
def osken_python():
    return sdn.venv_or_skip(sdn.OSKEN)


def test_osken_learning_switch_programs_pyvhost(net, workdir, osken_python):
    with time_limit(240):
        port = sdn.free_port()
        target = f"tcp:127.0.0.1:{port}"
        controller = sdn.osken_learning(osken_python, "127.0.0.1", port, workdir / "osken.log")
        controller.start()
        sw, run_dir = sdn.controlled_switch(workdir, target)
        try:
            controller.wait_for("CONNECTED")
            sdn.wait_show(run_dir, lambda s: f'"{target}"  connected' in s, "connected")
            with two_guests(net, run_dir) as (ga, gb):
                ip_a, ip_b = net.ip(1), net.ip(2)
                assert net.ping(ga.netns, ip_b, count=3)
                assert net.ping(gb.netns, ip_a, count=3)
                controller.wait_for("FLOW", 2)
                flows = processes.ctl(run_dir, "dump-flows", "br0")
                assert "priority=0 actions=CONTROLLER:65535" in flows, flows
                assert re.search(r"priority=1,in_port=1,dl_dst=[0-9a-f:]{17} "
                                 r"actions=output:2", flows), flows
                assert re.search(r"priority=1,in_port=2,dl_dst=[0-9a-f:]{17} "
                                 r"actions=output:1", flows), flows
                assert re.search(r"n_packets=[1-9]\d*, .*priority=1,in_port=1", flows), flows
                # the controller stops; secure: only what it installed
                controller.stop()
                sdn.wait_show(run_dir, lambda s: f'"{target}"  not connected' in s,
                          "the controller gone")
                assert net.ping(ga.netns, ip_b, count=3)
                sh(["ip", "neigh", "flush", "all"], ns=ga.netns)
                assert not net.ping(ga.netns, ip_b, count=1, timeout=3)   # ARP: no rule
                # standalone: the switch fails open and forwards by NORMAL
                processes.ctl(run_dir, "set-fail-mode", "br0", "standalone")
                assert "fail-open" in processes.ctl(run_dir, "show")
                assert net.ping(ga.netns, ip_b, count=3)
                # the controller comes back: reconnect, resync, its rules again
                controller.start()
                controller.wait_for("CONNECTED", 2, timeout=40)
                sdn.wait_show(run_dir, lambda s: f'"{target}"  connected' in s and
                          "fail-open" not in s, "reconnected")
                for g in (ga, gb):
                    sh(["ip", "neigh", "flush", "all"], ns=g.netns)
                before = sum(line.startswith("PACKET_IN") for line in controller.lines())
                assert net.ping(ga.netns, ip_b, count=3)
                after = sum(line.startswith("PACKET_IN") for line in controller.lines())
                assert after > before               # ARP went by the controller again
                flows = processes.ctl(run_dir, "dump-flows", "br0")
                assert "priority=0 actions=CONTROLLER:65535" in flows, flows
                assert re.search(r"priority=1,in_port=1,dl_dst=\S+ actions=output:2", flows)
        finally:
            try:
                controller.stop()
            finally:
                sw.stop()
