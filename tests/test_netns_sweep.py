"""The test harness cleans up after test processes that died: a HostNet writes down each
namespace and veth before making it, and ``sweep_orphans`` deletes what the ledger of a dead
process names, never what a live process's ledger names or anything no ledger names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import netns, processes
from tests.harness.netns import HostNet, sh

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root and ip")

CRASH = """
import os
from tests.harness.netns import HostNet
net = HostNet()
ns = net.netns("sweep")
net.veth(net.name("swv"), ns, net.name("swp"), net.ip(1))
print(ns, net.name("swv"), net.ledger, flush=True)
os._exit(9)           # dies without close(), as a crashed test process would
"""


def exists_ns(name: str) -> bool:
    return name in sh(["ip", "netns", "list"]).stdout.split()


def test_what_a_dead_test_process_left_is_swept_and_nothing_else():
    r = subprocess.run([sys.executable, "-c", CRASH], capture_output=True, text=True,
                       timeout=60, cwd=processes.REPO)
    assert r.returncode == 9, r.stderr
    ns, link, ledger = r.stdout.split()
    live = HostNet()                        # this process's own: alive, must stay
    stranger = live.name("stran")           # a namespace no ledger names
    try:
        assert exists_ns(ns) and live.exists(link)
        assert json.loads(open(ledger).read())["namespaces"] == [ns]
        mine = live.netns("alive")
        sh(["ip", "netns", "add", stranger])
        swept = netns.sweep_orphans()
        assert {f"namespace {ns}", f"link {link}"} <= set(swept), swept   # (and any other
        assert not any(mine in w or stranger in w for w in swept), swept  # dead run's)
        assert not exists_ns(ns) and not live.exists(link)
        assert exists_ns(mine) and exists_ns(stranger) and live.ledger.exists()
        assert not any(ns in w for w in netns.sweep_orphans())   # its ledger went too
    finally:
        sh(["ip", "netns", "del", ns], check=False)
        sh(["ip", "link", "del", link], check=False)
        sh(["ip", "netns", "del", stranger], check=False)
        live.close()
    assert not live.ledger.exists()


def test_an_unreadable_ledger_is_left_alone_and_said(tmp_path, monkeypatch):
    monkeypatch.setattr(netns, "LEDGER_DIR", tmp_path)
    (tmp_path / "1-x.json").write_text("{not json")
    [said] = netns.sweep_orphans()
    assert "unreadable ledger left alone" in said and (tmp_path / "1-x.json").exists()
