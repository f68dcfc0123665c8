"""Open vSwitch's userspace datapath (Debian's plain, non-DPDK ovs-vswitchd) as a tunnel peer
for tests, by the recipe of shared/PEERS.md: a private ovsdb-server under a work directory,
ovs-vswitchd inside a namespace the caller made, bridge ``br-phy`` (datapath_type=netdev)
holding the underlay interface with the underlay address on ``br-phy``, bridge ``br-int``
with one tunnel port, and an overlay address on ``br-int``'s own tap. ``stop()`` ends only
the processes started here (by PID); the namespace (and the taps in it) is the caller's.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.harness.ovs import SCHEMA, OvsProcesses

VSWITCHD = "/usr/lib/openvswitch-switch/ovs-vswitchd"


def available() -> str | None:
    """None if OVS's userspace datapath can run here, else why not."""
    for path in (VSWITCHD, SCHEMA, "/usr/sbin/ovsdb-server", "/usr/bin/ovs-vsctl"):
        if not Path(path).exists():
            return f"{path} missing (Debian openvswitch-switch)"
    return None


class OvsTunnelPeer(OvsProcesses):
    def __init__(self, workdir: Path, netns: str, name: str = "ovs"):
        super().__init__(workdir, name)
        self.netns = netns

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
        self.start_db()
        self.spawn(["ip", "netns", "exec", self.netns, VSWITCHD, self.db,
                    f"--unixctl={self.dir / 'vswitchd.ctl'}", "--no-chdir"], "vswitchd")
        self.vsctl("add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev",
                   wait=True)
        self.vsctl("add-port", "br-phy", underlay_dev, wait=True)
        self.ns("ip", "addr", "add", f"{underlay_ip}/24", "dev", "br-phy")
        self.ns("ip", "link", "set", "br-phy", "up")
        self.vsctl("add-br", "br-int", "--", "set", "bridge", "br-int", "datapath_type=netdev",
                   wait=True)
        self.vsctl("add-port", "br-int", "tun0", "--", "set", "interface", "tun0",
                   f"type={kind}", f"options:remote_ip={remote_ip}", f"options:key={key}",
                   wait=True)
        self.ns("ip", "addr", "add", f"{overlay_ip}/24", "dev", "br-int")
        self.ns("ip", "link", "set", "br-int", "mtu", "1450", "up")
        return self

    def stop(self) -> None:
        self.stop_processes()
