"""iperf3 between two network namespaces for the benches (host, guest): one test at a time,
the server started for it (``-s -1``) and ended by PID, both pinned to one CPU; the client's
JSON report, and the rates benches read from it. Knows namespaces and iperf3, no switch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

PORT = 5201
UDP_LEN = 18                          # iperf3 UDP payload: 60-byte frames (64 with FCS)


def _in(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def run(client_ns: str, server_ns: str, server_ip: str, seconds: float, *client_args: str,
        cpu: int = 1) -> dict:
    """One iperf3 test client_ns -> server_ip (in server_ns); the client's JSON report
    (RuntimeError with iperf3's reason if it failed)."""
    server = subprocess.Popen(
        _in(server_ns, ["taskset", "-c", str(cpu), "iperf3", "-s", "-1", "-B", server_ip,
                        "-p", str(PORT)]), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while f":{PORT}" not in subprocess.run(_in(server_ns, ["ss", "-ltnH"]),
                                               capture_output=True, text=True,
                                               timeout=10).stdout:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("iperf3 server did not start")
            time.sleep(0.05)
        r = subprocess.run(_in(client_ns, ["taskset", "-c", str(cpu), "iperf3", "-c",
                                           server_ip, "-p", str(PORT), "-t", str(seconds),
                                           "-J", *client_args]),
                           capture_output=True, text=True, timeout=seconds + 40)
        try:
            report = json.loads(r.stdout or "{}")
        except ValueError:
            report = {"error": f"no JSON from iperf3: {r.stdout[-300:]}"}
        if r.returncode or "error" in report:
            raise RuntimeError(f"iperf3 {' '.join(client_args)}: "
                               f"{report.get('error') or r.stderr.strip()}")
        server.wait(10)
        return report
    finally:
        if server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)


def tcp_gbps(report: dict) -> float:
    """Gbit/s the receiver counted."""
    return report["end"]["sum_received"]["bits_per_second"] / 1e9


def udp_kpps(report: dict) -> dict[str, float]:
    """Datagrams/s (thousands) the client sent and the server received (sent minus lost)."""
    sent, got = report["end"]["sum_sent"], report["end"]["sum_received"]
    return {"sent": sent["packets"] / sent["seconds"] / 1e3,
            "rcvd": (got["packets"] - got["lost_packets"]) / got["seconds"] / 1e3}


def udp_args() -> list[str]:
    """64-byte frames as fast as the sender can: ``-u -b 0 -l 18``."""
    return ["-u", "-b", "0", "-l", str(UDP_LEN)]


def rx_packets(ns: str, dev: str) -> int:
    """Frames the interface ``dev`` in ``ns`` received so far."""
    out = subprocess.run(_in(ns, ["ip", "-s", "-j", "link", "show", dev]), capture_output=True,
                         text=True, timeout=10, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])
