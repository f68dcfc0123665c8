"""Soak: traffic on 4 ports of ``pyvhost switch`` with random port churn, for N minutes.

Four pyvhost front-ends send sequence-numbered frames round the ring p0 -> p1 -> p2 -> p3
-> p0 (in_port flows), each keeping at most WINDOW frames in flight. Every few seconds a
random port churns: its front-end disconnects and comes back, or the port is deleted from
the switch and added again. Reports frames lost other than while their sender's or
receiver's port was going away (must be 0) and the switch's fd and memory trend.
Run with `pyvhost bench soak -- --minutes N`. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from pyvhost.frontend import BackendGone, VirtioUser
from tests.harness import processes

PORTS = 4
WINDOW = 64
MARGIN = 0.5          # seconds around a churn in which losses are the port going away
CONFIG = "add-br br0\n" + "".join(
    f"add-port br0 p{i} type=vhostuser queues=1\n" for i in range(PORTS)) + "".join(
    f"add-flow br0 priority=10,in_port=p{i},actions=output:p{(i + 1) % PORTS}\n"
    for i in range(PORTS))


def frame(src: int, seq: int) -> bytes:
    return bytes([2, 0, 0, 0, 1, (src + 1) % PORTS]) + bytes([2, 0, 0, 0, 1, src]) + \
        b"\x88\xb5" + src.to_bytes(2, "big") + seq.to_bytes(8, "big") + bytes(40)


class Endpoint(threading.Thread):
    """One front-end: sends to the next port, receives from the previous one."""

    def __init__(self, index: int, path: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.index, self.path, self.stop = index, path, stop
        self.sent: dict[int, float] = {}         # seq -> when it was sent
        self.received: set[int] = set()          # seqs from the previous port
        self.windows: list[tuple[float, float]] = []
        self.bounce = threading.Event()
        self.top = -1                            # highest seq received from the previous port
        self.port: VirtioUser | None = None

    def connect(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            try:
                self.port = VirtioUser(self.path, mem_size=16 << 20, connect_timeout=2).open()
                self.windows.append((start - MARGIN, time.monotonic() + MARGIN))
                return
            except BackendGone:
                time.sleep(0.1)

    def run(self) -> None:
        self.connect()
        seq = base = 0            # frames below base are delivered or given up on
        progress = time.monotonic()
        while not self.stop.is_set():
            try:
                if self.bounce.is_set():
                    self.bounce.clear()
                    self.port.close()
                    time.sleep(random.uniform(0.05, 0.3))
                    self.connect()
                top = self.peers[(self.index + 1) % PORTS].top
                if top + 1 > base:
                    base, progress = top + 1, time.monotonic()
                elif time.monotonic() - progress > MARGIN:
                    base, progress = seq, time.monotonic()    # in flight too long: lost
                if seq - base < WINDOW:
                    now = time.monotonic()
                    n = self.port.send([frame(self.index, seq + k) for k in range(16)])
                    for k in range(n):
                        self.sent[seq + k] = now
                    seq += n
                for f in self.port.recv(timeout=0.01):
                    if len(f) >= 24 and f[14:16] == ((self.index - 1) % PORTS).to_bytes(2, "big"):
                        n = int.from_bytes(f[16:24], "big")
                        self.received.add(n)
                        self.top = max(self.top, n)
            except BackendGone:
                self.port.close()
                self.connect()
        self.port.close()


def usage(pid: int) -> tuple[int, int]:
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    return fds, rss


def main() -> int:
    ap = argparse.ArgumentParser(prog="pyvhost bench soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--churn-every", type=float, default=3.0, help="seconds between churns")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    random.seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="pvsoak", dir="/tmp"))
    run_dir = work / "run"
    sw = processes.switch(work, run_dir, config=CONFIG)
    stop = threading.Event()
    eps = [Endpoint(i, str(run_dir / f"p{i}.sock"), stop) for i in range(PORTS)]
    for ep in eps:
        ep.peers = eps
        ep.start()
    samples, churns = [usage(sw.proc.pid)], {"reconnect": 0, "del/add-port": 0}
    end = time.monotonic() + args.minutes * 60
    try:
        while time.monotonic() < end:
            time.sleep(args.churn_every)
            victim = random.randrange(PORTS)
            if random.random() < 0.5:
                eps[victim].bounce.set()
                churns["reconnect"] += 1
            else:
                t0 = time.monotonic()
                processes.ctl(run_dir, "del-port", "br0", f"p{victim}")
                time.sleep(0.2)
                processes.ctl(run_dir, "add-port", "br0", f"p{victim}", "type=vhostuser",
                              "queues=1")
                eps[victim].windows.append((t0 - MARGIN, time.monotonic() + MARGIN))
                churns["del/add-port"] += 1
            samples.append(usage(sw.proc.pid))
            total = sum(len(ep.received) for ep in eps)
            print(f"{time.monotonic() - end + args.minutes * 60:6.0f} s: {total} frames "
                  f"received, switch fds {samples[-1][0]} RSS {samples[-1][1]} kB", flush=True)
    finally:
        stop.set()
        for ep in eps:
            ep.join(10)
        sw.stop()
        shutil.rmtree(work, ignore_errors=True)
    lost = unexplained = 0
    for ep in eps:
        nxt = eps[(ep.index + 1) % PORTS]
        windows = ep.windows + nxt.windows
        cutoff = max(ep.sent.values(), default=0) - 1.0    # still in flight at the end
        for seq, t in ep.sent.items():
            if seq in nxt.received or t > cutoff:
                continue
            lost += 1
            if not any(a <= t <= b for a, b in windows):
                unexplained += 1
    sent = sum(len(ep.sent) for ep in eps)
    fds = [s[0] for s in samples]
    rss = [s[1] for s in samples]
    print(f"\nsoak: {args.minutes:g} min, churns {churns}, {sent} frames sent, {lost} lost "
          f"while a port was going away, {unexplained} lost otherwise (must be 0)")
    print(f"switch fds first/median/last {fds[0]}/{statistics.median(fds)}/{fds[-1]}, "
          f"RSS kB first/median/last {rss[0]}/{statistics.median(rss)}/{rss[-1]}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    raise SystemExit(main())
