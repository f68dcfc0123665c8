"""``pyvhost gen`` against DPDK testpmd's vhost PMD (``net_vhost0``) forwarding in macswap:
100000 frames of 64, 1500 and 9000 bytes all come back (9000-byte frames arrive in
mergeable RX buffers of 2048 bytes); gen as the listening side with DPDK connecting; and
testpmd killed mid-run, which gen reports with a non-zero exit, without hanging."""

from __future__ import annotations

import json
import time

import pytest

from tests.harness.processes import PyvhostProcess
from tests.harness.testpmd import vhost_vdev

pytestmark = pytest.mark.slow

VHOST_MAIN_LCORE = 1       # testpmd forwards on core 0, gen runs where the kernel puts it
JUMBO = ["--mbuf-size=10240", "--max-pkt-len=9600"]


def macswap_vhost(testpmds, sock, **vdev_options):
    """testpmd forwarding in macswap from the start (before any frontend is there)."""
    return testpmds(vhost_vdev(sock, **vdev_options), "vhost", main_lcore=VHOST_MAIN_LCORE,
                    testpmd_args=[*JUMBO, "--forward-mode=macswap", "--auto-start"])


def run_gen(workdir, *args, timeout=90) -> tuple[int, dict, PyvhostProcess]:
    proc = PyvhostProcess(["gen", *map(str, args), "--json"], workdir, "gen").start()
    try:
        status = proc.proc.wait(timeout)
    finally:
        proc.stop()
    return status, json.loads(proc.output().strip().splitlines()[-1]), proc


@pytest.mark.parametrize("size", [64, 1500, 9000])
def test_txrx_every_frame_back_through_macswap(workdir, testpmds, size):
    sock = workdir / "vhost.sock"
    tp = macswap_vhost(testpmds, sock).start()
    status, out, _ = run_gen(workdir, "--socket", sock, "--mode", "txrx", "--count", 100000,
                             "--size", size)
    assert status == 0, out
    assert out["sent"] == 100000 and out["received"] == 100000 and out["lost"] == 0, out
    assert out["reordered"] == 0
    fwd = tp.fwd_stats()[0]
    assert fwd["rx_packets"] == 100000 and fwd["tx_packets"] == 100000, fwd


def test_gen_listens_and_dpdk_connects(workdir, testpmds):
    sock = workdir / "gen.sock"
    proc = PyvhostProcess(["gen", "--socket", str(sock), "--server", "--mode", "txrx",
                           "--count", "50000", "--json"], workdir, "gen").start()
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline and proc.alive(), proc.errors()
            time.sleep(0.05)
        macswap_vhost(testpmds, sock, client=True).start()
        status = proc.proc.wait(60)
    finally:
        proc.stop()
    out = json.loads(proc.output().strip().splitlines()[-1])
    # DPDK's vhost PMD may drop the first window of frames while it turns on queuing for
    # a device that just connected (its TX side is allowed a moment after its RX side);
    # gen never has more than the window (128 at 64 B) in flight, so that bounds the loss.
    assert status == 0 and out["sent"] == 50000 and out["lost"] <= 128, out
    assert out["received"] == out["sent"] - out["lost"]


def test_testpmd_killed_mid_run(workdir, testpmds):
    sock = workdir / "vhost.sock"
    tp = macswap_vhost(testpmds, sock).start()
    proc = PyvhostProcess(["gen", "--socket", str(sock), "--mode", "txrx", "--duration", "30",
                           "--json"], workdir, "gen").start()
    try:
        time.sleep(2)
        assert proc.alive(), proc.errors()
        tp.kill()
        t0 = time.monotonic()
        status = proc.proc.wait(10)
        assert time.monotonic() - t0 < 5
    finally:
        proc.stop()
    out = json.loads(proc.output().strip().splitlines()[-1])
    assert status == 1 and "went away" in out["error"] and out["received"] > 0, out
