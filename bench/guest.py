"""Namespaces as guests (issue 16): iperf3 between two ``pyvhost guest`` namespaces through
pyvhost, next to the same two kinds of guests through OVS-DPDK 3.1, in one run.

Each switch gets its own pair of guests (namespaces A and B, a private 10.x subnet each),
started as ``pyvhost guest --server`` (each listens on its socket) and pinned with their
iperf3 ends to CPU 1; the switch connects to them as a client:
  pyvhost   `pyvhost switch`, two ports type=vhostuserclient, in_port rules A <-> B,
            one PMD thread on CPU 0 (set-pmd threads=1 cpus=0)
  OVS-DPDK  ovs-vswitchd-dpdk (bench/_ovs.py: private ovsdb-server, hugepages for the run),
            two ports type=dpdkvhostuserclient options:vhost-server-path=SOCK, the same
            in_port rules (ovs-ofctl), pmd-cpu-mask=0x1 (its PMD on CPU 0), its other
            threads on CPU 1 (dpdk-lcore-mask=0x2)
OVS's PMD busy-polls its CPU even when idle, so its ports exist only during its own rounds
(the PMD thread goes with them; its guests wait, listening, and OVS reconnects to them);
pyvhost's PMD sleeps when its ports are idle. The CPU time each switch used during the
other's rounds is printed as a note. Offloads: the guests offer --offloads (default tso:
checksum and TSO as virtio-net features); OVS gets other_config:userspace-tso-enable=true
then, so that both switches can negotiate them.

  TCP           iperf3 -c B -t SECONDS, one stream, Gbit/s the receiver counted
  UDP 64B sent  iperf3 -u -b 0 -l 18 (60-byte frames), datagrams/s A's iperf3 sent
  UDP 64B at B  frames/s arriving on B's interface during that test: what the switch
                delivered
  UDP 64B rcvd  datagrams/s B's iperf3 received

Rounds alternate (OVS-DPDK, pyvhost, OVS-DPDK, ...); medians and the ratios pyvhost /
OVS-DPDK are printed. The run stops starting new rounds after --deadline seconds.
Everything it starts is stopped by PID, the namespaces deleted by name, the hugepages given
back, also on Ctrl-C or SIGTERM. Needs root, iperf3, OVS-DPDK (make bench installs it).
Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _iperf  # noqa: E402
from _ovs import Hugepages, OvsDpdk, available  # noqa: E402

from pyvhost.cli.benchtable import Table, emit  # noqa: E402
from tests.harness import processes  # noqa: E402

SWITCH_CPU, TOOL_CPU = 0, 1
PY, OVS = "pyvhost", "OVS-DPDK 3.1"
IFNAME = "eth0"
MEASURES = (("TCP", "Gbit/s"), ("UDP 64B sent", "kpps"), ("UDP 64B at B", "kpps"),
            ("UDP 64B rcvd", "kpps"))
COMPARED = ("TCP", "UDP 64B at B", "UDP 64B rcvd")     # what the switch decides


class Interrupted(BaseException):
    """SIGTERM (raised like Ctrl-C so that every finally block runs)."""


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Run:
    """What one run made: namespaces (by name), processes (stop()), and their PIDs."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.tag = secrets.token_hex(3)
        self.net16 = f"10.{150 + secrets.randbelow(50)}"
        self.namespaces: list[str] = []
        self.stoppable: list = []
        self.pids: list[int] = []

    def close(self) -> None:
        for p in reversed(self.stoppable):
            try:
                p.stop()
            except Exception as e:                  # go on with the rest
                print(f"bench guest: stopping {p}: {e}", file=sys.stderr)
        for ns in self.namespaces:                  # the guests delete theirs; not if killed
            if Path(f"/run/netns/{ns}").exists():
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.stoppable, self.namespaces = [], []


class Pair:
    """Guests A and B for one switch: ``pyvhost guest --server`` in their own namespaces."""

    def __init__(self, run: Run, key: str, index: int, offloads: str):
        self.sock_a = run.workdir / f"{key}-a.sock"
        self.sock_b = run.workdir / f"{key}-b.sock"
        self.ns_a, self.ns_b = (f"pvbg-{run.tag}-{key}{s}" for s in "ab")
        self.ip_a, self.ip_b = (f"{run.net16}.{index}.{h}" for h in (1, 2))
        for sock, ns, ip in ((self.sock_a, self.ns_a, self.ip_a),
                             (self.sock_b, self.ns_b, self.ip_b)):
            run.namespaces.append(ns)
            proc = processes.PyvhostProcess(
                ["guest", "--socket", str(sock), "--server", "--netns", ns, "--ifname", IFNAME,
                 "--ip", f"{ip}/24", "--offloads", offloads], run.workdir, ns)
            proc.args = ["taskset", "-c", str(TOOL_CPU), *proc.args]
            run.stoppable.append(proc)
            proc.start(ready_text="guest: ", timeout=30)
            run.pids.append(proc.proc.pid)

    def ping(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(["ip", "netns", "exec", self.ns_a, "ping", "-c", "1", "-W", "1",
                                self.ip_b], capture_output=True, timeout=15)
            if r.returncode == 0:
                return True
            time.sleep(0.2)
        return False


class PyvhostSide:
    name = PY

    def __init__(self, run: Run, pair: Pair):
        self.pair = pair
        run_dir = run.workdir / "pyvhost-run"
        config = (f"set-pmd threads=1 cpus={SWITCH_CPU}\nadd-br br0\n"
                  f"add-port br0 ga type=vhostuserclient path={pair.sock_a} queues=1\n"
                  f"add-port br0 gb type=vhostuserclient path={pair.sock_b} queues=1\n"
                  "add-flow br0 priority=10,in_port=ga,actions=output:gb\n"
                  "add-flow br0 priority=10,in_port=gb,actions=output:ga\n")
        self.proc = processes.switch(run.workdir, run_dir, config=config, name="pyvhost")
        run.stoppable.append(self.proc)
        run.pids.append(self.proc.proc.pid)

    def pid(self) -> int:
        return self.proc.proc.pid

    def enter(self) -> None:
        pass

    def leave(self) -> None:
        pass


class OvsSide:
    name = OVS

    def __init__(self, run: Run, pair: Pair, offloads: str):
        self.pair = pair
        extra = {"userspace-tso-enable": "true"} if offloads == "tso" else {}
        self.ovs = OvsDpdk(run.workdir, [], pmd_cpu=SWITCH_CPU, other_config=extra)
        run.stoppable.append(self.ovs)
        self.ovs.start()
        run.pids += [p.pid for p in self.ovs.procs]

    def pid(self) -> int:
        return self.ovs.vswitchd_pid()

    def enter(self) -> None:
        """Its ports (and with them its PMD thread) for its rounds only."""
        for port, sock in (("ga", self.pair.sock_a), ("gb", self.pair.sock_b)):
            self.ovs.vsctl("add-port", "br0", port, "--", "set", "Interface", port,
                           "type=dpdkvhostuserclient", f"options:vhost-server-path={sock}",
                           wait=True)
        self.ovs.ofctl("del-flows", "br0")
        for a, b in (("ga", "gb"), ("gb", "ga")):
            self.ovs.ofctl("add-flow", "br0", f"priority=10,in_port={a},actions=output:{b}")

    def leave(self) -> None:
        for port in ("ga", "gb"):
            self.ovs.vsctl("--if-exists", "del-port", "br0", port, wait=True)


def measure(pair: Pair, seconds: float) -> dict[str, float]:
    tcp = _iperf.tcp_gbps(_iperf.run(pair.ns_a, pair.ns_b, pair.ip_b, seconds, cpu=TOOL_CPU))
    before = _iperf.rx_packets(pair.ns_b, IFNAME)
    report = _iperf.run(pair.ns_a, pair.ns_b, pair.ip_b, seconds, *_iperf.udp_args(),
                        cpu=TOOL_CPU)
    at_b = _iperf.rx_packets(pair.ns_b, IFNAME) - before
    udp = _iperf.udp_kpps(report)
    return {"TCP": tcp, "UDP 64B sent": udp["sent"], "UDP 64B rcvd": udp["rcvd"],
            "UDP 64B at B": at_b / report["end"]["sum_sent"]["seconds"] / 1e3}


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, taps, hugepages)"
    for tool in ("ip", "iperf3", "ping", "taskset", "ss"):
        if shutil.which(tool) is None:
            return f"{tool} missing"
    if (os.cpu_count() or 1) < 2:
        return "needs 2 CPUs (switches on 0, guests and iperf3 on 1)"
    return available()


def main() -> int:
    ap = argparse.ArgumentParser(prog="pyvhost bench guest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="per iperf3 test")
    ap.add_argument("--offloads", choices=("tso", "csum", "none"), default="tso",
                    help="what the guests offer (pyvhost guest --offloads)")
    ap.add_argument("--deadline", type=float, default=900.0,
                    help="start no round after this many seconds")
    args = ap.parse_args()
    if args.rounds < 1 or not 0.5 <= args.seconds <= 600:
        ap.error("--rounds 1 or more, --seconds 0.5..600")
    why = preflight()
    if why:
        print(f"bench guest: cannot run: {why}", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise Interrupted()
    old_term = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="pvbg", dir="/tmp"))
    run = Run(workdir)
    results = {PY: {m: [] for m, _ in MEASURES}, OVS: {m: [] for m, _ in MEASURES}}
    notes: list[str] = []
    t0 = time.monotonic()
    try:
        with Hugepages():
            try:
                ovs = OvsSide(run, Pair(run, "o", 1, args.offloads), args.offloads)
                py = PyvhostSide(run, Pair(run, "p", 2, args.offloads))
                sides = [ovs, py]
                other_cpu = {OVS: [], PY: []}
                for r in range(args.rounds):
                    if time.monotonic() - t0 > args.deadline:
                        notes.append(f"stopped after {r} rounds: --deadline {args.deadline:g} s")
                        break
                    for side in sides:
                        idle = [s for s in sides if s is not side]
                        cpu0 = [cpu_seconds(s.pid()) for s in idle]
                        side.enter()
                        try:
                            if not side.pair.ping():
                                raise RuntimeError("A cannot ping B")
                            got = measure(side.pair, args.seconds)
                        except (RuntimeError, subprocess.SubprocessError, ValueError,
                                KeyError) as e:
                            print(f"round {r + 1} {side.name}: failed: {e}", flush=True)
                            continue
                        finally:
                            side.leave()
                        for s, c in zip(idle, cpu0, strict=True):
                            other_cpu[s.name].append(cpu_seconds(s.pid()) - c)
                        for m, v in got.items():
                            results[side.name][m].append(v)
                        print(f"round {r + 1} {side.name:13} TCP {got['TCP']:6.2f} Gbit/s  "
                              f"UDP 64B sent {got['UDP 64B sent']:7.1f} at B "
                              f"{got['UDP 64B at B']:7.1f} rcvd {got['UDP 64B rcvd']:7.1f} "
                              "kpps", flush=True)
                for name, used in other_cpu.items():
                    if used:
                        notes.append(f"{name} used {sum(used):.2f} CPU-seconds during the "
                                     f"other switch's {len(used)} rounds")
            finally:
                stopped = list(run.pids)
                run.close()
    except (KeyboardInterrupt, Interrupted):
        print("bench guest: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    notes.append(f"offloads offered by the guests: {args.offloads}; {args.rounds} rounds of "
                 f"{args.seconds:g} s tests in {time.monotonic() - t0:.0f} s")
    notes.append("processes started and stopped: " + " ".join(map(str, stopped)))
    table = Table("guest", "two pyvhost guest namespaces through a switch (medians)",
                  [PY, OVS], [(PY, OVS)], notes=notes)
    for m, unit in MEASURES:
        table.add(m, unit, {c: statistics.median(v[m]) if v[m] else None
                            for c, v in results.items()}, compare=m in COMPARED)
    emit(table)
    return 0 if all(results[c]["TCP"] for c in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
