"""A QEMU guest (TCG, Linux virtio-net) on a vhost-user port reaches a network namespace
through an afpacket port of the switch (a veth whose peer is in the namespace): ping, and
a 50 MiB HTTP download (md5 compared) from a server in the namespace, whose frames leave a
local socket with partial checksums and as TSO super-frames. With the guest's offloads
on, they pass as such; with them off, the switch segments and completes checksums."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import pytest

from pyvhost.cli.qemu_guest import NicSpec, QemuGuest, qemu_available
from tests.harness import processes
from tests.harness.netns import HostNet, available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason="needs root, ip and /dev/net/tun"),
              pytest.mark.skipif(not qemu_available(), reason="needs QEMU and a guest kernel")]
NO_OFFLOADS = "csum=off,guest_csum=off,host_tso4=off,host_tso6=off,guest_tso4=off,guest_tso6=off"


@pytest.mark.parametrize("guest_opts", ["", NO_OFFLOADS], ids=["offloads", "no-offloads"])
def test_qemu_guest_reaches_a_namespace_through_an_afpacket_port(workdir, guest_opts):
    net = HostNet()
    run_dir = workdir / "run"
    sw = guest = None
    try:
        ns = net.netns("hpq")
        veth = net.name("hpv")
        net.veth(veth, ns, net.name("hpp"), net.ip(1))
        www = workdir / "www"
        www.mkdir()
        data = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest()
                        for i in range(50 << 15))          # 50 MiB
        (www / "data").write_bytes(data)
        want = hashlib.md5(data).hexdigest()
        net.popen(ns, [sys.executable, "-m", "http.server", "8080", "--bind", net.ip(1),
                       "--directory", str(www)], stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
        sw = processes.switch(workdir, run_dir, config=(
            "add-br br0\nadd-port br0 vm1 type=vhostuser queues=1\n"
            f"add-port br0 up1 type=afpacket dev={veth}\n"))
        guest = QemuGuest("vm1", workdir, memory="512M", nics=[NicSpec(
            run_dir / "vm1.sock", ip=f"{net.ip(254)}/24", device_opts=guest_opts)])
        guest.start()
        guest.wait_ready(timeout=120)
        guest.wait_link_up(timeout=30)
        result = guest.ping(net.ip(1), count=5)
        assert result["received"] >= 4, result
        time.sleep(0.5)
        status, out = guest.run(f"wget -q -O /tmp/recv http://{net.ip(1)}:8080/data; "
                                "echo rc=$?; md5sum /tmp/recv", timeout=240)
        stats = processes.ctl(run_dir, "dump-ports", "br0")
        assert "rc=0" in out and want in out, f"{out}\n{stats}"
    finally:
        if guest is not None:
            guest.stop()
        if sw is not None:
            sw.stop()
        net.close()
