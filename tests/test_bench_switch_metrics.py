"""``pyvhost bench switch``'s metrics rows (issue 14): with the smallest settings (one 64-byte
io loop, no flowgen case) the table has pyvhost's loop with --metrics on, unscraped and
scraped, and with an idle capture, and notes with the shares kept and the scrapes done
(none failed). Needs DPDK
testpmd (no hugepages)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from pyvhost.cli import benchtable
from tests.harness import processes
from tests.harness.limits import time_limit


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="needs dpdk-testpmd")
def test_bench_switch_metrics_rows(tmp_path):
    rows = tmp_path / "switch.json"
    with time_limit(300, "bench switch"):
        r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "bench", "switch",
                            "--rows", str(rows), "--", "--sizes", "64", "--flows", "0",
                            "--seconds", "0.5", "--samples", "2", "--scrape-interval", "0.1"],
                           capture_output=True, text=True, timeout=280, cwd=processes.REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [table] = benchtable.load(rows)
    got = {row.label: row.values["pyvhost switch"] for row in table.rows}
    assert set(got) == {"64 B io loop, 1 flow per port", "64 B io loop, --metrics on, not "
                        "scraped", "64 B io loop, /metrics every 0.1 s",
                        "64 B io loop, an idle capture of p1 (filter tcp)"}, got
    assert all(v > 0 for v in got.values()), got
    [note] = [n for n in table.notes if n.startswith("metrics scraping")]
    m = re.search(r"kept ([\d.]+) .*; (\d+) scrapes, [\d.]+ ms each, (\d+) failed", note)
    assert m and int(m.group(2)) >= 3 and m.group(3) == "0", note
    assert any(n.startswith("idle capture hook: the 64 B io loop kept") for n in table.notes)
