"""QEMU guests (Linux virtio-net over vhost-user) ping each other through pyvhost while a
MAC-learning switch written on os-ken (PyPI, its own venv: tests/harness/sdn.py) programs
it: the bridge starts with no rules and in fail mode secure, so every frame that gets
through was programmed by the controller (PACKET_IN, FLOW_MOD, PACKET_OUT). The rules it
installed are counted by the packets that used them; with the controller stopped, the
installed rules keep the two guests pinging."""

from __future__ import annotations

import re

import pytest

from tests.harness import processes, sdn
from tests.harness.limits import time_limit

pytestmark = pytest.mark.slow

IP_A, IP_B = "10.98.0.1", "10.98.0.2"


@pytest.fixture(scope="module")
def osken_python():
    return sdn.venv_or_skip(sdn.OSKEN)


def ping(vm, ip: str, count: int = 3) -> tuple[int, str]:
    return vm.run(f"ping -c {count} -W 5 {ip}", timeout=60)


def test_osken_programs_pyvhost_between_qemu_guests(workdir, osken_python):
    from pyvhost.cli.qemu_guest import qemu_available
    if not qemu_available():
        pytest.skip("needs QEMU and a guest kernel (make test installs them)")
    with time_limit(400):
        port = sdn.free_port()
        target = f"tcp:127.0.0.1:{port}"
        controller = sdn.osken_learning(osken_python, "127.0.0.1", port, workdir / "osken.log")
        controller.start()
        sw, run_dir = sdn.controlled_switch(workdir, target)
        try:
            controller.wait_for("CONNECTED")
            sdn.wait_show(run_dir, lambda s: f'"{target}"  connected' in s, "connected")
            with sdn.qemu_pair(workdir, run_dir, (IP_A, IP_B)) as (va, vb):
                osken_scenario(controller, run_dir, target, va, vb)
        finally:
            try:
                controller.stop()
            finally:
                sw.stop()


def osken_scenario(controller, run_dir, target: str, va, vb) -> None:
    """Pings through the controller's rules; then, the controller stopped, through what it
    installed."""
    status, out = ping(va, IP_B)
    assert status == 0, out
    status, out = ping(vb, IP_A)
    assert status == 0, out
    flows = processes.ctl(run_dir, "dump-flows", "br0")
    assert "priority=0 actions=CONTROLLER:65535" in flows, flows
    for a, b in ((1, 2), (2, 1)):
        assert re.search(rf"n_packets=[1-9]\d*, .*priority=1,in_port={a},"
                         rf"dl_dst=[0-9a-f:]{{17}} actions=output:{b}", flows), flows
    # the controller stops (secure): what it installed keeps the guests pinging
    controller.stop()
    sdn.wait_show(run_dir, lambda s: f'"{target}"  not connected' in s,
                  "the controller gone")
    before = processes.ctl(run_dir, "dump-flows", "br0")
    status, out = ping(va, IP_B, count=5)
    assert status == 0, out
    assert processes.ctl(run_dir, "dump-flows", "br0") != before   # counters moved
