"""pyvhost switch next to OVS-DPDK 3.1 and DPDK testpmd as the switch, measured in the same
run, in alternating rounds (each system once per round, in turn; each round printed).

The two-port loop of PEERS.md: a DPDK testpmd with two virtio-user ports (the guests, on
CPU 1) forwards through
  pyvhost:   `pyvhost switch`, two vhostuser ports, PMD on CPU 0
  OVS-DPDK:  ovs-vswitchd-dpdk, two dpdkvhostuser ports, pmd-cpu-mask CPU 0 (hugepages)
  DPDK:      testpmd with two vhost ports in io mode, forwarding on CPU 0 (no lookup at all)
Rows:
  in_port loop  (--sizes): guests in io mode primed with `start tx_first 4`; in_port rules
                p1->p2 and p2->p1 (testpmd: no rules)
  NORMAL loop   (--normal): guests in mac mode, each port's peer the other's MAC, so MAC
                learning is stable; actions=NORMAL on both switches (not testpmd); once with
                --tx-offloads=0x0 and once with testpmd's default TX offloads
  flowgen       (--flows): guests run `flowgen` (--flowgen-flows=N) on both ports, so every
                frame has one of N keys (cache-miss heavy); in_port rules
  flowgen, a rule per flow (--rule-flows): the same with N more rules per port, one for
                each flow's destination (in_port=pX,ip,nw_dst=<flowgen's address i>), so
                the megaflow cache holds 2N entries and each frame counts to its own rule
Rates are the guests' RX pps summed over both ports (median of --samples readings per round).
The guests forward on one core and cap the loop's rate, so each loop row has a second row:
each switch's PMD processing time per frame over the same readings, from its own counters
(pyvhost: pmd-stats busy ns; OVS-DPDK: pmd-stats-show processing cycles' share of the wall
time; testpmd: `set record-core-cycles on`, cycles in bursts that received frames, at its
TSC clock): what a frame costs the switch, whatever the guests manage.
The cost of metrics (issue 14): pyvhost's 64-byte io loop again, started with
`--metrics 127.0.0.1:PORT`, measured without and then with a scraper fetching /metrics
every --scrape-interval seconds, then with an idle capture hook (a `pyvhost capture` of p1,
both ways, whose filter selects none of the loop's frames: the mirror's test runs on every
frame, nothing is copied): same switch, same guests, back to back; three rows (compare them
with each other: other rows come from other switch processes), notes with the shares.
Prints Mpps, each system's spread over the rounds and the ratios. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ovs import Hugepages, OvsDpdk, available  # noqa: E402
from _rounds import alternate, cross_core, paired  # noqa: E402

from pyvhost.cli.benchtable import Table, emit  # noqa: E402
from tests.harness import processes  # noqa: E402
from tests.harness.testpmd import Testpmd, vhost_vdev, virtio_user_vdev  # noqa: E402

MACS = ("00:01:02:03:04:05", "00:01:02:03:04:06")
PMD_CPU, GUEST_CPU = 0, 1     # every switch polls on CPU 0, the guests forward on CPU 1
PORTS = f"""set-pmd threads=1 cpus={PMD_CPU}
add-br br0
add-port br0 p1 type=vhostuser queues=1
add-port br0 p2 type=vhostuser queues=1
"""
IN_PORT_RULES = ("priority=10,in_port=p1,actions=output:p2",
                 "priority=10,in_port=p2,actions=output:p1")
NORMAL_RULES = ("priority=0,actions=normal",)
CONFIG = PORTS + "".join(f"add-flow br0 {r}\n" for r in IN_PORT_RULES)


class Case:
    """One row's traffic: frame size, guest forwarding mode and the switches' rules."""

    def __init__(self, size: int, mode: str = "io", flows: int = 0, offloads: bool = True,
                 rule_per_flow: bool = False):
        self.size, self.mode, self.flows, self.offloads = size, mode, flows, offloads
        self.normal = mode == "mac"
        self.rule_per_flow = rule_per_flow
        self.rules = NORMAL_RULES if self.normal else IN_PORT_RULES
        if rule_per_flow:
            self.rules = IN_PORT_RULES + flow_rules(flows)

    @property
    def label(self) -> str:
        if self.flows:
            return f"{self.size} B flowgen, {self.flows} flows" + \
                (", a rule per flow" if self.rule_per_flow else "")
        if self.normal:
            return (f"{self.size} B NORMAL loop, mac fwd, "
                    f"{'testpmd default TX offloads' if self.offloads else 'tx-offloads=0'}")
        return f"{self.size} B in_port loop"

    @property
    def key(self) -> str:
        return f"{self.size}-{self.mode}-{self.flows}-{int(self.offloads)}" + \
            ("-rules" if self.rule_per_flow else "")


FLOWGEN_DST = 0x0AFD0000      # testpmd flowgen's destinations: 10.253.0.0 + flow number


def flow_rules(flows: int) -> tuple[str, ...]:
    """A rule per flowgen flow and port, above the in_port rules, doing what they do."""
    out = []
    for i in range(flows):
        dst = socket.inet_ntoa((FLOWGEN_DST + i).to_bytes(4, "big"))
        out += [f"priority=20,in_port=p1,ip,nw_dst={dst},actions=output:p2",
                f"priority=20,in_port=p2,ip,nw_dst={dst},actions=output:p1"]
    return tuple(out)


class PmdCost:
    """A switch's PMD processing time per received frame over a measurement: its own
    counters cleared when the measurement starts and read when it ends. Each switch counts
    a poll-loop iteration that received at least one frame as processing, one that received
    none as idle (OVS: pmd_perf_end_iteration), so this is the PMD time each frame took,
    whatever the guests' rate; the loop's rate is capped by the guests' own core."""

    def clear(self) -> None:
        raise NotImplementedError

    def read(self) -> float | None:
        """ns per frame since clear(); None if no frame was received."""
        raise NotImplementedError


class PyvhostCost(PmdCost):
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def clear(self) -> None:
        processes.ctl(self.run_dir, "pmd-stats-clear")

    def read(self) -> float | None:
        stats = json.loads(processes.ctl(self.run_dir, "pmd-stats-show", "--json"))
        busy = sum(s["busy_ns"] for s in stats)
        frames = sum(s["packets"] for s in stats)
        return busy / frames if frames else None


class OvsCost(PmdCost):
    """From ``dpif-netdev/pmd-stats-show``: processing cycles over all cycles, times the
    wall time since the clear (so no TSC frequency is needed), over packets received."""

    def __init__(self, ovs: OvsDpdk):
        self.ovs = ovs
        self.t0 = 0.0

    def clear(self) -> None:
        self.ovs.appctl("dpif-netdev/pmd-stats-clear")
        self.t0 = time.monotonic()

    def read(self) -> float | None:
        elapsed = time.monotonic() - self.t0
        text = self.ovs.appctl("dpif-netdev/pmd-stats-show")
        return ovs_ns_per_frame(text, elapsed)


class TestpmdCost(PmdCost):
    """DPDK testpmd as the switch, with ``set record-core-cycles on``: its forwarding
    core's cycles in bursts that received frames, per frame, at its TSC clock."""

    def __init__(self, tp: Testpmd):
        self.tp = tp

    def clear(self) -> None:
        self.tp.cmd("clear fwd stats all")

    def read(self) -> float | None:
        return fwd_stats_ns_per_frame(self.tp.cmd("show fwd stats all"))


def fwd_stats_ns_per_frame(text: str) -> float | None:
    """ns per frame from ``show fwd stats all`` ("CPU cycles/packet=X (...) at M MHz")."""
    m = re.search(r"CPU cycles/packet=([\d.]+) .*? at (\d+) MHz", text)
    if not m or not float(m.group(2)):
        return None
    return float(m.group(1)) * 1000 / float(m.group(2))


def ovs_ns_per_frame(text: str, elapsed: float) -> float | None:
    """ns of PMD processing per received packet from OVS's pmd-stats-show text (summed over
    its PMD threads, the non-PMD 'main thread' left out), ``elapsed`` seconds after a clear."""
    frames, busy_s = 0, 0.0
    for block in re.split(r"^(?=\S)", text, flags=re.M):
        if not block.startswith("pmd thread"):
            continue
        got = {k: int(v) for k, v in re.findall(
            r"^\s+(packets received|idle cycles|processing cycles): (\d+)", block, re.M)}
        cycles = got.get("idle cycles", 0) + got.get("processing cycles", 0)
        frames += got.get("packets received", 0)
        if cycles:
            busy_s += got.get("processing cycles", 0) / cycles * elapsed
    return busy_s * 1e9 / frames if frames else None


def measure(tp: Testpmd, seconds: float, samples: int,
            cost: PmdCost | None = None, costs: list | None = None) -> float:
    """The guests' RX rate (Mpps, median of ``samples`` readings); with ``cost``, the
    switch's PMD ns per frame over the same readings appended to ``costs``."""
    tp.port_stats()
    if cost:
        cost.clear()
    rates = []
    for _ in range(samples):
        time.sleep(seconds)
        stats = tp.port_stats()
        rates.append(stats[0]["rx_pps"] + stats[1]["rx_pps"])
    if cost:
        costs.append(cost.read())
    return statistics.median(rates) / 1e6


def guest_side(workdir: Path, socks, case: Case, name: str) -> Testpmd:
    vdevs = [virtio_user_vdev(s, index=i, mac=MACS[i]) for i, s in enumerate(socks)]
    extra = [f"--flowgen-flows={case.flows}"] if case.flows else []
    if not case.offloads:
        extra.append("--tx-offloads=0x0")
    tp = Testpmd(vdevs, workdir=workdir, name=name, main_lcore=0, testpmd_args=extra)
    tp.start()
    tp.wait_link_up(0)
    tp.wait_link_up(1)
    tp.cmd(f"set txpkts {case.size}")
    if case.normal:
        tp.cmd(f"set eth-peer 0 {MACS[1]}")
        tp.cmd(f"set eth-peer 1 {MACS[0]}")
    tp.set_fwd("flowgen" if case.flows else case.mode)
    return tp


def start_guest(tp: Testpmd, case: Case) -> None:
    if case.flows:
        tp.start_fwd()
    else:
        tp.start_fwd(tx_first=True, bursts=4)


def run_guests(workdir: Path, socks, case: Case, seconds, samples, name: str,
               cost: PmdCost | None = None, costs: list | None = None) -> float:
    """The guests' rate through a switch already listening on ``socks``."""
    tp = guest_side(workdir, socks, case, name)
    try:
        start_guest(tp, case)
        return measure(tp, seconds, samples, cost, costs)
    finally:
        tp.close()


def run_pyvhost(workdir: Path, case: Case, seconds, samples, n: int, costs: list) -> float:
    run_dir = workdir / f"run-{case.key}-{n}"
    config = PORTS + "".join(f"add-flow br0 {r}\n" for r in case.rules)
    sw = processes.switch(workdir, run_dir, config=config, name=f"switch-{case.key}-{n}")
    try:
        return run_guests(workdir, [run_dir / "p1.sock", run_dir / "p2.sock"], case, seconds,
                          samples, f"guest-pyvhost-{case.key}-{n}", PyvhostCost(run_dir), costs)
    finally:
        sw.stop()


def run_ovs(workdir: Path, case: Case, seconds, samples, n: int, costs: list) -> float:
    ovs = OvsDpdk(workdir, ["p1", "p2"], pmd_cpu=PMD_CPU, name=f"ovs-{case.key}-{n}").start()
    try:
        ovs.ofctl("del-flows", "br0")
        rules = workdir / f"ovs-rules-{case.key}.txt"
        rules.write_text("".join(f"{r}\n" for r in case.rules))
        ovs.ofctl("add-flows", "br0", str(rules))
        return run_guests(workdir, [ovs.sock("p1"), ovs.sock("p2")], case, seconds, samples,
                          f"guest-ovs-{case.key}-{n}", OvsCost(ovs), costs)
    finally:
        ovs.stop()


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
        tp = guest_side(workdir, [run_dir / "p1.sock", run_dir / "p2.sock"], Case(64),
                        "guest-pyvhost-metrics")
        try:
            start_guest(tp, Case(64))
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


def run_dpdk(workdir: Path, case: Case, seconds, samples, n: int, costs: list) -> float:
    socks = [workdir / f"dpdk-{case.key}-{n}-{i}.sock" for i in range(2)]
    host = Testpmd([vhost_vdev(s, index=i) for i, s in enumerate(socks)], workdir=workdir,
                   name=f"switch-dpdk-{case.key}-{n}", main_lcore=1)
    try:
        host.start()
        host.set_fwd("io")
        host.cmd("set record-core-cycles on")
        tp = guest_side(workdir, socks, case, f"guest-dpdk-{case.key}-{n}")
        try:
            host.wait_link_up(0)
            host.wait_link_up(1)
            host.start_fwd()
            start_guest(tp, case)
            return measure(tp, seconds, samples, TestpmdCost(host), costs)
        finally:
            tp.close()
    finally:
        host.close()


PY, OVS, DPDK = "pyvhost switch", "OVS-DPDK 3.1", "DPDK testpmd io"
PEERS = {"ovs": OVS, "dpdk": DPDK}
RUNNERS = {PY: run_pyvhost, OVS: run_ovs, DPDK: run_dpdk}


def new_table(peers: list[str]) -> Table:
    return Table("switch", "two-port loop: Mpps summed over both ports, and each switch's PMD "
                 "processing ns per frame", [PY, *peers], [(PY, p) for p in peers])


def cases(args) -> list[Case]:
    out = [Case(int(s)) for s in _ints(args.sizes)]
    for size in _ints(args.normal):
        out += [Case(size, "mac", offloads=False), Case(size, "mac", offloads=True)]
    if args.flows:
        out.append(Case(64, flows=args.flows))
    if args.rule_flows:
        out.append(Case(64, flows=args.rule_flows, rule_per_flow=True))
    return out


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def measure_case(workdir: Path, case: Case, peers: list[str], args):
    """Each system's numbers for one case, in alternating rounds: the peers around pyvhost
    (OVS, pyvhost, testpmd, ...); testpmd has no lookup, so it has no NORMAL rows. Returns
    (rates, costs, trips): each system's Mpps per round, each switch's PMD ns per frame per
    round (None where no frame was received) and the CPU 0-1 round trip before each round."""
    systems = [p for p in peers if not (case.normal and p == DPDK)]
    order = systems[:1] + [PY] + systems[1:]
    count = {name: 0 for name in order}
    costs: dict[str, list] = {name: [] for name in order}

    def runner(name):
        def run() -> float:
            count[name] += 1
            return RUNNERS[name](workdir, case, args.seconds, args.samples, count[name],
                                 costs[name])
        return run

    trips: dict[str, list[float | None]] = {}
    rates = alternate(case.label, args.rounds, {name: runner(name) for name in order},
                      probe=cross_core(PMD_CPU, GUEST_CPU), probed=trips)
    return rates, {name: got for name, got in costs.items() if got and None not in got}, trips


def report(table: Table, label: str, rounds: dict[str, list[float]], unit: str,
           trips: dict[str, list[float | None]] | None = None) -> None:
    row = table.add(label, unit, rounds=rounds, better="lower" if unit == "ns" else "higher",
                    round_trips=trips)
    cells = [f"{c} {row.values[c]:.2f} +-{(row.spread(c) or 0) * 100:.0f}%"
             for c in table.columns if row.values[c] is not None]
    for a, b in table.ratios:
        ratio = paired(rounds, a, b)
        if ratio is not None:
            cells.append(f"{a}/{b} per round x{ratio:.2f}")
    print(f"{label}: " + "  ".join(cells), flush=True)
    table.notes.append(f"{label}: " + "; ".join(
        f"{a}/{b} median of per-round ratios x{r:.2f}" for a, b in table.ratios
        if (r := paired(rounds, a, b)) is not None))


def main() -> int:
    ap = argparse.ArgumentParser(prog="pyvhost bench switch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,1500", help="in_port loop rows ('' for none)")
    ap.add_argument("--normal", default="64", help="NORMAL loop rows ('' for none)")
    ap.add_argument("--flows", type=int, default=10000, help="0: no flowgen case")
    ap.add_argument("--rule-flows", type=int, default=10000,
                    help="flowgen flows with a rule each (0: no such case)")
    ap.add_argument("--peers", default="ovs,dpdk",
                    help="the peers measured next to pyvhost: ovs, dpdk or both")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per row")
    ap.add_argument("--scrape-interval", type=float, default=0.1,
                    help="seconds between /metrics fetches in the metrics row (0: no row)")
    ap.add_argument("--seconds", type=float, default=2.0, help="per sample")
    ap.add_argument("--samples", type=int, default=3, help="rate readings per round")
    args = ap.parse_args()
    try:
        peers = [PEERS[p] for p in args.peers.split(",") if p]
        todo = cases(args)
    except (KeyError, ValueError) as e:
        ap.error(f"bad --peers, --sizes or --normal: {e}")
    if args.rounds < 1 or args.samples < 1:
        ap.error("--rounds and --samples must be at least 1")
    why = available() if OVS in peers else None
    if why:
        print(f"bench switch: OVS-DPDK cannot run: {why} (--peers dpdk leaves it out)",
              file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="pvs", dir="/tmp"))
    table = new_table(peers)
    try:
        with Hugepages() if OVS in peers else contextlib.nullcontext():
            for case in todo:
                rates, costs, trips = measure_case(workdir, case, peers, args)
                report(table, case.label, rates, "Mpps", trips)
                if costs:
                    report(table, f"{case.label}, PMD processing per frame", costs, "ns")
        if args.scrape_interval > 0:
            metrics_rows(table, workdir, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    emit(table)
    return 0


def metrics_rows(table: Table, workdir: Path, args) -> None:
    """pyvhost's 64 B io loop unscraped, scraped and with an idle capture, in one switch;
    compared with each other (no ratio: the peers' numbers come from other rows)."""
    quiet, scraped, captured, scraper = run_pyvhost_scraped(
        workdir, args.seconds, args.samples, args.scrape_interval)
    table.add("64 B io loop, --metrics on, not scraped", "Mpps", {PY: quiet}, compare=False)
    table.add(f"64 B io loop, /metrics every {args.scrape_interval:g} s", "Mpps",
              {PY: scraped}, compare=False)
    each = statistics.median(scraper.times) * 1e3 if scraper.times else float("nan")
    table.notes.append(f"metrics scraping: the 64 B io loop kept {scraped / quiet:.3f} of "
                       f"its rate without scraping in the same switch ({quiet:.2f} -> "
                       f"{scraped:.2f} Mpps; {len(scraper.times)} scrapes, {each:.1f} ms "
                       f"each, {scraper.errors} failed)" if quiet else
                       "metrics scraping: no rate without scraping")
    print(table.notes[-1], flush=True)
    table.add("64 B io loop, an idle capture of p1 (filter tcp)", "Mpps", {PY: captured},
              compare=False)
    table.notes.append(f"idle capture hook: the 64 B io loop kept {captured / quiet:.3f} of "
                       f"its rate ({quiet:.2f} -> {captured:.2f} Mpps)" if quiet else
                       "idle capture hook: no rate without it")
    print(table.notes[-1], flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
