"""``pyvhost bench openflow``: the harness's PACKET_IN -> PACKET_OUT controller
(tests.harness.openflow.Responder) against a running pyvhost switch that connects to it
(every frame a miss comes back out of port 2, each one counted), and the bench with the
smallest settings next to OVS-DPDK (slow: hugepages, root): its table has both measures
for both switches, the controller rate it used is said, and no namespace is left."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pyvhost.cli import benchtable
from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports
from tests.harness.limits import time_limit
from tests.harness.openflow import Responder
from tests.test_openflow_packets import MAC, udp


def test_the_responder_answers_each_packet_in_with_a_packet_out(workdir):
    responder = Responder(out_port=2)
    config = "add-br br0\n" + "".join(f"add-port br0 {n} type=vhostuser queues=1\n"
                                      for n in "ab") \
        + "set-fail-mode br0 secure\n" \
        + f"set-controller br0 tcp:127.0.0.1:{responder.port}\n" \
        + "add-flow br0 priority=0,actions=controller\n"
    try:
        with switch_with_ports(workdir, config, "ab") as (run_dir, ports):
            with time_limit(30, "the switch connects"):
                while not responder.connected:
                    drain(ports["b"], 0.1)
            frames = [udp(MAC["a"], MAC["b"], dport=1000 + i) for i in range(20)]
            ports["a"].send_all(frames)
            got = drain(ports["b"], 1.0)
            show = processes.ctl(run_dir, "show")
            m = re.search(r"packet_in: queued (\d+), sent (\d+), dropped: rate (\d+), "
                          r"full (\d+), busy (\d+)", show)
            queued, sent, rate, full, busy = map(int, m.groups())
            # every frame accounted for: a PMD drops a frame it finds the queue busy with
            # (the control thread holds it only to read and move the ring: rarely)
            assert queued + busy == 20 and rate == full == 0, show
            assert responder.packet_ins == sent == queued == len(got) >= 15, show
            assert set(got) <= set(frames) and len(set(got)) == len(got)
            assert "priority=0 actions=CONTROLLER" in processes.ctl(run_dir, "dump-flows", "br0")
    finally:
        responder.stop()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(
    "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"), reason="needs root and OVS-DPDK")
def test_bench_openflow_smallest_run(tmp_path):
    rows = tmp_path / "openflow.json"
    with time_limit(300, "bench openflow"):
        r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "bench", "openflow",
                            "--rows", str(rows), "--", "--rules", "200", "--rounds", "1",
                            "--seconds", "1", "--offer", "2000"],
                           capture_output=True, text=True, timeout=280, cwd=processes.REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table, = benchtable.load(rows)
    assert [row.label for row in table.rows][:2] == ["add-flows of 200 rules",
                                                     "PACKET_IN->PACKET_OUT, 2k/s offered"]
    for row in table.rows:
        assert all(v is not None and v > 0 for v in row.values.values()), row
    assert "controller_rate_limit=50000" in r.stdout
