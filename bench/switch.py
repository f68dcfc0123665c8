"""pyvhost switch next to DPDK testpmd as the switch, measured in the same run.

The two-port loop of PEERS.md: a DPDK testpmd with two virtio-user ports forwards in io
mode (primed with `start tx_first 4`) through
  pyvhost:  `pyvhost switch`, two vhostuser ports, in_port flows p1->p2 and p2->p1
  DPDK:     testpmd with two vhost ports in io mode (no lookup at all)
at 64 and 1500 bytes. Then the same with 10,000 distinct flows: the virtio-user testpmd
runs `flowgen` (--flowgen-flows=10000) on both ports, so every frame has one of 10,000
keys (cache-miss heavy). Rates are the virtio-user side's RX pps summed over both ports.
The cost of metrics (issue 14): pyvhost's 64-byte io loop again, started with
`--metrics 127.0.0.1:PORT`, measured without and then with a scraper fetching /metrics
every --scrape-interval seconds, then with an idle capture hook (a `pyvhost capture` of p1,
both ways, whose filter selects none of the loop's frames: the mirror's test runs on every
frame, nothing is copied): same switch, same guests, back to back; three rows (compare them
with each other: other rows come from other switch processes), notes with the shares.
Prints Mpps and the ratio pyvhost/DPDK. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
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


class Scraper:
    """Fetches http://127.0.0.1:PORT/metrics every ``interval`` seconds on a thread."""

    def __init__(self, port: int, interval: float):
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.done = threading.Event()
        self.times: list[float] = []
        self.errors = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.interval):
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    r.read()
                self.times.append(time.monotonic() - t0)
            except OSError:
                self.errors += 1

    def stop(self) -> None:
        self.done.set()
        self.thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def idle_capture(run_dir: Path) -> subprocess.Popen:
    """A running ``pyvhost capture`` of p1 whose filter (tcp) the loop's UDP never
    matches."""
    proc = subprocess.Popen([sys.executable, "-m", "pyvhost.cli.main", "capture", "--control",
                             str(run_dir / "ctl.sock"), "-w", "/dev/null", "br0", "p1", "tcp"],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if not line.startswith("capture: capturing"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"capture did not start: {line}")
    return proc


def run_pyvhost_scraped(workdir: Path, seconds, samples, interval: float):
    """(Mpps unscraped, Mpps scraped, Mpps with an idle capture, the Scraper) of pyvhost's
    64-byte io loop with --metrics on, measured back to back in one switch."""
    run_dir = workdir / "run-metrics"
    port = free_port()
    sw = processes.switch(workdir, run_dir, config=CONFIG, name="switch-metrics",
                          extra=["--metrics", f"127.0.0.1:{port}"])
    try:
        tp = guest_side(workdir, [run_dir / "p1.sock", run_dir / "p2.sock"], 64, 0,
                        "guest-pyvhost-metrics")
        try:
            start_guest(tp, 0)
            quiet = measure(tp, seconds, samples)
            scraper = Scraper(port, interval)
            try:
                scraped = measure(tp, seconds, samples)
            finally:
                scraper.stop()
            capture = idle_capture(run_dir)
            try:
                captured = measure(tp, seconds, samples)
            finally:
                capture.terminate()
                capture.wait(10)
            return quiet, scraped, captured, scraper
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
    """The run's rows (frame, flows or a label, pyvhost Mpps, DPDK Mpps) as the bench
    table."""
    t = Table("switch", "two-port loop, Mpps summed over both ports (median)", [PY, DPDK],
              [(PY, DPDK)])
    for size, flows, py, dp in rows:
        label = flows if isinstance(flows, str) else \
            f"flowgen, {flows} flows" if flows else "io loop, 1 flow per port"
        t.add(f"{size} B {label}", "Mpps", {PY: py, DPDK: dp})
    return t


def main() -> int:
    ap = argparse.ArgumentParser(prog="pyvhost bench switch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,1500")
    ap.add_argument("--flows", type=int, default=10000, help="0: no flowgen case")
    ap.add_argument("--scrape-interval", type=float, default=0.1,
                    help="seconds between /metrics fetches in the metrics row (0: no row)")
    ap.add_argument("--seconds", type=float, default=2.0, help="per sample")
    ap.add_argument("--samples", type=int, default=3)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pvs", dir="/tmp"))
    cases = [(int(s), 0) for s in args.sizes.split(",")] + \
        ([(64, args.flows)] if args.flows else [])
    rows = []
    notes = []
    try:
        for size, flows in cases:
            py = run_pyvhost(workdir, size, flows, args.seconds, args.samples)
            dp = run_dpdk(workdir, size, flows, args.seconds, args.samples)
            rows.append((size, flows, py, dp))
            label = f"{flows} flows" if flows else "io loop"
            print(f"{size:5} B {label:12} pyvhost {py:6.2f} Mpps  DPDK {dp:6.2f} Mpps  ratio "
                  f"{py / dp if dp else float('nan'):.2f}", flush=True)
        if args.scrape_interval > 0:
            quiet, scraped, captured, scraper = run_pyvhost_scraped(
                workdir, args.seconds, args.samples, args.scrape_interval)
            dp = next((d for size, flows, _, d in rows if size == 64 and flows == 0), None)
            rows.append((64, "io loop, --metrics on, not scraped", quiet, dp))
            rows.append((64, f"io loop, /metrics every {args.scrape_interval:g} s", scraped,
                         dp))
            each = statistics.median(scraper.times) * 1e3 if scraper.times else float("nan")
            notes.append(f"metrics scraping: the 64 B io loop kept {scraped / quiet:.3f} of "
                         f"its rate without scraping in the same switch ({quiet:.2f} -> "
                         f"{scraped:.2f} Mpps; {len(scraper.times)} scrapes, {each:.1f} ms "
                         f"each, {scraper.errors} failed)" if quiet else
                         "metrics scraping: no rate without scraping")
            print(notes[-1], flush=True)
            rows.append((64, "io loop, an idle capture of p1 (filter tcp)", captured, dp))
            notes.append(f"idle capture hook: the 64 B io loop kept {captured / quiet:.3f} of "
                         f"its rate ({quiet:.2f} -> {captured:.2f} Mpps)" if quiet else
                         "idle capture hook: no rate without it")
            print(notes[-1], flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    t = table(rows)
    t.notes += notes
    emit(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
