"""The PMD's megaflow cache (pyvhost._flow: mf_insert, mf_lookup, mf_hint): an answer is
always the latest valid decision cached for a (mask, masked key) the probe matches, and the
cache stays consistent (tags, entries, free list, counts: checked after every step); under
the limit nothing is evicted, not even when more keys than a neighbourhood holds share a
home slot (the table grows instead); a lookup with the hint a burst computes for its frame
answers what one without it does, the hint is used (the right mask with a wrong hash
misses), and a hint gone stale or made up can cost a miss but never a wrong answer."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost._flow import megaflow_hash, megaflow_run, pack_key

ONES4 = b"\xff" * 4
MASKS = [pack_key(m) for m in (
    {"in_port": 0xFFFF},
    {"in_port": 0xFFFF, "nw_src": ONES4},
    {"in_port": 0xFFFF, "nw_src": ONES4, "tp_dst": 0xFFFF},
    {"tp_dst": 0xFFFF},
)]
ADDRS = [bytes([10, 0, 0, i]) for i in (1, 2, 3)]
KEYS = [pack_key({"in_port": port, "nw_src": addr, "tp_dst": tp, "dl_type": 0x0800})
        for port in (1, 2, 3) for addr in ADDRS for tp in (53, 80, 443)]


def masked(key: bytes, mask: bytes) -> bytes:
    return bytes(k & m for k, m in zip(key, mask, strict=True))


def right_answers(cached: dict, key: bytes) -> set:
    """The tags a sound cache may answer for ``key``: one per mask it matches."""
    return {tag for (mask, mkey), tag in cached.items() if masked(key, mask) == mkey}


def test_every_entry_is_found_again_after_the_table_grew():
    mask = pack_key({"nw_src": ONES4, "tp_dst": 0xFFFF})
    keys = [pack_key({"nw_src": i.to_bytes(4, "big"), "tp_dst": 80}) for i in range(3000)]
    ops = [("insert", k, mask, i) for i, k in enumerate(keys)]
    ops += [("lookup", k, hinted) for k in keys for hinted in (False, True)]
    answers, (count, slots, masks, evictions) = megaflow_run(ops)
    assert answers == [i for i in range(3000) for _ in (0, 1)]
    assert (count, masks, evictions) == (3000, 1, 0)
    assert slots > 4096                               # it grew (from 4096, half full at most)


def test_keys_sharing_a_home_slot_grow_the_table_instead_of_evicting():
    mask = pack_key({"nw_src": ONES4})
    homes: dict[int, list[bytes]] = {}
    for i in range(200000):
        key = pack_key({"nw_src": i.to_bytes(4, "big")})
        home = homes.setdefault(megaflow_hash(key, mask) % 4096, [])
        home.append(key)
        if len(home) == 12:                          # 12 keys for one 8-slot neighbourhood
            break
    assert len(home) == 12
    ops = [("insert", k, mask, i) for i, k in enumerate(home)]
    ops += [("lookup", k, hinted) for k in home for hinted in (False, True)]
    answers, (count, slots, _masks, evictions) = megaflow_run(ops)
    assert answers == [i for i in range(12) for _ in (0, 1)]
    assert (count, evictions) == (12, 0) and slots > 4096


def test_the_hint_is_used_and_a_made_up_one_only_misses():
    mask = pack_key({"nw_src": ONES4})
    key = pack_key({"nw_src": bytes([10, 0, 0, 1])})
    h = megaflow_hash(key, mask)                     # the first mask is id 0: hint id 1
    answers, _ = megaflow_run([("insert", key, mask, 7), ("lookup_raw", key, 1 << 32 | h),
                               ("lookup_raw", key, 1 << 32 | (h ^ 1)),
                               ("lookup_raw", key, 2 << 32 | (h ^ 1)),
                               ("lookup_raw", key, 0)])
    assert answers == [7, None, 7, 7]     # a wrong hash for mask 0 misses it; another id's
                                          # hint, or none, leaves mask 0 to be hashed


def test_a_hint_kept_across_growth_answers_rightly():
    mask = pack_key({"nw_src": ONES4})
    keys = [pack_key({"nw_src": i.to_bytes(4, "big")}) for i in range(3000)]
    ops = [("insert", keys[0], mask, 0), ("hint", keys[0])]
    ops += [("insert", k, mask, i) for i, k in enumerate(keys) if i]
    answers, (_count, slots, _masks, _evictions) = megaflow_run(ops + [("lookup_kept", keys[0])])
    assert slots > 4096 and answers == [0]


def test_a_full_cache_evicts_and_never_answers_an_evicted_decision():
    mask = pack_key({"nw_src": ONES4})
    keys = [pack_key({"nw_src": i.to_bytes(4, "big")}) for i in range(64)]
    ops = [("insert", k, mask, i) for i, k in enumerate(keys)]
    ops += [("lookup", k, True) for k in keys]
    answers, (count, _slots, _masks, evictions) = megaflow_run(ops, limit=16)
    assert count == 16 and evictions == 48
    assert sum(a is not None for a in answers) == 16
    assert all(a is None or a == i for i, a in enumerate(answers))


op = st.one_of(
    st.tuples(st.just("insert"), st.sampled_from(KEYS), st.sampled_from(MASKS),
              st.integers(0, 1000)),
    st.tuples(st.just("lookup"), st.sampled_from(KEYS)),
    st.tuples(st.just("hint"), st.sampled_from(KEYS)),
    st.tuples(st.just("invalidate"), st.integers(0, 1000)),
    st.tuples(st.just("lookup_raw"), st.sampled_from(KEYS), st.integers(0, 2**64 - 1)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60), st.sampled_from([4, 100000]))
def test_answers_are_sound_and_hints_change_nothing(ops, limit):
    run, checks, model, kept, invalid = [], [], {}, None, set()

    def right(key):
        return right_answers(model, key) - invalid

    for o in ops:
        if o[0] == "insert":
            run.append(o)
            model[(o[2], masked(o[1], o[2]))] = o[3]
        elif o[0] == "hint":
            run.append(o)
            kept = o[1]
        elif o[0] == "invalidate":
            run.append(o)
            invalid.add(o[1])
        elif o[0] == "lookup_raw":
            run.append(o)
            checks.append(("kept", o[1], right(o[1])))   # any hint: sound, maybe a miss
        else:
            run += [("lookup", o[1], False), ("lookup", o[1], True)]
            checks.append(("fresh", o[1], right(o[1])))
            if kept is not None:                     # the hint kept earlier, maybe stale now
                run.append(("lookup_kept", kept))
                checks.append(("kept", kept, right(kept)))
    answers, (count, _slots, _masks, _evictions) = megaflow_run(run, limit=limit)
    it = iter(answers)
    for kind, key, right in checks:
        if kind == "fresh":
            plain, hinted = next(it), next(it)
            assert plain == hinted, (key, plain, hinted)     # a fresh hint changes nothing
            assert plain is None or plain in right, (key, plain, right)
            if limit >= len(KEYS) * len(MASKS):      # nothing evicted: a match is found
                assert (plain is None) == (not right), (key, plain, right)
        else:
            answer = next(it)
            assert answer is None or answer in right, (key, answer, right)
    assert next(it, "end") == "end"
    assert count <= limit
