"""TABLE_FEATURES says what the switch takes, and TABLE_MOD gets the 1.3 spec's answer:
every table's reply holds the 8 required properties once each (instructions, next tables,
write/apply actions, match, wildcards, write/apply set-field), padded, and each list is
exactly what the decoders accept (an instruction, action, match field or set-field the
reply lists is taken; one it does not list is refused); TABLE_MOD with the deprecated
table-miss bits is taken and changes nothing, other bits are BAD_CONFIG."""

from __future__ import annotations

import struct

import pytest

from pyvhost._classifier import TABLES
from pyvhost.openflow import actions as A
from pyvhost.openflow import errors as E
from pyvhost.openflow import multipart as M
from pyvhost.openflow import oxm
from pyvhost.openflow.errors import OFError
from tests.harness import openflow as O
from tests.test_openflow_codec import running  # noqa: F401 (a fixture)

REQUIRED = (M.TFPT_INSTRUCTIONS, M.TFPT_NEXT_TABLES, M.TFPT_WRITE_ACTIONS,
            M.TFPT_APPLY_ACTIONS, M.TFPT_MATCH, M.TFPT_WILDCARDS, M.TFPT_WRITE_SETFIELD,
            M.TFPT_APPLY_SETFIELD)
INSTRUCTION_SAMPLES = {
    A.IT_GOTO_TABLE: O.goto(TABLES - 1),
    A.IT_WRITE_METADATA: struct.pack("!HH4xQQ", 2, 24, 1, 1),
    A.IT_WRITE_ACTIONS: struct.pack("!HH4x", 3, 8),
    A.IT_APPLY_ACTIONS: O.apply_actions(O.output(1)),
    A.IT_CLEAR_ACTIONS: struct.pack("!HH4x", 5, 8),
    A.IT_METER: struct.pack("!HHI", 6, 8, 1),
}
ACTION_SAMPLES = {             # (action, the match it needs)
    A.AT_OUTPUT: (O.output(1), {}),
    11: (struct.pack("!HH4x", 11, 8), {}),                      # COPY_TTL_OUT
    15: (struct.pack("!HHB3x", 15, 8, 3), {}),                  # SET_MPLS_TTL
    A.AT_PUSH_VLAN: (struct.pack("!HHH2x", 17, 8, 0x8100), {"dl_vlan": 0xFFFF}),
    A.AT_POP_VLAN: (struct.pack("!HH4x", 18, 8), {"dl_vlan": 5}),
    19: (struct.pack("!HHH2x", 19, 8, 0x8847), {}),             # PUSH_MPLS
    A.AT_GROUP: (struct.pack("!HHI", 22, 8, 1), {}),
    23: (struct.pack("!HHB3x", 23, 8, 3), {}),                  # SET_NW_TTL
    24: (struct.pack("!HH4x", 24, 8), {}),                      # DEC_NW_TTL
    A.AT_SET_FIELD: (struct.pack("!HHIH6x", 25, 16, oxm.header(oxm.VLAN_VID, 2), 0x1005),
                     {"dl_vlan": 5}),
}


def props_of(entry: bytes) -> dict[int, bytes]:
    length, = struct.unpack_from("!H", entry)
    assert length == len(entry) and length % 8 == 0
    out: dict[int, bytes] = {}
    off = M.TABLE_FEATURES_HEAD.size
    while off < length:
        ptype, plen = struct.unpack_from("!HH", entry, off)
        assert plen >= 4 and ptype not in out
        out[ptype] = entry[off + 4:off + plen]
        off += (plen + 7) // 8 * 8
    assert off == length
    return out


def _ids(data: bytes, fmt: str = "!HH") -> list[int]:
    size = struct.calcsize(fmt)
    return [struct.unpack_from(fmt, data, i)[0] for i in range(0, len(data), size)]


@pytest.mark.parametrize("table", [0, 1, TABLES - 1])
def test_table_features_list_exactly_what_the_switch_takes(table):
    props = props_of(M.table_features(table))
    assert set(props) == set(REQUIRED)
    assert list(props[M.TFPT_NEXT_TABLES]) == list(range(table + 1, TABLES))
    listed = set(_ids(props[M.TFPT_INSTRUCTIONS]))
    for itype, sample in INSTRUCTION_SAMPLES.items():
        ok = True
        try:
            A.decode_flow_instructions(sample, table if itype != A.IT_GOTO_TABLE else 0, {})
        except OFError as e:
            ok = e.type == E.METER_MOD_FAILED            # (no meter 1: but it is taken)
        if itype == A.IT_GOTO_TABLE and table == TABLES - 1:
            ok = False                                   # (no later table)
        assert ok == (itype in listed), (table, itype, listed)
    assert props[M.TFPT_WRITE_ACTIONS] == props[M.TFPT_APPLY_ACTIONS]   # the same, in the set
    listed = set(_ids(props[M.TFPT_APPLY_ACTIONS]))
    for atype, (sample, match) in ACTION_SAMPLES.items():
        try:
            A.decode_actions(sample, match)
            ok = True
        except OFError:
            ok = False
        assert ok == (atype in listed), (atype, listed)
    match_fields = _ids(props[M.TFPT_MATCH], "!I")
    wild = _ids(props[M.TFPT_WILDCARDS], "!I")
    assert {h & ~0x1FF for h in match_fields} == {h & ~0x1FF for h in wild}
    for h in match_fields:                               # a mask listed: a mask taken
        field, hasmask, length = oxm.key(h), h >> 8 & 1, h & 0xFF
        assert oxm.SUPPORTED[field] == bool(hasmask)
        assert length == oxm.SIZES[field] * (2 if hasmask else 1)
    assert props[M.TFPT_WRITE_SETFIELD] == props[M.TFPT_APPLY_SETFIELD]
    head = struct.unpack_from("!HB5x32sQQII", M.table_features(table))
    assert head[3] == head[4] == (1 << 64) - 1           # metadata: every bit matched, written
    for h in _ids(props[M.TFPT_APPLY_SETFIELD], "!I"):
        size = h & 0xFF
        value = (0x1005).to_bytes(2, "big") if oxm.key(h) == oxm.VLAN_VID else \
            bytes(size)
        body = struct.pack("!I", h) + value
        act = struct.pack("!HH", 25, (4 + len(body) + 7) // 8 * 8) + body
        act += bytes((8 - len(act) % 8) % 8)
        proto = 17 if oxm.key(h) in (oxm.UDP_SRC, oxm.UDP_DST) else 6
        A.decode_actions(act, {"dl_vlan": 5, "dl_type": 0x0800, "nw_proto": proto})  # taken


def test_table_mod_answers_as_the_spec(running):  # noqa: F811
    with running.client() as c:
        for table, config, want in ((0, 0, None), (0xFF, 3, None), (TABLES - 1, 2, None),
                                    (0, 4, (E.TABLE_MOD_FAILED, E.TMFC_BAD_CONFIG)),
                                    (3, 0x80000000, (E.TABLE_MOD_FAILED, E.TMFC_BAD_CONFIG))):
            c.send(O.msg(17, struct.pack("!B3xI", table, config), xid=5))
            c.send(O.msg(O.BARRIER_REQUEST, xid=6))
            t, xid, body = c.recv()
            if want is None:
                assert (t, xid) == (O.BARRIER_REPLY, 6), (table, config, t, body)
            else:
                assert (t, xid) == (O.ERROR, 5) and struct.unpack_from("!HH", body) == want
                assert c.recv()[:2] == (O.BARRIER_REPLY, 6)
        t, _, body = c.request(O.msg(17, b"\x00" * 4))
        assert t == O.ERROR and struct.unpack_from("!HH", body) == (E.BAD_REQUEST,
                                                                    E.BRC_BAD_LEN)
