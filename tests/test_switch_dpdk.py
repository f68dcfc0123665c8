"""``pyvhost switch`` driven by DPDK testpmd's virtio-user (two ports, no VM): PMD threads
and RX-queue assignment with rebalancing, packed rings, and ingress policing holding a set
rate."""

from __future__ import annotations

import re
import time

import pytest

from tests.harness import processes
from tests.harness.testpmd import parse_fwd_stats, virtio_user_vdev

pytestmark = pytest.mark.slow

MACS = ("00:01:02:03:04:05", "00:01:02:03:04:06")
# testpmd forwards on lcore 1 (its main lcore 0 waits at the prompt); the switch pins its
# PMD to the highest CPU by default, so these tests put it on CPU 0: two busy pollers on one
# core took turns by the scheduler's clock (~10 kpps, the switch spinning its 1 ms before
# each sleep while testpmd waited for the core)
PMD_CPU = "set-pmd cpus=0\n"
LOOP_CONFIG = (PMD_CPU + "add-br br0\nadd-port br0 p1 type=vhostuser queues=1\n"
               "add-port br0 p2 type=vhostuser queues=1\n"
               "add-flow br0 priority=10,in_port=p1,actions=output:p2\n"
               "add-flow br0 priority=10,in_port=p2,actions=output:p1\n")


def two_port_testpmd(testpmds, run_dir, queues: int, active_queues: int, name: str, **opts):
    vdevs = [virtio_user_vdev(run_dir / f"p{i + 1}.sock", index=i, mac=MACS[i], queues=queues,
                              **opts) for i in range(2)]
    tp = testpmds(vdevs, name, main_lcore=0, rxq=active_queues, txq=active_queues)
    tp.start()
    tp.wait_link_up(0)
    tp.wait_link_up(1)
    return tp


def rxq_owners(text: str) -> dict[tuple[str, int], int]:
    """pmd-rxq-show -> {(port, queue): pmd}"""
    owners, pmd = {}, None
    for line in text.splitlines():
        m = re.match(r"pmd thread (\d+)", line)
        if m:
            pmd = int(m.group(1))
        m = re.search(r"port: (\S+)\s+queue-id:\s+(\d+)", line)
        if m:
            owners[(m.group(1), int(m.group(2)))] = pmd
    return owners


def test_two_pmds_two_queues_and_rebalance(workdir, testpmds):
    run_dir = workdir / "run"
    config = ("set-pmd threads=2 assign=cycles\nadd-br br0\n"
              "add-port br0 p1 type=vhostuser queues=2\nadd-port br0 p2 type=vhostuser queues=2\n"
              "add-flow br0 priority=10,in_port=p1,actions=output:p2\n"
              "add-flow br0 priority=10,in_port=p2,actions=output:p1\n")
    sw = processes.switch(workdir, run_dir, config=config)
    try:
        # both queue pairs of both ports carry traffic
        tp = two_port_testpmd(testpmds, run_dir, queues=2, active_queues=2, name="tp-2q")
        tp.set_fwd("io")
        tp.start_fwd(tx_first=True)
        time.sleep(3)
        tp.stop_fwd()
        tp.close()
        show = processes.ctl(run_dir, "pmd-rxq-show")
        owners = rxq_owners(show)
        assert set(owners) == {("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1)}, show
        assert set(owners.values()) == {0, 1}, show
        stats = processes.ctl(run_dir, "pmd-stats-show")
        received = [int(x) for x in re.findall(r"packets received: (\d+)", stats)]
        assert len(received) == 2 and min(received) > 0, stats   # both PMDs forwarded
        ports_text = processes.ctl(run_dir, "dump-ports", "br0")
        q1 = [int(x) for x in re.findall(r"queue 1: rx pkts=(\d+)", ports_text)]
        assert q1 and max(q1) > 0, ports_text                    # queue 1 carried traffic

        # only queue 0 active now: round robin put p1/0 and p2/0 on the same PMD
        assert owners[("p1", 0)] == owners[("p2", 0)], show
        tp = two_port_testpmd(testpmds, run_dir, queues=2, active_queues=1, name="tp-1q")
        tp.set_fwd("io")
        tp.start_fwd(tx_first=True)
        time.sleep(11)                                           # a full load window
        before = processes.ctl(run_dir, "pmd-rxq-show")
        after = processes.ctl(run_dir, "pmd-rebalance")
        moved = rxq_owners(after)
        assert moved[("p1", 0)] != moved[("p2", 0)], f"{before}\n--- after ---\n{after}"
        processes.ctl(run_dir, "pmd-stats-clear")
        time.sleep(1)
        stats = processes.ctl(run_dir, "pmd-stats-show")
        received = [int(x) for x in re.findall(r"packets received: (\d+)", stats)]
        assert min(received) > 0, stats                          # both PMDs busy now
        tp.stop_fwd()
    finally:
        assert sw.stop() == 0


@pytest.mark.parametrize("in_order", [0, 1])
def test_packed_ring_loop_through_switch(workdir, testpmds, in_order):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=LOOP_CONFIG)
    try:
        tp = two_port_testpmd(testpmds, run_dir, queues=1, active_queues=1, name="tp-packed",
                              packed_vq=1, in_order=in_order)
        tp.set_fwd("io")
        tp.start_fwd(tx_first=True)
        rates = tp.measure_port_stats(1.0)
        fwd = parse_fwd_stats(tp.stop_fwd())
        assert rates[0]["rx_pps"] > 0 and rates[1]["rx_pps"] > 0, rates
        for port in (0, 1):      # what one port sends, the other receives, less in flight
            other = fwd[1 - port]
            assert 0 <= fwd[port]["tx_packets"] - other["rx_packets"] <= 4 * 32, fwd
        in_flight = 2 * 32                        # tx_first: a burst from each port
        assert min(f["rx_packets"] for f in fwd.values()) > 100 * in_flight, fwd   # kept going
    finally:
        assert sw.stop() == 0


@pytest.mark.parametrize("packed", [0, 1], ids=["split", "packed"])
def test_long_frames_between_guests_are_copied_once(workdir, testpmds, packed):
    """1500-byte frames in an in_port loop between two testpmd virtio-user ports go
    straight from one guest's buffers into the other's (pmd-stats-show one-copy frames),
    and none is lost but those in flight."""
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=LOOP_CONFIG)
    try:
        tp = two_port_testpmd(testpmds, run_dir, queues=1, active_queues=1,
                              name=f"tp-onecopy-{packed}", packed_vq=packed)
        tp.cmd("set txpkts 1500")
        tp.set_fwd("io")
        tp.start_fwd(tx_first=True)
        time.sleep(1)
        fwd = parse_fwd_stats(tp.stop_fwd())
        for port in (0, 1):
            other = fwd[1 - port]
            assert 0 <= fwd[port]["tx_packets"] - other["rx_packets"] <= 4 * 32, fwd
        stats = processes.ctl(run_dir, "pmd-stats-show")
        onecopy = int(re.search(r"one-copy frames: (\d+)", stats).group(1))
        received = int(re.search(r"packets received: (\d+)", stats).group(1))
        assert received > 1000 and 0 <= received - onecopy <= 4 * 32, stats
    finally:
        assert sw.stop() == 0


def port_bytes(run_dir, port: str, direction: str) -> int:
    text = processes.ctl(run_dir, "dump-ports", "br0")
    block = text[text.index(f"({port})"):]
    return int(re.search(rf"{direction} pkts=\d+, bytes=(\d+)", block).group(1))


def passed_bytes(run_dir) -> int:
    """Bytes that got past p1's policer: the in_port=p1 rule's counter (testpmd's txonly
    does not read p2's receive ring, so p2's own counters stop when its ring is full)."""
    flows = processes.ctl(run_dir, "dump-flows", "br0")
    return int(re.search(r"n_bytes=(\d+),[^\n]* priority=10,in_port=p1 ", flows).group(1))


def test_ingress_policing_holds_rate(workdir, testpmds):
    run_dir = workdir / "run"
    rate_kbps = 20000                                           # 20 Mbit/s
    config = (PMD_CPU + "add-br br0\nadd-port br0 p1 type=vhostuser queues=1\n"
              "add-port br0 p2 type=vhostuser queues=1\n"
              "add-flow br0 priority=10,in_port=p1,actions=output:p2\n"
              "add-flow br0 priority=10,in_port=p2,actions=drop\n"
              f"set-policing p1 rate={rate_kbps} burst=2000\n")
    sw = processes.switch(workdir, run_dir, config=config)
    try:
        tp = two_port_testpmd(testpmds, run_dir, queues=1, active_queues=1, name="tp-txonly")
        tp.set_fwd("txonly")
        tp.cmd("set txpkts 1000")
        tp.start_fwd()
        time.sleep(1)
        b0, t0 = passed_bytes(run_dir), time.monotonic()
        time.sleep(5)
        b1, t1 = passed_bytes(run_dir), time.monotonic()
        tp.stop_fwd()
        measured_kbps = (b1 - b0) * 8 / 1000 / (t1 - t0)
        offered = port_bytes(run_dir, "p1", "rx")
        print(f"policing at {rate_kbps} kbps: measured {measured_kbps:.0f} kbps "
              f"({measured_kbps / rate_kbps:.3f} of the rate); offered {offered} bytes in all")
        assert 0.8 * rate_kbps < measured_kbps < 1.2 * rate_kbps
        dump = processes.ctl(run_dir, "dump-ports", "br0")
        assert int(re.search(r"police=(\d+)", dump).group(1)) > 0, dump
    finally:
        assert sw.stop() == 0
