"""Two QEMU guests exchange a 50 MB TCP stream (busybox httpd and wget; busybox's small nc
stops early by itself) through ``pyvhost switch`` with
checksum and segmentation offloads negotiated (the guests send 64 KB TCP super-frames with
partial checksums, passed through), and again with one guest lacking the offloads (the
switch completes checksums and segments in software). The received data's checksum
matches what was sent."""

from __future__ import annotations

import re

import pytest

from pyvhost.cli.qemu_guest import NicSpec, QemuGuest
from tests.harness import processes

pytestmark = pytest.mark.slow

CONFIG = """add-br br0
add-port br0 vm1 type=vhostuser queues=1
add-port br0 vm2 type=vhostuser queues=1
"""
NO_OFFLOADS = "csum=off,guest_csum=off,host_tso4=off,host_tso6=off,guest_tso4=off,guest_tso6=off"


@pytest.mark.parametrize("vm2_opts", ["", NO_OFFLOADS], ids=["offloads", "vm2_without"])
def test_tcp_stream_checksum(workdir, vm2_opts):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=CONFIG)
    vm1 = QemuGuest("vm1", workdir, nics=[NicSpec(run_dir / "vm1.sock", ip="10.0.0.1/24")],
                    memory="512M")
    vm2 = QemuGuest("vm2", workdir, nics=[NicSpec(run_dir / "vm2.sock", ip="10.0.0.2/24",
                                                  device_opts=vm2_opts)], memory="512M")
    try:
        for g in (vm1, vm2):
            g.start()
        for g in (vm1, vm2):
            g.wait_ready(timeout=120)
            g.wait_link_up(timeout=30)
        _, feats = vm1.run("cat /sys/class/net/eth0/device/features")
        status, out = vm1.run("mkdir -p /tmp/www; dd if=/dev/urandom of=/tmp/www/data bs=1M "
                              "count=50 2>/dev/null; md5sum /tmp/www/data; "
                              "httpd -p 8080 -h /tmp/www", timeout=120)
        assert status == 0
        sent_sum = out.split()[0]
        status, out = vm2.run("wget -q -O /tmp/recv http://10.0.0.1:8080/data; echo rc=$?; "
                              "md5sum /tmp/recv", timeout=240)
        stats = processes.ctl(run_dir, "dump-ports", "br0")
        print(f"vm1 virtio features {feats.strip()}\n{stats}")
        assert "rc=0" in out and out.split()[1] == sent_sum, out
        # vm1 sent TCP super-frames (TSO): far fewer frames than 50 MB of MSS-sized ones
        sent_frames = int(re.search(r"\(vm1\): rx pkts=(\d+)", stats).group(1))
        assert sent_frames < 50 * 1024 * 1024 // 1448 // 4, stats
    finally:
        for g in (vm1, vm2):
            g.stop()
        sw.stop()
