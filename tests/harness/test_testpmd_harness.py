"""Prove tests/harness/testpmd.py with DPDK on both ends of a vhost-user link.

A testpmd with DPDK's vhost PMD plays the backend ("host"), a testpmd with a
virtio-user port plays the guest; both forward in ``io`` mode and the guest
primes the loop with ``start tx_first``. The guest's RX and TX counters must
then agree to within the packets still in flight: the check our own backend's
tests make. The parser tests need no DPDK.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.harness.testpmd import (
    Testpmd,
    TestpmdError,
    parse_fwd_stats,
    parse_port_stats,
    vhost_vdev,
    virtio_user_vdev,
)

HOST_MAIN_LCORE = 1   # the host forwards on core 0
GUEST_MAIN_LCORE = 0  # the guest forwards on core 1
BURST = 32            # testpmd's default packets per burst
IN_FLIGHT = 4 * BURST  # `start tx_first` puts one burst in the loop; allow 4

PORT_STATS_SAMPLE = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 7807776    RX-missed: 0          RX-bytes:  499697664
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 7807808    TX-errors: 0          TX-bytes:  499699712

  Throughput (since last show)
  Rx-pps:      8040246          Rx-bps:   4116606272
  Tx-pps:      8040250          Tx-bps:   4116608000
  ############################################################################
"""

STOP_SAMPLE = """Telling cores to stop...
Waiting for lcores to finish...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 11773024       RX-dropped: 0             RX-total: 11773024
  TX-packets: 11773056       TX-dropped: 0             TX-total: 11773056
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 11773024       RX-dropped: 0             RX-total: 11773024
  TX-packets: 11773056       TX-dropped: 0             TX-total: 11773056
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done.
"""


def test_parse_port_stats():
    stats = parse_port_stats(PORT_STATS_SAMPLE)
    assert stats == {0: {
        "rx_packets": 7807776, "rx_missed": 0, "rx_bytes": 499697664,
        "rx_errors": 0, "rx_nombuf": 0, "tx_packets": 7807808, "tx_errors": 0,
        "tx_bytes": 499699712, "rx_pps": 8040246, "rx_bps": 4116606272,
        "tx_pps": 8040250, "tx_bps": 4116608000}}


def test_parse_fwd_stats_ignores_accumulated_totals():
    assert parse_fwd_stats(STOP_SAMPLE) == {0: {
        "rx_packets": 11773024, "rx_dropped": 0, "rx_total": 11773024,
        "tx_packets": 11773056, "tx_dropped": 0, "tx_total": 11773056}}


@pytest.fixture
def sock_path(tmp_path):
    """A vhost-user socket path safely under the 108-byte sun_path limit."""
    path = tmp_path / "vhost.sock"
    if len(os.fsencode(path)) < 100:
        yield path
        return
    short = tempfile.mkdtemp(prefix="pv", dir="/tmp")
    try:
        yield Path(short) / "vhost.sock"
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def testpmds(tmp_path):
    """Factory of one-vdev Testpmd objects logging to tmp_path; all closed
    (newest first) when the test ends, however it ends."""
    made = []

    def make(vdev, name, main_lcore):
        tp = Testpmd([vdev], workdir=tmp_path, name=name, main_lcore=main_lcore)
        made.append(tp)
        return tp

    try:
        yield make
    finally:
        for tp in reversed(made):
            tp.close()


def wait_links(host, guest):
    host.wait_link_up()
    guest.wait_link_up()


def forward_io(tp, tx_first=False):
    tp.set_fwd("io")
    tp.start_fwd(tx_first=tx_first)


def assert_loop_ran(host, guest):
    """Let the loop run a second, stop both sides (guest first), check the
    packets went round."""
    rates = guest.measure_port_stats(1.0)[0]
    guest_fwd = parse_fwd_stats(guest.stop_fwd())[0]
    host.stop_fwd()
    g, h = guest.port_stats()[0], host.port_stats()[0]
    assert rates["rx_pps"] > 0 and rates["tx_pps"] > 0, rates
    for stats in g, h:
        assert stats["rx_packets"] > 0 and stats["tx_packets"] > 0, stats
        assert stats["rx_errors"] == 0 and stats["tx_errors"] == 0, stats
    assert abs(g["tx_packets"] - g["rx_packets"]) <= IN_FLIGHT, g
    assert 0 <= guest_fwd["tx_packets"] - guest_fwd["rx_packets"] <= IN_FLIGHT, guest_fwd


@pytest.mark.slow
def test_vhost_server_virtio_user_client(testpmds, sock_path):
    host = testpmds(vhost_vdev(sock_path), "vhost", HOST_MAIN_LCORE).start()
    # A client-mode virtio-user port needs the backend's socket at startup.
    guest = testpmds(virtio_user_vdev(sock_path, mrg_rxbuf=1, in_order=0),
                     "virtio-user", GUEST_MAIN_LCORE).start()
    wait_links(host, guest)
    forward_io(host)
    forward_io(guest, tx_first=True)
    assert_loop_ran(host, guest)


@pytest.mark.slow
def test_virtio_user_server_restart(testpmds, sock_path):
    guest_vdev = virtio_user_vdev(sock_path, server=True)
    # A server-mode virtio-user port blocks its startup until the backend
    # connects, so launch it before the (client, reconnecting) vhost side.
    guest = testpmds(guest_vdev, "virtio-user-1", GUEST_MAIN_LCORE).launch()
    host = testpmds(vhost_vdev(sock_path, client=True), "vhost",
                    HOST_MAIN_LCORE).start()
    guest.wait_ready()
    wait_links(host, guest)
    forward_io(host)
    forward_io(guest, tx_first=True)
    assert guest.measure_port_stats(0.5)[0]["rx_pps"] > 0

    guest.kill()
    host.wait_link(up=False)
    # The killed server leaves its socket file behind; a new one cannot bind.
    with pytest.raises(TestpmdError, match="failed to probe"):
        testpmds(guest_vdev, "virtio-user-stale", GUEST_MAIN_LCORE).start()
    sock_path.unlink()

    host.clear_stats()  # the host kept forwarding all along
    guest = testpmds(guest_vdev, "virtio-user-2", GUEST_MAIN_LCORE).start()
    wait_links(host, guest)
    forward_io(guest, tx_first=True)
    assert_loop_ran(host, guest)
