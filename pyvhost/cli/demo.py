"""``pyvhost demo``: the picture of the seed article, live. A switch with two vhost-user
ports, two small QEMU guests (TCG) attached, pinging each other while the per-port
counters tick; then everything is shut down. Needs QEMU, a guest kernel and busybox (the
Debian packages `make demo` installs); runs from an installed wheel as well as a checkout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CONFIG = """add-br br0
add-port br0 vm1 type=vhostuser queues=1
add-port br0 vm2 type=vhostuser queues=1
"""
GUESTS = {"vm1": "10.0.0.1", "vm2": "10.0.0.2"}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="two QEMU guests pinging through a pyvhost switch")
    p.add_argument("--count", type=int, default=20, help="pings each way (default 20)")
    p.add_argument("--part", choices=("all", "netns", "qemu"), default="all",
                   help="netns: two namespaces as guests (pyvhost guest, no QEMU); qemu: two "
                        "QEMU guests; all (default): both")
    p.set_defaults(run=run)


def _say(text: str) -> None:
    print(text, flush=True)


class _Switch:
    """``pyvhost switch`` as a child process, its output in the work dir."""

    def __init__(self, work: Path, run_dir: Path, config: str):
        conf = work / "switch.conf"
        conf.write_text(config)
        self.out = work / "switch.out"
        with open(self.out, "wb") as out, open(work / "switch.err", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyvhost.cli.main", "switch", "--run-dir", str(run_dir),
                 "--config", str(conf)],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while b"switch: running" not in self.out.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the switch did not start: "
                                   + (work / "switch.err").read_text(errors="replace")[-2000:])
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _ctl(run_dir: Path, *argv: str) -> str:
    from pyvhost.switch.wire import request
    answer = request(str(run_dir / "ctl.sock"), list(argv))
    return answer.get("output", "") if answer["ok"] else "error: " + answer["error"]


def run(args) -> int:
    status = 0
    if args.part in ("all", "netns"):
        from .guest_demo import run_demo
        status = run_demo()
    if args.part in ("all", "qemu"):
        status = _run_qemu(args) or status
    return status


def _run_qemu(args) -> int:
    from .qemu_guest import NicSpec, QemuGuest, missing_prerequisites

    missing = missing_prerequisites()
    if missing:
        _say("demo: missing " + "; ".join(missing) + " (run `make demo`)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="pvdemo", dir="/tmp"))
    run_dir = work / "run"
    _say(f"== starting pyvhost switch (run dir {run_dir})")
    sw = _Switch(work, run_dir, CONFIG)
    guests = []
    try:
        _say(_ctl(run_dir, "show"))
        for name, ip in GUESTS.items():
            g = QemuGuest(name, work, nics=[NicSpec(run_dir / f"{name}.sock", ip=f"{ip}/24")])
            guests.append(g)
            _say(f"== booting {name} ({ip}) under QEMU/TCG")
            g.start()
        for g in guests:
            g.wait_ready(timeout=120)
            g.wait_link_up(timeout=30)
        _say("== both guests up; vm1 and vm2 ping each other")
        results = {}

        def pinger(src, dst_ip):
            results[src.name] = src.ping(dst_ip, count=args.count, interval=0.25)

        threads = [threading.Thread(target=pinger, args=(guests[0], GUESTS["vm2"])),
                   threading.Thread(target=pinger, args=(guests[1], GUESTS["vm1"]))]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            _say(_ctl(run_dir, "dump-ports", "br0"))
        for t in threads:
            t.join()
        for name, r in results.items():
            _say(f"== {name}: {r['transmitted']} sent, {r['received']} received, "
                 f"{r['loss_pct']}% loss")
        _say("== flows\n" + _ctl(run_dir, "dump-flows", "br0"))
        _say("== learned MACs\n" + _ctl(run_dir, "fdb-show", "br0"))
        _say("== PMD\n" + _ctl(run_dir, "pmd-stats-show"))
        ok = all(r["loss_pct"] == 0 for r in results.values()) and len(results) == 2
    finally:
        _say("== shutting down")
        for g in guests:
            g.stop()
        sw.stop()
    _say("demo: " + ("guests pinged each other with 0% loss" if ok else "LOSS seen"))
    return 0 if ok else 1
