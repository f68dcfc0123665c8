"""OpenFlow 1.3 control plane: pyvhost switch next to OVS-DPDK 3.1, measured in the same run.

Both switches have the same ports (p1, p2, p3: vhost-user, OpenFlow ports 1, 2, 3), are in
fail mode secure, speak OpenFlow 1.3 to ``ovs-ofctl`` over a Unix socket (pyvhost:
``punix:`` in its run dir; OVS: its bridge's management socket) and connect to a controller
of the test harness (tests.harness.openflow.Responder; pyvhost over loopback TCP, OVS, in
a network namespace of its own, over a Unix socket) with the same controller rate and
burst limit (pyvhost: set-controller controller_rate_limit/controller_burst_limit; OVS:
the Controller table's). Rounds alternate (OVS, pyvhost, OVS, ...); medians are printed.

  flow_mods    ``ovs-ofctl -O OpenFlow13 add-flows`` of N rules (in_port + ip + nw_dst/32 ->
               output, OpenFlow port numbers) into an empty table: rules per second, the
               whole command timed (its TABLE_FEATURES/PORT_DESC requests, the FLOW_MODs).
               ovs-ofctl sends each FLOW_MOD with a BARRIER_REQUEST and waits for its
               reply, so this is one round trip (and, for pyvhost, one store commit) per
               rule
  round trips  a ``pyvhost gen`` on p1 offers --offer frames/s that miss (the only rule:
               priority=0 actions=CONTROLLER:65535); the controller answers each PACKET_IN
               with a PACKET_OUT of its frame to port 2; frames/s a generator on p2 gets
               (each one a PACKET_IN -> PACKET_OUT round trip), and the PACKET_INs/s the
               controller answered
Both switches poll with one PMD pinned to CPU 0, the generators run on CPU 1; the
controller and pyvhost's control thread float. The switch not being measured is stopped
(SIGSTOP) meanwhile (bench.flows.alone). Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ovs import Hugepages, available  # noqa: E402
from flows import Ovs, Pyvhost, alone, forwarded_rate  # noqa: E402

from pyvhost.cli.benchtable import Table, emit  # noqa: E402
from tests.harness.openflow import Responder  # noqa: E402

OUT_PORT = 2                     # p2's OpenFlow port on both switches
MISS = "priority=0,actions=CONTROLLER:65535\n"


def rules(n: int) -> str:
    return "".join(f"priority=10,in_port=1,ip,nw_dst=10.{i >> 16 & 255}.{i >> 8 & 255}."
                   f"{i & 255},actions=output:2\n" for i in range(n))


class PyvhostOF:
    """pyvhost's switch (bench.flows.Pyvhost) with its OpenFlow side set up."""

    name = "pyvhost"

    def __init__(self, workdir: Path, rate: int, burst: int):
        self.sw = Pyvhost(workdir)
        self.responder = Responder(OUT_PORT)
        self.target = f"unix:{self.sw.run_dir / 'br0.mgmt'}"
        self.sw.ctl("set-fail-mode", "br0", "secure")
        self.sw.ctl("set-controller", "br0", f"punix:{self.sw.run_dir / 'br0.mgmt'}",
                    f"tcp:127.0.0.1:{self.responder.port}", f"controller_rate_limit={rate}",
                    f"controller_burst_limit={burst}")

    def ofctl(self, *args: str) -> str:
        n = next(i for i, a in enumerate(args) if not a.startswith("--"))
        r = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", *args[:n + 1], self.target,
                            *args[n + 1:]], capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise RuntimeError(f"ovs-ofctl {args[n]}: {r.stderr}")
        return r.stdout

    def log_tail(self) -> str:
        return self.sw.proc.output()

    def stop(self) -> None:
        self.sw.stop()
        self.responder.stop()


class OvsOF:
    """OVS-DPDK (bench.flows.Ovs) with its OpenFlow side set up."""

    name = "OVS-DPDK"

    def __init__(self, workdir: Path, rate: int, burst: int):
        self.sw = Ovs(workdir)
        path = self.sw.ovs.dir / "controller.sock"     # (OVS: in its run dir, and in a netns)
        self.responder = Responder(OUT_PORT, unix_path=str(path))
        vsctl = self.sw.ovs.vsctl
        vsctl("set", "bridge", "br0", "protocols=OpenFlow13")
        vsctl("set-fail-mode", "br0", "secure")
        vsctl("set-controller", "br0", f"unix:{path}")
        vsctl("set", "controller", "br0", f"controller_rate_limit={rate}",
              f"controller_burst_limit={burst}", "connection-mode=out-of-band")

    def ofctl(self, *args: str) -> str:
        n = next(i for i, a in enumerate(args) if not a.startswith("--"))
        return self.sw.ovs.ofctl("-O", "OpenFlow13", *args[:n + 1], "br0",
                                 *args[n + 1:]).stdout

    def log_tail(self) -> str:
        return self.sw.ovs.log_tail()

    def stop(self) -> None:
        self.sw.stop()
        self.responder.stop()


def flow_mods(sw, path: Path, n: int) -> float:
    sw.ofctl("del-flows")
    t0 = time.monotonic()
    sw.ofctl("add-flows", str(path))
    elapsed = time.monotonic() - t0
    count = sw.ofctl("dump-aggregate")
    if f"flow_count={n}" not in count:
        raise RuntimeError(f"{sw.name}: {n} rules added, dump-aggregate says {count.strip()}")
    return n / elapsed


def wait_connected(switches, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(sw.responder.connected for sw in switches):
        if time.monotonic() > deadline:
            late = [sw for sw in switches if not sw.responder.connected]
            raise RuntimeError("did not connect to its controller: " + "; ".join(
                f"{sw.name} ({sw.log_tail()[-600:]})" for sw in late))
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(prog="pyvhost bench openflow", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", type=int, default=100000, help="rules of one add-flows")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="traffic per round trip sample")
    ap.add_argument("--offer", type=float, default=20000.0,
                    help="frames/s p1's generator offers (every one a PACKET_IN)")
    ap.add_argument("--controller-rate", type=int, default=50000,
                    help="both switches' controller_rate_limit (PACKET_INs/s)")
    ap.add_argument("--controller-burst", type=int, default=12500,
                    help="both switches' controller_burst_limit")
    ap.add_argument("--cases", default="flow_mods,round_trips")
    args = ap.parse_args()
    cases = set(args.cases.split(","))
    why = available()
    if why:
        print(f"bench openflow: OVS-DPDK cannot run: {why}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="pvo", dir="/tmp"))
    cols = ["pyvhost", "OVS-DPDK 3.1"]
    table = Table("openflow", "OpenFlow 1.3 control plane (medians of alternating rounds)",
                  cols, [("pyvhost", "OVS-DPDK 3.1")])
    table.notes.append(f"both switches: controller_rate_limit={args.controller_rate}, "
                       f"controller_burst_limit={args.controller_burst}; one PMD on CPU 0, "
                       "generators on CPU 1")

    def row(what: str, unit: str, got: dict[str, list[float]], compare: bool = True) -> None:
        med = {k: statistics.median(v) for k, v in got.items()}
        r = table.add(what, unit, {"pyvhost": med["pyvhost"], "OVS-DPDK 3.1": med["OVS-DPDK"]},
                      compare=compare)
        ratio = table.ratio(r, table.ratios[0]) if compare else None
        print(f"{what:44} pyvhost {med['pyvhost']:10.2f}  OVS-DPDK {med['OVS-DPDK']:10.2f} "
              f"{unit:10}" + (f" (pyvhost/OVS x{ratio:.2f})" if ratio else "") +
              f"  rounds: pyvhost {[round(x, 2) for x in got['pyvhost']]}, "
              f"OVS {[round(x, 2) for x in got['OVS-DPDK']]}", flush=True)

    try:
        with Hugepages():
            switches = []
            try:
                switches = [OvsOF(workdir, args.controller_rate, args.controller_burst),
                            PyvhostOF(workdir, args.controller_rate, args.controller_burst)]
                wait_connected(switches)
                if "flow_mods" in cases:
                    path = workdir / "rules.txt"
                    path.write_text(rules(args.rules))
                    got: dict[str, list[float]] = {sw.name: [] for sw in switches}
                    for _ in range(args.rounds):
                        for sw in switches:
                            with alone(sw.sw, [s.sw for s in switches]):
                                got[sw.name].append(flow_mods(sw, path, args.rules) / 1e3)
                    row(f"add-flows of {args.rules} rules", "kflow_mods/s", got)
                if "round_trips" in cases:
                    miss = workdir / "miss.txt"
                    miss.write_text(MISS)
                    for sw in switches:
                        sw.ofctl("del-flows")
                        sw.ofctl("add-flows", str(miss))
                    trips: dict[str, list[float]] = {sw.name: [] for sw in switches}
                    pins: dict[str, list[float]] = {sw.name: [] for sw in switches}
                    for _ in range(args.rounds):
                        for sw in switches:
                            before = sw.responder.packet_ins
                            with alone(sw.sw, [s.sw for s in switches]):
                                rate = forwarded_rate(sw.sw, workdir, args.seconds, 1,
                                                      ["--rate", str(args.offer)])
                            pins[sw.name].append((sw.responder.packet_ins - before) /
                                                 args.seconds / 1e3)
                            trips[sw.name].append(rate / 1e3)
                    row(f"PACKET_IN->PACKET_OUT, {args.offer / 1e3:g}k/s offered", "k/s", trips)
                    row("PACKET_INs the controller answered", "k/s", pins, compare=False)
            finally:
                for sw in switches:
                    sw.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    emit(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
