"""Two QEMU guests (TCG, Linux virtio-net) on two vhost-user ports of ``pyvhost switch``.

Ping with the default normal rule, then with explicit in_port flows; an ICMP drop rule
stops ping while UDP still passes (counted by the receiving guest's kernel), and deleting
it restores ping. Then the switch restarted under guests whose QEMU is the socket server:
the persisted configuration comes back and the guests keep their network without reboot.
Rules by port number survive port deletions, re-adds and a restart. And an idle switch
with two attached idle guests uses (almost) no CPU.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from pyvhost.cli.qemu_guest import NicSpec, QemuGuest
from tests.harness import processes

pytestmark = pytest.mark.slow

IPS = {"vm1": "10.0.0.1", "vm2": "10.0.0.2"}
CONFIG = """
add-br br0
add-port br0 vm1 type=vhostuser queues=1
add-port br0 vm2 type=vhostuser queues=1
"""


@pytest.fixture
def guests(workdir):
    made = []

    def boot(nics_by_name: dict[str, NicSpec]) -> dict[str, QemuGuest]:
        out = {}
        for name, nic in nics_by_name.items():
            g = QemuGuest(name, workdir, nics=[nic])
            made.append(g)
            g.start()
            out[name] = g
        for g in out.values():
            g.wait_ready(timeout=120)
            g.wait_link_up(timeout=30)
        return out

    try:
        yield boot
    finally:
        for g in made:
            g.stop()


def ping(guest, ip, count=10) -> dict:
    return guest.ping(ip, count=count, interval=0.1)


def ping_back(guest, ip, timeout: float = 30.0) -> None:
    """Ping until an attempt loses nothing (a reconnected port comes back) or time is up;
    the caller asserts with a ping of its own."""
    deadline = time.monotonic() + timeout
    while ping(guest, ip, count=3)["loss_pct"] and time.monotonic() < deadline:
        pass


def udp_noports(guest) -> int:
    """Datagrams this guest's kernel received for a port nobody listens on."""
    _, out = guest.run("grep '^Udp:' /proc/net/snmp | tail -1")
    return int(out.split()[2])      # Udp: InDatagrams NoPorts ...


def test_two_guests_ping_rules_and_drop(workdir, guests):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=CONFIG)
    try:
        vms = guests({n: NicSpec(run_dir / f"{n}.sock", ip=f"{ip}/24") for n, ip in IPS.items()})
        vm1, vm2 = vms["vm1"], vms["vm2"]
        assert ping(vm1, IPS["vm2"])["loss_pct"] == 0           # default: normal
        fdb = processes.ctl(run_dir, "fdb-show", "br0")
        assert "vm1" in fdb and "vm2" in fdb, fdb

        processes.ctl(run_dir, "add-flow", "br0", "priority=10,in_port=vm1,actions=output:vm2")
        processes.ctl(run_dir, "add-flow", "br0", "priority=10,in_port=vm2,actions=output:vm1")
        assert ping(vm1, IPS["vm2"])["loss_pct"] == 0
        flows = processes.ctl(run_dir, "dump-flows", "br0")
        counted = r"n_packets=(\d+), n_bytes=\d+,(?: idle_age=\d+,)? priority=10"
        n = [int(m) for m in re.findall(counted, flows)]
        assert len(n) == 2 and min(n) >= 10, flows            # the in_port rules did it

        processes.ctl(run_dir, "add-flow", "br0", "priority=100,icmp,actions=drop")
        assert ping(vm1, IPS["vm2"], count=5)["received"] == 0
        before = udp_noports(vm2)
        status, out = vm1.run(f"nslookup pyvhost {IPS['vm2']} 2>&1; true", timeout=30)
        assert udp_noports(vm2) > before, out                  # UDP still gets through
        flows = processes.ctl(run_dir, "dump-flows", "br0")
        assert re.search(r"n_packets=([1-9]\d*), .*priority=100,icmp "
                         r"actions=drop", flows), flows

        processes.ctl(run_dir, "del-flows", "br0", "icmp")
        assert ping(vm1, IPS["vm2"])["loss_pct"] == 0
        ports = processes.ctl(run_dir, "dump-ports", "br0")
        assert "port 1(vm1): rx pkts=" in ports and "port 2(vm2)" in ports, ports
    finally:
        assert sw.stop() == 0


def test_packed_ring_guests_ping_through_switch(workdir, guests):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=CONFIG)
    try:
        vms = guests({n: NicSpec(run_dir / f"{n}.sock", ip=f"{ip}/24", device_opts="packed=on")
                      for n, ip in IPS.items()})
        assert ping(vms["vm1"], IPS["vm2"])["loss_pct"] == 0
        assert ping(vms["vm2"], IPS["vm1"])["loss_pct"] == 0
    finally:
        assert sw.stop() == 0


def test_switch_restart_guests_keep_network(workdir, guests):
    run_dir = workdir / "run"
    socks = {n: workdir / f"{n}-qemu.sock" for n in IPS}
    config = "add-br br0\n" + "".join(
        f"add-port br0 {n} type=vhostuserclient path={s} queues=1\n" for n, s in socks.items())
    sw = processes.switch(workdir, run_dir, config=config, name="switch-1")
    try:
        vms = guests({n: NicSpec(socks[n], ip=f"{ip}/24", server=True) for n, ip in IPS.items()})
        assert ping(vms["vm1"], IPS["vm2"])["loss_pct"] == 0
        processes.ctl(run_dir, "add-flow", "br0", "priority=5,icmp,actions=normal")
    finally:
        assert sw.stop() == 0
    assert vms["vm1"].ping(IPS["vm2"], count=2, interval=0.2)["received"] == 0  # switch gone

    sw = processes.switch(workdir, run_dir, name="switch-2")     # no --config: the store
    try:
        assert "priority=5" in processes.ctl(run_dir, "dump-flows", "br0")
        for vm in vms.values():
            vm.wait_link_up(timeout=30)
        ping_back(vms["vm1"], IPS["vm2"])
        assert ping(vms["vm1"], IPS["vm2"])["loss_pct"] == 0
        assert ping(vms["vm2"], IPS["vm1"])["loss_pct"] == 0
        _, uptime = vms["vm1"].run("cat /proc/uptime")
        assert float(uptime.split()[0]) > 5                      # same boot
    finally:
        assert sw.stop() == 0


def test_restart_after_port_deletions_keeps_port_numbers(workdir, guests):
    """Rules written with OpenFlow port numbers keep meaning the same guests after ports
    are deleted and re-added and the switch restarts (port numbers persist)."""
    run_dir = workdir / "run"
    socks = {n: workdir / f"{n}-qemu.sock" for n in IPS}
    config = ("add-br br0\n"
              f"add-port br0 vm1 type=vhostuserclient path={socks['vm1']} queues=1\n"
              "add-port br0 spare type=vhostuser queues=1\n"
              f"add-port br0 vm2 type=vhostuserclient path={socks['vm2']} queues=1\n"
              "add-flow br0 priority=10,in_port=1,actions=output:3\n"
              "add-flow br0 priority=10,in_port=3,actions=output:1\n"
              "add-flow br0 priority=5,actions=drop\n")
    sw = processes.switch(workdir, run_dir, config=config, name="switch-1")
    try:
        vms = guests({n: NicSpec(socks[n], ip=f"{ip}/24", server=True) for n, ip in IPS.items()})
        assert ping(vms["vm1"], IPS["vm2"])["loss_pct"] == 0
        processes.ctl(run_dir, "del-port", "spare")
        processes.ctl(run_dir, "del-port", "vm1")     # at once: QEMU may be slow to relisten
        processes.ctl(run_dir, "add-port", "br0", "vm1", "type=vhostuserclient",
                      f"path={socks['vm1']}", "queues=1", "ofport_request=1")
        processes.ctl(run_dir, "add-port", "br0", "other", "type=vhostuser", "queues=1")
        show = processes.ctl(run_dir, "show")
        assert "Port vm1 (ofport 1)" in show and "Port vm2 (ofport 3)" in show, show
        assert "Port other (ofport 4)" in show, show      # not spare's 2: as OVS, a number
        vms["vm1"].wait_link_up(timeout=30)               # given back waits
        ping_back(vms["vm1"], IPS["vm2"])
        assert ping(vms["vm1"], IPS["vm2"])["loss_pct"] == 0
    finally:
        assert sw.stop() == 0
    sw = processes.switch(workdir, run_dir, name="switch-2")     # the store only
    try:
        show = processes.ctl(run_dir, "show")
        assert "Port vm1 (ofport 1)" in show and "Port vm2 (ofport 3)" in show, show
        assert "Port other (ofport 4)" in show, show
        for vm in vms.values():
            vm.wait_link_up(timeout=30)
        ping_back(vms["vm1"], IPS["vm2"])
        assert ping(vms["vm2"], IPS["vm1"])["loss_pct"] == 0
    finally:
        assert sw.stop() == 0


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_switch_uses_no_cpu(workdir, guests):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=CONFIG)
    try:
        vms = guests({n: NicSpec(run_dir / f"{n}.sock", ip=f"{ip}/24") for n, ip in IPS.items()})
        assert ping(vms["vm1"], IPS["vm2"], count=3)["loss_pct"] == 0
        time.sleep(1)
        before = cpu_seconds(sw.proc.pid)
        time.sleep(10)
        used = cpu_seconds(sw.proc.pid) - before
        print(f"idle switch: {used:.3f} s of CPU in 10 s ({used * 10:.2f}% of a core)")
        assert used < 0.2, f"idle switch used {used:.2f} s of CPU in 10 s"
    finally:
        sw.stop()
