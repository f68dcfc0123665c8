"""Faucet (PyPI, a production SDN controller, in its own venv: tests/harness/sdn.py) drives
pyvhost unmodified: a two-port VLAN config (both ports untagged in VLAN 100), the switch
an active-connection datapath of dp_id 1 with no rules of its own, two ``pyvhost guest``
namespaces pinging through it. Faucet's multi-table pipeline (vlan, eth_src, eth_dst,
flood tables with goto_table; push_vlan + set_field vlan_vid on the way in, pop_vlan on the
way out; learned hosts from PACKET_INs; port state from PORT_DESC and PORT_STATUS) is what
forwards. Faucet stopped (secure): the installed rules keep the pair going; restarted: the
switch reconnects, Faucet programs it again and the guests ping on."""

from __future__ import annotations

import re

import pytest

from tests.harness import processes, sdn
from tests.harness.limits import time_limit
from tests.harness.netns import available
from tests.test_guest import two_guests

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason="needs root, ip and /dev/net/tun")]

CONFIG = """vlans:
  office:
    vid: 100
dps:
  sw1:
    dp_id: 0x1
    hardware: "Open vSwitch"
    interfaces:
      1:
        name: "a"
        native_vlan: office
      2:
        name: "b"
        native_vlan: office
"""


@pytest.fixture(scope="module")
def faucet_bin():
    return sdn.venv_or_skip(sdn.FAUCET)


def why(run_dir, workdir) -> str:
    """What the switch has and what Faucet said (for a failed ping)."""
    refused = [line for line in (workdir / "switch.err").read_text().splitlines()
               if "refused" in line or "ERROR" in line]
    return "\n".join([processes.ctl(run_dir, "dump-flows", "br0"), *refused[-20:],
                      *(workdir / "faucet.log").read_text().splitlines()[-30:]])


def test_faucet_programs_pyvhost(net, workdir, faucet_bin):
    with time_limit(240), sdn.faucet_switch(faucet_bin, workdir, CONFIG) as \
            (faucet, run_dir, target), two_guests(net, run_dir) as (ga, gb):
        ip_a, ip_b = net.ip(1), net.ip(2)
        assert net.ping(ga.netns, ip_b, count=3, timeout=40), why(run_dir, workdir)
        assert net.ping(gb.netns, ip_a, count=3)
        flows = processes.ctl(run_dir, "dump-flows", "br0")
        # the way in: untagged on port 1 gets VLAN 100 (push_vlan + set_field)
        assert re.search(r"in_port=1,dl_vlan=0xffff actions=mod_vlan_vid:100,"
                         r"goto_table:1", flows), flows
        # hosts Faucet learned: to each guest's MAC, the tag popped
        assert re.search(r"table=2, .*dl_vlan=100,dl_dst=[0-9a-f:]{17} "
                         r"actions=strip_vlan,output:2", flows), flows
        assert re.search(r"table=2, n_packets=[1-9]\d*, .*actions=strip_vlan,output:1",
                         flows), flows
        log = (workdir / "faucet.log").read_text()
        assert "L2 learned" in log and "on Port 2" in log, log[-2000:]
        # Faucet stops: secure keeps its rules, the pair keeps pinging
        faucet.stop()
        sdn.wait_show(run_dir, lambda s: f'"{target}"  not connected' in s, "gone")
        assert net.ping(ga.netns, ip_b, count=3)
        # Faucet comes back: reconnect, reprogram, ping on
        faucet.start()
        sdn.wait_show(run_dir, lambda s: f'"{target}"  connected' in s, "reconnected")
        assert net.ping(ga.netns, ip_b, count=3, timeout=40)
        assert net.ping(gb.netns, ip_a, count=3)
