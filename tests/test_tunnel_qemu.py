"""A QEMU guest (Linux virtio-net under TCG, offloads on) on a pyvhost switch that runs in a
namespace, across a VXLAN port to the Linux kernel's own vxlan device in another
namespace (the underlay a veth pair between the two): the guest pings the kernel's
address and fetches 50 MB over HTTP from it (md5 compared), and the kernel side fetches
what the guest serves (its TSO super-frames cut by the switch before encapsulation).

Needs root, ip, QEMU and the guest kernel; every name is unique to the test, every address
private and inside namespaces made here, and everything is stopped (by PID) and deleted."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from pyvhost.cli.qemu_guest import NicSpec, QemuGuest, qemu_available
from tests.harness.limits import time_limit
from tests.harness.netns import sh
from tests.test_tunnel_ports import (
    ctl,
    kernel_vxlan,
    needs_root,
    ns_switch,
    stopping,
    underlay,
)

TEST_TIMEOUT = 600
FETCH_MD5 = ("import hashlib, sys, urllib.request\n"
             "print(hashlib.md5(urllib.request.urlopen(sys.argv[1], timeout=200).read())"
             ".hexdigest())")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not qemu_available(), reason="needs QEMU and a guest kernel")]


@pytest.fixture(autouse=True)
def bounded():
    with time_limit(TEST_TIMEOUT):
        yield


@needs_root
def test_qemu_guest_reaches_the_kernel_vxlan_device(workdir, net):
    u1, u2, ip1, ip2 = underlay(net)
    gip, kip = kernel_vxlan(net, u2, ip1)
    www = workdir / "www"
    www.mkdir()
    data = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest()
                    for i in range(50 << 15))          # 50 MiB
    (www / "data").write_bytes(data)
    net.popen(u2, [sys.executable, "-m", "http.server", "8080", "--bind", kip,
                   "--directory", str(www)], stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    sw = ns_switch(workdir, u1, "sw1")
    vm = None
    with stopping(sw):
        try:
            ctl(sw, "add-br", "br0")
            ctl(sw, "add-port", "br0", "vm", "type=vhostuser", "queues=1")
            ctl(sw, "add-port", "br0", "vx", "type=vxlan", f"remote_ip={ip2}", "key=42")
            assert "mtu: 1450" in ctl(sw, "show")
            vm = QemuGuest("vm", workdir, memory="512M", nics=[NicSpec(
                sw.run / "vm.sock", ip=f"{gip}/24", mtu=1450)])
            vm.start()
            vm.wait_ready(timeout=120)
            vm.wait_link_up(timeout=30)
            result = vm.ping(kip, count=5)
            assert result["received"] >= 4, (result, ctl(sw, "dump-ports", "br0"))
            status, out = vm.run(f"wget -q -O /tmp/recv http://{kip}:8080/data; "
                                 "echo rc=$?; md5sum /tmp/recv; rm -f /tmp/recv", timeout=300)
            assert "rc=0" in out and hashlib.md5(data).hexdigest() in out, \
                (out, ctl(sw, "dump-ports", "br0"))
            status, out = vm.run("mkdir -p /tmp/www; dd if=/dev/urandom of=/tmp/www/vm.bin "
                                 "bs=1M count=20 2>/dev/null; md5sum /tmp/www/vm.bin; "
                                 "httpd -p 8080 -h /tmp/www", timeout=120)
            assert status == 0, out
            want = out.split()[0]
            r = sh([sys.executable, "-c", FETCH_MD5, f"http://{gip}:8080/vm.bin"], ns=u2,
                   check=False, timeout=240)
            assert r.stdout.strip() == want, (r.stdout, r.stderr, ctl(sw, "dump-ports", "br0"))
            vxp = json.loads(ctl(sw, "dump-ports", "--json", "br0"))["vx"]
            assert vxp["rx_rings"]["drop_unknown_remote"] == 0, vxp
            assert vxp["tx_rings"]["tx_errors"] == 0, vxp
        finally:
            if vm is not None:
                vm.stop()
