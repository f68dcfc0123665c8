"""The PMD skips its exact-match cache while the cache loses most lookups to other flows
in its slots (DPDK testpmd's flowgen, 10000 flows through two megaflows: more flows than
it holds) and asks it again once it would answer (the same guests forwarding one flow each
way); a cache that is only filling (1000 flows from a cold start: misses on empty slots)
is never skipped. Seen in pmd-stats-show's ``emc skipped`` and ``emc_skipping``, with every
frame that reached the lookup counted once (hit, miss or skipped), traffic still flowing.
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


def wait_stats(run_dir, ok, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok(s := pmd_stats(run_dir)):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s: {s}"
        time.sleep(0.2)


def quiet_stats(tp, run_dir, timeout: float = 10.0) -> dict:
    """The PMD's counters once the guests stopped sending and the frames still in the
    rings are through (two readings 0.1 s apart agree: none read mid-burst)."""
    tp.stop_fwd()
    deadline = time.monotonic() + timeout
    last = pmd_stats(run_dir)
    while True:
        time.sleep(0.1)
        s = pmd_stats(run_dir)
        if s["packets"] == last["packets"]:
            return s
        assert time.monotonic() < deadline, f"the PMD still receiving after {timeout} s: {s}"
        last = s


def guests(testpmds, run_dir, flows: int):
    vdevs = [virtio_user_vdev(run_dir / f"p{i + 1}.sock", index=i, mac=MACS[i])
             for i in range(2)]
    tp = testpmds(vdevs, f"flowgen-{flows}", main_lcore=0,
                  testpmd_args=[f"--flowgen-flows={flows}", "--tx-offloads=0x0"])
    tp.start()
    tp.wait_link_up(0)
    tp.wait_link_up(1)
    tp.cmd("set txpkts 64")
    tp.set_fwd("flowgen")
    return tp


def looked_up_once(s: dict) -> bool:
    return s["emc_hits"] + s["emc_misses"] + s["emc_skipped"] == s["packets"]


def test_emc_skipped_under_many_flows_and_asked_again_for_few(workdir, testpmds):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=LOOP_CONFIG)
    try:
        with time_limit(240, "emc skip"):
            # 1000 flows from a cold start: the EMC fills (1 miss in 16 inserted), is not
            # skipped on the way, and ends answering most frames
            tp = guests(testpmds, run_dir, 1000)
            tp.start_fwd()
            wait_stats(run_dir, lambda s: s["emc_hits"] > 2 * 10**6, "1000 flows")
            s = quiet_stats(tp, run_dir)
            assert s["emc_skipped"] == 0 and not s["emc_skipping"], s
            assert s["emc_hits"] > s["emc_misses"] and looked_up_once(s), s
            tp.close()

            # 10000 flows: most lookups find another flow in the slot; skipped
            tp = guests(testpmds, run_dir, 10000)
            tp.start_fwd()
            wait_stats(run_dir, lambda s: s["emc_skipping"] and s["emc_skipped"] > 10**6,
                       "10000 flows")
            before = s
            s = quiet_stats(tp, run_dir)
            assert s["emc_skipping"] and looked_up_once(s), s
            # still asked in one poll round of 8: it knows its hit rate
            hits, misses = (s[k] - before[k] for k in ("emc_hits", "emc_misses"))
            assert 0 < hits < misses, (before, s)
            assert s["megaflow_hits"] - before["megaflow_hits"] > s["emc_skipped"], s
            # the rules match the input port alone: a burst the EMC is not asked for is
            # decided by its first frame's megaflow (simple match), all of its frames
            simple, skipped = (s[k] - before[k] for k in ("simple_match_hits", "emc_skipped"))
            assert 0.9 * skipped < simple <= skipped, (before, s)
            text = processes.ctl(run_dir, "pmd-stats-show")
            assert f"emc skipped: {s['emc_skipped']} (now skipped, 1 in 16 inserted)" in text, text
            assert f"(simple match: {s['simple_match_hits']}, same megaflow as" in text, text
            stats = tp.port_stats()
            assert min(stats[0]["rx_packets"], stats[1]["rx_packets"]) > 10**5, stats

            # one flow each way (testpmd io, bursts sent first): the EMC answers again
            tp.set_fwd("io")
            tp.start_fwd(tx_first=True, bursts=4)
            before = pmd_stats(run_dir)
            wait_stats(run_dir, lambda s: not s["emc_skipping"]
                       and s["emc_hits"] > before["emc_hits"] + 10**5, "one flow each way")
            s = quiet_stats(tp, run_dir)
            assert not s["emc_skipping"] and looked_up_once(s), s
            assert "(now asked, 1 in 16 inserted)" in processes.ctl(run_dir, "pmd-stats-show")
    finally:
        sw.stop()
