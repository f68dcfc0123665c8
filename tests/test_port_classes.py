"""The datapath's port classes without root or peers: two TapDev ports over SOCK_SEQPACKET
socketpairs (each read and write is one record, as on a tap) on one bridge with the
NORMAL rule, driven by a real PMD thread. Frames (with their 12-byte virtio-net headers)
cross from one port to the other, the header's checksum request passes through, the PMD
sleeps between frames and wakes on the fds, and a dead fd (EOF: the peer is gone) does
not make it spin."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest

from pyvhost._port import PortDev
from pyvhost._switch import Datapath
from pyvhost._tap import TapDev
from pyvhost.switch.bridge import Bridge
from pyvhost.switch.flows import parse_flow

MAC1, MAC2 = bytes.fromhex("525400000001"), bytes.fromhex("525400000002")
HDR = bytes(12)
NEEDS_CSUM = bytes([1, 0, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0])     # start 34, offset 6 (UDP)


def frame(src, dst, n=0) -> bytes:
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    return dst + src + b"\x08\x00" + ip + n.to_bytes(2, "big") + bytes(6)


@pytest.fixture
def two_ports():
    """(datapath, pmd, (outside end of port 0, outside end of port 1)); all torn down."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    for inside, _ in pairs:
        inside.setblocking(False)
    bridge = Bridge("b", 0)
    bridge.apply(add=[parse_flow("priority=0,actions=normal")])
    dp = Datapath()
    dp.set_bridge(0, bridge.cls, bridge.macs)
    devs = [TapDev(inside.fileno()) for inside, _ in pairs]
    for i, dev in enumerate(devs):
        dp.add_port(i, 0, dev)
    pmd = dp.new_pmd(0, pool_size=256)
    thread = threading.Thread(target=pmd.run, daemon=True)
    thread.start()
    pmd.set_rxqs([(0, 0), (1, 0)])
    try:
        yield dp, pmd, [outside for _, outside in pairs]
    finally:
        pmd.stop()
        thread.join(5)
        for i in range(2):
            dp.remove_port(i)
        for inside, outside in pairs:
            inside.close()
            outside.close()


def recv(sock, timeout=2.0) -> bytes | None:
    if not select.select([sock], [], [], timeout)[0]:
        return None
    return sock.recv(70000)


def test_frames_cross_between_tap_class_ports_with_their_headers(two_ports):
    dp, pmd, (a, b) = two_ports
    a.send(HDR + frame(MAC1, MAC2))                 # unknown destination: flooded to b
    assert recv(b) == HDR + frame(MAC1, MAC2)
    b.send(NEEDS_CSUM + frame(MAC2, MAC1, 7))       # MAC1 learned: straight to a
    assert recv(a) == NEEDS_CSUM + frame(MAC2, MAC1, 7)
    deadline = time.monotonic() + 2              # counted just after the write
    while dp.port_stats(0)["tx_packets"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dp.port_stats(0)["rx_packets"] == 1 and dp.port_stats(0)["tx_packets"] == 1
    a.send(b"\x00" * 20)                            # shorter than header + Ethernet
    assert recv(b, 0.3) is None
    time.sleep(0.3)
    assert pmd.stats()["sleeps"] > 0                # it slept, and woke for each frame


def test_a_dead_fd_does_not_make_the_pmd_spin(two_ports):
    dp, pmd, (a, b) = two_ports
    a.send(HDR + frame(MAC1, MAC2))
    assert recv(b) is not None
    a.shutdown(socket.SHUT_RDWR)                    # port 0 reads EOF (0 bytes) for ever
    time.sleep(0.5)
    cpu0 = os.times()
    time.sleep(1.5)
    cpu = os.times()
    used = (cpu.user - cpu0.user) + (cpu.system - cpu0.system)
    assert used < 0.6, f"{used:.2f} s of CPU in 1.5 s"
    b.send(HDR + frame(MAC2, MAC1))                 # the other port still works
    deadline = time.monotonic() + 2
    while dp.port_stats(1)["rx_packets"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dp.port_stats(1)["rx_packets"] == 1


def test_add_port_refuses_a_device_that_is_not_set_up():
    dp = Datapath()
    with pytest.raises(ValueError, match="not set up"):
        dp.add_port(0, 0, PortDev())
    with pytest.raises(ValueError):
        TapDev(-1)


def test_a_port_id_a_stuck_pmd_may_still_use_is_not_given_again():
    """A PMD stuck inside a port (here: blocked in a read on a blocking fd) keeps the
    removed port's device; its id is refused until then, so a new port's device never
    replaces (and frees) the one the PMD is inside."""
    inside, outside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    other, _other_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bridge = Bridge("b", 0)
    dp = Datapath()
    dp.set_bridge(0, bridge.cls, bridge.macs)
    dp.add_port(0, 0, TapDev(inside.fileno()))
    pmd = dp.new_pmd(0, pool_size=64)
    thread = threading.Thread(target=pmd.run, daemon=True)
    thread.start()
    pmd.set_rxqs([(0, 0)])
    try:
        time.sleep(0.3)                                  # blocked in the port's read
        with pytest.raises(TimeoutError):
            dp.remove_port(0)
        with pytest.raises(ValueError, match="stuck PMD"):
            dp.add_port(0, 0, TapDev(other.fileno()))
    finally:
        outside.close()                                  # the read returns (EOF): unstuck
        pmd.stop()
        thread.join(5)
        for s in (inside, other, _other_peer):
            s.close()
    assert not thread.is_alive()
