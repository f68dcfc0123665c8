"""A rule compiled again while frames are in flight (a port it names came or went: its
counters carry over to the new compiled rule) loses none of its counts: what a PMD counted
into the old one after the carry reaches the new one at reclaim (pyvhost._classifier), as
OVS forwards a replaced rule's late stats to its successor. Through a PMD thread and two
in-process guests; every frame is a new flow (an upcall each), so a burst takes long
enough for the rule to be compiled again under it, over and over."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from pyvhost._switch import Datapath
from pyvhost.switch.bridge import Bridge
from pyvhost.switch.flows import parse_flow
from tests.test_onecopy import MAC, Guest, collect, frame, wait_for

RULES = ["priority=10,in_port=a,actions=output:b",
         # never matched: it makes every megaflow take tp_src, so each new flow is an upcall
         "priority=20,udp,in_port=a,tp_src=9,actions=drop"]
ROUNDS, PER_ROUND = 60, 64


@pytest.fixture
def loop():
    a = Guest("split", "split", mrg=False, hdr_len=12)
    b = Guest("split", "split", mrg=False, hdr_len=12)
    bridge = Bridge("br0", 0)
    dp = Datapath()
    dp.set_bridge(0, bridge.cls, bridge.macs)
    for i, (name, g) in enumerate((("a", a), ("b", b))):
        bridge.attach(SimpleNamespace(name=name, port_id=i, ofport=i + 1))
        dp.add_port(i, 0, g.dev)
    bridge.apply(add=[parse_flow(f) for f in RULES])
    pmd = dp.new_pmd(0, pool_size=512)
    thread = threading.Thread(target=pmd.run, daemon=True)
    yield SimpleNamespace(a=a, b=b, bridge=bridge, dp=dp, pmd=pmd, thread=thread)
    if thread.is_alive():
        pmd.stop()
        thread.join(5)
        assert not thread.is_alive()
    for i in range(2):
        dp.remove_port(i)
    a.close()
    b.close()


def output_rule(bridge):
    [rule] = [r for r in bridge.rules.values() if "output:b" in r.text]
    return rule


def test_counts_made_into_a_rule_compiled_again_reach_its_successor(loop):
    stop = threading.Event()
    carries = [0]

    def recompile():                     # the rule naming b, compiled again and again
        while not stop.is_set():
            loop.bridge.reresolve({"b"})
            carries[0] += 1
            time.sleep(0.0001)

    sent = nbytes = 0
    seed = 100
    worker = threading.Thread(target=recompile, daemon=True)
    try:
        for rnd in range(ROUNDS):
            frames = [frame("a", MAC["b"], 64 + j % 40, seed + j) for j in range(PER_ROUND)]
            seed += PER_ROUND
            loop.b.post_rx(len(frames))
            for f in frames:
                loop.a.tx.post_tx(f, hdr=bytes(12))
            if rnd == 0:
                loop.thread.start()
                loop.pmd.set_rxqs([(0, 0), (1, 0)])
                worker.start()
            loop.pmd.wake()
            got = collect(loop.b, len(frames), loop.pmd)
            assert sorted(f for _, f in got) == sorted(frames), rnd
            sent += len(frames)
            nbytes += sum(map(len, frames))
            assert wait_for(lambda n=sent: loop.dp.port_stats(0)["rx_packets"] == n,
                            pmd=loop.pmd)
            loop.a.tx.used()
            if rnd % 10 == 9:                  # as the switch does after a change
                loop.dp.synchronize()
                loop.bridge.cls.reclaim()
    finally:
        stop.set()
        worker.join(5)
    assert carries[0] > ROUNDS, carries                 # it was compiled again throughout
    assert loop.pmd.stats()["upcalls"] == sent          # a burst is a burst of upcalls
    loop.dp.synchronize()
    loop.bridge.cls.reclaim()
    packets, got_bytes = loop.bridge.counters(output_rule(loop.bridge))[:2]
    assert (packets, got_bytes) == (sent, nbytes)
