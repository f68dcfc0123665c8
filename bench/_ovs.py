"""OVS-DPDK 3.1 as a benchmark peer (the recipe of shared/PEERS.md): a private ovsdb-server
and ovs-vswitchd-dpdk under one work directory, a netdev bridge with dpdkvhostuser ports
(OVS listens; sockets in the work directory), ovs-ofctl for rules, hugepages reserved for
the run and given back. ovs-vswitchd runs in a network namespace of its own (its bridge's taps
stay there and go with it). Only what this module starts is stopped, by PID."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.harness.ovs import SCHEMA, OvsProcesses

VSWITCHD = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"
HUGEPAGES = 600                     # 2 MiB each: dpdk-socket-mem=1024 plus room
HUGE_MOUNT = Path("/dev/hugepages")


def available() -> str | None:
    """None if OVS-DPDK can run here, else why not."""
    for path in (VSWITCHD, SCHEMA, "/usr/sbin/ovsdb-server", "/usr/bin/ovs-ofctl"):
        if not Path(path).exists():
            return f"{path} missing (Debian openvswitch-switch-dpdk)"
    return None


class Hugepages:
    """Reserve 2 MiB hugepages (and mount hugetlbfs) for the run; undo both after."""

    def __enter__(self):
        self.nr_path = Path("/proc/sys/vm/nr_hugepages")
        self.before = int(self.nr_path.read_text())
        if self.before < HUGEPAGES:
            self.nr_path.write_text(str(HUGEPAGES))
        self.mounted = False
        if not os.path.ismount(HUGE_MOUNT):
            HUGE_MOUNT.mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "hugetlbfs", "nodev", str(HUGE_MOUNT)], check=True)
            self.mounted = True
        return self

    def __exit__(self, *exc):
        if self.mounted:
            subprocess.run(["umount", str(HUGE_MOUNT)], check=False)
        self.nr_path.write_text(str(self.before))


class OvsDpdk(OvsProcesses):
    """One OVS-DPDK switch with bridge ``br0`` and the given dpdkvhostuser ports."""

    def __init__(self, workdir: Path, ports: list[str], pmd_cpu: int = 0, name: str = "ovs",
                 other_config: dict[str, str] | None = None):
        super().__init__(workdir, name)
        self.other_config = dict(other_config or {})     # more Open_vSwitch other_config
        self.ports = ports
        self.pmd_cpu = pmd_cpu
        self.netns = f"pvbench-ovs-{os.getpid()}"

    def ofctl(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["ovs-ofctl", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=True)

    def sock(self, port: str) -> Path:
        return self.dir / port

    def start(self) -> OvsDpdk:
        try:
            return self._start()
        except BaseException:
            self.stop()                    # what did start (processes, the namespace) goes
            raise

    def _start(self) -> OvsDpdk:
        self.start_db()
        mask = hex(1 << self.pmd_cpu)
        other = hex(1 << (1 - self.pmd_cpu)) if self.pmd_cpu in (0, 1) else "0x2"
        self.vsctl("set", "Open_vSwitch", ".", "other_config:dpdk-init=true",
                   'other_config:dpdk-extra="--no-pci"', "other_config:dpdk-socket-mem=1024",
                   "other_config:dpdk-socket-limit=1024", f"other_config:pmd-cpu-mask={mask}",
                   f"other_config:dpdk-lcore-mask={other}",
                   *(f"other_config:{k}={v}" for k, v in self.other_config.items()))
        # in a network namespace of its own: a netdev bridge makes taps (br0, ovs-netdev)
        # that must not appear on the host; they go with the namespace
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self.spawn(["ip", "netns", "exec", self.netns, VSWITCHD, self.db,
                     f"--unixctl={self.dir / 'vswitchd.ctl'}", "--no-chdir"], "vswitchd")
        self.vsctl("add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev",
                   wait=True)
        for port in self.ports:
            self.vsctl("add-port", "br0", port, "--", "set", "Interface", port,
                       "type=dpdkvhostuser", wait=True)
        deadline = time.monotonic() + 30
        while not all(self.sock(p).exists() for p in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"OVS made no vhost-user sockets: {self.log_tail()}")
            time.sleep(0.1)
        return self

    def vswitchd_pid(self) -> int:
        return self.procs[1].pid

    def stop(self) -> None:
        self.stop_processes()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
