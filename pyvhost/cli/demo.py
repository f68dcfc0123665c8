"""``pyvhost demo``: the picture of the seed article, live. A switch with two vhost-user
ports, two small QEMU guests (TCG) attached, pinging each other while the per-port
counters tick; then everything is shut down. Needs the repository checkout (it boots the
guests with the test harness) and the Debian packages `make demo` installs."""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """add-br br0
add-port br0 vm1 type=vhostuser queues=1
add-port br0 vm2 type=vhostuser queues=1
"""
GUESTS = {"vm1": "10.0.0.1", "vm2": "10.0.0.2"}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="two QEMU guests pinging through a pyvhost switch")
    p.add_argument("--count", type=int, default=20, help="pings each way (default 20)")
    p.set_defaults(run=run)


def _say(text: str) -> None:
    print(text, flush=True)


def run(args) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.harness import processes
    from tests.harness.guest import NicSpec, QemuGuest, missing_prerequisites

    missing = missing_prerequisites()
    if missing:
        _say("demo: missing " + "; ".join(missing) + " (run `make demo`)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="pvdemo", dir="/tmp"))
    run_dir = work / "run"
    _say(f"== starting pyvhost switch (run dir {run_dir})")
    sw = processes.switch(work, run_dir, config=CONFIG)
    guests = []
    try:
        _say(processes.ctl(run_dir, "show"))
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
            _say(processes.ctl(run_dir, "dump-ports", "br0"))
        for t in threads:
            t.join()
        for name, r in results.items():
            _say(f"== {name}: {r['transmitted']} sent, {r['received']} received, "
                 f"{r['loss_pct']}% loss")
        _say("== flows\n" + processes.ctl(run_dir, "dump-flows", "br0"))
        _say("== learned MACs\n" + processes.ctl(run_dir, "fdb-show", "br0"))
        _say("== PMD\n" + processes.ctl(run_dir, "pmd-stats-show"))
        ok = all(r["loss_pct"] == 0 for r in results.values()) and len(results) == 2
    finally:
        _say("== shutting down")
        for g in guests:
            g.stop()
        sw.stop()
    _say("demo: " + ("guests pinged each other with 0% loss" if ok else "LOSS seen"))
    return 0 if ok else 1
