"""QEMU guests (Linux virtio-net over vhost-user) ping each other through pyvhost while
Faucet (PyPI, its own venv: tests/harness/sdn.py) programs it with a two-port VLAN config
(both ports untagged in VLAN 100): the bridge starts with no rules and in fail mode
secure, so every frame that gets through took Faucet's pipeline (push_vlan on the way in,
learned hosts, pop_vlan on the way out). Faucet stopped: in secure mode the installed rules
keep the guests pinging and nothing else forwards (with the rules deleted, no ping); in
standalone mode the switch fails open (NORMAL). Restarted: the switch reconnects, Faucet
programs it again from scratch (its cold start deletes every rule first: a rule it did not
make is gone) and the guests ping on. The namespace-guest variant is test_openflow_faucet.py."""

from __future__ import annotations

import re

import pytest

from tests.harness import processes, sdn
from tests.harness.limits import time_limit
from tests.test_openflow_faucet import CONFIG

pytestmark = pytest.mark.slow

IP_A, IP_B = "10.97.0.1", "10.97.0.2"
STRAY = "table=0,priority=9,in_port=1,dl_src=02:00:00:00:99:99,actions=drop"


@pytest.fixture(scope="module")
def faucet_bin():
    return sdn.venv_or_skip(sdn.FAUCET)


def ping(vm, ip: str, count: int = 3) -> tuple[int, str]:
    return vm.run(f"ping -c {count} -W 5 {ip}", timeout=60)


def why(run_dir, workdir) -> str:
    """What the switch has and what Faucet said (for a failed ping)."""
    log = workdir / "faucet.log"
    return "\n".join([processes.ctl(run_dir, "dump-flows", "br0"),
                      *(log.read_text().splitlines()[-30:] if log.exists() else [])])


def test_faucet_programs_pyvhost_between_qemu_guests(workdir, faucet_bin):
    from pyvhost.cli.qemu_guest import qemu_available
    if not qemu_available():
        pytest.skip("needs QEMU and a guest kernel (make test installs them)")
    with time_limit(480), sdn.faucet_switch(faucet_bin, workdir, CONFIG) as \
            (faucet, run_dir, target), sdn.qemu_pair(workdir, run_dir, (IP_A, IP_B)) as (va, vb):
        status, out = ping(va, IP_B)
        assert status == 0, out + why(run_dir, workdir)
        status, out = ping(vb, IP_A)
        assert status == 0, out + why(run_dir, workdir)
        flows = processes.ctl(run_dir, "dump-flows", "br0")
        # the way in: untagged on port 1 gets VLAN 100 (push_vlan + set_field)
        assert re.search(r"n_packets=[1-9]\d*, .*in_port=1,dl_vlan=0xffff "
                         r"actions=mod_vlan_vid:100,goto_table:1", flows), flows
        # the guests Faucet learned: to each one's MAC, the tag popped, packets counted
        for out_port, vm in ((1, va), (2, vb)):
            mac = vm.macs[0].lower()
            assert re.search(rf"table=2, n_packets=[1-9]\d*, .*dl_vlan=100,dl_dst={mac} "
                             rf"actions=strip_vlan,output:{out_port}", flows), flows
        # Faucet stops (secure): its rules keep the guests pinging
        faucet.stop()
        sdn.wait_show(run_dir, lambda s: f'"{target}"  not connected' in s,
                      "the controller gone")
        before = processes.ctl(run_dir, "dump-flows", "br0")
        status, out = ping(va, IP_B, count=5)
        assert status == 0, out + why(run_dir, workdir)
        assert processes.ctl(run_dir, "dump-flows", "br0") != before   # counters moved
        # secure keeps only what was installed: without rules nothing gets through
        processes.ctl(run_dir, "del-flows", "br0")
        status, out = ping(va, IP_B, count=2)
        assert status != 0, out
        # standalone: no controller, so the switch fails open and forwards by NORMAL
        processes.ctl(run_dir, "set-fail-mode", "br0", "standalone")
        assert "fail-open" in processes.ctl(run_dir, "show")
        status, out = ping(va, IP_B)
        assert status == 0, out + why(run_dir, workdir)
        # a rule Faucet did not make, then Faucet back: reconnect and resync
        processes.ctl(run_dir, "add-flow", "br0", STRAY)
        assert "dl_src=02:00:00:00:99:99" in processes.ctl(run_dir, "dump-flows", "br0")
        faucet.start()
        sdn.wait_show(run_dir, lambda s: f'"{target}"  connected' in s and
                      "fail-open" not in s, "reconnected")
        status, out = ping(va, IP_B, count=5)
        assert status == 0, out + why(run_dir, workdir)
        status, out = ping(vb, IP_A)
        assert status == 0, out + why(run_dir, workdir)
        flows = processes.ctl(run_dir, "dump-flows", "br0")
        assert "02:00:00:00:99:99" not in flows, flows          # resynced from scratch
        assert re.search(r"in_port=1,dl_vlan=0xffff actions=mod_vlan_vid:100,"
                         r"goto_table:1", flows), flows
