"""``pyvhost gen --packed`` against DPDK testpmd's vhost PMD (``net_vhost0``) forwarding in
macswap: 100000 frames of 64, 1500 and 9000 bytes all come back over packed rings of 256
(hundreds of laps of the ring), with IN_ORDER negotiated or not (DPDK's vhost returns a
whole in-order batch of TX buffers with one used descriptor), with mergeable RX buffers or
not, and with every buffer posted as a chain of descriptors."""

from __future__ import annotations

import pytest

from tests.test_gen_dpdk import macswap_vhost, run_gen

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("size", [64, 1500, 9000])
def test_packed_txrx_every_frame_back_through_macswap(workdir, testpmds, size):
    sock = workdir / "vhost.sock"
    tp = macswap_vhost(testpmds, sock).start()
    status, out, proc = run_gen(workdir, "--socket", sock, "--mode", "txrx", "--count", 100000,
                                "--size", size, "--packed")
    assert status == 0, out
    assert out["sent"] == 100000 and out["received"] == 100000 and out["lost"] == 0, out
    assert out["reordered"] == 0
    assert "RING_PACKED" in proc.errors() and "IN_ORDER" in proc.errors()
    fwd = tp.fwd_stats()[0]
    assert fwd["rx_packets"] == 100000 and fwd["tx_packets"] == 100000, fwd


@pytest.mark.parametrize("options", [["--no-in-order"], ["--no-mrg-rxbuf"],
                                     ["--chain-seg", "1024"],
                                     ["--chain-seg", "512", "--no-in-order", "--no-mrg-rxbuf"]],
                         ids=["no_in_order", "no_mrg", "chained", "chained_plain"])
def test_packed_variants_through_macswap(workdir, testpmds, options):
    sock = workdir / "vhost.sock"
    macswap_vhost(testpmds, sock).start()
    status, out, _ = run_gen(workdir, "--socket", sock, "--mode", "txrx", "--count", 50000,
                             "--size", 1500, "--packed", *options)
    assert status == 0, out
    assert out["sent"] == 50000 and out["received"] == 50000 and out["lost"] == 0, out
