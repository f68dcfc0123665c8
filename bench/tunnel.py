"""Tunnels: two namespaces on two switches joined by VXLAN, pyvhost next to OVS userspace.

Each path: namespace A (overlay 10.x.i.1, MTU 1450) on a veth whose peer is in switch
namespace S1; namespace B (10.x.i.2, MTU 1450) on a veth whose peer is in S2; S1 and S2
joined by an underlay veth pair (172.x.i.1 / .2, MTU 1500). The two switches forward
between their guest veth and a VXLAN tunnel (VNI 42, UDP 4789) to each other:

  pyvhost   `pyvhost switch` in S1 and in S2: bridge br0 (NORMAL) with the guest veth as
            a type=afpacket port and a type=vxlan port (remote_ip = the other underlay
            address); the kernel's UDP socket carries the datagrams
  OVS       Debian's non-DPDK ovs-vswitchd (private ovsdb-server) in S1 and in S2: br0
            (datapath_type=netdev) with the guest veth as a system port and a vxlan port,
            br-phy (netdev) holding the underlay veth with the underlay address on it
            (OVS's userspace tunnelling: shared/PEERS.md)

Pinning: all four switch processes under `taskset -c 0` (pyvhost: `set-pmd threads=1
cpus=0`), iperf3 client and server under `taskset -c 1`, as bench host does; the guest veths
have `tx off` (complete checksums, no TSO: OVS system ports do not complete partial ones).
Measures (bench host's): TCP (iperf3, one stream, Gbit/s received), 64B sent / at B / rcvd
(iperf3 UDP with 18-byte payloads: 60-byte inner frames; kpps). Rounds alternate pyvhost
and OVS; medians and the ratios pyvhost / OVS are printed. Everything made here goes at
the end (namespaces with their veths; processes by PID), also on Ctrl-C. Not a test: no
thresholds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host as H  # noqa: E402

from tests.harness import processes  # noqa: E402

PYVHOST, OVS = "pyvhost vxlan", "OVS vxlan"
ORDER = (OVS, PYVHOST)
U1, U2 = "pvu1", "pvu2"                  # the underlay veth ends in S1 and S2
INNER_MTU = 1450
MEASURES = (("TCP", "Gbit/s"), ("64B sent", "kpps"), ("64B at B", "kpps"),
            ("64B rcvd", "kpps"))


class TunnelPath(H.Path_):
    """ns A -- S1 ==vxlan over U1/U2== S2 -- ns B."""

    def __init__(self, bench: H.HostBench, name: str, key: str, index: int):
        self.name = name
        self.bench = bench
        self.ns_a, self.ns_b, self.ns_s, self.ns_s2 = (bench.netns(f"{key}{r}")
                                                       for r in ("a", "b", "s", "t"))
        net = bench.net16
        self.ip_a, self.ip_b = f"{net}.{index}.1", f"{net}.{index}.2"
        self.u1 = f"172.{16 + index}.{int(net.split('.')[1]) - 200}.1"
        self.u2 = self.u1[:-1] + "2"
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
        H.sh(["ip", "link", "add", U1, "netns", self.ns_s, "type", "veth", "peer", "name", U2,
              "netns", self.ns_s2])
        self.partial_csum_ok = False


def start_pyvhost(bench: H.HostBench, path: TunnelPath) -> None:
    infos = []
    for ns, guest_dev, under, here, there, n in (
            (path.ns_s, H.SA_DEV, U1, path.u1, path.u2, 1),
            (path.ns_s2, H.SB_DEV, U2, path.u2, path.u1, 2)):
        H.sh(["ip", "addr", "add", f"{here}/24", "dev", under], ns=ns)
        H.sh(["ip", "link", "set", under, "up"], ns=ns)
        run_dir = bench.workdir / f"run-tunnel{n}"
        proc = processes.PyvhostProcess(["switch", "--run-dir", str(run_dir)], bench.workdir,
                                        f"pyvhost-tunnel{n}")
        proc.args = ["ip", "netns", "exec", ns, "taskset", "-c", str(H.SWITCH_CPU),
                     *proc.args]
        bench.switches.append(proc)
        proc.start(ready_text="switch: running")
        for argv in (("set-pmd", "threads=1", f"cpus={H.SWITCH_CPU}"), ("add-br", "br0"),
                     ("add-port", "br0", guest_dev, "type=afpacket", f"dev={guest_dev}"),
                     ("add-port", "br0", "vx0", "type=vxlan", f"remote_ip={there}",
                      "key=42")):
            processes.ctl(run_dir, *argv)
        infos.append(run_dir)
    path.switch_info = lambda: "\n".join(processes.ctl(d, "dump-ports", "br0") for d in infos)


def start_ovs(bench: H.HostBench, path: TunnelPath) -> None:
    infos = []
    for ns, guest_dev, under, here, there, n in (
            (path.ns_s, H.SA_DEV, U1, path.u1, path.u2, 1),
            (path.ns_s2, H.SB_DEV, U2, path.u2, path.u1, 2)):
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


def main() -> int:
    ap = argparse.ArgumentParser(prog="pyvhost bench tunnel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="per iperf3 test")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench tunnel: needs root (namespaces, veths)", file=sys.stderr)
        return 2
    for tool in ("ip", "iperf3", "ethtool", "ping", "taskset", "ss"):
        if shutil.which(tool) is None:
            print(f"bench tunnel: {tool} missing", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("bench tunnel: needs 2 CPUs (switches on 0, tools on 1)", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise H.Interrupted()
    old_term = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="pvt", dir="/tmp"))
    bench = H.HostBench(workdir)
    results: dict[str, dict[str, list[float]]] = {}
    notes: list[str] = []
    try:
        paths = []
        for index, (name, start) in enumerate(((OVS, start_ovs), (PYVHOST, start_pyvhost)),
                                              1):
            if name == OVS and not Path(H.OVS_VSWITCHD).exists():
                notes.append(f"{OVS}: skipped, {H.OVS_VSWITCHD} missing (openvswitch-switch)")
                continue
            path = TunnelPath(bench, name, "ovs" if name == OVS else "pyv", index)
            try:
                start(bench, path)
            except (RuntimeError, subprocess.CalledProcessError) as e:
                why = getattr(e, "stderr", None) or str(e)
                notes.append(f"{name}: skipped, the switches did not start: "
                             f"{why.strip()[-600:]}")
                continue
            if not H.ping(path, timeout=30):
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
                    tcp = H.measure_tcp(path, args.seconds)
                    udp = H.measure_udp(path, args.seconds)
                except (RuntimeError, subprocess.TimeoutExpired, subprocess.CalledProcessError,
                        ValueError, KeyError) as e:
                    print(f"round {r + 1} {path.name}: failed: {e}", flush=True)
                    continue
                got["TCP"].append(tcp)
                got["64B sent"].append(udp["sent"])
                got["64B at B"].append(udp["at_b"])
                got["64B rcvd"].append(udp["rcvd"])
                print(f"round {r + 1} {path.name:14} TCP {tcp:6.2f} Gbit/s  64B sent "
                      f"{udp['sent']:7.1f} at B {udp['at_b']:7.1f} rcvd {udp['rcvd']:7.1f} "
                      "kpps", flush=True)
        print(f"({args.rounds} rounds of {args.seconds:g} s tests in "
              f"{time.monotonic() - t0:.0f} s)")
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
    report(results)
    return 0


def report(results: dict[str, dict[str, list[float]]]) -> None:
    cols = [c for c in ORDER if c in results]
    med = {c: {m: H.median(results[c][m]) for m, _ in MEASURES} for c in cols}
    print("\n| measure (median) | unit | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for m, unit in MEASURES:
        print(f"| {m} | {unit} | " + " | ".join(H.cell(med[c][m], unit) for c in cols) + " |")
    if OVS in med and PYVHOST in med:
        for m in ("TCP", "64B at B", "64B rcvd"):
            base = med[OVS][m]
            if base and base == base:
                print(f"| pyvhost vs OVS: {m} | ratio | | x{med[PYVHOST][m] / base:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
