"""pyvhost switch next to DPDK testpmd as the switch, measured in the same run.

The two-port loop of PEERS.md: a DPDK testpmd with two virtio-user ports forwards in io
mode (primed with `start tx_first 4`) through
  pyvhost:  `pyvhost switch`, two vhostuser ports, in_port flows p1->p2 and p2->p1
  DPDK:     testpmd with two vhost ports in io mode (no lookup at all)
at 64 and 1500 bytes. Then the same with 10,000 distinct flows: the virtio-user testpmd
runs `flowgen` (--flowgen-flows=10000) on both ports, so every frame has one of 10,000
keys (cache-miss heavy). Rates are the virtio-user side's RX pps summed over both ports.
Prints Mpps and the ratio pyvhost/DPDK. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pyvhost.cli.benchtable import Table, emit
from tests.harness import processes
from tests.harness.testpmd import Testpmd, vhost_vdev, virtio_user_vdev

MACS = ("00:01:02:03:04:05", "00:01:02:03:04:06")
CONFIG = """set-pmd threads=1 cpus=0
add-br br0
add-port br0 p1 type=vhostuser queues=1
add-port br0 p2 type=vhostuser queues=1
add-flow br0 priority=10,in_port=p1,actions=output:p2
add-flow br0 priority=10,in_port=p2,actions=output:p1
"""


def measure(tp: Testpmd, seconds: float, samples: int) -> float:
    tp.port_stats()
    rates = []
    for _ in range(samples):
        time.sleep(seconds)
        stats = tp.port_stats()
        rates.append(stats[0]["rx_pps"] + stats[1]["rx_pps"])
    return statistics.median(rates) / 1e6


def guest_side(workdir: Path, socks, size: int, flows: int, name: str) -> Testpmd:
    vdevs = [virtio_user_vdev(s, index=i, mac=MACS[i]) for i, s in enumerate(socks)]
    extra = [f"--flowgen-flows={flows}"] if flows else []
    tp = Testpmd(vdevs, workdir=workdir, name=name, main_lcore=0, testpmd_args=extra)
    tp.start()
    tp.wait_link_up(0)
    tp.wait_link_up(1)
    tp.cmd(f"set txpkts {size}")
    tp.set_fwd("flowgen" if flows else "io")
    return tp


def start_guest(tp: Testpmd, flows: int) -> None:
    if flows:
        tp.start_fwd()
    else:
        tp.start_fwd(tx_first=True, bursts=4)


def run_pyvhost(workdir: Path, size: int, flows: int, seconds, samples) -> float:
    run_dir = workdir / f"run-{size}-{flows}"
    sw = processes.switch(workdir, run_dir, config=CONFIG, name=f"switch-{size}-{flows}")
    try:
        tp = guest_side(workdir, [run_dir / "p1.sock", run_dir / "p2.sock"], size, flows,
                        f"guest-pyvhost-{size}-{flows}")
        try:
            start_guest(tp, flows)
            return measure(tp, seconds, samples)
        finally:
            tp.close()
    finally:
        sw.stop()


def run_dpdk(workdir: Path, size: int, flows: int, seconds, samples) -> float:
    socks = [workdir / f"dpdk{i}.sock" for i in range(2)]
    host = Testpmd([vhost_vdev(s, index=i) for i, s in enumerate(socks)], workdir=workdir,
                   name=f"switch-dpdk-{size}-{flows}", main_lcore=1)
    try:
        host.start()
        host.set_fwd("io")
        tp = guest_side(workdir, socks, size, flows, f"guest-dpdk-{size}-{flows}")
        try:
            host.wait_link_up(0)
            host.wait_link_up(1)
            host.start_fwd()
            start_guest(tp, flows)
            return measure(tp, seconds, samples)
        finally:
            tp.close()
    finally:
        host.close()


PY, DPDK = "pyvhost switch", "DPDK testpmd io"


def table(rows) -> Table:
    """The run's rows (frame, flows, pyvhost Mpps, DPDK Mpps) as the bench table."""
    t = Table("switch", "two-port loop, Mpps summed over both ports (median)", [PY, DPDK],
              [(PY, DPDK)])
    for size, flows, py, dp in rows:
        label = f"flowgen, {flows} flows" if flows else "io loop, 1 flow per port"
        t.add(f"{size} B {label}", "Mpps", {PY: py, DPDK: dp})
    return t


def main() -> int:
    ap = argparse.ArgumentParser(prog="pyvhost bench switch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,1500")
    ap.add_argument("--flows", type=int, default=10000)
    ap.add_argument("--seconds", type=float, default=2.0, help="per sample")
    ap.add_argument("--samples", type=int, default=3)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pvs", dir="/tmp"))
    cases = [(int(s), 0) for s in args.sizes.split(",")] + [(64, args.flows)]
    rows = []
    try:
        for size, flows in cases:
            py = run_pyvhost(workdir, size, flows, args.seconds, args.samples)
            dp = run_dpdk(workdir, size, flows, args.seconds, args.samples)
            rows.append((size, flows, py, dp))
            label = f"{flows} flows" if flows else "io loop"
            print(f"{size:5} B {label:12} pyvhost {py:6.2f} Mpps  DPDK {dp:6.2f} Mpps  ratio "
                  f"{py / dp if dp else float('nan'):.2f}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    emit(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
