"""Open vSwitch's userspace datapath (Debian's plain, non-DPDK ovs-vswitchd) as a tunnel peer
for tests, by the recipe of shared/PEERS.md: a private ovsdb-server under a work directory,
ovs-vswitchd inside a namespace the caller made, bridge ``br-phy`` (datapath_type=netdev)
holding the underlay interface with the underlay address on ``br-phy``, bridge ``br-int``
with one tunnel port, and an overlay address on ``br-int``'s own tap. ``stop()`` ends only
the processes started here (by PID); the namespace (and the taps in it) is the caller's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

VSWITCHD = "/usr/lib/openvswitch-switch/ovs-vswitchd"
SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


def available() -> str | None:
    """None if OVS's userspace datapath can run here, else why not."""
    for path in (VSWITCHD, SCHEMA, "/usr/sbin/ovsdb-server", "/usr/bin/ovs-vsctl"):
        if not Path(path).exists():
            return f"{path} missing (Debian openvswitch-switch)"
    return None


class OvsTunnelPeer:
    def __init__(self, workdir: Path, netns: str, name: str = "ovs"):
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.netns = netns
        self.env = {**os.environ, "OVS_RUNDIR": str(self.dir), "OVS_LOGDIR": str(self.dir),
                    "OVS_DBDIR": str(self.dir), "OVS_SYSCONFDIR": str(self.dir)}
        self.db = f"unix:{self.dir / 'db.sock'}"
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, argv: list[str], name: str) -> None:
        with open(self.dir / f"{name}.out", "wb") as out:
            self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                               env=self.env, stdin=subprocess.DEVNULL,
                                               start_new_session=True))

    def vsctl(self, *args: str) -> str:
        return subprocess.run(["ovs-vsctl", f"--db={self.db}", "--timeout=30", *args],
                              env=self.env, check=True, capture_output=True, text=True,
                              timeout=40).stdout

    def ns(self, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.netns, *argv], check=True,
                       capture_output=True, timeout=30)

    def start(self, underlay_dev: str, underlay_ip: str, kind: str, remote_ip: str,
              key: int, overlay_ip: str) -> OvsTunnelPeer:
        try:
            return self._start(underlay_dev, underlay_ip, kind, remote_ip, key, overlay_ip)
        except BaseException:
            self.stop()
            raise

    def _start(self, underlay_dev, underlay_ip, kind, remote_ip, key, overlay_ip):
        conf = self.dir / "conf.db"
        subprocess.run(["ovsdb-tool", "create", str(conf), SCHEMA], check=True, env=self.env,
                       capture_output=True)
        self._spawn(["ovsdb-server", str(conf), f"--remote=punix:{self.dir / 'db.sock'}",
                     f"--unixctl={self.dir / 'ovsdb.ctl'}", "--no-chdir"], "ovsdb-server")
        deadline = time.monotonic() + 20
        while not (self.dir / "db.sock").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("ovsdb-server did not start")
            time.sleep(0.05)
        self.vsctl("--no-wait", "init")
        self._spawn(["ip", "netns", "exec", self.netns, VSWITCHD, self.db,
                     f"--unixctl={self.dir / 'vswitchd.ctl'}", "--no-chdir"], "vswitchd")
        self.vsctl("add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev")
        self.vsctl("add-port", "br-phy", underlay_dev)
        self.ns("ip", "addr", "add", f"{underlay_ip}/24", "dev", "br-phy")
        self.ns("ip", "link", "set", "br-phy", "up")
        self.vsctl("add-br", "br-int", "--", "set", "bridge", "br-int", "datapath_type=netdev")
        self.vsctl("add-port", "br-int", "tun0", "--", "set", "interface", "tun0",
                   f"type={kind}", f"options:remote_ip={remote_ip}", f"options:key={key}")
        self.ns("ip", "addr", "add", f"{overlay_ip}/24", "dev", "br-int")
        self.ns("ip", "link", "set", "br-int", "mtu", "1450", "up")
        return self

    def log_tail(self) -> str:
        path = self.dir / "vswitchd.out"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
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
