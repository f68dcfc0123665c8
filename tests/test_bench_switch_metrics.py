"""``pyvhost bench switch`` with small settings: the 64-byte in_port loop next to OVS-DPDK
and DPDK testpmd and the NORMAL loops next to OVS-DPDK, each in two alternating rounds whose
numbers the table keeps (issue 15: rounds and spreads); pyvhost's loop with --metrics on,
unscraped and scraped, and with an idle capture, with notes on the shares kept and the
scrapes done, none failed (issue 14). Needs DPDK testpmd and OVS-DPDK (hugepages, given
back)."""

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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="needs dpdk-testpmd")
def test_bench_switch_rounds_and_metrics_rows(tmp_path):
    rows = tmp_path / "switch.json"
    hugepages = Path("/proc/sys/vm/nr_hugepages").read_text()
    with time_limit(400, "bench switch"):
        r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "bench", "switch",
                            "--rows", str(rows), "--", "--sizes", "64", "--normal", "64",
                            "--flows", "0", "--rounds", "2", "--seconds", "0.5", "--samples",
                            "1", "--scrape-interval", "0.1"],
                           capture_output=True, text=True, timeout=380, cwd=processes.REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert Path("/proc/sys/vm/nr_hugepages").read_text() == hugepages
    [table] = benchtable.load(rows)
    assert table.columns == ["pyvhost switch", "OVS-DPDK 3.1", "DPDK testpmd io"]
    got = {row.label: row for row in table.rows}
    assert set(got) == {"64 B in_port loop",
                        "64 B NORMAL loop, mac fwd, tx-offloads=0",
                        "64 B NORMAL loop, mac fwd, testpmd default TX offloads",
                        "64 B io loop, --metrics on, not scraped",
                        "64 B io loop, /metrics every 0.1 s",
                        "64 B io loop, an idle capture of p1 (filter tcp)"}, sorted(got)
    systems = {"64 B in_port loop": set(table.columns)}
    for label, row in got.items():
        want = systems.get(label, {"pyvhost switch", "OVS-DPDK 3.1"} if "NORMAL" in label
                           else set())
        assert set(row.rounds) == want, (label, row.rounds)
        assert all(len(v) == 2 and min(v) > 0 for v in row.rounds.values()), row
        assert row.values["pyvhost switch"] > 0, row
    for round_ in (1, 2):
        assert f"round {round_}/2  64 B in_port loop: OVS-DPDK 3.1 " in r.stdout
    [note] = [n for n in table.notes if n.startswith("metrics scraping")]
    m = re.search(r"kept ([\d.]+) .*; (\d+) scrapes, [\d.]+ ms each, (\d+) failed", note)
    assert m and int(m.group(2)) >= 3 and m.group(3) == "0", note
    assert any(n.startswith("idle capture hook: the 64 B io loop kept") for n in table.notes)
