"""The part of ``pyvhost demo`` that needs no QEMU (issue 16): a switch with two vhost-user
ports, two network namespaces attached to them as guests by ``pyvhost guest``, a ping each
way and a short iperf3 run between them while the per-port counters tick; then everything
it made (processes by PID, namespaces) is removed. Needs root (namespaces, taps); iperf3
is optional (skipped with a note when missing).

Only child processes of pyvhost's own commands and ``ip``/``ping``/``iperf3``; nothing of
the switch's or the frontend's internals.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .demo import _ctl, _say, _Switch

CONFIG = """add-br br0
add-port br0 ns1 type=vhostuser queues=1
add-port br0 ns2 type=vhostuser queues=1
"""


def _in_ns(ns: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=timeout)


class _GuestProc:
    """``pyvhost guest`` as a child process in its own session."""

    def __init__(self, work: Path, name: str, socket: Path, netns: str, ip: str):
        self.out = work / f"{name}.out"
        self.err = work / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyvhost.cli.main", "guest", "--socket", str(socket),
                 "--netns", netns, "--ip", ip, "--json"],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while b"guest: " not in self.out.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("pyvhost guest did not start: "
                                   + self.err.read_text(errors="replace")[-2000:])
            time.sleep(0.05)

    def stop(self) -> dict | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        lines = self.out.read_text(errors="replace").strip().splitlines()
        try:
            return json.loads(lines[-1])
        except (IndexError, ValueError):
            return None


def _ping(ns: str, address: str, count: int) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:      # the first ARP may race the link coming up
        r = _in_ns(ns, "ping", "-c", "1", "-W", "1", address, timeout=10)
        if r.returncode == 0:
            break
        time.sleep(0.2)
    r = _in_ns(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "1", address,
               timeout=count + 20)
    summary = [line for line in r.stdout.splitlines() if "transmitted" in line]
    _say("   " + (summary[0] if summary else (r.stderr.strip() or "ping printed nothing")))
    return r.returncode == 0


def _counters(run_dir: Path) -> dict:
    """{port: (rx packets, rx bytes, tx packets)} from the switch."""
    try:
        ports = json.loads(_ctl(run_dir, "dump-ports", "--json", "br0"))
    except ValueError:
        return {}
    return {name: (p["datapath"]["rx_packets"], p["datapath"]["rx_bytes"],
                   p["datapath"]["tx_packets"]) for name, p in ports.items()}


def _iperf3(run_dir: Path, server_ns: str, client_ns: str, address: str,
            seconds: int) -> bool:
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B",
                            address], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        cli = subprocess.Popen(["ip", "netns", "exec", client_ns, "iperf3", "-c", address,
                                "-t", str(seconds), "-J"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + seconds + 30
        last = _counters(run_dir)
        while cli.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
            now = _counters(run_dir)
            _say("   " + "   ".join(
                f"{port}: rx {now[port][0]} pkts ({(now[port][1] - last[port][1]) * 8 / 1e9:.2f}"
                f" Gbit/s) tx {now[port][2]} pkts" for port in sorted(now)))
            last = now
        if cli.poll() is None:
            cli.kill()
        out, _ = cli.communicate(timeout=10)
        try:
            end = json.loads(out)["end"]
        except (ValueError, KeyError):
            _say("   iperf3 failed")
            return False
        _say(f"   iperf3 TCP: {end['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s, "
             f"{end['sum_sent']['bytes']} bytes sent, {end['sum_received']['bytes']} "
             f"counted by the receiver")
        return True
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(5)


def run_demo(count: int = 5, seconds: int = 3) -> int:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        _say("demo (namespaces): skipped: needs root and iproute2")
        return 0
    work = Path(tempfile.mkdtemp(prefix="pvgdemo", dir="/tmp"))
    run_dir = work / "run"
    tag = f"{os.getpid() % 100000}"
    guests = {"ns1": (f"pvdemo{tag}a", "10.213.0.1"), "ns2": (f"pvdemo{tag}b", "10.213.0.2")}
    _say(f"== namespaces as guests (no VM): pyvhost switch (run dir {run_dir})")
    sw = _Switch(work, run_dir, CONFIG)
    procs: dict[str, _GuestProc] = {}
    ok = False
    try:
        for port, (ns, ip) in guests.items():
            _say(f"== pyvhost guest --socket {run_dir / (port + '.sock')} --netns {ns} "
                 f"--ip {ip}/24")
            procs[port] = _GuestProc(work, port, run_dir / f"{port}.sock", ns, f"{ip}/24")
        (ns1, ip1), (ns2, ip2) = guests.values()
        _say(f"== {ns1} pings {ip2}, {ns2} pings {ip1}")
        ok = _ping(ns1, ip2, count) and _ping(ns2, ip1, count)
        if shutil.which("iperf3"):
            _say(f"== iperf3 TCP {ns1} -> {ns2} for {seconds} s (port counters each second)")
            ok = _iperf3(run_dir, ns2, ns1, ip2, seconds) and ok
        else:
            _say("== iperf3 not installed: no throughput run")
    finally:
        _say("== shutting down guests and switch")
        for port, p in procs.items():
            stats = p.stop()
            if stats:
                _say(f"   {port}: {stats['to_device_packets']} frames to the switch, "
                     f"{stats['to_tap_packets']} from it")
        sw.stop()
        for ns, _ in guests.values():         # gone already unless a guest failed early
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    _say("demo (namespaces): " + ("pings and iperf3 through the switch worked" if ok
                                  else "FAILED"))
    return 0 if ok else 1
