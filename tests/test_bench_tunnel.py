"""``pyvhost bench tunnel`` with the smallest settings: guest to guest across two switches
over VXLAN (pyvhost guest namespaces on vhost-user ports, namespaces on afpacket ports, and
OVS userspace when installed), one round of 1-second iperf3 tests. Its table (the bench
table: --rows, --plot) has every path's TCP and 64-byte numbers, the PNG is drawn, and no
namespace of the run is left. Needs root, iperf3 and ethtool."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pyvhost.cli import benchtable
from tests.harness import processes
from tests.harness.limits import time_limit

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("iperf3", "ethtool", "ip")),
    reason="needs root, iperf3, ethtool and ip")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.slow
def test_bench_tunnel_smallest_run(tmp_path):
    before = netns_names()
    rows, png = tmp_path / "tunnel.json", tmp_path / "tunnel.png"
    with time_limit(300, "bench tunnel"):
        r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "bench", "tunnel",
                            "--rows", str(rows), "--plot", str(png), "--", "--rounds", "1",
                            "--seconds", "1"],
                           capture_output=True, text=True, timeout=280, cwd=processes.REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [table] = benchtable.load(rows)
    assert table.bench == "tunnel"
    assert table.columns[:2] == ["pyvhost guest", "pyvhost afpacket"], table.columns
    got = {row.label: row.values for row in table.rows}
    for measure in ("TCP", "64B at B", "64B rcvd"):
        assert all(v and v > 0 for v in got[measure].values()), (measure, got)
    if "OVS userspace" in table.columns:
        assert ("pyvhost guest", "OVS userspace") in [tuple(p) for p in table.ratios]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    left = {ns for ns in netns_names() - before if ns.startswith("pvbh-")}
    assert not left, left
