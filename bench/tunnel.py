"""Tunnels: guest to guest across two switches joined by VXLAN, pyvhost next to OVS
userspace, in alternating rounds of one run.

Every path has two switch namespaces S1 and S2 joined by an underlay veth pair (172.x.i.1 /
.2, MTU 1500) and a guest on each switch (overlay 10.x.i.1 and .2, MTU 1450); the switches
forward between their guest and a VXLAN port (VNI 42, UDP 4789) to each other over the
kernel's IP stack:

  pyvhost guest     `pyvhost switch` in S1 and in S2, each with a `pyvhost guest` namespace
                    on a vhost-user port (the guest --server, the port type=vhostuserclient)
                    and a type=vxlan port; bridge br0 with NORMAL. This is the guest-to-guest
                    path the issue asks for.
  pyvhost afpacket  the same switches with the guest a plain namespace on a veth whose peer
                    is a type=afpacket port (the OVS path's shape, with pyvhost)
  OVS userspace     Debian's non-DPDK ovs-vswitchd (private ovsdb-server) in S1 and in S2:
                    br0 (datapath_type=netdev) with the guest namespace's veth as a system
                    port and a vxlan port, br-phy (netdev) holding the underlay veth with the
                    underlay address on it (OVS's userspace tunnelling: shared/PEERS.md).
                    OVS's userspace datapath has no vhost-user without DPDK: its guests are
                    namespaces on veths.

Pinning, the same for every path: both switch processes under `taskset -c 0` (pyvhost:
`set-pmd threads=1 cpus=0 sleep-max=50`: two switches share that core, and OVS's userspace
datapath does not busy-poll, so pyvhost's PMDs nap while lightly loaded, as OVS-DPDK's
pmd-sleep-max lets them; --sleep-max 0 to compare busy-polling); the `pyvhost guest`
processes and iperf3 client and server under `taskset -c 1`. The guests' veths have
`tx off` and the `pyvhost guest`s offer --offloads (default none: complete checksums, no
TSO, as the veths; OVS system ports do not complete partial checksums).

  TCP        iperf3 -c B -t SECONDS (one stream), Gbit/s received
  64B sent   iperf3 -u -b 0 -l 18 (60-byte inner frames), datagrams/s A's iperf3 sent
  64B at B   frames/s arriving on B's interface during that test: what the switches
             delivered
  64B rcvd   datagrams/s B's iperf3 received (sent minus lost)

Rounds alternate (OVS, pyvhost guest, pyvhost afpacket, repeat); medians go into the bench
table (pyvhost/cli/benchtable.py, so `pyvhost bench tunnel --plot x.png` draws it) with
the ratios pyvhost / OVS on what the switches decide. On a 2-core machine the guests and
both iperf3 ends share CPU 1, so the 64-byte rates are bounded by them as well. Everything
made here goes at the end (namespaces with their veths; processes by PID), also on Ctrl-C.
Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import os
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
import host as H  # noqa: E402

from pyvhost.cli.benchtable import Table, emit  # noqa: E402
from tests.harness import processes  # noqa: E402

PY_GUEST, PY_AFPACKET, OVS = "pyvhost guest", "pyvhost afpacket", "OVS userspace"
ORDER = (PY_GUEST, PY_AFPACKET, OVS)
KEYS = {"guest": PY_GUEST, "afpacket": PY_AFPACKET, "ovs": OVS}
ROUND_ORDER = ("ovs", "guest", "afpacket")
U1, U2 = "pvu1", "pvu2"                  # the underlay veth ends in S1 and S2
INNER_MTU = 1450
GUEST_IF = "eth0"
MEASURES = (("TCP", "Gbit/s"), ("64B sent", "kpps"), ("64B at B", "kpps"),
            ("64B rcvd", "kpps"))
COMPARED = ("TCP", "64B at B", "64B rcvd")     # what the switches decide


class Underlay:
    """Switch namespaces S1 and S2 joined by the underlay veth pair U1 / U2."""

    def __init__(self, bench: H.HostBench, key: str, index: int):
        self.bench = bench
        self.ns_s, self.ns_s2 = bench.netns(f"{key}s"), bench.netns(f"{key}t")
        net = bench.net16
        self.ip_a, self.ip_b = f"{net}.{index}.1", f"{net}.{index}.2"
        self.u1 = f"172.{16 + index}.{int(net.split('.')[1]) - 200}.1"
        self.u2 = self.u1[:-1] + "2"
        H.sh(["ip", "link", "add", U1, "netns", self.ns_s, "type", "veth", "peer", "name", U2,
              "netns", self.ns_s2])

    def sides(self):
        """(switch namespace, underlay dev, its address, the other's address, 1 or 2)."""
        return ((self.ns_s, U1, self.u1, self.u2, 1), (self.ns_s2, U2, self.u2, self.u1, 2))

    def switch_info(self) -> str:
        return ""


class VethPath(Underlay):
    """ns A -- S1 ==vxlan over U1/U2== S2 -- ns B, the guests plain namespaces on veths."""

    def __init__(self, bench: H.HostBench, name: str, key: str, index: int):
        super().__init__(bench, key, index)
        self.name = name
        self.ns_a, self.ns_b = bench.netns(f"{key}a"), bench.netns(f"{key}b")
        self.dev_b = H.B_DEV
        for ns, dev, peer, ip, sw in ((self.ns_a, H.A_DEV, H.SA_DEV, self.ip_a, self.ns_s),
                                      (self.ns_b, H.B_DEV, H.SB_DEV, self.ip_b, self.ns_s2)):
            H.sh(["ip", "link", "add", dev, "netns", ns, "numtxqueues", "1", "numrxqueues",
                  "1", "type", "veth", "peer", "name", peer, "netns", sw,
                  "numtxqueues", "1", "numrxqueues", "1"])
            H.sh(["ip", "addr", "add", f"{ip}/24", "dev", dev], ns=ns)
            H.sh(["ip", "link", "set", dev, "mtu", str(INNER_MTU)], ns=ns)
            H.sh(["ethtool", "-K", dev, "tx", "off"], ns=ns)
            H.sh(["ip", "link", "set", dev, "up"], ns=ns)
            H.sh(["ip", "link", "set", peer, "up"], ns=sw)


class GuestPath(Underlay):
    """`pyvhost guest` A -- vhost-user -- S1 ==vxlan== S2 -- vhost-user -- `pyvhost guest` B."""

    def __init__(self, bench: H.HostBench, name: str, key: str, index: int, offloads: str):
        super().__init__(bench, key, index)
        self.name = name
        self.dev_b = GUEST_IF
        self.socks = []
        names = []
        for side, ip in (("a", self.ip_a), ("b", self.ip_b)):
            ns = f"pvbh-{bench.tag}-{key}{side}"
            bench.namespaces.append(ns)           # `pyvhost guest` makes it; deleted at the end
            sock = bench.workdir / f"{key}-{side}.sock"
            proc = processes.PyvhostProcess(
                ["guest", "--socket", str(sock), "--server", "--netns", ns, "--ifname",
                 GUEST_IF, "--ip", f"{ip}/24", "--mtu", str(INNER_MTU), "--offloads",
                 offloads], bench.workdir, f"guest-{key}{side}")
            proc.args = ["taskset", "-c", str(H.TOOL_CPU), *proc.args]
            bench.switches.append(proc)
            proc.start(ready_text="guest: ", timeout=30)
            self.socks.append(sock)
            names.append(ns)
        self.ns_a, self.ns_b = names


SLEEP_MAX_US = [50]      # --sleep-max: the pyvhost switches' set-pmd sleep-max


def start_pyvhost(bench: H.HostBench, path: Underlay, guest_ports) -> None:
    """A `pyvhost switch` in each switch namespace: br0 (NORMAL) with the guest's port (its
    ctl add-port words from ``guest_ports``: a list of two) and a vxlan port to the other."""
    infos = []
    for (ns, under, here, there, n), guest_port in zip(path.sides(), guest_ports, strict=True):
        H.sh(["ip", "addr", "add", f"{here}/24", "dev", under], ns=ns)
        H.sh(["ip", "link", "set", under, "up"], ns=ns)
        run_dir = bench.workdir / f"run-{path.name.replace(' ', '-')}{n}"
        proc = processes.PyvhostProcess(["switch", "--run-dir", str(run_dir)], bench.workdir,
                                        f"{path.name.replace(' ', '-')}{n}")
        proc.args = ["ip", "netns", "exec", ns, "taskset", "-c", str(H.SWITCH_CPU),
                     *proc.args]
        bench.switches.append(proc)
        proc.start(ready_text="switch: running")
        for argv in (("set-pmd", "threads=1", f"cpus={H.SWITCH_CPU}",
                      f"sleep-max={SLEEP_MAX_US[0]}"), ("add-br", "br0"),
                     ("add-port", "br0", *guest_port),
                     ("add-port", "br0", "vx0", "type=vxlan", f"remote_ip={there}",
                      "key=42")):
            processes.ctl(run_dir, *argv)
        infos.append(run_dir)
    path.switch_info = lambda: "\n".join(processes.ctl(d, "dump-ports", "br0") for d in infos)


def start_pyvhost_afpacket(bench: H.HostBench, path: VethPath) -> None:
    start_pyvhost(bench, path, [(dev, "type=afpacket", f"dev={dev}")
                                for dev in (H.SA_DEV, H.SB_DEV)])


def start_pyvhost_guest(bench: H.HostBench, path: GuestPath) -> None:
    start_pyvhost(bench, path, [("vm", "type=vhostuserclient", f"path={sock}", "queues=1")
                                for sock in path.socks])


def start_ovs(bench: H.HostBench, path: VethPath) -> None:
    infos = []
    for (ns, under, here, there, n), guest_dev in zip(path.sides(), (H.SA_DEV, H.SB_DEV),
                                                      strict=True):
        ovs = H.OvsNetdev(bench.workdir, [guest_dev], ns, H.SWITCH_CPU, f"ovs-tunnel{n}")
        bench.switches.append(ovs)
        ovs.start()
        ovs.vsctl("add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev",
                  wait=True)
        ovs.vsctl("add-port", "br-phy", under, wait=True)
        H.sh(["ip", "link", "set", under, "up"], ns=ns)
        H.sh(["ip", "addr", "add", f"{here}/24", "dev", "br-phy"], ns=ns)
        H.sh(["ip", "link", "set", "br-phy", "up"], ns=ns)
        ovs.vsctl("add-port", "br0", "vx0", "--", "set", "interface", "vx0", "type=vxlan",
                  f"options:remote_ip={there}", "options:key=42", wait=True)
        infos.append(ovs)
    path.switch_info = lambda: "\n".join(o.appctl("dpctl/show", "-s") + o.log_tail()
                                         for o in infos)


def ping(path: Underlay, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = H.sh(["ping", "-c", "3", "-i", "0.2", "-W", "1", path.ip_b], ns=path.ns_a,
                 check=False, timeout=15)
        if r.returncode == 0:
            return True
        time.sleep(0.2)
    return False


def measure(path: Underlay, seconds: float) -> dict[str, float]:
    """TCP, then 64-byte UDP, A -> B; iperf3's ends pinned to the tool CPU."""
    tcp = _iperf.tcp_gbps(_iperf.run(path.ns_a, path.ns_b, path.ip_b, seconds,
                                     cpu=H.TOOL_CPU))
    before = _iperf.rx_packets(path.ns_b, path.dev_b)
    report = _iperf.run(path.ns_a, path.ns_b, path.ip_b, seconds, *_iperf.udp_args(),
                        cpu=H.TOOL_CPU)
    at_b = _iperf.rx_packets(path.ns_b, path.dev_b) - before
    udp = _iperf.udp_kpps(report)
    return {"TCP": tcp, "64B sent": udp["sent"], "64B rcvd": udp["rcvd"],
            "64B at B": at_b / report["end"]["sum_sent"]["seconds"] / 1e3}


def build(bench: H.HostBench, key: str, index: int, offloads: str) -> Underlay:
    name = KEYS[key]
    if key == "guest":
        path = GuestPath(bench, name, "pyg", index, offloads)
        start_pyvhost_guest(bench, path)
    elif key == "afpacket":
        path = VethPath(bench, name, "pya", index)
        start_pyvhost_afpacket(bench, path)
    else:
        path = VethPath(bench, name, "ovs", index)
        start_ovs(bench, path)
    return path


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, veths)"
    for tool in ("ip", "iperf3", "ethtool", "ping", "taskset", "ss"):
        if shutil.which(tool) is None:
            return f"{tool} missing"
    if (os.cpu_count() or 1) < 2:
        return "needs 2 CPUs (switches on 0, guests and tools on 1)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(prog="pyvhost bench tunnel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="per iperf3 test")
    ap.add_argument("--paths", default=",".join(KEYS),
                    help=f"which paths (comma-separated: {', '.join(KEYS)})")
    ap.add_argument("--offloads", choices=("tso", "csum", "none"), default="none",
                    help="what the pyvhost guests offer (default none, as the tx-off veths)")
    ap.add_argument("--deadline", type=float, default=900.0,
                    help="start no round after this many seconds")
    ap.add_argument("--sleep-max", type=int, default=50, metavar="US",
                    help="the pyvhost switches' set-pmd sleep-max (default 50: load-based "
                         "sleeping, as both switches share CPU 0 here and OVS userspace does "
                         "not poll; 0: both pyvhost PMDs busy-poll that one core)")
    args = ap.parse_args()
    if not 0 <= args.sleep_max <= 10000:
        ap.error("--sleep-max 0..10000")
    SLEEP_MAX_US[0] = args.sleep_max
    wanted = args.paths.split(",")
    if args.rounds < 1 or not 0.5 <= args.seconds <= 600:
        ap.error("--rounds 1 or more, --seconds 0.5..600")
    if not wanted or any(k not in KEYS for k in wanted):
        ap.error(f"--paths: some of {', '.join(KEYS)}")
    why = preflight()
    if why:
        print(f"bench tunnel: cannot run: {why}", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise H.Interrupted()
    old_term = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="pvt", dir="/tmp"))
    bench = H.HostBench(workdir)
    results: dict[str, dict[str, list[float]]] = {}
    notes: list[str] = []
    t0 = time.monotonic()
    try:
        paths = []
        for index, key in enumerate(ROUND_ORDER, 1):
            name = KEYS[key]
            if key not in wanted:
                continue
            if key == "ovs" and not Path(H.OVS_VSWITCHD).exists():
                notes.append(f"{OVS}: skipped, {H.OVS_VSWITCHD} missing (openvswitch-switch)")
                continue
            try:
                path = build(bench, key, index, args.offloads)
            except (RuntimeError, subprocess.CalledProcessError,
                    subprocess.TimeoutExpired) as e:
                why = getattr(e, "stderr", None) or str(e)
                notes.append(f"{name}: skipped, it did not start: {str(why).strip()[-600:]}")
                continue
            if not ping(path):
                notes.append(f"{name}: skipped, A cannot ping B through it:\n"
                             f"{path.switch_info()[-1500:]}")
                continue
            paths.append(path)
            results[name] = {m: [] for m, _ in MEASURES}
        for note in notes:
            print("note:", note, flush=True)
        t1 = time.monotonic()
        for r in range(args.rounds):
            if time.monotonic() - t0 > args.deadline:
                notes.append(f"stopped after {r} rounds: --deadline {args.deadline:g} s")
                break
            for path in paths:
                try:
                    got = measure(path, args.seconds)
                except (RuntimeError, subprocess.TimeoutExpired, subprocess.CalledProcessError,
                        ValueError, KeyError) as e:
                    print(f"round {r + 1} {path.name}: failed: {e}", flush=True)
                    continue
                for m, v in got.items():
                    results[path.name][m].append(v)
                print(f"round {r + 1} {path.name:16} TCP {got['TCP']:6.2f} Gbit/s  64B sent "
                      f"{got['64B sent']:7.1f} at B {got['64B at B']:7.1f} rcvd "
                      f"{got['64B rcvd']:7.1f} kpps", flush=True)
        notes.append(f"{args.rounds} rounds of {args.seconds:g} s tests in "
                     f"{time.monotonic() - t1:.0f} s; pyvhost guests offer --offloads "
                     f"{args.offloads}; switches on CPU {H.SWITCH_CPU}, guests and iperf3 on "
                     f"CPU {H.TOOL_CPU}; pyvhost set-pmd sleep-max={args.sleep_max}")
    except (KeyboardInterrupt, H.Interrupted):
        print("bench tunnel: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        try:
            bench.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, old_int)
    report(results, notes)
    return 0 if results and all(v["TCP"] for v in results.values()) else 1


def report(results: dict[str, dict[str, list[float]]], notes: list[str]) -> Table:
    """The medians as the bench table; ratios pyvhost / OVS on what the switches decide."""
    cols = [c for c in ORDER if c in results]
    ratios = [(c, OVS) for c in (PY_GUEST, PY_AFPACKET) if c in cols and OVS in cols]
    table = Table("tunnel", "guest to guest across two switches over VXLAN (medians)", cols,
                  ratios, notes=notes)
    for m, unit in MEASURES:
        table.add(m, unit, {c: statistics.median(results[c][m]) if results[c][m] else None
                            for c in cols}, compare=m in COMPARED)
    return emit(table)


if __name__ == "__main__":
    raise SystemExit(main())
