"""The controller queue's rate and burst per bridge, as OVS's Controller table has them
(controller_rate_limit, controller_burst_limit): ``set-controller`` takes them (bad
values refused, stored values kept when a later set-controller leaves them out), ``show``
lists them, they persist; a guest's frames to CONTROLLER reach the controller at no more
than the burst plus the rate over the time (frames counted, every frame accounted for),
and another bridge keeps the default."""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.harness import openflow as O
from tests.harness import processes
from tests.harness.frontends import switch_with_ports
from tests.harness.openflow import ofctl
from tests.test_openflow_packets import MAC, PACKET_IN, udp

pytestmark = pytest.mark.skipif(not os.path.exists(O.OVS_OFCTL),
                                reason="ovs-ofctl (Debian openvswitch-common) is not installed")

CONFIG = "add-br br0\n" + "".join(f"add-port br0 {n} type=vhostuser queues=1\n" for n in "ab") \
    + "set-controller br0 ptcp:0:127.0.0.1 controller_rate_limit=100 " \
      "controller_burst_limit=10\n" \
    + "add-br br1\nset-controller br1 ptcp:0:127.0.0.1\n"


def block(show: str, bridge: str) -> str:
    return show.split(f"Bridge {bridge}\n")[1].split("\nBridge ")[0]


def limits(show: str, bridge: str) -> str:
    block_ = block(show, bridge)
    m = re.search(r"controller_rate_limit: (\S+), controller_burst_limit: (\d+)", block_)
    assert m, show
    return f"{m.group(1)}/{m.group(2)}"


def test_controller_rate_and_burst_per_bridge(workdir):
    with switch_with_ports(workdir, CONFIG, "ab") as (run_dir, ports):
        show = processes.ctl(run_dir, "show")
        assert limits(show, "br0") == "100/10" and limits(show, "br1") == "1000/100", show
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", block(show, "br0")).group(1))
        target = f"tcp:127.0.0.1:{port}"
        for bad in ("controller_rate_limit=-1", "controller_burst_limit=0",
                    "controller_rate_limit=x", "rate=5"):
            with pytest.raises(RuntimeError, match="controller_|unknown option"):
                processes.ctl(run_dir, "set-controller", "br0", f"ptcp:{port}:127.0.0.1", bad)
        assert limits(processes.ctl(run_dir, "show"), "br0") == "100/10"
        ofctl(target, "add-flow", "priority=100,udp,actions=controller")
        sent = 0
        with O.Client("127.0.0.1", port) as ctl:
            assert ctl.alive()
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:             # 400 frames a second
                ports["a"].send_all([udp(MAC["a"], MAC["b"], dport=1000 + sent % 7)] * 20)
                sent += 20
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
            got = 0
            ctl.sock.settimeout(1.0)
            try:
                while True:
                    got += ctl.recv()[0] == PACKET_IN
            except TimeoutError:
                pass
        show = processes.ctl(run_dir, "show")
        m = re.search(r"packet_in: queued (\d+), sent (\d+), dropped: rate (\d+), full (\d+), "
                      r"busy (\d+)", show)
        assert m, show
        queued, out, rate, full, busy = map(int, m.groups())
        assert queued + rate + full + busy == sent and out == got, (m.groups(), sent, got)
        # the burst (10) and 100 a second: far fewer than the 400 a second sent
        assert 10 <= got <= 10 + 100 * (elapsed + 1.0), (got, elapsed)
        assert rate >= sent - got - full - busy > 0, (rate, sent, got)
        # a later set-controller without them keeps them; one with a rate alone: a quarter
        processes.ctl(run_dir, "set-controller", "br0", f"ptcp:{port}:127.0.0.1")
        assert limits(processes.ctl(run_dir, "show"), "br0") == "100/10"
        processes.ctl(run_dir, "set-controller", "br0", f"ptcp:{port}:127.0.0.1",
                      "controller_rate_limit=400")
        assert limits(processes.ctl(run_dir, "show"), "br0") == "400/100"
        processes.ctl(run_dir, "set-controller", "br0", f"ptcp:{port}:127.0.0.1",
                      "controller_rate_limit=0", "controller_burst_limit=7")
        assert limits(processes.ctl(run_dir, "show"), "br0") == "none/7"
    sw = processes.switch(workdir, run_dir, name="switch2")
    try:
        show = processes.ctl(run_dir, "show")
        assert limits(show, "br0") == "none/7" and limits(show, "br1") == "1000/100", show
    finally:
        assert sw.stop() == 0
