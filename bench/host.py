"""Host ports: two network namespaces talking through a switch, side by side in one run.

Namespace A (10.x.y.1) and namespace B (10.x.y.2) each own one end of a veth pair (one
queue each way: numtxqueues 1 numrxqueues 1); the other ends sit in a switch namespace made
for the path, where the switch attaches them:

  OVS userspace     Debian's non-DPDK ovs-vswitchd (openvswitch-switch 3.1) with a private
                    ovsdb-server, bridge datapath_type=netdev, both veths as system ports,
                    actions=NORMAL; ovs-vswitchd runs in the switch namespace (its br0 and
                    ovs-netdev taps stay there)
  OVS afxdp         the same OVS set-up with the veths as type=afxdp ports
                    (options:xdp-mode=generic: copy mode, as pyvhost's), added to the bridge
                    only for this path's rounds (their PMD thread busy-polls CPU 0, and goes
                    away when they are deleted); not asked for, but the like-for-like peer of
                    pyvhost afxdp
  pyvhost afpacket  `pyvhost switch` in the switch namespace, the veths as type=afpacket ports
  pyvhost afxdp     the same with type=afxdp ports (a second switch; skipped with a note
                    where AF_XDP is not built or not allowed)
  Linux bridge      the kernel's bridge in the switch namespace (the reference)

Every path has its own namespaces and subnet and stays up for the whole run; switches that
are not measured sleep (pyvhost's PMD sleeps on its ports' fds; OVS polls system ports from
its main thread, which sleeps in poll()). Pinning: each switch process runs under
`taskset -c 0` with its polling thread on CPU 0: pyvhost `set-pmd threads=1 cpus=0`; OVS
`other_config:pmd-cpu-mask=0x1`, which only applies to PMD port types (dpdk, afxdp): the
userspace datapath polls system (netdev-linux) ports from its main thread (no PMD thread
exists), so with system ports that is the thread pinned to CPU 0 (the run prints what
`dpif-netdev/pmd-rxq-show` says). The Linux
bridge forwards in softirq context, mostly on the sender's CPU. The traffic tools (iperf3
client and server) run under `taskset -c 1`.

Both A's and B's veth ends have `ethtool -K DEV tx off` (complete checksums, no TSO from
the namespaces): AF_XDP ports carry no checksum metadata and OVS's system ports in the
userspace datapath do not complete partial checksums, so this is the configuration every
path carries; the same for all four. One more row measures TCP with the veth defaults
(checksum offload and TSO on: local senders' frames carry partial checksums, the PEERS.md
pitfall) on the paths that carry such frames (pyvhost afpacket, through PACKET_VNET_HDR, and
the bridge); OVS's system ports and AF_XDP ports do not (TCP stalls), so they show n/a.

  TCP          iperf3 -c B -t SECONDS (one stream), Gbit/s received
  TCP offload  the same with `tx on` on A's and B's veths (afpacket and bridge only)
  64B sent     iperf3 -u -b 0 -l 18 (18-byte payload: 60-byte frames, 64 on a wire with
               FCS), datagrams/s A's iperf3 sent
  64B at B     frames/s arriving on B's veth (its rx_packets) during that test: what the
               switch delivered
  64B rcvd     datagrams/s B's iperf3 received (sent minus lost, iperf3's count)

Rounds alternate (OVS, OVS afxdp, pyvhost afpacket, pyvhost afxdp, bridge, repeat);
medians are printed (with each system's spread over the rounds), with the ratios pyvhost /
OVS userspace, pyvhost afxdp / OVS afxdp and pyvhost afxdp / pyvhost afpacket. On a 2-core
machine sender and receiver share CPU 1, so the 64-byte rates are bounded by iperf3 itself
as well; the bridge forwards on the sender's CPU, so its column is no ceiling either.
Everything this creates (namespaces with their veths, processes) is removed at the end, also
on Ctrl-C; processes are stopped by PID. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
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
from _ovs import SCHEMA, OvsDpdk  # noqa: E402

from pyvhost.cli.benchtable import Table, emit  # noqa: E402
from tests.harness import processes  # noqa: E402

OVS_VSWITCHD = "/usr/lib/openvswitch-switch/ovs-vswitchd"     # Debian's non-DPDK build
SWITCH_CPU, TOOL_CPU = 0, 1
A_DEV, B_DEV = "pva", "pvb"           # in namespaces A and B
SA_DEV, SB_DEV = "pvsa", "pvsb"       # their peers in the switch namespace

OVS, OVS_XDP = "OVS userspace", "OVS afxdp"
AFPACKET, AFXDP, BRIDGE = "pyvhost afpacket", "pyvhost afxdp", "Linux bridge"
ORDER = (OVS, OVS_XDP, AFPACKET, AFXDP, BRIDGE)
KEYS = {"ovs": OVS, "ovs-afxdp": OVS_XDP, "afpacket": AFPACKET, "afxdp": AFXDP,
        "bridge": BRIDGE}


def sh(argv: list[str], *, ns: str | None = None, timeout: float = 30.0,
       check: bool = True) -> subprocess.CompletedProcess:
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


class Interrupted(BaseException):
    """SIGTERM (raised like Ctrl-C so that every finally block runs)."""


class OvsNetdev(OvsDpdk):
    """OVS's userspace datapath without DPDK: the private ovsdb-server and work directory of
    bench/_ovs.py, Debian's plain ovs-vswitchd run in ``netns`` (made by the caller, holding
    the veth ends) under taskset, a netdev bridge with ``ports`` as system ports."""

    def __init__(self, workdir: Path, ports: list[str], netns: str, cpu: int, name: str):
        super().__init__(workdir, ports, pmd_cpu=cpu, name=name)
        self.netns = netns

    def _start(self) -> OvsNetdev:
        self.start_db()
        self.vsctl("set", "Open_vSwitch", ".",
                   f"other_config:pmd-cpu-mask={hex(1 << self.pmd_cpu)}")
        self.spawn(["ip", "netns", "exec", self.netns, "taskset", "-c", str(self.pmd_cpu),
                    OVS_VSWITCHD, self.db, f"--unixctl={self.dir / 'vswitchd.ctl'}",
                    "--no-chdir"], "vswitchd")
        self.vsctl("add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev",
                   wait=True)
        for port in self.ports:
            self.vsctl("add-port", "br0", port, wait=True)
        return self

    def stop(self) -> None:
        self.stop_processes()                    # the namespace is the caller's to delete


class HostBench:
    """The namespaces, veths and processes of one run; ``close()`` removes all of it."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.tag = secrets.token_hex(3)
        self.net16 = f"10.{200 + secrets.randbelow(50)}"
        self.namespaces: list[str] = []
        self.switches: list = []              # PyvhostProcess or OvsNetdev: stop()
        self.paths: dict[str, Path_] = {}

    def netns(self, what: str) -> str:
        ns = f"pvbh-{self.tag}-{what}"
        sh(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        sh(["ip", "link", "set", "lo", "up"], ns=ns)
        return ns

    def close(self) -> None:
        for sw in reversed(self.switches):
            with contextlib.suppress(Exception):
                sw.stop()
        for ns in reversed(self.namespaces):      # their veths go with them
            sh(["ip", "netns", "del", ns], check=False)
        self.switches, self.namespaces = [], []


class Path_:
    """ns A and ns B, each with a veth whose peer is in the switch namespace ns S."""

    def __init__(self, bench: HostBench, name: str, key: str, index: int):
        self.name = name
        self.bench = bench
        self.ns_a, self.ns_b, self.ns_s = (bench.netns(f"{key}{r}") for r in "abs")
        self.ip_a = f"{bench.net16}.{index}.1"
        self.ip_b = f"{bench.net16}.{index}.2"
        for ns, dev, peer, ip in ((self.ns_a, A_DEV, SA_DEV, self.ip_a),
                                  (self.ns_b, B_DEV, SB_DEV, self.ip_b)):
            sh(["ip", "link", "add", dev, "netns", ns, "numtxqueues", "1", "numrxqueues", "1",
                "type", "veth", "peer", "name", peer, "netns", self.ns_s,
                "numtxqueues", "1", "numrxqueues", "1"])
            sh(["ip", "addr", "add", f"{ip}/24", "dev", dev], ns=ns)
            sh(["ethtool", "-K", dev, "tx", "off"], ns=ns)
            sh(["ip", "link", "set", dev, "up"], ns=ns)
            sh(["ip", "link", "set", peer, "up"], ns=self.ns_s)
        self.partial_csum_ok = False     # carries frames with partial checksums (tx on)

    def enter(self) -> None:
        """Before this path's measures (and its first ping)."""

    def leave(self) -> None:
        """After them."""

    def offload(self, on: bool) -> None:
        for ns, dev in ((self.ns_a, A_DEV), (self.ns_b, B_DEV)):
            sh(["ethtool", "-K", dev, "tx", "on" if on else "off"], ns=ns)

    def switch_info(self) -> str:
        return ""


def start_pyvhost(bench: HostBench, path: Path_, port_type: str) -> None:
    run_dir = bench.workdir / f"run-{port_type}"
    proc = processes.PyvhostProcess(["switch", "--run-dir", str(run_dir)], bench.workdir,
                                    f"pyvhost-{port_type}")
    proc.args = ["ip", "netns", "exec", path.ns_s, "taskset", "-c", str(SWITCH_CPU),
                 *proc.args]
    bench.switches.append(proc)
    proc.start(ready_text="switch: running")
    processes.ctl(run_dir, "set-pmd", "threads=1", f"cpus={SWITCH_CPU}")
    processes.ctl(run_dir, "add-br", "br0")
    for dev in (SA_DEV, SB_DEV):
        processes.ctl(run_dir, "add-port", "br0", dev, f"type={port_type}", f"dev={dev}")
    path.switch_info = lambda: processes.ctl(run_dir, "dump-ports", "br0")
    path.stats = lambda: json.loads(processes.ctl(run_dir, "dump-ports", "--json", "br0"))


def start_ovs(bench: HostBench, path: Path_, afxdp: bool = False) -> OvsNetdev:
    """OVS with the veths as system ports; or (``afxdp``) as afxdp ports in generic (copy)
    XDP mode, pyvhost's mode, added only while the path is measured: their PMD thread
    busy-polls CPU 0 and goes away with them."""
    ovs = OvsNetdev(bench.workdir, [] if afxdp else [SA_DEV, SB_DEV], path.ns_s, SWITCH_CPU,
                    "ovs-afxdp" if afxdp else "ovs-system")
    bench.switches.append(ovs)
    ovs.start()
    path.switch_info = lambda: ovs.appctl("dpctl/show", "-s") + ovs.log_tail()
    if afxdp:
        def enter():
            for dev in (SA_DEV, SB_DEV):
                ovs.vsctl("add-port", "br0", dev, "--", "set", "Interface", dev, "type=afxdp",
                          "options:xdp-mode=generic", wait=True)
            if not ping(path):
                raise RuntimeError(f"A cannot ping B through OVS afxdp ports:\n"
                                   f"{path.switch_info()[-1500:]}")

        def leave():
            for dev in (SA_DEV, SB_DEV):
                ovs.vsctl("--if-exists", "del-port", "br0", dev, wait=True)
        path.enter, path.leave = enter, leave
    return ovs


def start_bridge(path: Path_) -> None:
    sh(["ip", "link", "add", "br0", "type", "bridge"], ns=path.ns_s)
    for dev in (SA_DEV, SB_DEV):
        sh(["ip", "link", "set", dev, "master", "br0"], ns=path.ns_s)
    sh(["ip", "link", "set", "br0", "up"], ns=path.ns_s)


def ping(path: Path_, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = sh(["ping", "-c", "3", "-i", "0.2", "-W", "1", path.ip_b], ns=path.ns_a,
               check=False, timeout=15)
        if r.returncode == 0:
            return True
        time.sleep(0.2)
    return False


def iperf3(path: Path_, seconds: float, *client_args: str) -> dict:
    """One iperf3 test A -> B, both ends pinned to the tool CPU; the client's JSON report."""
    return _iperf.run(path.ns_a, path.ns_b, path.ip_b, seconds, *client_args, cpu=TOOL_CPU)


def measure_tcp(path: Path_, seconds: float) -> float:
    return _iperf.tcp_gbps(iperf3(path, seconds))


def measure_tcp_offload(path: Path_, seconds: float) -> float:
    path.offload(True)
    try:
        return measure_tcp(path, seconds)
    finally:
        path.offload(False)


def measure_udp(path: Path_, seconds: float) -> dict[str, float]:
    before = _iperf.rx_packets(path.ns_b, B_DEV)
    report = iperf3(path, seconds, *_iperf.udp_args())
    at_b = _iperf.rx_packets(path.ns_b, B_DEV) - before
    return {**_iperf.udp_kpps(report),
            "at_b": at_b / report["end"]["sum_sent"]["seconds"] / 1e3}


MEASURES = (("TCP", "Gbit/s"), ("TCP offload", "Gbit/s"), ("64B sent", "kpps"),
            ("64B at B", "kpps"), ("64B rcvd", "kpps"))


def main() -> int:
    ap = argparse.ArgumentParser(prog="pyvhost bench host", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="per iperf3 test")
    ap.add_argument("--paths", default=",".join(KEYS), help="which paths (comma-separated)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench host: needs root (namespaces, veths)", file=sys.stderr)
        return 2
    for tool in ("ip", "iperf3", "ethtool", "ping", "taskset", "ss"):
        if shutil.which(tool) is None:
            print(f"bench host: {tool} missing", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("bench host: needs 2 CPUs (switches on 0, tools on 1)", file=sys.stderr)
        return 2
    wanted = set(args.paths.split(","))
    notes: list[str] = []

    def on_term(signum, frame):
        raise Interrupted()
    old_term = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)   # even if inherited
    workdir = Path(tempfile.mkdtemp(prefix="pvh", dir="/tmp"))
    bench = HostBench(workdir)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        paths: list[Path_] = []
        for index, (key, name) in enumerate(KEYS.items(), 1):
            if key not in wanted:
                continue
            if key.startswith("ovs") and not all(Path(p).exists() for p in
                                        (OVS_VSWITCHD, SCHEMA, "/usr/sbin/ovsdb-server")):
                notes.append(f"{name}: skipped, {OVS_VSWITCHD} missing (openvswitch-switch)")
                continue
            if key == "afxdp":
                try:
                    import pyvhost._afxdp  # noqa: F401
                except ImportError as e:
                    notes.append(f"{AFXDP}: skipped, pyvhost built without AF_XDP ({e})")
                    continue
            path = Path_(bench, name, key.replace("-", "")[:4], index)
            try:
                if key == "ovs":
                    ovs = start_ovs(bench, path)
                    rxq = [line for line in ovs.appctl("dpif-netdev/pmd-rxq-show")
                           .splitlines() if "port:" in line]
                    notes.append(f"{OVS}: ovs-vswitchd (all its threads) under taskset -c "
                                 f"{SWITCH_CPU}, pmd-cpu-mask={hex(1 << SWITCH_CPU)}; "
                                 + (f"PMD rx queues: {'; '.join(rxq)}" if rxq else
                                    "no PMD thread (pmd-rxq-show lists no queue): system "
                                    "ports are polled by the main thread"))
                elif key == "ovs-afxdp":
                    ovs = start_ovs(bench, path, afxdp=True)
                    path.enter()
                    rxq = [" ".join(line.split()[:4]) for line in
                           ovs.appctl("dpif-netdev/pmd-rxq-show").splitlines()
                           if "port:" in line]
                    path.leave()
                    notes.append(f"{OVS_XDP}: the same OVS set-up with type=afxdp "
                                 "options:xdp-mode=generic ports, added for its rounds only; "
                                 f"its PMD polls them on CPU {SWITCH_CPU}: {'; '.join(rxq)}")
                elif key in ("afpacket", "afxdp"):
                    start_pyvhost(bench, path, key)
                    path.partial_csum_ok = key == "afpacket"
                else:
                    start_bridge(path)
                    path.partial_csum_ok = True
            except (RuntimeError, subprocess.CalledProcessError) as e:
                why = getattr(e, "stderr", None) or str(e)
                notes.append(f"{name}: skipped, the switch did not start: {why.strip()[-600:]}")
                continue
            if key != "ovs-afxdp" and not ping(path):
                notes.append(f"{name}: skipped, A cannot ping B through it:\n"
                             f"{path.switch_info()[-1500:]}")
                continue
            paths.append(path)
            results[name] = {m: [] for m, _ in MEASURES}
        for note in notes:
            print("note:", note, flush=True)
        t0 = time.monotonic()
        for r in range(args.rounds):
            for path in paths:
                got = results[path.name]
                try:
                    path.enter()
                    try:
                        got["TCP"].append(measure_tcp(path, args.seconds))
                        udp = measure_udp(path, args.seconds)
                        if path.partial_csum_ok:
                            got["TCP offload"].append(measure_tcp_offload(path, args.seconds))
                    finally:
                        path.leave()
                except (RuntimeError, subprocess.TimeoutExpired, subprocess.CalledProcessError,
                        ValueError, KeyError) as e:
                    print(f"round {r + 1} {path.name}: failed: {e}", flush=True)
                    continue
                got["64B sent"].append(udp["sent"])
                got["64B at B"].append(udp["at_b"])
                got["64B rcvd"].append(udp["rcvd"])
                offl = f"{got['TCP offload'][-1]:6.2f}" if path.partial_csum_ok else "   n/a"
                print(f"round {r + 1} {path.name:17} TCP {got['TCP'][-1]:6.2f} "
                      f"(offload {offl}) Gbit/s  64B sent {udp['sent']:7.1f} "
                      f"at B {udp['at_b']:7.1f} rcvd {udp['rcvd']:7.1f} kpps", flush=True)
        print(f"({args.rounds} rounds of {args.seconds:g} s tests in "
              f"{time.monotonic() - t0:.0f} s)")
    except (KeyboardInterrupt, Interrupted):
        print("bench host: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        try:
            bench.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, old_int)
    report(results)
    return 0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


RATIO_MEASURES = ("TCP", "64B at B", "64B rcvd")     # what the switch decides


def report(results: dict[str, dict[str, list[float]]]) -> Table:
    """The medians as the bench table (each system's spread over its rounds with them),
    ratios on the measures the switch decides."""
    cols = [c for c in ORDER if c in results]
    ratios = [(c, base) for base, which in ((OVS, (AFPACKET, AFXDP)), (OVS_XDP, (AFXDP,)),
                                            (AFPACKET, (AFXDP,)))
              for c in which if c in cols and base in cols]
    table = Table("host", "two namespaces through a switch (medians)", cols, ratios)
    for m, unit in MEASURES:
        table.add(m, unit, {c: median(results[c][m]) for c in cols},
                  compare=m in RATIO_MEASURES,
                  rounds={c: results[c][m] for c in cols if results[c][m]})
    return emit(table)


if __name__ == "__main__":
    raise SystemExit(main())
