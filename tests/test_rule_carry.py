"""A rule compiled again while frames are in flight (a port it names came or went: its
counters carry over to the new compiled rule) loses none of its counts: what a PMD counted
into the old one after the carry reaches the new one at reclaim (pyvhost._classifier), as
OVS forwards a replaced rule's late stats to its successor. Through a PMD thread and two
in-process guests; every frame is a new flow (an upcall each), so a burst takes long
enough for the rule to be compiled again under it, over and over."""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

import pytest

from pyvhost.switch.bridge import Bridge
from pyvhost.switch.flows import parse_flow
from tests.test_onecopy import MAC, collect, frame, guests_a_to_b, settled, wait_for

RULES = ["priority=10,in_port=a,actions=output:b",
         # never matched: it makes every megaflow take tp_src, so each new flow is an upcall
         "priority=20,udp,in_port=a,tp_src=9,actions=drop"]
ROUNDS, PER_ROUND = 40, 64


@pytest.fixture
def loop():
    with guests_a_to_b(RULES) as loop:
        yield loop


def slow_upcalls(bridge) -> None:
    """1000 rules above the output rule that match no frame, each with a mask of its own:
    an upcall searches them all first, so a burst of upcalls lasts long enough (~1 ms) for
    a change to land inside it."""
    bridge.apply(add=[parse_flow(f"priority={20 + i},in_port=a,dl_src=0e:00:00:00:00:00"
                                 f"/ff:00:00:00:{i >> 8:02x}:{i & 255:02x},actions=drop")
                      for i in range(1, 1001)])


def output_rule(bridge):
    [rule] = [r for r in bridge.rules.values() if "output:b" in r.text]
    return rule


def test_counts_made_into_a_rule_compiled_again_reach_its_successor(loop):
    stop = threading.Event()
    carries = [0]
    control = threading.Lock()          # the switch changes and reclaims on one thread

    def recompile():                     # the rule naming b, compiled again and again
        while not stop.is_set():
            with control:
                loop.bridge.reresolve({"b"})
            carries[0] += 1
            time.sleep(0.0001)

    def reclaim() -> int:
        """Reclaim (after a grace period); what it added to the rule's count."""
        with control:
            loop.dp.synchronize()
            before = loop.bridge.counters(output_rule(loop.bridge))[0]
            loop.bridge.cls.reclaim()
            return loop.bridge.counters(output_rule(loop.bridge))[0] - before

    sent = nbytes = late = 0
    seed = 100
    slow_upcalls(loop.bridge)
    worker = threading.Thread(target=recompile, daemon=True)
    try:
        for rnd in range(10 * ROUNDS):      # ROUNDS, and on until a change hit a burst
            if rnd >= ROUNDS and late:
                break
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
                late += reclaim()
    finally:
        stop.set()
        worker.join(5)
    assert carries[0] > ROUNDS, carries                 # it was compiled again throughout
    assert loop.pmd.stats()["upcalls"] == sent          # a burst is a burst of upcalls
    late += reclaim()
    # (late > 0 in most runs: counts made into old rules, handed on at reclaim; not
    # asserted, as whether a change lands inside a burst is the scheduler's to decide)
    packets, got_bytes = loop.bridge.counters(output_rule(loop.bridge))[:2]
    assert (packets, got_bytes) == (sent, nbytes)


def test_a_rule_removed_under_traffic_reports_what_it_counted_to_the_end(loop):
    """A rule removed while a burst goes through it: its final counters (read once no PMD
    can count into it, as FLOW_REMOVED and the switch's observers take them) are exactly
    the frames it delivered, counted after the removal too, not what a read just before
    the removal saw."""
    rng = random.Random(3)
    stats = loop.dp.port_stats
    seed, late = 5000, 0
    loop.bridge.apply(remove=[output_rule(loop.bridge)])    # added again each attempt
    slow_upcalls(loop.bridge)
    loop.b.post_rx(PER_ROUND)
    for attempt in range(300):              # until enough landed inside a burst
        if attempt >= 20 and late >= 3:
            break
        [rule] = loop.bridge.apply(add=[parse_flow(RULES[0])])
        before = stats(1)["tx_packets"]
        frames = [frame("a", MAC["b"], 64, seed + j) for j in range(PER_ROUND)]
        seed += PER_ROUND
        for f in frames:
            loop.a.tx.post_tx(f, hdr=bytes(12))
        if attempt == 0:
            loop.thread.start()
            loop.pmd.set_rxqs([(0, 0), (1, 0)])
        loop.pmd.wake()
        spin_until = time.perf_counter() + rng.uniform(0, 0.002)
        while time.perf_counter() < spin_until:
            pass
        read_before = loop.bridge.counters(rule)[0]
        loop.bridge.apply(remove=[rule])
        assert settled(loop.a, PER_ROUND, loop.pmd), attempt   # every frame taken
        loop.bridge.reclaim(loop.dp, [rule])
        delivered = stats(1)["tx_packets"] - before
        assert loop.bridge.counters(rule)[:2] == (delivered, 64 * delivered), attempt
        late += read_before < delivered
        got = loop.b.received()
        assert len(got) == delivered
        loop.b.post_rx(len(got))                 # the ring's RX buffers stay PER_ROUND
    # (``late``: attempts where a frame was counted after the removal began; most runs
    # have some, but that is the scheduler's to decide: the counts above are the test)


def test_after_a_pmd_did_not_answer_reclaim_asks_briefly_until_it_does():
    """A grace period that timed out (a stuck PMD) keeps the removed rules and is logged
    once; later changes ask for it briefly (0.1 s), not the full time each, until a PMD
    round passes again."""
    class Datapath:                         # only what Bridge.reclaim asks of one
        def __init__(self):
            self.answers, self.asked = [], []

        def synchronize(self, timeout):
            self.asked.append(timeout)
            if not self.answers.pop(0):
                raise TimeoutError("a PMD did not pass a quiescent point")

    bridge = Bridge("br0", 0)
    bridge.attach(SimpleNamespace(name="a", port_id=0, ofport=1))
    dp = Datapath()
    dp.answers = [False, False, True, True]
    rules = []
    for _ in range(4):
        [rule] = bridge.apply(add=[parse_flow("priority=1,in_port=a,actions=drop")])
        bridge.apply(remove=[rule])
        bridge.reclaim(dp, [rule])
        rules.append(rule)
    assert dp.asked == [5.0, 0.1, 0.1, 5.0]
    assert [r.final for r in rules] == [None, None, (0, 0, 0), (0, 0, 0)]
    assert not bridge.cls.reclaimable
