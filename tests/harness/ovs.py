"""The processes of a private Open vSwitch for tests and benchmarks (the recipe of
shared/PEERS.md): an ovsdb-server with its own database under one work directory, and
whatever daemons the subclass starts next to it (ovs-vswitchd with DPDK, the plain userspace
one, in a namespace or not), with ovs-vsctl/ovs-appctl pointed at them. ``stop()`` ends only
the processes started here, by process group; namespaces belong to whoever made them.
Nothing here decides bridges or ports: subclasses (bench/_ovs.py, ovs_netdev.py) do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


class OvsProcesses:
    """ovsdb-server (``start_db``) and the daemons ``spawn``ed next to it."""

    def __init__(self, workdir: Path, name: str):
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "OVS_RUNDIR": str(self.dir), "OVS_LOGDIR": str(self.dir),
                    "OVS_DBDIR": str(self.dir), "OVS_SYSCONFDIR": str(self.dir)}
        self.db = f"unix:{self.dir / 'db.sock'}"
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        """Start a daemon in a session of its own, its output in NAME.out."""
        with open(self.dir / f"{name}.out", "wb") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def start_db(self) -> None:
        """A fresh database, ovsdb-server serving it on db.sock, and ``ovs-vsctl init``."""
        conf = self.dir / "conf.db"
        subprocess.run(["ovsdb-tool", "create", str(conf), SCHEMA], check=True, env=self.env,
                       capture_output=True)
        self.spawn(["ovsdb-server", str(conf), f"--remote=punix:{self.dir / 'db.sock'}",
                    f"--unixctl={self.dir / 'ovsdb.ctl'}", "--no-chdir"], "ovsdb-server")
        deadline = time.monotonic() + 20
        while not (self.dir / "db.sock").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("ovsdb-server did not start")
            time.sleep(0.05)
        self.vsctl("init")

    def vsctl(self, *args: str, wait: bool = False) -> str:
        """ovs-vsctl on this database; ``wait``: until ovs-vswitchd has applied it."""
        argv = ["ovs-vsctl", f"--db={self.db}", "--timeout=60"] + ([] if wait else ["--no-wait"])
        return subprocess.run(argv + list(args), env=self.env, check=True, capture_output=True,
                              text=True, timeout=70).stdout

    def appctl(self, *args: str) -> str:
        return subprocess.run(["ovs-appctl", "-t", str(self.dir / "vswitchd.ctl"), *args],
                              env=self.env, capture_output=True, text=True, timeout=60).stdout

    def log_tail(self) -> str:
        path = self.dir / "vswitchd.out"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop_processes(self) -> None:
        """SIGTERM each daemon's group, newest first; SIGKILL what is left after 10 s."""
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs = []
