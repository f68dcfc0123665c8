"""The PMD's exact-match cache (pyvhost._flow: flow_hash, emc_lookup) and the per-run rule
counting of its hits (pyvhost._switch: a run of frames that hit one EMC entry is counted
once): a hit needs the whole key equal, whatever the hash says; the hash takes every word
of the key and spreads real keys over the cache; flow_extract (which builds the key's
words in registers and returns their hash) agrees field by field with a reference parser
on any frame; rule counters stay exact to the frame and the byte through runs, misses and
upcalls in one burst."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pyvhost._flow import (
    EMC_SIZE,
    KEY_SIZE,
    emc_probe,
    frame_key,
    frame_key_hash,
    key_hash,
    pack_key,
)
from tests.test_onecopy import MAC, collect, frame, guests_a_to_b, wait_for


def test_a_key_that_differs_anywhere_misses_under_the_same_hash():
    stored = frame_key(frame("a", MAC["b"], 64), in_port=3)
    h = key_hash(stored)
    assert emc_probe(stored, stored)
    assert emc_probe(stored, bytes(stored), h)
    for i in range(KEY_SIZE):
        for bit in (0x01, 0x80):
            probe = bytearray(stored)
            probe[i] ^= bit
            assert not emc_probe(stored, bytes(probe), h), (i, bit)   # same slot, same hash


def test_equal_keys_hash_equal_and_every_word_counts():
    rng = random.Random(15)
    base = frame_key(frame("a", MAC["b"], 64), in_port=1)
    assert key_hash(base) == key_hash(bytes(bytearray(base)))
    changed = total = 0
    for i in range(KEY_SIZE):
        for _ in range(8):
            probe = bytearray(base)
            probe[i] ^= 1 << rng.randrange(8)
            total += 1
            changed += key_hash(bytes(probe)) != key_hash(base)
    assert changed == total          # a one-bit change anywhere moves the hash


@pytest.mark.parametrize("field", ["tp_src", "nw_dst", "dl_src", "in_port"])
def test_real_keys_spread_over_the_cache(field):
    """4096 keys that differ in one field take about as many EMC slots as random slots
    would (8192 * (1 - e^-0.5) ~ 3223 expected; a hash that ignored the field takes 1)."""
    keys = []
    for n in range(4096):
        f = bytearray(frame("a", MAC["b"], 64))
        port = 0
        if field == "tp_src":
            f[34:36] = n.to_bytes(2, "big")
        elif field == "nw_dst":
            f[30:34] = bytes([10, 0]) + n.to_bytes(2, "big")
        elif field == "dl_src":
            f[6:12] = bytes([2, 0, 0, 0]) + n.to_bytes(2, "big")
        else:
            port = n
        keys.append(frame_key(bytes(f), in_port=port))
    slots = {key_hash(k) & (EMC_SIZE - 1) for k in keys}
    assert len(slots) > 3000, len(slots)


def reference_key(f: bytes, in_port: int, tun_id: int, tun_src: int, tun_dst: int) -> bytes:
    """The key flow_extract must give, field by field as the module doc says (network-order
    fields as their frame bytes; tun_src/tun_dst as pkt_t holds them)."""
    k = {"in_port": in_port, "tun_id": tun_id, "tun_src": tun_src.to_bytes(4, "little"),
         "tun_dst": tun_dst.to_bytes(4, "little")}
    if len(f) < 14:
        return pack_key(k)
    k["dl_dst"], k["dl_src"] = f[:6], f[6:12]
    dl_type, off = int.from_bytes(f[12:14], "big"), 14
    if dl_type == 0x8100 and len(f) >= 18:
        k["vlan_tci"] = int.from_bytes(f[14:16], "big") | 0x1000
        dl_type, off = int.from_bytes(f[16:18], "big"), 18
    k["dl_type"] = dl_type
    ip = f[off:]
    if dl_type == 0x0806 and len(ip) >= 28:
        k.update(nw_proto=ip[7], arp_sha=ip[8:14], nw_src=ip[14:18], arp_tha=ip[18:24],
                 nw_dst=ip[24:28])
    elif dl_type == 0x0800 and len(ip) >= 20 and ip[0] >> 4 == 4:
        ihl = (ip[0] & 15) * 4
        k.update(nw_tos=ip[1], nw_proto=ip[9], nw_src=ip[12:16], nw_dst=ip[16:20])
        frag = int.from_bytes(ip[6:8], "big") & 0x1FFF
        if ihl >= 20 and frag == 0 and len(ip) >= ihl + 4:
            l4 = ip[ihl:]
            if ip[9] in (6, 17):
                k.update(tp_src=int.from_bytes(l4[:2], "big"),
                         tp_dst=int.from_bytes(l4[2:4], "big"))
            elif ip[9] == 1:
                k.update(tp_src=l4[0], tp_dst=l4[1])
    return pack_key(k)


def _frames():
    eth = st.binary(min_size=12, max_size=12)
    tag = st.one_of(st.just(b""), st.binary(min_size=2, max_size=2).map(lambda t: b"\x81\x00" + t))
    ipv4 = st.tuples(st.integers(0, 255), st.integers(0, 255), st.sampled_from([1, 6, 17, 47]),
                     st.sampled_from([0, 0, 0x2000, 0x0001, 0x4000]),
                     st.binary(min_size=8, max_size=8),
                     st.binary(min_size=0, max_size=40)).map(
        lambda t: b"\x08\x00" + bytes([t[0] | 0x40, t[1]]) + bytes(4) + t[3].to_bytes(2, "big") +
        bytes([64, t[2]]) + bytes(2) + t[4] + t[5])
    arp = st.binary(min_size=20, max_size=40).map(lambda b: b"\x08\x06" + b)
    other = st.binary(min_size=0, max_size=60)
    body = st.one_of(ipv4, arp, other)
    return st.tuples(eth, tag, body, st.integers(0, 120)).map(
        lambda t: (t[0] + t[1] + t[2])[:len(t[0] + t[1] + t[2]) - t[3] if t[3] < 60 else None])


@settings(max_examples=400, deadline=None)
@given(_frames(), st.integers(0, 0xFFFF), st.integers(0, 2 ** 32 - 1),
       st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1))
@example(b"\x01\x02", 3, 0, 0, 0)
@example(bytes(12) + b"\x81\x00\x00", 1, 0, 0, 0)
def test_extraction_agrees_with_the_reference_and_returns_the_key_hash(f, port, vni, src, dst):
    key, h = frame_key_hash(f, port, vni, src, dst)
    assert key == reference_key(f, port, vni, src, dst)
    assert h == key_hash(key)


# -- rule counters through a PMD: runs of EMC hits counted once, exactly ---------------------

RULES = ["priority=20,udp,in_port=a,tp_src=1000,actions=output:b",
         "priority=20,udp,in_port=a,tp_src=1001,actions=output:b",
         "priority=10,in_port=a,actions=output:b"]
# the same decisions through two tables: every frame passes the table-0 rule, then one of
# the three (each decision counts two rules)
PIPELINE = ["priority=10,in_port=a,actions=goto_table:1",
            *(f"table=1,{r.replace('in_port=a,', '')}" for r in RULES)]


def rule_for(seed: int) -> int:
    return {0: 0, 1: 1}.get(seed, 2)


@pytest.fixture(params=["one table", "two tables"])
def loop(request):
    """guests_a_to_b with RULES or PIPELINE (``pipeline`` says which)."""
    rules = RULES if request.param == "one table" else PIPELINE
    with guests_a_to_b(rules) as loop:
        loop.pipeline = rules is PIPELINE
        yield loop


def test_rule_counters_stay_exact_through_runs_misses_and_upcalls(loop):
    """Rounds of 60 frames (whole bursts, posted before the PMD polls): long runs of one
    flow (EMC hits once it is cached), another flow in between, and a new flow (a miss, an
    upcall, a cache insert) now and then inside a run; sizes vary so that bytes count too.
    Every rule's packets and bytes are exactly what was sent through it."""
    rng = random.Random(4)
    want = [[0, 0] for _ in RULES]
    fresh = 100
    started = False
    for rnd in range(12):
        frames = []
        for j in range(60):
            if j % 11 == 5:
                seed, fresh = fresh, fresh + 1          # never seen: a miss mid-run
            else:
                seed = 1 if j % 7 == 3 or rng.random() < 0.1 else 0
            f = frame("a", MAC["b"], rng.randrange(64, 300), seed)
            frames.append(f)
            want[rule_for(seed)][0] += 1
            want[rule_for(seed)][1] += len(f)
        loop.b.post_rx(len(frames))
        for f in frames:
            loop.a.tx.post_tx(f, hdr=bytes(12))
        if not started:                                  # the first round: whole bursts
            loop.thread.start()
            loop.pmd.set_rxqs([(0, 0), (1, 0)])
            started = True
        loop.pmd.wake()
        got = collect(loop.b, len(frames), loop.pmd)
        assert [f for _, f in got] == frames, rnd
        sent = 60 * (rnd + 1)
        assert wait_for(lambda n=sent: loop.dp.port_stats(0)["rx_packets"] == n, pmd=loop.pmd)
        loop.a.tx.used()                                 # the sender's buffers back
    stats = loop.pmd.stats()
    assert stats["emc_hits"] > 300, stats                 # the runs were EMC hits
    assert stats["upcalls"] >= 12 * 5, stats
    got = [None] * (len(RULES) + loop.pipeline)
    for r in loop.bridge.rules.values():
        if "goto_table" in r.text:
            i = 3
        else:
            i = 0 if "tp_src=1000" in r.text else 1 if "tp_src=1001" in r.text else 2
        got[i] = list(loop.bridge.counters(r)[:2])
    if loop.pipeline:                        # every frame passed the table-0 rule
        want.append([sum(w[0] for w in want), sum(w[1] for w in want)])
    assert got == want
