"""``pyvhost bench guest`` (issue 16) with the smallest settings: two pyvhost guest namespaces
through pyvhost and through OVS-DPDK, one round of 1-second iperf3 tests. Its table has
both switches' TCP and UDP numbers, and afterwards nothing it started is left: no process
it listed, no namespace of its, the hugepages as they were. Needs root, iperf3 and OVS-DPDK
(hugepages are reserved by bench/_ovs.py for the run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyvhost.cli import benchtable
from tests.harness import processes
from tests.harness.limits import time_limit

sys.path.insert(0, str(Path(processes.REPO) / "bench"))
from _ovs import available  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or available() is not None,
                                reason=f"needs root and OVS-DPDK ({available()})")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.slow
def test_bench_guest_smallest_run(tmp_path):
    huge = Path("/proc/sys/vm/nr_hugepages").read_text()
    before = netns_names()
    rows = tmp_path / "guest.json"
    with time_limit(400, "bench guest"):
        r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "bench", "guest",
                            "--rows", str(rows), "--", "--rounds", "1", "--seconds", "1"],
                           capture_output=True, text=True, timeout=360, cwd=processes.REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [table] = benchtable.load(rows)
    assert table.columns == ["pyvhost", "OVS-DPDK 3.1"]
    got = {row.label: row.values for row in table.rows}
    for measure in ("TCP", "UDP 64B at B", "UDP 64B rcvd"):
        assert all(v and v > 0 for v in got[measure].values()), (measure, got)
    assert re.search(r"^\| TCP \| Gbit/s \| [\d.]+ \| [\d.]+ \| x[\d.]+ \|$", r.stdout, re.M)
    pids = [int(p) for p in re.search(r"processes started and stopped: ([\d ]+)",
                                      r.stdout).group(1).split()]
    assert len(pids) >= 6                      # 4 guests, the switch, ovsdb-server, vswitchd
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", pid
    left = {ns for ns in netns_names() - before if ns.startswith("pvbg-")}
    assert not left, left
    assert Path("/proc/sys/vm/nr_hugepages").read_text() == huge
