"""A QEMU guest behind an emulated Intel vIOMMU pings another guest through ``pyvhost switch``.

The vIOMMU guest's NIC has iommu_platform=on (VIRTIO_F_ACCESS_PLATFORM) and ats=on, so its
ring and buffer addresses are IOVAs that the guest's intel-iommu driver maps; QEMU answers
the switch's IOTLB misses (BACKEND_IOTLB_MSG on the back-end request channel) with
IOTLB_MSG updates and forwards the guest's device-IOTLB invalidations.

Recipe that works with QEMU 7.2 under TCG: ``-machine q35`` and
``-device intel-iommu,intremap=on,device-iotlb=on`` and a ``pcie-root-port`` before the
NIC, the virtio-net-pci device on that port with ``iommu_platform=on,ats=on`` (on the root
bus it would be transitional, which QEMU refuses with iommu_platform, and have no ATS),
``intel_iommu=on`` on the guest kernel command line (Debian's 6.1 kernel has the driver
built in). The guest's lazy IOTLB flushing makes QEMU send global invalidations often, so
the switch re-asks for ring and buffer mappings all the time; RX frames wait (held) for
the answer instead of being dropped.
"""

from __future__ import annotations

import re

import pytest

from pyvhost.cli.qemu_guest import NicSpec, QemuGuest
from tests.harness import processes

pytestmark = pytest.mark.slow

IPS = {"vm1": "10.0.0.1", "vm2": "10.0.0.2"}
CONFIG = """
add-br br0
add-port br0 vm1 type=vhostuser queues=1
add-port br0 vm2 type=vhostuser queues=1
"""
VIOMMU_ARGS = ["-machine", "q35", "-device", "intel-iommu,intremap=on,device-iotlb=on",
               "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1"]
# behind a PCIe root port the NIC is modern-only and has the ATS capability
NIC_OPTS = "bus=rp0,iommu_platform=on,ats=on"


def test_guest_behind_viommu_pings_through_switch(workdir):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=CONFIG)
    guests = []
    try:
        vm1 = QemuGuest("vm1", workdir, nics=[NicSpec(
            run_dir / "vm1.sock", ip=f"{IPS['vm1']}/24", device_opts=NIC_OPTS)],
            pre_nic_args=VIOMMU_ARGS, append="intel_iommu=on")
        vm2 = QemuGuest("vm2", workdir, nics=[NicSpec(run_dir / "vm2.sock",
                                                      ip=f"{IPS['vm2']}/24")])
        for g in (vm1, vm2):
            guests.append(g)
            g.start()
        for g in (vm1, vm2):
            g.wait_ready(timeout=150)
            g.wait_link_up(timeout=30)
        # the guest really is behind the IOMMU: its NIC sits in an IOMMU group
        status, out = vm1.run("ls /sys/class/net/eth0/device/../iommu_group/devices/")
        assert status == 0 and out.strip(), out
        assert vm1.ping(IPS["vm2"], count=10, interval=0.1)["loss_pct"] == 0
        assert vm2.ping(IPS["vm1"], count=10, interval=0.1)["loss_pct"] == 0
        # a bigger exchange: many buffers, each mapped (and later unmapped) by the guest
        status, out = vm1.run(f"ping -c 20 -i 0.05 -s 1400 -W 1 -w 8 {IPS['vm2']}", timeout=30)
        m = re.search(r"(\d+) packets received", out)
        assert m and int(m.group(1)) >= 18, out
        out = processes.ctl(run_dir, "dump-ports", "br0")
        assert re.search(r"port 1\(vm1\): rx pkts=[1-9]", out), out
    finally:
        for g in guests:
            g.stop()
        assert sw.stop() == 0
