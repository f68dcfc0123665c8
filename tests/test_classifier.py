"""The compiled classifier and MAC table on their own: a differential test against a brute
force reference over thousands of random overlapping rules in several tables (random
masks and priorities, ties, goto_table, deletions, OpenFlow's metadata match and
write_metadata, write/clear actions into the action set), megaflow masks that are exact (a key
differing only outside the mask gets the same answer), 100k rules loaded, matched and
measured, and the MAC table's size, per-port, aging and flapping limits."""

from __future__ import annotations

import os
import random
import time
import tracemalloc

import pytest

from pyvhost._classifier import NO_GOTO_TABLE, Classifier
from pyvhost._fdb import MacTable
from pyvhost._flow import ACTION_OPS, KEY_SIZE, frame_key, pack_key
from pyvhost.switch.bridge import (
    OP_CONTROLLER,
    OP_FLOOD,
    OP_GROUP,
    OP_OUTPUT,
    OP_SET_VLAN,
    OP_STRIP_VLAN,
    OP_TUN_HI,
    Bridge,
)
from pyvhost.switch.flows import parse_flow

SEED = int(os.environ.get("PYVHOST_FUZZ_SEED", random.randrange(1 << 30)))
SCALE = float(os.environ.get("PYVHOST_FUZZ_SCALE", "1"))

# the key's bytes that packets can differ in, grouped by field, and masks a rule may use
FIELDS = {
    "in_port": [0xFFFF], "vlan_tci": [0x1FFF, 0xFFFF, 0x1000, 0x1FF0], "dl_type": [0xFFFF],
    "nw_proto": [0xFF], "tp_src": [0xFFFF, 0xFF00], "tp_dst": [0xFFFF, 0xFFF0],
    "nw_src": [b"\xff\xff\xff\xff", b"\xff\xff\xff\x00", b"\xff\xff\x00\x00"],
    "nw_dst": [b"\xff\xff\xff\xff", b"\xff\xff\xff\x00", b"\xff\x00\x00\x00"],
    "dl_src": [b"\xff" * 6, b"\x01\x00\x00\x00\x00\x00"], "dl_dst": [b"\xff" * 6],
    "arp_tha": [b"\xff" * 6, b"\xff" * 5 + b"\x00"],
    "tun_id": [0xFFFFFFFF, 0xFF], "tun_dst": [b"\xff\xff\xff\xff", b"\xff\xff\xff\x00"],
}
# few distinct values per field, so that random packets hit random rules often
VALUES = {
    "in_port": [1, 2, 3], "vlan_tci": [0, 0x1005, 0x1006, 0x3015], "dl_type": [0x0800, 0x0806],
    "nw_proto": [1, 6, 17], "tp_src": [53, 80, 0x1234], "tp_dst": [53, 80, 443],
    "nw_src": [bytes([10, 0, 0, i]) for i in (1, 2)] + [bytes([10, 0, 1, 1])],
    "nw_dst": [bytes([10, 0, 0, i]) for i in (1, 2)] + [bytes([192, 168, 0, 1])],
    "dl_src": [bytes([2, 0, 0, 0, 0, i]) for i in (1, 2)] + [bytes([3, 0, 0, 0, 0, 1])],
    "dl_dst": [bytes([2, 0, 0, 0, 0, i]) for i in (1, 2, 3)],
    "arp_tha": [bytes([2, 0, 0, 0, 0, i]) for i in (0, 1)] + [bytes([2, 0, 0, 0, 1, 0])],
    "tun_id": [0, 5, 0x123456], "tun_dst": [bytes(4), bytes([172, 16, 0, 1])],
}


def words(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


U64 = (1 << 64) - 1
OP_SET_NW_DST, OP_SET_TP_DST = ACTION_OPS["set_nw_dst"], ACTION_OPS["set_tp_dst"]
OP_SET_TUN_ID, OP_SET_TUN_DST = ACTION_OPS["set_tun_id"], ACTION_OPS["set_tun_dst"]
MD_VALUES, MD_MASKS = [0, 1, 2, 0x100, 0x101], [U64, 0xFF, 0x100]
# the action set's slots, in the order it runs (OpenFlow 1.3, 5.10): pop, push/set VLAN,
# group, output (an output not run when a group is set); the last write of each kind wins
SLOT = {OP_STRIP_VLAN: 0, OP_SET_VLAN: 1, OP_GROUP: 14, OP_OUTPUT: 15, OP_FLOOD: 15,
        OP_CONTROLLER: 15}


def set_nw_dst(addr: bytes) -> list:
    v = int.from_bytes(addr, "big")
    return [(OP_TUN_HI, v >> 16), (OP_SET_NW_DST, v & 0xFFFF)]


def set_tun(op: int, v: int) -> list:
    """set_tun_id / set_tun_dst (``v``: the address as an int) as the bridge compiles them."""
    return [(OP_TUN_HI, v >> 16), (op, v & 0xFFFF)]


def edited(k: int, op: int, value: int) -> int:
    """The key (an int of its bytes, little-endian) as an apply-action leaves it for a
    later table: VLAN ops; tun_id and tun_dst; nw_dst and tp_dst of an IPv4 (TCP/UDP)
    packet."""
    b = bytearray(k.to_bytes(KEY_SIZE, "little"))
    ip = b[16:18] == (0x0800).to_bytes(2, "little")
    if op == OP_SET_VLAN:
        tci = int.from_bytes(b[2:4], "little")
        b[2:4] = ((tci & 0xE000) | 0x1000 | value).to_bytes(2, "little")
    elif op == OP_STRIP_VLAN:
        b[2:4] = bytes(2)
    elif op == OP_SET_TUN_ID:
        b[36:40] = value.to_bytes(4, "little")
    elif op == OP_SET_TUN_DST:
        b[44:48] = value.to_bytes(4, "big")
    elif op == OP_SET_NW_DST and ip:
        b[24:28] = value.to_bytes(4, "big")
    elif op == OP_SET_TP_DST and ip and b[28] in (6, 17):
        b[32:34] = value.to_bytes(2, "little")
    return int.from_bytes(b, "little")


def md8(n: int) -> bytes:
    return n.to_bytes(8, "little")


def random_write(rng: random.Random) -> list:
    ops = []
    for _ in range(rng.randint(1, 3)):
        op = rng.choice((OP_STRIP_VLAN, OP_SET_VLAN, OP_GROUP, OP_OUTPUT, OP_FLOOD,
                         OP_CONTROLLER))
        ops.append((op, rng.randint(0, 3) if op != OP_STRIP_VLAN else 0))
    return ops


def random_rule(rng: random.Random, table: int, tables: int):
    fields = rng.sample(sorted(FIELDS), rng.randint(0, 4))
    mask = pack_key({f: rng.choice(FIELDS[f]) for f in fields})
    value = pack_key({f: rng.choice(VALUES[f]) for f in fields})
    goto = NO_GOTO_TABLE
    if table + 1 < tables and rng.random() < 0.3:
        goto = rng.randint(table + 1, tables - 1)
    r = rng.random()                # edits a later table sees, often to a value it matches
    ops = [(OP_SET_VLAN, rng.choice((5, 6, rng.randint(0, 4095))))] if r < 0.4 else \
        [(OP_STRIP_VLAN, 0)] if r < 0.5 else \
        set_nw_dst(rng.choice(VALUES["nw_dst"])) if r < 0.6 else \
        [(OP_SET_TP_DST, rng.choice(VALUES["tp_dst"]))] if r < 0.65 else \
        set_tun(OP_SET_TUN_ID, rng.choice(VALUES["tun_id"])) if r < 0.68 else \
        set_tun(OP_SET_TUN_DST, int.from_bytes(rng.choice(VALUES["tun_dst"]), "big")) \
        if r < 0.71 else []
    if r >= 0.5 and ops and goto == NO_GOTO_TABLE and table + 1 < tables and \
            rng.random() < 0.7:             # (an edit a later table can see)
        goto = rng.randint(table + 1, tables - 1)
    if rng.random() < 0.5:          # plain: a flow key's mask and value, no instructions
        return table, rng.randint(0, 12), mask, value, ops, goto
    # OpenFlow's instructions: a metadata match, write_metadata, clear/write actions (and
    # more often a goto_table, so that later tables see what earlier ones wrote)
    if goto == NO_GOTO_TABLE and table + 1 < tables and rng.random() < 0.4:
        goto = rng.randint(table + 1, tables - 1)
    md_mask = rng.choice(MD_MASKS) if table and rng.random() < 0.6 else 0
    mask += md8(md_mask)
    value += md8(rng.choice(MD_VALUES) & md_mask)
    write = random_write(rng) if rng.random() < 0.6 else []
    wmd = (lambda m: (rng.choice(MD_VALUES) & m, m))(rng.choice(MD_MASKS)) \
        if rng.random() < 0.5 else None
    return table, rng.randint(0, 12), mask, value, ops, goto, \
        (write, rng.random() < 0.2, wmd)


def random_key(rng: random.Random) -> bytes:
    return pack_key({f: rng.choice(VALUES[f]) for f in FIELDS if rng.random() < 0.9})


class Reference:
    """The obvious classifier: scan every rule of the table, best priority, earliest wins;
    a table after goto_table sees the packet as the earlier tables' VLAN ops left it and
    the metadata as their write_metadata left it (0 at first); write-actions fill an
    action set (clear_actions empties it) run when a rule without goto_table ends the
    pipeline (a miss drops it)."""

    def __init__(self):
        self.rules: dict[int, tuple] = {}
        self.order: dict[int, int] = {}
        self._n = 0

    def add(self, rid, spec):
        self.rules[rid] = spec
        self.order[rid] = self._n
        self._n += 1

    def lookup(self, key: bytes):
        k = words(key)
        table, hops, ops, md, aset = 0, [], [], 0, {}
        while len(hops) < 8:
            best = None
            for rid, (t, prio, mask, value, *_) in self.rules.items():
                m, v = words(mask[:KEY_SIZE]), words(value[:KEY_SIZE])
                mm, mv = words(mask[KEY_SIZE:]), words(value[KEY_SIZE:])
                if t == table and k & m == v & m and md & mm == mv & mm:
                    if best is None or (prio, -self.order[rid]) > best[0]:
                        best = ((prio, -self.order[rid]), rid)
            if best is None:
                break
            rid = best[1]
            hops.append((table, rid))
            ops += self.rules[rid][4]
            write, clear, wmd = self.rules[rid][6] if len(self.rules[rid]) > 6 else \
                ([], False, None)
            if clear:
                aset = {}
            for op, arg in write:
                aset[SLOT[op]] = (op, arg)
            if wmd is not None:
                md = (md & ~wmd[1]) | wmd[0]
            hi = 0
            for op, arg in self.rules[rid][4]:       # a later table sees the edits
                if op == OP_TUN_HI:
                    hi = hi << 16 | arg
                    continue
                k = edited(k, op, hi << 16 | arg)
                hi = 0
            goto = self.rules[rid][5]
            if goto == NO_GOTO_TABLE:
                ops += [aset[s] for s in sorted(aset) if not (s == 15 and 14 in aset)]
                break
            table = goto
        return hops, ops


def test_classifier_matches_brute_force_reference():
    rng = random.Random(SEED)
    print(f"classifier differential: seed {SEED} (PYVHOST_FUZZ_SEED to repeat)")
    n_rules, n_keys, tables = int(3000 * SCALE), int(3000 * SCALE), 3
    cls, ref = Classifier(), Reference()
    specs = [random_rule(rng, rng.randrange(tables), tables) for _ in range(n_rules)]
    for spec, rid in zip(specs, cls.apply(specs[: n_rules // 2]) +
                         [cls.insert(*s) for s in specs[n_rules // 2:]], strict=True):
        ref.add(rid, spec)
    assert len(cls) == n_rules
    assert cls.subtables(0) > 20                       # many masks: a real search

    def check(n):
        hit = 0
        for _ in range(n):
            key = random_key(rng)
            hops, ops, mask, overflow = cls.lookup(key)
            want_hops, want_ops = ref.lookup(key)
            assert (hops, ops) == (want_hops, want_ops), key.hex()
            hit += bool(hops)
            # exact megaflow: any key equal on the mask's bits gets the same answer
            noise = rng.getrandbits(8 * KEY_SIZE)
            other = ((words(key) & words(mask)) | (noise & ~words(mask))).to_bytes(
                KEY_SIZE, "little")
            assert cls.lookup(other)[:2] == (hops, ops), (key.hex(), other.hex())
            for _, rid in hops:                        # the matched rules' bits are in it
                rule_mask = words(cls.rule(rid)[2][:KEY_SIZE])
                assert words(mask) & rule_mask == rule_mask
        return hit

    assert check(n_keys) > n_keys // 4                 # the keys do hit rules
    assert sum(len(s) > 6 and bool(s[6][0]) for s in specs) > n_rules // 10   # (written)
    gone = rng.sample(sorted(ref.rules), n_rules // 2)
    cls.apply(removes=gone)
    cls.reclaim()
    for rid in gone:
        del ref.rules[rid]
    assert len(cls) == len(ref.rules)
    check(n_keys // 2)


def test_later_tables_see_edits_as_the_reference_does():
    """Few fields (the ones apply-actions rewrite and their prerequisites), so that later
    tables often decide on what an earlier one rewrote: the classifier agrees with the
    reference, and its megaflow mask stays exact (a key equal on the mask's bits gets the
    same answer)."""
    rng = random.Random(SEED + 2)
    narrow = ("vlan_tci", "dl_type", "nw_proto", "nw_dst", "tp_dst", "tun_id", "tun_dst")
    cls, ref = Classifier(), Reference()
    specs = []
    for _ in range(int(400 * SCALE)):
        table = rng.randrange(3)
        fields = rng.sample(narrow, rng.randint(1, 3))
        mask = pack_key({f: rng.choice(FIELDS[f]) if f == "vlan_tci" else FIELDS[f][0]
                         for f in fields})             # (VLAN: any tag, VID ranges too)
        value = pack_key({f: rng.choice(VALUES[f]) for f in fields})
        r = rng.random()
        ops = set_nw_dst(rng.choice(VALUES["nw_dst"])) if r < 0.35 else \
            [(OP_SET_TP_DST, rng.choice(VALUES["tp_dst"]))] if r < 0.6 else \
            [(OP_SET_VLAN, rng.choice((5, 6)))] if r < 0.7 else \
            set_tun(OP_SET_TUN_ID, rng.choice(VALUES["tun_id"])) if r < 0.75 else \
            set_tun(OP_SET_TUN_DST, int.from_bytes(rng.choice(VALUES["tun_dst"]), "big")) \
            if r < 0.8 else [(OP_OUTPUT, table)]
        goto = rng.randint(table + 1, 2) if table < 2 and rng.random() < 0.7 else NO_GOTO_TABLE
        specs.append((table, rng.randint(0, 12), mask, value, ops, goto))
    for spec, rid in zip(specs, cls.apply(specs), strict=True):
        ref.add(rid, spec)
    edited_hits = 0
    for _ in range(int(3000 * SCALE)):
        key = pack_key({f: rng.choice(VALUES[f]) for f in narrow if rng.random() < 0.9})
        hops, ops, mask, _ = cls.lookup(key)
        assert (hops, ops) == ref.lookup(key), key.hex()
        edited_hits += len(hops) > 1 and any(op == OP_SET_NW_DST for op, _ in ops)
        noise = rng.getrandbits(8 * KEY_SIZE)
        other = ((words(key) & words(mask)) | (noise & ~words(mask))).to_bytes(
            KEY_SIZE, "little")
        assert cls.lookup(other)[:2] == (hops, ops), (key.hex(), other.hex())
    assert edited_hits > 100                           # later tables did see rewrites


def prefix_rule(rng: random.Random, bases: list[int], table: int = 0):
    """A rule on a prefix of nw_src and/or nw_dst near one of ``bases`` (sometimes with
    in_port too), of any length 1..32."""
    fields, values = {}, {}
    for f in rng.sample(["nw_src", "nw_dst"], rng.randint(1, 2)):
        plen = rng.randint(1, 32)
        mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
        fields[f] = mask.to_bytes(4, "big")
        values[f] = (rng.choice(bases) ^ rng.getrandbits(32) >> rng.randint(8, 32)).to_bytes(
            4, "big")
    if rng.random() < 0.3:
        fields["in_port"], values["in_port"] = 0xFFFF, rng.randint(1, 2)
    return (table, rng.randint(0, 12), pack_key(fields), pack_key(values),
            [(3, rng.randint(0, 4095))], NO_GOTO_TABLE)


def test_prefix_tries_skip_subtables_exactly():
    """Rules on address prefixes of every length: lookups agree with the reference, the
    megaflow mask stays exact (a key differing outside it, in the low address bits too,
    gets the same answer), misses consult fewer address bits than the rules' prefixes,
    and removing every rule leaves the tries empty."""
    rng = random.Random(SEED + 1)
    bases = [0x0A000000, 0x0A000100, 0xC0A80000, 0x0A010000]
    cls, ref = Classifier(), Reference()
    specs = [prefix_rule(rng, bases) for _ in range(int(1500 * SCALE))]
    for spec, rid in zip(specs, cls.apply(specs), strict=True):
        ref.add(rid, spec)
    assert all(cls.trie_nodes(0))
    short = 0
    for _ in range(int(3000 * SCALE)):
        key = pack_key({"in_port": rng.randint(1, 2), "dl_type": 0x0800,
                        "nw_src": (rng.choice(bases) ^ rng.getrandbits(32) >> rng.randint(
                            0, 32)).to_bytes(4, "big"),
                        "nw_dst": (rng.choice(bases) ^ rng.getrandbits(32) >> rng.randint(
                            0, 32)).to_bytes(4, "big")})
        hops, ops, mask, _ = cls.lookup(key)
        assert (hops, ops) == ref.lookup(key), key.hex()
        for _ in range(3):
            noise = rng.getrandbits(8 * KEY_SIZE)
            other = ((words(key) & words(mask)) | (noise & ~words(mask))).to_bytes(
                KEY_SIZE, "little")
            assert cls.lookup(other)[:2] == (hops, ops), (key.hex(), other.hex())
        for at in (20, 24):                            # the first address bit left out
            field = int.from_bytes(mask[at:at + 4], "big")
            if field != 0xFFFFFFFF:
                bit = 31 - (~field & 0xFFFFFFFF).bit_length() + 1
                flipped = int.from_bytes(key[at:at + 4], "big") ^ (1 << (31 - bit))
                other = key[:at] + flipped.to_bytes(4, "big") + key[at + 4:]
                assert cls.lookup(other)[:2] == (hops, ops), (key.hex(), other.hex())
        short += mask[24:28] != b"\xff" * 4
    assert short > 0                                   # the tries did spare address bits
    cls.apply(removes=list(ref.rules))
    assert cls.trie_nodes(0) == (0, 0) and len(cls) == 0


def test_prefix_trie_megaflow_for_a_miss_is_a_short_prefix():
    """100k /32 rules on 10.0.0.0-10.1.134.159: a packet to 10.2.0.1 misses them all and
    its megaflow needs only the leading bits of nw_dst that tell it apart, while a packet
    to a ruled address needs all 32; a non-prefix mask still consults its whole field."""
    n = 100_000
    m = pack_key({"in_port": 0xFFFF, "dl_type": 0xFFFF, "nw_dst": b"\xff" * 4})
    specs = [(0, 10, m, pack_key({"in_port": 1, "dl_type": 0x0800,
                                  "nw_dst": (0x0A000000 + i).to_bytes(4, "big")}),
              [(1, 2)], NO_GOTO_TABLE) for i in range(n)]
    specs.append((0, 1, pack_key({"in_port": 0xFFFF}), pack_key({"in_port": 1}), [(1, 3)],
                  NO_GOTO_TABLE))
    cls = Classifier()
    cls.apply(specs)
    miss = pack_key({"in_port": 1, "dl_type": 0x0800, "nw_dst": bytes([10, 2, 0, 1])})
    _, ops, mask, _ = cls.lookup(miss)
    assert ops == [(1, 3)]
    assert mask[24:28] == bytes([255, 254, 0, 0])      # 10.2/15 tells it from 10.0-10.1
    hit = pack_key({"in_port": 1, "dl_type": 0x0800, "nw_dst": bytes([10, 0, 1, 5])})
    _, ops, mask, _ = cls.lookup(hit)
    assert ops == [(1, 2)] and mask[24:28] == b"\xff" * 4
    odd = pack_key({"nw_dst": bytes([255, 0, 255, 0])})
    cls.insert(0, 20, odd, pack_key({"nw_dst": bytes([1, 0, 1, 0])}), [(1, 4)])
    assert cls.lookup(miss)[2][24:28] == bytes([255, 254, 255, 0])   # /15 | the whole mask


def test_strict_and_select_and_modify():
    cls = Classifier()
    m, v = pack_key({"dl_type": 0xFFFF, "nw_dst": b"\xff\xff\xff\x00"}), \
        pack_key({"dl_type": 0x0800, "nw_dst": bytes([10, 0, 0, 0])})
    a = cls.insert(0, 10, m, v, [(1, 2)])
    b = cls.insert(0, 20, m, v, [(1, 3)])
    c = cls.insert(0, 5, pack_key({"dl_type": 0xFFFF}), pack_key({"dl_type": 0x0800}), [])
    assert cls.find_strict(0, 10, m, v) == a and cls.find_strict(0, 11, m, v) == -1
    ip = (pack_key({"dl_type": 0xFFFF}), pack_key({"dl_type": 0x0800}))
    assert sorted(cls.select(-1, *ip)) == sorted([a, b, c])       # at least as specific
    assert sorted(cls.select(0, m, v)) == sorted([a, b])
    key = pack_key({"dl_type": 0x0800, "nw_dst": bytes([10, 0, 0, 9])})
    assert cls.lookup(key)[:2] == ([(0, b)], [(1, 3)])
    cls.apply(changes=[(b, [(1, 4)], NO_GOTO_TABLE)])
    assert cls.lookup(key)[1] == [(1, 4)]
    with pytest.raises(ValueError):                   # nothing applied: all or nothing
        cls.apply(specs=[(0, 1, m, v, [], NO_GOTO_TABLE), (0, 1, m, v, [(0, 1)], NO_GOTO_TABLE)])
    with pytest.raises(ValueError):
        cls.apply(specs=[(1, 1, m, v, [], 0)])       # goto an earlier table
    with pytest.raises(ValueError):
        cls.apply(specs=[(0, 1, m, v, [(3, 1)] * 33, NO_GOTO_TABLE)])
    with pytest.raises(KeyError):
        cls.apply(removes=[a, 999])
    with pytest.raises(ValueError):
        cls.apply(changes=[(a, [], NO_GOTO_TABLE)], removes=[a])
    assert len(cls) == 3 and cls.lookup(key)[1] == [(1, 4)]


def test_later_tables_see_set_field_edits():
    """A set_field (ip_dst, tcp/udp dst, vlan_pcp) of table 0 is what table 1 matches; on a
    packet without that header (ARP, untagged) it changes nothing. Whether the header is
    there is a decision on the key's dl_type, nw_proto, tag: the megaflow mask has those
    bits, so a packet differing there is not given the same answer."""
    set_pcp = ACTION_OPS["set_pcp"]
    cls = Classifier()
    cls.insert(0, 1, pack_key({}), pack_key({}), set_nw_dst(bytes([10, 0, 0, 2])) +
               [(OP_SET_TP_DST, 80), (set_pcp, 5)], 1)
    to2 = cls.insert(1, 5, pack_key({"nw_dst": b"\xff" * 4, "tp_dst": 0xFFFF}),
                     pack_key({"nw_dst": bytes([10, 0, 0, 2]), "tp_dst": 80}), [(1, 7)])
    pcp5 = cls.insert(1, 3, pack_key({"vlan_tci": 0xE000}), pack_key({"vlan_tci": 0xA000}),
                      [(1, 9)])
    other = cls.insert(1, 1, pack_key({}), pack_key({}), [(1, 8)])
    cases = ((pack_key({"dl_type": 0x0800, "nw_proto": 6, "tp_dst": 22,
                        "nw_dst": bytes([10, 0, 0, 1])}), to2),
             (pack_key({"dl_type": 0x0800, "nw_proto": 1,
                        "nw_dst": bytes([10, 0, 0, 1])}), other),             # no ports
             (pack_key({"dl_type": 0x0806, "nw_dst": bytes([10, 0, 0, 1])}), other),
             (pack_key({"dl_type": 0x0806, "vlan_tci": 0x1007}), pcp5),           # tagged
             (pack_key({"dl_type": 0x0806}), other))                            # untagged
    masks = []
    for key, hop in cases:
        hops, _, mask, _ = cls.lookup(key)
        assert hops[-1] == (1, hop), key.hex()
        masks.append(mask)
    for (key, _), mask in zip(cases, masks, strict=True):
        want = {"dl_type": 0xFFFF, "vlan_tci": 0x1000}
        if key[16:18] == (0x0800).to_bytes(2, "little"):
            want["nw_proto"] = 0xFF                    # (looked at only in IPv4)
        for field, bits in want.items():
            m = pack_key({field: bits})
            assert words(mask) & words(m) == words(m), (key.hex(), field, mask.hex())
        # and what the mask says is true: a key equal on its bits gets the same rules
        for flip in range(8 * KEY_SIZE):
            if not words(mask) >> flip & 1:
                other_key = (words(key) ^ 1 << flip).to_bytes(KEY_SIZE, "little")
                assert cls.lookup(other_key)[0] == cls.lookup(key)[0], (key.hex(), flip)


def test_later_tables_see_tunnel_set_fields():
    """set_field tun_id / tun_dst of table 0 is what table 1 matches (OVS: a later table
    matches the tunnel metadata as set)."""
    cls = Classifier()
    cls.insert(0, 1, pack_key({}), pack_key({}), set_tun(OP_SET_TUN_ID, 0x123456) +
               set_tun(OP_SET_TUN_DST, 0xAC100001), 1)
    both = cls.insert(1, 5, pack_key({"tun_id": 0xFFFFFFFF, "tun_dst": b"\xff" * 4}),
                      pack_key({"tun_id": 0x123456, "tun_dst": bytes([172, 16, 0, 1])}),
                      [(1, 7)])
    cls.insert(1, 1, pack_key({}), pack_key({}), [(1, 8)])
    for key in (pack_key({}), pack_key({"tun_id": 9, "tun_dst": bytes([10, 0, 0, 9])})):
        assert cls.lookup(key)[0][-1] == (1, both), key.hex()


def test_later_tables_see_the_vlan_ops_of_earlier_ones():
    """OpenFlow: a table after goto_table matches the packet as the earlier tables' apply
    actions left it (Faucet pushes the VLAN tag in table 0 and matches it in table 1)."""
    from pyvhost._flow import ACTION_OPS
    set_vlan, strip = ACTION_OPS["set_vlan"], ACTION_OPS["strip_vlan"]
    cls = Classifier()
    vlan = pack_key({"vlan_tci": 0x1FFF})
    cls.insert(0, 5, pack_key({"vlan_tci": 0xFFFF}), pack_key({"vlan_tci": 0}),
               [(set_vlan, 100)], 1)                                    # untagged: push 100
    cls.insert(0, 5, vlan, pack_key({"vlan_tci": 0x1000 | 7}), [(strip, 0)], 1)   # 7: pop
    tagged_100 = cls.insert(1, 5, vlan, pack_key({"vlan_tci": 0x1000 | 100}), [(1, 2)])
    untagged = cls.insert(1, 5, pack_key({"vlan_tci": 0xFFFF}), pack_key({"vlan_tci": 0}),
                          [(1, 3)])
    hops, ops, mask, _ = cls.lookup(pack_key({"in_port": 1}))
    assert hops[1] == (1, tagged_100) and ops == [(set_vlan, 100), (1, 2)], (hops, ops)
    hops, ops, _, _ = cls.lookup(pack_key({"in_port": 1, "vlan_tci": 0x1000 | 7}))
    assert hops[1] == (1, untagged) and ops == [(strip, 0), (1, 3)], (hops, ops)


def test_100k_rules_load_match_and_memory():
    """OVN-sized: 100k rules of a few shapes load in one change, each packet finds its rule,
    and a rule costs at most 1 KiB (classifier and the bridge's Python side together)."""
    n = 100_000

    class P:
        name, port_id, ofport = "p1", 1, 1
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    br = Bridge("br0", 0)
    br.attach(P())
    flows = []
    for i in range(n):
        dst = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        if i % 3 == 0:
            text = f"priority=100,ip,nw_dst={dst},actions=output:p1"
        elif i % 3 == 1:
            text = (f"priority=200,tcp,nw_dst={dst},tp_dst={i % 1000},"
                    f"actions=mod_vlan_vid:{i % 4000},output:p1")
        else:
            text = f"table=1,cookie={i},priority=50,in_port=p1,udp,nw_src={dst},actions=drop"
        flows.append(parse_flow(text))
    parsed = tracemalloc.get_traced_memory()[0]
    t0 = time.monotonic()
    br.apply(add=flows)
    load = time.monotonic() - t0
    del flows                                       # the input, not what the bridge holds
    py_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    per_rule = (py_bytes + br.cls.memory()) / n
    print(f"100k rules: loaded in {load:.2f} s, {per_rule:.0f} B per rule "
          f"(python {py_bytes / n:.0f}, parsed flows were {(parsed - before) / n:.0f}; "
          f"classifier {br.cls.memory() / n:.0f})")
    assert len(br.cls) == n and per_rule <= 1024
    for i in range(0, n, 997):
        dst = bytes([10, (i >> 16) & 255, (i >> 8) & 255, i & 255])
        if i % 3 == 0:
            key = pack_key({"dl_type": 0x0800, "nw_dst": dst, "nw_proto": 17})
            assert br.cls.lookup(key)[1] == [(1, 1)], i
        elif i % 3 == 1:
            key = pack_key({"dl_type": 0x0800, "nw_dst": dst, "nw_proto": 6, "tp_dst": i % 1000})
            assert br.cls.lookup(key)[1] == [(3, i % 4000), (1, 1)], i
    br.apply(remove=list(br.rules.values()))        # one change, linear (each subtable's
    br.cls.reclaim()                                # maximum is recounted once, not per rule)
    assert len(br.cls) == 0 and br.cls.subtables(0) == 0


def test_mac_table_limits():
    macs = MacTable(64, 300)
    now = 1000
    busy = [bytes([2, 0, 0, 0, 0, i]) for i in range(8)]
    for mac in busy:
        assert macs.learn(0, mac, 1, now=now) == 1
    for i in range(5000):                              # a storm of random sources
        now += 1
        for mac in busy[:: 1 + i % 8]:                 # the busy hosts keep being seen
            macs.learn(0, mac, 1, now=now)
        macs.learn(0, bytes([2, 1]) + i.to_bytes(4, "big"), 2, now=now)
    assert len(macs) == 64 and macs.stats()["evicted"] >= 5000 - 56
    assert all(macs.lookup(0, m) == 1 for m in busy)   # idle entries went first
    macs.set_port_limit(3, 2)
    assert [macs.learn(0, bytes([4, 0, 0, 0, 0, i]), 3, now=now) for i in range(4)] == \
        [1, 1, -1, -1]
    assert macs.stats()["refused"] == 2
    flap = busy[0]
    moves = [macs.learn(0, flap, 5 + (i % 2), now=now + i) for i in range(10)]
    # four moves in a window, then it stays where it is (6): moves back to 5 are ignored
    assert moves[:4] == [2, 2, 2, 2] and moves[4::2] == [-1] * 3 and moves[5::2] == [0] * 3
    assert macs.lookup(0, flap) == 6
    assert macs.stats()["damped"] == 3 and macs.last_damped() == (0, flap)
    assert macs.learn(0, flap, 7, now=now + 2000) == 2                # a new window
    assert len(macs.rows()) == len(macs) > 0
    assert macs.forget_port(7) == 1
    n = len(macs)
    assert macs.expire(now=now + 2000 + 301_000) == n and len(macs) == 0 and macs.rows() == []


def test_frame_keys_feed_the_classifier():
    """The key the datapath extracts is the key the rule language describes."""
    br = Bridge("br0", 0)

    class P:
        name, port_id, ofport = "a", 3, 1
    br.attach(P())
    br.apply(add=[parse_flow("priority=9,in_port=a,udp,nw_dst=10.0.0.0/24,tp_dst=53,"
                             "actions=strip_vlan")])
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 9, 9, 9, 10, 0, 0, 7])
    udp = (1000).to_bytes(2, "big") + (53).to_bytes(2, "big") + bytes(4)
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp
    assert br.cls.lookup(frame_key(frame, 3))[1] == [(4, 0)]
    assert br.cls.lookup(frame_key(frame, 4))[1] == []                # another port


def test_metadata_and_the_action_set():
    """write_metadata changes only the bits under its mask, a later table matches the
    metadata (masked); write-actions run at the end in the spec's order (pop, set VLAN,
    group, output; a group drops the output), the last written of a kind wins,
    clear_actions empties the set, a table miss drops the set but not applied actions."""
    cls = Classifier()
    any_key, none = pack_key({}), pack_key({})
    port = pack_key({"in_port": 0xFFFF})

    def md(mask, value):
        return any_key + md8(mask), none + md8(value)

    # table 0: metadata := 0x1100 (all bits), write output:1 and set_vlan:7
    cls.insert(0, 1, any_key, none, [(OP_OUTPUT, 9)], 1,
               ([(OP_OUTPUT, 1), (OP_SET_VLAN, 7)], False, (0x1100, U64)))
    # table 1: metadata low byte := 0x22 (keeps 0x1100), write strip_vlan, output:2 wins
    cls.insert(1, 1, *md(0xFF00, 0x1100), [], 2,
               ([(OP_OUTPUT, 2), (OP_STRIP_VLAN, 0)], False, (0x22, 0xFF)))
    # table 2: on 0x1122 exactly (both writes seen): apply flood, end
    t2 = cls.insert(2, 5, *md(U64, 0x1122), [(OP_FLOOD, 0)])
    cls.insert(2, 1, any_key, none, [(OP_CONTROLLER, 0)])
    hops, ops, mask, _ = cls.lookup(pack_key({"in_port": 1}))
    assert hops[-1] == (2, t2)
    assert ops == [(OP_OUTPUT, 9), (OP_FLOOD, 0),
                   (OP_STRIP_VLAN, 0), (OP_SET_VLAN, 7), (OP_OUTPUT, 2)]
    assert mask[KEY_SIZE:] == b"" and not any(mask)    # metadata is never in the megaflow
    # in_port 2: table 0 clears the set and writes a group: it replaces the output
    cls.insert(0, 9, port, pack_key({"in_port": 2}), [], 1,
               ([(OP_GROUP, 3)], True, (0x1100, 0xFF00)))
    hops, ops, _, _ = cls.lookup(pack_key({"in_port": 2}))
    assert ops == [(OP_FLOOD, 0), (OP_STRIP_VLAN, 0), (OP_GROUP, 3)]
    # in_port 3: metadata 0x2133: table 1 (0x11xx) misses: the set (set_vlan) is dropped
    cls.insert(0, 9, port, pack_key({"in_port": 3}), [(OP_OUTPUT, 4)], 1,
               ([(OP_SET_VLAN, 7)], False, (0x2133, U64)))
    assert cls.lookup(pack_key({"in_port": 3}))[1] == [(OP_OUTPUT, 4)]
    with pytest.raises(ValueError):                    # a meter is no action-set action
        cls.insert(0, 1, any_key, none, [], NO_GOTO_TABLE, ([(12, 1)], False, None))
    with pytest.raises(ValueError):                    # 33 ops in all
        cls.insert(0, 1, any_key, none, [(OP_OUTPUT, 1)] * 30, NO_GOTO_TABLE,
                   ([(OP_OUTPUT, 1)] * 3, False, None))


def test_a_rule_given_more_ops_than_it_has_room_for_is_replaced_in_place():
    """A rule is allocated with room for its own ops (at least 4, in steps of 4): a change
    to more ops puts a successor with room where it was (its id, its place in its value's
    chain and its bucket's), the old one waiting for reclaim; fewer ops change it where it
    is. Many values in one subtable (chains in buckets), three priorities per value; after every
    change each key finds what a reference finds."""
    rng = random.Random(7)
    cls = Classifier()
    mask = pack_key({"dl_type": 0xFFFF, "nw_dst": b"\xff\xff\xff\xff"})
    ref: dict[int, tuple[int, bytes, list]] = {}          # id -> (priority, address, ops)
    for i in range(60):
        addr = bytes([10, 0, 0, i])
        for prio in (30, 20, 10):
            ops = [(1, prio + i)]
            rid = cls.insert(0, prio, mask, pack_key({"dl_type": 0x0800, "nw_dst": addr}), ops)
            ref[rid] = (prio, addr, ops)

    def check():
        for i in range(60):
            addr = bytes([10, 0, 0, i])
            rules = [(p, rid) for rid, (p, a, _) in ref.items() if a == addr]
            key = pack_key({"dl_type": 0x0800, "nw_dst": addr, "nw_proto": 17})
            if not rules:
                assert cls.lookup(key)[0] == [], i
                continue
            best = max(rules)[1]
            assert cls.lookup(key)[:2] == ([(0, best)], ref[best][2]), i
        for rid, (prio, addr, _) in ref.items():           # found by id and by match
            value = pack_key({"dl_type": 0x0800, "nw_dst": addr})
            assert cls.rule(rid)[:2] == (0, prio) and cls.find_strict(0, prio, mask, value) == rid

    check()
    before = cls.memory()
    grown = rng.sample(sorted(ref), 40)
    changes = []
    for rid in grown:
        ops = [(1, rng.randrange(1, 1000)) for _ in range(rng.randrange(5, 33))]
        changes.append((rid, ops, NO_GOTO_TABLE))
        ref[rid] = (*ref[rid][:2], ops)
    cls.apply(changes=changes)
    assert cls.reclaimable                                   # the old rules wait
    # (room comes in steps of 4 ops, malloc's 16 bytes)
    assert cls.memory() == before + sum(4 * ((len(ops) + 3) // 4 * 4 - 4)
                                        for _, ops, _ in changes)
    check()
    assert len(cls.reclaim()) == 0 and not cls.reclaimable   # no rule removed
    check()
    # fewer ops: in place (nothing to reclaim), then more again, then removals
    cls.apply(changes=[(rid, [(1, 5)], NO_GOTO_TABLE) for rid in grown[:10]])
    for rid in grown[:10]:
        ref[rid] = (*ref[rid][:2], [(1, 5)])
    assert not cls.reclaimable
    check()
    gone = rng.sample(sorted(ref), 90)
    cls.apply(removes=gone)
    for rid in gone:
        del ref[rid]
    cls.reclaim()
    check()
    cls.apply(removes=sorted(ref))
    cls.reclaim()
    assert len(cls) == 0
