"""DPDK testpmd's virtio-user as the front-end of ``pyvhost reflector --mode echo``.

testpmd forwards in io mode and primes the loop with ``start tx_first``: every frame it
sends comes back from the reflector, so its RX and TX counters must agree to within the
bursts still in flight. Split ring, mrg_rxbuf 0/1, in_order 0/1, 1 and 2 queue pairs;
packed rings (packed_vq=1); then testpmd as the server with the reflector connecting,
killed and restarted.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.harness.testpmd import parse_fwd_stats, virtio_user_vdev

pytestmark = pytest.mark.slow

GUEST_MAIN_LCORE = 0   # testpmd forwards on core 1; the reflector's poller gets core 0
BURST = 32


def run_loop(guest, queues: int, seconds: float = 1.0) -> dict:
    """io forwarding primed with one burst per queue; returns the guest's fwd stats."""
    guest.set_fwd("io")
    guest.start_fwd(tx_first=True)
    rates = guest.measure_port_stats(seconds)[0]
    fwd = parse_fwd_stats(guest.stop_fwd())[0]
    assert rates["rx_pps"] > 0 and rates["tx_pps"] > 0, rates
    in_flight = 4 * BURST * queues
    assert fwd["rx_packets"] > 10 * in_flight, fwd
    assert 0 <= fwd["tx_packets"] - fwd["rx_packets"] <= in_flight, fwd
    return fwd


def settled_totals(refl, sent_by_guest: int, timeout: float = 5.0) -> tuple[int, int]:
    """The reflector's totals once it has taken every frame the guest sent (its poll thread
    may still be on its way to the last burst when testpmd stops), or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got, sent = reflector_totals(refl)
        if got >= sent_by_guest or time.monotonic() > deadline:
            return got, sent
        time.sleep(0.05)


def reflector_totals(refl) -> tuple[int, int]:
    """(frames from the guest, frames to the guest) summed over queues."""
    got = sent = 0
    for line in refl.counters().splitlines():
        if line.startswith("queue "):
            parts = line.replace(",", "").split()
            got += int(parts[parts.index("from-guest") + 1])
            sent += int(parts[parts.index("to-guest") + 1])
    return got, sent


@pytest.mark.parametrize("queues", [1, 2])
@pytest.mark.parametrize("in_order", [0, 1])
@pytest.mark.parametrize("mrg_rxbuf", [0, 1])
def test_echo_split_ring(workdir, testpmds, reflectors, mrg_rxbuf, in_order, queues):
    sock = workdir / "refl.sock"
    refl = reflectors(sock, mode="echo", queues=queues)
    guest = testpmds(virtio_user_vdev(sock, queues=queues, mrg_rxbuf=mrg_rxbuf,
                                      in_order=in_order),
                     "virtio-user", main_lcore=GUEST_MAIN_LCORE, rxq=queues, txq=queues)
    guest.start()
    guest.wait_link_up()
    fwd = run_loop(guest, queues)
    got, sent = settled_totals(refl, fwd["tx_packets"])
    # everything the guest sent reached the reflector; what it echoed reached the guest's
    # ring, less at most the bursts testpmd left unread there when it stopped
    assert got == fwd["tx_packets"]
    assert 0 <= sent - fwd["rx_packets"] <= 4 * BURST * queues
    assert refl.alive()
    guest.close()
    assert "ERROR" not in refl.errors(), refl.errors()     # GET_VRING_BASE etc. all fine


@pytest.mark.parametrize("in_order", [0, 1])
@pytest.mark.parametrize("mrg_rxbuf", [0, 1])
def test_echo_packed_ring(workdir, testpmds, reflectors, mrg_rxbuf, in_order):
    queues = 2
    sock = workdir / "refl.sock"
    refl = reflectors(sock, mode="echo", queues=queues)
    guest = testpmds(virtio_user_vdev(sock, queues=queues, packed_vq=1, mrg_rxbuf=mrg_rxbuf,
                                      in_order=in_order),
                     "virtio-user", main_lcore=GUEST_MAIN_LCORE, rxq=queues, txq=queues)
    guest.start()
    guest.wait_link_up()
    fwd = run_loop(guest, queues)
    got, sent = settled_totals(refl, fwd["tx_packets"])
    assert got == fwd["tx_packets"]
    assert 0 <= sent - fwd["rx_packets"] <= 4 * BURST * queues
    assert "internal error" not in refl.errors()
    assert "ERROR" not in refl.errors(), refl.errors()


def test_testpmd_server_killed_and_restarted(workdir, testpmds, reflectors):
    sock = workdir / "tp.sock"
    vdev = virtio_user_vdev(sock, server=True, mrg_rxbuf=1)
    first = testpmds(vdev, "virtio-user-1", main_lcore=GUEST_MAIN_LCORE).launch()
    refl = reflectors(sock, mode="echo", client=True)
    first.wait_ready()
    first.wait_link_up()
    run_loop(first, 1)

    os.kill(first.pid, signal.SIGKILL)
    first.close()
    os.unlink(sock)                 # a killed server leaves its socket file behind
    assert refl.alive()

    for round_ in range(2):         # and again, to show reconnecting is not a one-off
        second = testpmds(vdev, f"virtio-user-{round_ + 2}", main_lcore=GUEST_MAIN_LCORE)
        second.launch().wait_ready()
        second.wait_link_up()
        run_loop(second, 1)
        second.close()
        if sock.exists():
            os.unlink(sock)
        assert refl.alive()
    assert "front-end connected (#3)" in refl.errors()
