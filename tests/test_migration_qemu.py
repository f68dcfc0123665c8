"""A QEMU live migration on this machine through ``pyvhost switch``: the guest moves from a
QEMU on switch port ``src`` to a QEMU on port ``dst`` (``migrate`` over a Unix socket) while
another guest pings it. Ping resumes after the migration with few losses, and data the
guest wrote before the migration reads back with the same checksum after it. The switch
logs every page it writes into the moving guest (VHOST_F_LOG_ALL, SET_LOG_BASE)."""

from __future__ import annotations

import re
import threading
import time

import pytest

from pyvhost.cli.qemu_guest import NicSpec, QemuGuest
from tests.harness import processes

pytestmark = pytest.mark.slow

CONFIG = """add-br br0
add-port br0 peer type=vhostuser queues=1
add-port br0 src type=vhostuser queues=1
add-port br0 dst type=vhostuser queues=1
"""
MOVER_MAC = "52:54:00:12:34:56"


def test_live_migration_keeps_ping_and_data(workdir):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=CONFIG)
    mig = workdir / "mig.sock"
    peer = QemuGuest("peer", workdir, nics=[NicSpec(run_dir / "peer.sock", ip="10.0.0.1/24")])
    mover_nic = dict(ip="10.0.0.2/24", mac=MOVER_MAC)
    src = QemuGuest("mover-src", workdir, nics=[NicSpec(run_dir / "src.sock", **mover_nic)])
    dst = QemuGuest("mover-dst", workdir, nics=[NicSpec(run_dir / "dst.sock", **mover_nic)],
                    extra_args=["-incoming", f"unix:{mig}"])
    try:
        for g in (peer, src):
            g.start()
        for g in (peer, src):
            g.wait_ready(timeout=120)
            g.wait_link_up(timeout=30)
        assert peer.ping("10.0.0.2", count=5, interval=0.1)["loss_pct"] == 0
        status, out = src.run("dd if=/dev/urandom of=/tmp/data bs=64k count=64 2>/dev/null; "
                              "md5sum /tmp/data", timeout=60)
        assert status == 0
        checksum = out.split()[0]
        dst.start()                                   # waits for the migration stream
        result = {}
        pinger = threading.Thread(target=lambda: result.update(
            peer.ping("10.0.0.2", count=150, interval=0.1, timeout=60)))
        pinger.start()
        time.sleep(2)
        src.qmp({"execute": "migrate", "arguments": {"uri": f"unix:{mig}"}})
        deadline = time.monotonic() + 120
        while True:
            state = src.qmp({"execute": "query-migrate"})
            if state.get("status") in ("completed", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        assert state["status"] == "completed", state
        dst.adopt_migrated()
        pinger.join(timeout=90)
        print(f"migration: {state.get('total-time')} ms total, downtime "
              f"{state.get('downtime')} ms; ping during it: {result['received']}/"
              f"{result['transmitted']} ({result['loss_pct']}% loss)")
        status, out = dst.run("md5sum /tmp/data", timeout=60)
        assert status == 0 and out.split()[0] == checksum
        assert peer.ping("10.0.0.2", count=10, interval=0.1)["loss_pct"] == 0
        assert result["loss_pct"] <= 20, result["output"]
        fdb = processes.ctl(run_dir, "fdb-show", "br0")
        assert re.search(rf"dst\s+0\s+{MOVER_MAC}", fdb), fdb   # learned on its new port
        assert "dirty log" in sw.errors()                       # SET_LOG_BASE was used
    finally:
        for g in (peer, src, dst):
            g.stop()
        sw.stop()
