"""The PMD skips its exact-match cache while the cache answers under half the frames asked
of it (more flows than it holds: DPDK testpmd's flowgen, 10000 flows, through two
megaflows) and asks it again once it would answer (the same guests forwarding one flow
each way): pmd-stats-show's ``emc skipped`` and ``emc_skipping``, every frame still
forwarded, and no frame looked up twice or lost to the switch while it changes its mind.
Needs DPDK testpmd (no hugepages)."""

from __future__ import annotations

import json
import time

import pytest

from tests.harness import processes
from tests.harness.limits import time_limit
from tests.harness.testpmd import virtio_user_vdev
from tests.test_switch_dpdk import LOOP_CONFIG, MACS

pytestmark = pytest.mark.slow


def pmd_stats(run_dir) -> dict:
    [s] = json.loads(processes.ctl(run_dir, "pmd-stats-show", "--json"))
    return s


def wait_stats(run_dir, ok, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = pmd_stats(run_dir)
        if ok(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


def test_emc_skipped_under_many_flows_and_asked_again_for_few(workdir, testpmds):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=LOOP_CONFIG)
    try:
        with time_limit(120, "emc skip"):
            vdevs = [virtio_user_vdev(run_dir / f"p{i + 1}.sock", index=i, mac=MACS[i])
                     for i in range(2)]
            tp = testpmds(vdevs, "flowgen", main_lcore=0,
                          testpmd_args=["--flowgen-flows=10000", "--tx-offloads=0x0"])
            tp.start()
            tp.wait_link_up(0)
            tp.wait_link_up(1)
            tp.cmd("set txpkts 64")
            tp.set_fwd("flowgen")
            tp.start_fwd()
            wait_stats(run_dir, lambda s: s["emc_skipping"] and s["emc_skipped"] > 10**5)
            tp.stop_fwd()                   # (counters read while the PMD is between bursts)
            time.sleep(0.5)
            s = pmd_stats(run_dir)
            assert s["emc_skipping"] and s["emc_skipped"] > 10**5, s
            # still asked now and then (one burst in 8): it knows its hit rate
            assert s["emc_hits"] + s["emc_misses"] > 0, s
            assert s["emc_hits"] * 2 < s["emc_hits"] + s["emc_misses"], s
            # skipped frames were megaflow hits, each frame looked up once
            assert s["emc_hits"] + s["emc_misses"] + s["emc_skipped"] == s["packets"], s
            assert s["megaflow_hits"] > s["emc_skipped"] // 2, s
            text = processes.ctl(run_dir, "pmd-stats-show")
            assert "emc skipped: " in text and "(now skipped:" in text, text
            stats = tp.port_stats()
            assert min(stats[0]["rx_packets"], stats[1]["rx_packets"]) > 10**5, stats

            # one flow each way (testpmd io, bursts sent first): the EMC answers again
            tp.set_fwd("io")
            tp.start_fwd(tx_first=True, bursts=4)
            before = pmd_stats(run_dir)
            wait_stats(run_dir, lambda s: not s["emc_skipping"]
                       and s["emc_hits"] > before["emc_hits"] + 10**5)
            tp.stop_fwd()
            time.sleep(0.5)
            s = pmd_stats(run_dir)
            assert not s["emc_skipping"], s
            assert s["emc_hits"] > before["emc_hits"] + 10**5, (before, s)
            assert s["emc_hits"] + s["emc_misses"] + s["emc_skipped"] == s["packets"], s
            assert "(now asked:" in processes.ctl(run_dir, "pmd-stats-show")
    finally:
        sw.stop()
