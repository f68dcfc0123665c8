"""Frames decided without a megaflow lookup of their own, while the PMD does not ask its EMC.
Port-wide megaflows (OVS's "simple match"): a burst whose first frame's megaflow matches the
input port alone takes that decision for all its frames with one lookup. Any other mask: a
frame under the megaflow the frame before it was found in takes it (mf_matches). Through
a PMD thread and in-process guests (pyvhost._switch): many flows behind an in_port rule
are forwarded byte-exact and counted exactly, with every burst after the first decided
that way; a rule that looks further into the frames makes masks that are not port-wide;
a rule added while the traffic runs is obeyed from then on; many flows under one wider
megaflow reuse it; flows under different megaflows, interleaved and in runs, each go
where their own rule says."""

from __future__ import annotations

from pyvhost.switch.flows import parse_flow
from tests.test_onecopy import MAC, Guest, collect, frame, guests_a_to_b, switch, wait_for  # noqa: F401 (switch: a fixture)

ROUND = 40                    # frames a round: a full burst (32) and a short one
MAX_BURST = 32


def run_round(loop, frames: list[bytes], expect: list[bytes], sent_before: int,
              start: bool = False) -> None:
    """``frames`` from guest a; b receives exactly ``expect``, in order."""
    loop.b.post_rx(len(frames))
    publish(loop.a, frames)
    if start:
        loop.pmd.set_emc_insert_inv_prob(0)          # the EMC off: never asked
        loop.thread.start()
        loop.pmd.set_rxqs([(0, 0), (1, 0)])
    loop.pmd.wake()
    assert [f for _, f in collect(loop.b, len(expect), loop.pmd)] == expect
    total = sent_before + len(frames)
    assert wait_for(lambda: loop.dp.port_stats(0)["rx_packets"] == total, pmd=loop.pmd)
    loop.a.tx.used()


def publish(sender, frames: list[bytes]) -> None:
    """All of ``frames`` made available at once: a PMD takes them in full bursts."""
    sender.tx.publish(*[sender.tx.add_tx(f, hdr=bytes(12)) for f in frames])


def flows(rnd: int) -> list[bytes]:
    """A round of ROUND frames, each a flow of its own (its UDP source port)."""
    return [frame("a", MAC["b"], 64 + j % 30, seed=rnd * ROUND + j) for j in range(ROUND)]


def four_rounds(loop) -> tuple[int, int, dict]:
    """Four rounds of flows, each delivered whole: (rounds, frames, the PMD's counters)."""
    for rnd in range(4):
        run_round(loop, flows(rnd), flows(rnd), rnd * ROUND, start=rnd == 0)
    return 4, 4 * ROUND, loop.pmd.stats()


def rule_packets(loop, text: str) -> int:
    [rule] = [r for r in loop.bridge.rules.values() if r.text == parse_flow(text).format()]
    return loop.bridge.counters(rule)[0]


def test_every_burst_after_the_first_is_decided_by_its_ports_megaflow():
    rule = "priority=10,in_port=a,actions=output:b"
    with guests_a_to_b([rule]) as loop:
        rounds, total, s = four_rounds(loop)
        assert s["upcalls"] == 1 and s["megaflow_hits"] == total - 1, s
        assert s["megaflows"] == 1 and s["megaflow_masks"] == 1, s
        # the first burst (the PMD started with all of round 0 posted) found no megaflow
        # for its first frame: the upcall made it; every later burst used it at once
        assert s["simple_match_hits"] == total - MAX_BURST, s
        assert s["emc_hits"] == 0 and s["emc_skipped"] == total, s
        assert rule_packets(loop, rule) == total


def test_a_mask_beyond_the_input_port_is_looked_up_frame_by_frame():
    rules = ["priority=20,in_port=a,udp,tp_src=1003,actions=output:b",
             "priority=10,in_port=a,actions=output:b"]
    with guests_a_to_b(rules) as loop:
        for rnd in range(3):
            run_round(loop, flows(rnd), flows(rnd), rnd * ROUND, start=rnd == 0)
        s = loop.pmd.stats()
        assert s["simple_match_hits"] == 0, s
        assert s["upcalls"] + s["megaflow_hits"] == 3 * ROUND, s
        assert rule_packets(loop, rules[0]) == 1
        assert rule_packets(loop, rules[1]) == 3 * ROUND - 1


def test_a_rule_added_under_traffic_is_obeyed_by_the_next_burst():
    rule = "priority=10,in_port=a,actions=output:b"
    drop = "priority=20,in_port=a,udp,tp_src=1083,actions=drop"    # round 2, frame 3
    with guests_a_to_b([rule]) as loop:
        for rnd in range(2):
            run_round(loop, flows(rnd), flows(rnd), rnd * ROUND, start=rnd == 0)
        assert loop.pmd.stats()["simple_match_hits"] > 0
        loop.bridge.apply(add=[parse_flow(drop)])
        kept = [f for j, f in enumerate(flows(2)) if j != 3]
        run_round(loop, flows(2), kept, 2 * ROUND)
        assert rule_packets(loop, drop) == 1
        assert rule_packets(loop, rule) == 3 * ROUND - 1
        # the drop rule unwildcards the UDP source port: no mask is port-wide any more
        hits = loop.pmd.stats()["simple_match_hits"]
        run_round(loop, flows(3), flows(3), 3 * ROUND)
        assert loop.pmd.stats()["simple_match_hits"] == hits


def test_many_flows_under_one_wider_megaflow_reuse_it():
    rule = "priority=10,in_port=a,udp,actions=output:b"    # in_port, dl_type, nw_proto
    with guests_a_to_b([rule]) as loop:
        rounds, total, s = four_rounds(loop)
        assert s["upcalls"] == 1 and s["megaflow_hits"] == total - 1, s
        assert s["megaflows"] == 1 and s["simple_match_hits"] == 0, s
        # a lookup per burst (32 and 8 frames a round; the first burst's first frame an
        # upcall, its second a lookup), every other frame under the frame before's
        assert s["bursts"] == 2 * rounds, s
        assert s["megaflow_reused"] == total - 1 - s["bursts"], s
        assert rule_packets(loop, rule) == total


def test_flows_under_different_megaflows_each_go_where_their_rule_says(switch):  # noqa: F811
    """Flow 1 goes to c, the others to b; each source port is a megaflow of its own. In
    runs (1 1 1 2 2 1 3 3 3 ...) a frame after one of its own flow reuses that megaflow;
    interleaved, none does; either way every frame arrives where its rule sends it."""
    guests = {n: Guest("split", "split", mrg=False, hdr_len=12) for n in "abc"}
    to_c = "priority=20,in_port=a,udp,tp_src=1001,actions=output:c"
    to_b = "priority=10,in_port=a,actions=output:b"
    dp, pmd = switch(guests, [to_c, to_b])
    pmd.set_emc_insert_inv_prob(0)
    runs = [0, 0, 0, 1, 1, 2, 2, 2, 1, 0, 3, 3, 1, 1, 1, 0, 2, 1, 3, 0, 1, 2, 1, 3] * 5
    seeds = [1 if s == 1 else 2 + s for s in runs]           # seed 1: UDP source port 1001
    frames = [frame("a", MAC["b"], 64 + 7 * k % 40, seed=seed) for k, seed in
              enumerate(seeds)]
    want_c = [f for f, seed in zip(frames, seeds, strict=True) if seed == 1]
    want_b = [f for f, seed in zip(frames, seeds, strict=True) if seed != 1]
    guests["b"].post_rx(len(want_b))
    guests["c"].post_rx(len(want_c))
    for k in range(0, len(frames), ROUND):         # (the TX ring holds 64 descriptors)
        publish(guests["a"], frames[k:k + ROUND])
        pmd.wake()
        sent = min(k + ROUND, len(frames))
        assert wait_for(lambda n=sent: dp.port_stats(0)["rx_packets"] == n, pmd=pmd)
        guests["a"].tx.used()
    assert [f for _, f in collect(guests["c"], len(want_c), pmd)] == want_c
    assert [f for _, f in collect(guests["b"], len(want_b), pmd)] == want_b
    s = pmd.stats()
    assert s["upcalls"] == 4 and s["megaflow_hits"] == len(frames) - 4, s
    assert s["bursts"] == 2 * len(frames) // ROUND, s
    # a frame after one of its own flow in the same burst (32 + 8 frames a chunk), except
    # right after that flow's upcall (its megaflow was inserted, not found)
    upcalled = {seeds.index(x) for x in set(seeds)}
    reusable = sum(1 for k in range(1, len(seeds)) if seeds[k] == seeds[k - 1] and
                   k % ROUND not in (0, 32) and k - 1 not in upcalled)
    assert s["megaflow_reused"] == reusable, s
