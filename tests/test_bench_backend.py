"""``pyvhost bench backend`` with small settings: split rings, 64-byte frames, both
directions, two alternating rounds each (DPDK's vhost PMD, pyvhost, ...): the table keeps
every round of both back-ends (issue 15: rounds and spreads), each one a rate, with the
cross-core round trip read before it, and the run prints each round as it ends. Needs DPDK
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
def test_bench_backend_alternating_rounds(tmp_path):
    rows = tmp_path / "backend.json"
    with time_limit(300, "bench backend"):
        r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "bench", "backend",
                            "--rows", str(rows), "--", "--sizes", "64", "--rings", "split",
                            "--rounds", "2", "--seconds", "0.3", "--samples", "1"],
                           capture_output=True, text=True, timeout=280, cwd=processes.REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [table] = benchtable.load(rows)
    assert [row.label for row in table.rows] == ["split to-backend 64 B",
                                                 "split from-backend 64 B"]
    for row in table.rows:
        assert set(row.rounds) == {"pyvhost", "DPDK vhost"}, row
        assert all(len(v) == 2 and min(v) > 0 for v in row.rounds.values()), row
        assert set(row.round_trips) == set(row.rounds), row      # CPU 0-1, before each
        assert all(len(v) == 2 and min(v) > 0 for v in row.round_trips.values()), row
        assert f"round 2/2  {row.label}: DPDK vhost " in r.stdout
        assert re.search(rf"round 2/2  {row.label}: DPDK vhost [\d.]+ \[rt \d+ ns\]", r.stdout)
    assert "+-" in r.stdout and "half the range of the rounds" in r.stdout
