"""``pyvhost bench switch`` with small settings: the 64-byte in_port loop and the flowgen
row with a rule per flow next to OVS-DPDK and DPDK testpmd and the NORMAL loops next to
OVS-DPDK, each in two alternating rounds whose numbers the table keeps with the cross-core
round trip read before each (issue 15: rounds and spreads); pyvhost's loop with --metrics
on, unscraped and scraped, and with an idle capture, with notes on the shares kept and the
scrapes done, none failed (issue 14); for each loop row, a row of each switch's PMD
processing ns per frame from its own counters. Needs DPDK testpmd and OVS-DPDK (hugepages,
given back). The OVS counters' parser alone on OVS 3.1's text."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyvhost.cli import benchtable
from tests.harness import processes
from tests.harness.limits import time_limit

sys.path.insert(0, str(Path(processes.REPO) / "bench"))
from _rounds import paired  # noqa: E402
from switch import fwd_stats_ns_per_frame, ovs_ns_per_frame  # noqa: E402

OVS_PMD_STATS = """\
pmd thread numa_id 0 core_id 0:
  packets received: 4000000
  packet recirculations: 0
  avg. datapath passes per packet: 1.00
  phwol hits: 0
  mfex opt hits: 0
  simple match hits: 0
  emc hits: 3999998
  smc hits: 0
  megaflow hits: 0
  avg. subtable lookups per megaflow hit: 0.00
  miss with success upcall: 2
  miss with failed upcall: 0
  avg. packets per output batch: 31.94
  idle cycles: 1000000000 (25.00%)
  processing cycles: 3000000000 (75.00%)
  avg cycles per packet: 1000.00 (4000000000/4000000)
  avg processing cycles per packet: 750.00 (3000000000/4000000)
main thread:
  packets received: 7
  idle cycles: 0 (0.00%)
  processing cycles: 99999999 (100.00%)
"""


def test_paired_ratios_are_the_median_of_each_rounds_ratio():
    # rounds 2/1, 4/4, 9/3: 2, 1, 3 -> 2 (the ratio of the medians would say 4/3)
    assert paired({"a": [2, 4, 9], "b": [1, 4, 3]}, "a", "b") == 2
    assert paired({"a": [2, 4, 9]}, "a", "b") is None
    with pytest.raises(ValueError):
        paired({"a": [2, 4, 9], "b": [1, 4]}, "a", "b")


def test_testpmd_fwd_stats_give_ns_per_frame():
    text = ("  CPU cycles/packet=43.92 (total cycles=2545102277 / total io packets=57951552)"
            " at 2600 MHz Clock\n")
    assert fwd_stats_ns_per_frame(text) == pytest.approx(43.92 / 2.6)
    assert fwd_stats_ns_per_frame("  RX-packets: 0\n") is None


def test_ovs_pmd_stats_give_processing_ns_per_frame():
    # 75% of 2 s processing over 4M frames: 375 ns each; the main thread is not a PMD
    assert ovs_ns_per_frame(OVS_PMD_STATS, 2.0) == pytest.approx(375.0)
    two = OVS_PMD_STATS.split("main thread")[0]
    assert ovs_ns_per_frame(two + two.replace("core_id 0", "core_id 1"), 2.0) == \
        pytest.approx(375.0)
    assert ovs_ns_per_frame("main thread:\n  packets received: 5\n", 2.0) is None
    assert ovs_ns_per_frame(OVS_PMD_STATS.replace("packets received: 4000000",
                                                  "packets received: 0"), 2.0) is None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="needs dpdk-testpmd")
def test_bench_switch_rounds_and_metrics_rows(tmp_path):
    rows = tmp_path / "switch.json"
    hugepages = Path("/proc/sys/vm/nr_hugepages").read_text()
    with time_limit(400, "bench switch"):
        r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "bench", "switch",
                            "--rows", str(rows), "--", "--sizes", "64", "--normal", "64",
                            "--flows", "0", "--rule-flows", "50", "--rounds", "2",
                            "--seconds", "0.5", "--samples",
                            "1", "--scrape-interval", "0.1"],
                           capture_output=True, text=True, timeout=380, cwd=processes.REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert Path("/proc/sys/vm/nr_hugepages").read_text() == hugepages
    [table] = benchtable.load(rows)
    assert table.columns == ["pyvhost switch", "OVS-DPDK 3.1", "DPDK testpmd io"]
    got = {row.label: row for row in table.rows}
    loops = ["64 B in_port loop", "64 B NORMAL loop, mac fwd, tx-offloads=0",
             "64 B NORMAL loop, mac fwd, testpmd default TX offloads",
             "64 B flowgen, 50 flows, a rule per flow"]
    costs = {f"{loop}, PMD processing per frame": got.pop(f"{loop}, PMD processing per frame",
                                                          None) for loop in loops}
    for label, row in costs.items():
        assert row is not None, (label, sorted(got))
        assert row.unit == "ns" and row.better == "lower", row
        want = {"pyvhost switch", "OVS-DPDK 3.1"} | ({"DPDK testpmd io"} if "NORMAL" not in label
                                                     else set())
        assert set(row.rounds) == want, row
        assert all(len(v) == 2 and min(v) > 0 for v in row.rounds.values()), row
    assert set(got) == {*loops,
                        "64 B io loop, --metrics on, not scraped",
                        "64 B io loop, /metrics every 0.1 s",
                        "64 B io loop, an idle capture of p1 (filter tcp)"}, sorted(got)
    systems = {"64 B in_port loop": set(table.columns),
               "64 B flowgen, 50 flows, a rule per flow": set(table.columns)}
    for label, row in got.items():
        want = systems.get(label, {"pyvhost switch", "OVS-DPDK 3.1"} if "NORMAL" in label
                           else set())
        assert set(row.rounds) == want, (label, row.rounds)
        assert all(len(v) == 2 and min(v) > 0 for v in row.rounds.values()), row
        assert row.values["pyvhost switch"] > 0, row
        if row.rounds:                          # the CPU 0-1 round trip before each round
            assert set(row.round_trips) == want, (label, row.round_trips)
            assert all(len(v) == 2 and min(v) > 0 for v in row.round_trips.values()), row
    for round_ in (1, 2):
        assert re.search(rf"round {round_}/2  64 B in_port loop: OVS-DPDK 3.1 [\d.]+ "
                         r"\[rt \d+ ns\]", r.stdout), r.stdout[-3000:]
    [note] = [n for n in table.notes if n.startswith("metrics scraping")]
    m = re.search(r"kept ([\d.]+) .*; (\d+) scrapes, [\d.]+ ms each, (\d+) failed", note)
    assert m and int(m.group(2)) >= 3 and m.group(3) == "0", note
    assert any(n.startswith("idle capture hook: the 64 B io loop kept") for n in table.notes)
