"""The flow table at scale: pyvhost switch next to OVS-DPDK 3.1, measured in the same run.

Both switches get the same rules (ovs-ofctl syntax, port names) and the same traffic from
``pyvhost gen`` front-ends attached to their vhost-user ports; both poll with one PMD
thread pinned to CPU 0 (pyvhost: set-pmd cpus=0; OVS: pmd-cpu-mask=0x1); the generators
are pinned to the other CPU (on a 2-core machine they share it: the storm rows offer
bounded rates so that the generators are not what limits p1). Rounds alternate (OVS,
pyvhost, OVS, ...) and medians are printed. The switch not being measured is stopped
(SIGSTOP) meanwhile: OVS-DPDK's PMD busy-polls CPU 0 whenever it has a port, guest or not.

  load N       time of `ctl add-flows br0 FILE` / `ovs-ofctl add-flows br0 FILE` with N rules
               (OVN-like: in_port + ip + nw_dst/32 -> output), from an empty table
  rss          resident memory added by 100k such rules
  setup        frames/s forwarded p1 -> p2 when every frame goes to a new destination: 100k
               /32 rules on nw_dst installed, the generator cycles 1M destinations, 100k of
               them under a rule (a switch caches the rest by prefix if it can)
  upcalls      frames/s forwarded p1 -> p2 when every frame is a miss: 100k destinations
               cycled, each under its own /32 rule, with both switches' flow limit at 1000
               (pyvhost set-pmd flow-limit, OVS other_config:flow-limit)
  10k flows    frames/s p1 -> p2 with 100k rules and 10k active destinations (cache hits);
               on two cores the generators share one CPU, so a switch that drains p1 faster
               lets p1's generator starve p2's: read it with the next row
  10k cost     PMD processing time per frame for the same traffic offered at --rate (both
               switches keep up): pyvhost's busy ns / frames, OVS's processing-cycles share
               of the run / frames (its PMD never sleeps)
  mac storm    p1 -> p2 (in_port rule, offered at --rate) while p3 sends 1M random source
               MACs into NORMAL at --storm-rate: delivered p1 -> p2 rate as a fraction of
               the quiet rate
  dst storm    the same while p3 sends to 1M unique destinations under 100k /32 rules
Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ovs import Hugepages, OvsDpdk, available  # noqa: E402
from _rounds import alternate, medians  # noqa: E402

from pyvhost.cli.benchtable import Table, emit  # noqa: E402
from tests.harness import processes  # noqa: E402

PORTS = ("p1", "p2", "p3")
GEN_MAC = "02:00:00:00:00:01"               # pyvhost gen's source MAC
STORM_DST = "02:00:00:00:00:00"             # --vary src-mac's first source: learned on p3
UPCALL_FLOW_LIMIT = 1000                    # far below the 100k flows cycled: all misses


def dst_rules(n: int, in_port: str, action: str, priority: int = 10) -> str:
    return "".join(f"priority={priority},in_port={in_port},ip,"
                   f"nw_dst=10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255},actions={action}\n"
                   for i in range(n))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Pyvhost:
    name = "pyvhost"

    def __init__(self, workdir: Path):
        self.run_dir = workdir / "pyvhost-run"
        config = "set-pmd threads=1 cpus=0\nadd-br br0\n" + "".join(
            f"add-port br0 {p} type=vhostuser queues=1\n" for p in PORTS)
        self.proc = processes.switch(workdir, self.run_dir, config=config, name="pyvhost")

    def ctl(self, *argv: str) -> str:
        r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "ctl", "--control",
                            str(self.run_dir / "ctl.sock"), *argv], capture_output=True,
                           text=True, timeout=900)
        if r.returncode:
            raise RuntimeError(f"ctl {argv[0]}: {r.stderr}")
        return r.stdout

    def sock(self, port: str) -> Path:
        return self.run_dir / f"{port}.sock"

    def load(self, path: Path) -> float:
        t0 = time.monotonic()
        self.ctl("add-flows", "br0", str(path))
        return time.monotonic() - t0

    def clear(self) -> None:
        self.ctl("del-flows", "br0")

    def flow_limit(self, n: int | None) -> None:
        self.ctl("set-pmd", "threads=1", "cpus=0", f"flow-limit={n or 200000}")

    def pmd_clear(self) -> None:
        self.ctl("pmd-stats-clear")

    def pmd_ns_per_packet(self, seconds: float) -> float:
        text = self.ctl("pmd-stats-show")
        busy = int(re.search(r"processing cycles: (\d+)", text).group(1))   # ns here
        packets = int(re.search(r"packets received: (\d+)", text).group(1))
        return busy / packets if packets else float("nan")

    def pid(self) -> int:
        return self.proc.proc.pid

    def stop(self) -> None:
        resume(self)
        self.proc.stop()


class Ovs:
    name = "OVS-DPDK"

    def __init__(self, workdir: Path):
        self.ovs = OvsDpdk(workdir, list(PORTS), pmd_cpu=0).start()

    def sock(self, port: str) -> Path:
        return self.ovs.sock(port)

    def load(self, path: Path) -> float:
        t0 = time.monotonic()
        self.ovs.ofctl("add-flows", "br0", str(path))
        return time.monotonic() - t0

    def clear(self) -> None:
        self.ovs.ofctl("del-flows", "br0")

    def pmd_clear(self) -> None:
        self.ovs.appctl("dpif-netdev/pmd-stats-clear")

    def pmd_ns_per_packet(self, seconds: float) -> float:
        text = self.ovs.appctl("dpif-netdev/pmd-stats-show")
        share = float(re.search(r"processing cycles: \d+ \(([\d.]+)%\)", text).group(1))
        packets = int(re.search(r"packets received: (\d+)", text).group(1))
        return share / 100 * seconds * 1e9 / packets if packets else float("nan")

    def flow_limit(self, n: int | None) -> None:
        if n:
            self.ovs.vsctl("set", "Open_vSwitch", ".", f"other_config:flow-limit={n}")
        else:
            self.ovs.vsctl("remove", "Open_vSwitch", ".", "other_config", "flow-limit")

    def pid(self) -> int:
        return self.ovs.vswitchd_pid()

    def stop(self) -> None:
        resume(self)
        self.ovs.stop()


def pause(sw) -> None:
    """``sw``'s switch process stopped (SIGSTOP), all its threads."""
    os.kill(sw.pid(), signal.SIGSTOP)
    sw.paused = True


def resume(sw) -> None:
    if getattr(sw, "paused", False):
        with contextlib.suppress(ProcessLookupError):
            os.kill(sw.pid(), signal.SIGCONT)
        sw.paused = False


@contextlib.contextmanager
def alone(sw, switches):
    """``sw`` measured with the other switches stopped (SIGSTOP) and continued after.
    OVS-DPDK's PMD busy-polls its CPU whenever it has a vhost-user port, guest or not, and
    that is CPU 0, where pyvhost's PMD is pinned: left running, it took half of CPU 0 from
    pyvhost's measures (10k active flows at 1 Mpps: 190 ns a frame alone, 345-397 next to
    an idle OVS-DPDK). pyvhost's idle PMD sleeps, but it is stopped too."""
    others = [o for o in switches if o is not sw]
    try:
        for o in others:
            pause(o)
        yield
    finally:
        for o in others:
            resume(o)


def gen(workdir: Path, sock: Path, name: str, mode: str, seconds: float, *extra: str):
    """A generator pinned to CPU 1 (the PMDs of both switches poll on CPU 0)."""
    proc = processes.PyvhostProcess(
        ["gen", "--socket", str(sock), "--mode", mode, "--duration", str(seconds),
         "--timeout", "20", *extra], workdir, name)
    proc.args = ["taskset", "-c", "1", *proc.args]
    return proc.start()


def forwarded_rate(sw, workdir: Path, seconds: float, samples: int, p1_args: list[str],
                   p3_args: list[str] | None = None) -> float:
    """Frames/s of p1's that p2's generator receives while p1 (and p3) send for ``seconds *
    samples`` (both switches measured by the same receiver: OVS shows no counters for a
    vhost port whose guest is not up yet). p1's frames carry run id 1 and the receiver
    counts only those: p3's storm frames flooded to p2 are not p1's."""
    send = samples * seconds
    rx = gen(workdir, sw.sock("p2"), "gen-p2", "rx", send + 4, "--json", "--run-id", "1")
    procs = [rx]
    try:
        time.sleep(1.0)                                   # the receiver is attached
        procs.append(gen(workdir, sw.sock("p1"), "gen-p1", "tx", send, "--run-id", "1",
                         *p1_args))
        if p3_args is not None:
            procs.append(gen(workdir, sw.sock("p3"), "gen-p3", "tx", send, "--run-id", "3",
                             *p3_args))
        rx.proc.wait(send + 30)
        summary = json.loads(rx.output().strip().splitlines()[-1])
        return summary["received"] / send
    finally:
        for p in procs:
            p.stop()


def pmd_cost(sw, workdir: Path, seconds: float, p1_args: list[str]) -> float:
    """PMD processing ns per frame while p1 sends to p2 for ``seconds``."""
    rx = gen(workdir, sw.sock("p2"), "gen-p2", "rx", seconds + 4, "--json")
    procs = [rx]
    try:
        time.sleep(1.0)
        sw.pmd_clear()
        t0 = time.monotonic()
        tx = gen(workdir, sw.sock("p1"), "gen-p1", "tx", seconds, *p1_args)
        procs.append(tx)
        tx.proc.wait(seconds + 30)
        return sw.pmd_ns_per_packet(time.monotonic() - t0)
    finally:
        for p in procs:
            p.stop()


def main() -> int:
    ap = argparse.ArgumentParser(prog="pyvhost bench flows", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", default="1000,10000,100000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0, help="per traffic sample")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--rate", type=float, default=1e6, help="p1's offered frames/s in storms")
    ap.add_argument("--storm-rate", type=float, default=1e6,
                    help="p3's frames/s in storms (every one a new flow)")
    ap.add_argument("--cases", default="rss,load,setup,upcalls,active,storms",
                    help="which measures (comma-separated)")
    args = ap.parse_args()
    cases = set(args.cases.split(","))
    why = available()
    if why:
        print(f"bench flows: OVS-DPDK cannot run: {why}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="pvf", dir="/tmp"))
    table = Table("flows", "the flow table at scale (medians of alternating rounds)",
                  ["pyvhost", "OVS-DPDK 3.1"], [("pyvhost", "OVS-DPDK 3.1")], better_by=True)

    def measured(sw, res):
        with alone(sw, switches):
            return res(sw)

    def row(what: str, unit: str, res, better: str = "higher") -> None:
        """A row from one number per switch (dict) or from alternating rounds of
        ``res(switch)``."""
        rounds = {}
        if callable(res):
            rounds = alternate(what, args.rounds, {sw.name: (lambda sw=sw: measured(sw, res))
                                                  for sw in switches}, unit)
            res = medians(rounds)
        names = {"pyvhost": "pyvhost", "OVS-DPDK": "OVS-DPDK 3.1"}
        r = table.add(what, unit, {names[k]: v for k, v in res.items()}, better,
                      rounds={names[k]: v for k, v in rounds.items()})
        ratio = table.ratio(r, table.ratios[0])
        print(f"{what:34} pyvhost {res['pyvhost']:12.3f}  OVS-DPDK {res['OVS-DPDK']:12.3f} "
              f"{unit:8} (pyvhost better by x{ratio or float('nan'):.2f})", flush=True)

    try:
        with Hugepages():
            switches = []
            try:
                switches = [Ovs(workdir), Pyvhost(workdir)]
                files = {}
                for n in (int(x) for x in args.loads.split(",")):
                    files[n] = workdir / f"rules-{n}.txt"
                    files[n].write_text(dst_rules(n, "p1", "output:p2"))
                # rss: the first load of 100k rules into an empty table
                if 100000 in files and "rss" in cases:
                    rss = {}
                    for sw in switches:
                        with alone(sw, switches):
                            sw.clear()
                            before = rss_kb(sw.pid())
                            sw.load(files[100000])
                            rss[sw.name] = (rss_kb(sw.pid()) - before) / 1024
                    row("RSS per 100k rules", "MiB", rss, better="lower")
                for n, path in files.items() if "load" in cases else ():
                    def load(sw, path=path):
                        sw.clear()
                        return sw.load(path)
                    row(f"load {n} rules", "s", load, better="lower")
                setup_rules = workdir / "setup.txt"
                setup_rules.write_text(dst_rules(100000, "p1", "output:p2") +
                                       "priority=1,in_port=p1,actions=output:p2\n")
                for sw in switches:
                    sw.clear()
                    sw.load(setup_rules)

                def setup(sw):
                    return forwarded_rate(sw, workdir, args.seconds, args.samples,
                                          ["--vary", "dst-ip", "--flows", "1000000",
                                           "--target", "10.0.0.0"]) / 1e3
                if "setup" in cases:
                    row("1M new destinations, 100k rules", "kframes/s", setup)

                def upcalls(sw):
                    return forwarded_rate(sw, workdir, args.seconds, args.samples,
                                          ["--vary", "dst-ip", "--flows", "100000",
                                           "--target", "10.0.0.0"]) / 1e3
                if "upcalls" in cases:
                    for sw in switches:
                        sw.flow_limit(UPCALL_FLOW_LIMIT)
                    try:
                        row("every frame a miss, 100k rules", "kflows/s", upcalls)
                    finally:
                        for sw in switches:
                            sw.flow_limit(None)

                def active(sw):
                    return forwarded_rate(sw, workdir, args.seconds, args.samples,
                                          ["--vary", "dst-ip", "--flows", "10000",
                                           "--target", "10.0.0.0"]) / 1e6
                if "active" in cases:
                    row("100k rules, 10k active flows", "Mpps",
                        active)

                def cost(sw):
                    return pmd_cost(sw, workdir, args.seconds * args.samples,
                                    ["--vary", "dst-ip", "--flows", "10000", "--target",
                                     "10.0.0.0", "--rate", str(args.rate)])
                if "active" in cases:
                    row(f"10k active flows at {args.rate / 1e6:g} Mpps: PMD time per frame",
                        "ns", cost, better="lower")
                p1 = ["--rate", str(args.rate)]
                storms = {
                    "mac storm": ("priority=20,in_port=p1,actions=output:p2\n"
                                  "priority=0,actions=normal\n",
                                  ["--vary", "src-mac", "--flows", "1000000",
                                   "--dst-mac", STORM_DST, "--rate", str(args.storm_rate)]),
                    "dst storm": ("priority=20,in_port=p1,actions=output:p2\n"
                                  "priority=5,in_port=p3,actions=drop\n" +
                                  dst_rules(100000, "p3", "drop"),
                                  ["--vary", "dst-ip", "--flows", "1000000",
                                   "--target", "10.0.0.0", "--rate", str(args.storm_rate)]),
                }
                for what, (rules, p3) in storms.items() if "storms" in cases else ():
                    path = workdir / f"{what.replace(' ', '-')}.txt"
                    path.write_text(rules)
                    for sw in switches:
                        sw.clear()
                        sw.load(path)

                    def impact(sw, p3=p3):
                        quiet = forwarded_rate(sw, workdir, args.seconds, args.samples, p1)
                        storm = forwarded_rate(sw, workdir, args.seconds, args.samples, p1, p3)
                        return storm / quiet if quiet else 0.0
                    row(f"{what}: p1->p2 kept", "fraction", impact)
            finally:
                for sw in switches:
                    sw.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    emit(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
