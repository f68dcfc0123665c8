"""QEMU guests (TCG, Linux 6.1 virtio-net, busybox initramfs) attached to
``pyvhost reflector`` in reply mode: the guest pings 10.0.0.254 with 0% loss.

Variants: one queue pair; two pairs with mq=on (and traffic seen on the second pair);
mrg_rxbuf=off; QEMU as the socket server with the reflector connecting, restarted under a
running guest (the guest keeps its network).
"""

from __future__ import annotations

import re

import pytest

from pyvhost.cli.qemu_guest import NicSpec, QemuGuest

pytestmark = pytest.mark.slow

REFLECTOR_IP = "10.0.0.254"
GUEST_IP = "10.0.0.1/24"


def queue_packets(refl) -> dict[int, int]:
    """Frames the reflector took from the guest, per queue pair (from its counters)."""
    out = {}
    for m in re.finditer(r"queue (\d+): from-guest (\d+) pkts", refl.counters()):
        out[int(m.group(1))] = int(m.group(2))
    return out


def boot(workdir, sock, **nic) -> QemuGuest:
    smp = nic.pop("smp", 1)
    guest = QemuGuest("guest", workdir, nics=[NicSpec(sock, ip=GUEST_IP, **nic)], smp=smp)
    guest.start()
    return guest


def ping_ok(guest, count=20) -> None:
    result = guest.ping(REFLECTOR_IP, count=count, interval=0.1)
    assert result["transmitted"] == count and result["loss_pct"] == 0, result["output"]


@pytest.mark.parametrize("device_opts",
                         ["", "mrg_rxbuf=off", "packed=on", "packed=on,mrg_rxbuf=off"],
                         ids=["default", "mrg_rxbuf_off", "packed", "packed_mrg_rxbuf_off"])
def test_guest_pings_reflector(workdir, reflectors, device_opts):
    sock = workdir / "r.sock"
    refl = reflectors(sock, mode="reply")
    guest = boot(workdir, sock, device_opts=device_opts)
    try:
        guest.wait_ready(timeout=90)
        guest.wait_link_up(timeout=20)
        ping_ok(guest)
    finally:
        guest.stop()
    replies = int(re.search(r"icmp_replies=(\d+)", refl.counters()).group(1))
    assert replies >= 20


def test_guest_pings_reflector_two_queue_pairs(workdir, reflectors):
    sock = workdir / "r.sock"
    refl = reflectors(sock, mode="reply", queues=2)
    guest = boot(workdir, sock, queues=2, smp=2)
    try:
        guest.wait_ready(timeout=120)
        guest.wait_link_up(timeout=20)
        status, out = guest.run("ls /sys/class/net/eth0/queues")
        assert status == 0 and "rx-1" in out, out
        ping_ok(guest)
        # pinned to each vCPU in turn, so each transmit queue carries some of the pings
        for cpu in (0, 1):
            status, out = guest.run(f"taskset -c {cpu} ping -c 5 -i 0.1 -W 1 {REFLECTOR_IP}",
                                    timeout=30)
            assert status == 0 and " 0% packet loss" in out, out
    finally:
        guest.stop()
    per_queue = queue_packets(refl)
    assert per_queue.get(0, 0) > 0 and per_queue.get(1, 0) > 0, per_queue


def test_qemu_server_reflector_client_restarted(workdir, reflectors):
    sock = workdir / "q.sock"
    guest = boot(workdir, sock, server=True)
    try:
        first = reflectors(sock, mode="reply", client=True, name="reflector-1")
        guest.wait_ready(timeout=90)
        guest.wait_link_up(timeout=20)
        ping_ok(guest, count=10)
        first.stop()
        second = reflectors(sock, mode="reply", client=True, name="reflector-2")
        guest.wait_link_up(timeout=20)
        ping_ok(guest, count=10)
        assert second.alive()
    finally:
        guest.stop()
