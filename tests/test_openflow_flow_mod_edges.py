"""FLOW_MOD where ports come and go, a batch the store undoes, and a MODIFY that selects
nothing, against a switch run in-process (the handler driven directly, FLOW_REMOVEDs
caught where they would be sent):
- a rule compiled again when a port it names comes or goes keeps its id, so what
  OpenFlow keeps by id (SEND_FLOW_REM) stays with it;
- rules naming a port that went are still selected by that port's number (DELETE,
  DELETE_STRICT, out_port), are given new actions by a MODIFY (their in_port is not
  checked again) and are reported with that number, as OVS does;
- a batch whose store write fails sends no FLOW_REMOVED for its undone deletes, and the
  rules that come back keep their flags;
- a MODIFY that selects no rule still has its instructions checked (OVS: against its own
  match)."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import struct

from pyvhost.openflow import codec as C
from pyvhost.openflow import errors as E
from pyvhost.openflow.handler import Handler
from pyvhost.openflow.manager import enable
from pyvhost.switch import Switch, run_command
from tests.harness import openflow as O

SEND_FLOW_REM = 1


def fm(*args, **kw) -> bytes:
    return O.flow_mod(*args, **kw)[8:]


def in_port(n: int) -> bytes:
    return O.match(O.oxm(0, struct.pack("!I", n)))


def ip_dst(addr: str) -> bytes:
    return O.match(O.oxm(5, struct.pack("!H", 0x800)), O.oxm(12, socket.inet_aton(addr)))


def out(n: int) -> bytes:
    return O.apply_actions(O.output(n))


def codes(errors: list) -> list:
    return [None if e is None else (e.type, e.code) for e in errors]


def run(tmp_path, scenario, ports=("a", "b", "c", "d")):
    """``scenario(sw, handler, removed)``: ports a, b, c, d are OpenFlow ports 1..4;
    ``removed`` gets the (reason, FLOW_REMOVED) of every one sent."""
    async def main():
        sw = Switch(tmp_path / "run")
        of = enable(sw)
        await sw.start()
        of.events.start()
        removed: list = []
        of.events._send = lambda bridge, t, reason, msg: \
            (removed.append((reason, msg)) if t == C.FLOW_REMOVED else None) or 1
        try:
            await run_command(sw, ["add-br", "br0"])
            for p in ports:
                await run_command(sw, ["add-port", "br0", p, "type=vhostuser"])
            await scenario(sw, Handler(sw, "br0", of._state("br0"), 1, of.events), removed)
        finally:
            await of.close()
            await sw.stop()

    asyncio.run(main())


def texts(sw) -> list[str]:
    return sorted(r.text for r in sw.bridges["br0"].rules.values())


def test_a_rule_compiled_again_keeps_its_id_and_send_flow_rem(tmp_path):
    async def scenario(sw, h, removed):
        assert h.flow_mods([fm(O.ADD, in_port(3), out(1), priority=10, flags=SEND_FLOW_REM),
                            fm(O.ADD, ip_dst("10.0.0.1"), out(3), priority=10,
                               flags=SEND_FLOW_REM)]) == [None, None]
        ids = {r.text: r.id for r in sw.bridges["br0"].rules.values()}
        await run_command(sw, ["del-port", "br0", "c"])       # both compile again
        assert {r.text: r.id for r in sw.bridges["br0"].rules.values()} == ids
        await run_command(sw, ["add-port", "br0", "c", "type=vhostuser"])
        assert {r.text: r.id for r in sw.bridges["br0"].rules.values()} == ids
        assert h.flow_mods([fm(O.DELETE, table=0xFF)]) == [None]
        assert len(removed) == 2                    # the flags were still theirs

    run(tmp_path, scenario)


def test_rules_naming_a_port_that_went_are_selected_by_its_number(tmp_path):
    async def scenario(sw, h, removed):
        assert h.flow_mods([fm(O.ADD, in_port(3), out(1), priority=10),
                            fm(O.ADD, in_port(3), out(2), priority=20),
                            fm(O.ADD, in_port(4), out(1), priority=10),
                            fm(O.ADD, ip_dst("10.0.0.1"), out(3), priority=10),
                            fm(O.ADD, ip_dst("10.0.0.2"), out(4), priority=10)]) == [None] * 5
        for port in ("c", "d"):                    # both compile to match no port now
            await run_command(sw, ["del-port", "br0", port])
        # a MODIFY of every rule takes them too (their in_port is not checked again)
        assert h.flow_mods([fm(O.MODIFY, in_port(4), out(2), table=0)]) == [None]
        assert "priority=10,in_port=4,actions=output:2" in texts(sw)
        assert h.flow_mods([fm(O.DELETE_STRICT, in_port(3), priority=10)]) == [None]
        assert "priority=10,in_port=3,actions=output:1" not in texts(sw)
        assert "priority=20,in_port=3,actions=output:2" in texts(sw)
        assert h.flow_mods([fm(O.DELETE, table=0xFF, out_port=3)]) == [None]
        assert not any("output:3" in t for t in texts(sw))
        assert any("output:4" in t for t in texts(sw))
        assert h.flow_mods([fm(O.DELETE, in_port(3), table=0xFF)]) == [None]
        assert texts(sw) == ["priority=0,actions=normal",
                             "priority=10,in_port=4,actions=output:2",
                             "priority=10,ip,nw_dst=10.0.0.2,actions=output:4"]
        # ctl's del-flows selects the same way
        assert await run_command(sw, ["del-flows", "br0", "in_port=4"]) == "1 flows deleted"

    run(tmp_path, scenario)


def failing_write(sw, n: int):
    """The store's ``n``-th change_flows from now fails (as a full disk); the real one."""
    real, calls = sw.store.change_flows, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            raise sqlite3.OperationalError("disk I/O error")
        return real(*args, **kw)

    sw.store.change_flows = failing
    return real


def test_an_undone_batch_sends_no_flow_removed_and_keeps_flags(tmp_path):
    """Whichever message's write fails (a later one, or the delete's own), the batch is
    undone whole: no FLOW_REMOVED for its deletes, every rule back with the flags it had
    (a modified one too), and no flags left for rules it added."""
    ip = O.match(O.oxm(5, struct.pack("!H", 0x800)))
    for fails in (3, 1):
        async def scenario(sw, h, removed, fails=fails):
            flagged = [fm(O.ADD, ip_dst(f"10.0.0.{i}"), out(1), priority=10,
                          flags=SEND_FLOW_REM) for i in (7, 8, 9)]
            assert h.flow_mods(flagged) == [None] * 3
            before = texts(sw)
            real = failing_write(sw, fails)
            try:
                got = h.flow_mods([fm(O.DELETE, ip, table=0xFF, out_port=1),   # 7, 8, 9
                                   fm(O.ADD, ip_dst("10.0.0.5"), out(1), priority=10,
                                      flags=SEND_FLOW_REM),
                                   fm(O.ADD, ip_dst("10.0.0.6"), out(1), priority=10)])
            finally:
                sw.store.change_flows = real
            assert codes(got) == [(E.FLOW_MOD_FAILED, E.FMFC_UNKNOWN)] * 3
            assert removed == []                   # the deletes were undone: nothing to say
            assert texts(sw) == before
            state = h.state
            assert sorted(f for _, f in state.rule_flags.values()) == [SEND_FLOW_REM] * 3
            assert all(state.flags_of(sw.bridges["br0"].rules[i]) for i in state.rule_flags)
            assert h.flow_mods([fm(O.DELETE, table=0xFF)]) == [None]
            assert len(removed) == 3               # their SEND_FLOW_REM came back with them

        run(tmp_path / str(fails), scenario)


def test_modify_reset_counts_of_a_rule_naming_a_port_that_went(tmp_path):
    """MODIFY with RESET_COUNTS compiles the rules again: one whose in_port went is
    taken too, and the batch around it stands."""
    async def scenario(sw, h, removed):
        assert h.flow_mods([fm(O.ADD, in_port(3), out(1), priority=10)]) == [None]
        await run_command(sw, ["del-port", "c"])
        got = h.flow_mods([fm(O.ADD, ip_dst("10.0.0.9"), out(1), priority=10),
                           fm(O.MODIFY, in_port(3), out(2), table=0, flags=4)])
        assert got == [None, None]
        assert "priority=10,in_port=3,actions=output:2" in texts(sw)
        assert "priority=10,ip,nw_dst=10.0.0.9,actions=output:1" in texts(sw)

    run(tmp_path, scenario)


def test_a_modify_selecting_nothing_still_checks_its_instructions(tmp_path):
    async def scenario(sw, h, removed):
        nothing = ip_dst("10.9.9.9")
        assert codes(h.flow_mods([fm(O.MODIFY, nothing, out(9), table=0)])) == \
            [(E.BAD_ACTION, E.BAC_BAD_OUT_PORT)]
        assert codes(h.flow_mods([fm(O.MODIFY, nothing, O.goto(0), table=0)])) == \
            [(E.BAD_INSTRUCTION, E.BIC_BAD_TABLE_ID)]
        assert h.flow_mods([fm(O.MODIFY, nothing, out(2), table=0)]) == [None]
        assert texts(sw) == ["priority=0,actions=normal"]

    run(tmp_path, scenario)


def test_a_rule_deleted_and_added_again_in_one_batch_keeps_its_new_flags(tmp_path):
    """The batch's FLOW_REMOVED goes out after its commit; the rule added again meanwhile
    (it may have the deleted one's id) keeps the SEND_FLOW_REM it was given."""
    async def scenario(sw, h, removed):
        add = fm(O.ADD, ip_dst("10.0.0.7"), out(1), priority=10, flags=SEND_FLOW_REM)
        assert h.flow_mods([add]) == [None]
        assert h.flow_mods([fm(O.DELETE_STRICT, ip_dst("10.0.0.7"), priority=10), add]) == \
            [None, None]
        assert len(removed) == 1
        assert h.flow_mods([fm(O.DELETE, table=0xFF)]) == [None]
        assert len(removed) == 2

    run(tmp_path, scenario)


def test_a_port_that_went_is_reported_by_its_number(tmp_path):
    """FLOW_REMOVED of a rule whose in_port went carries that port's number (it had 0)."""
    async def scenario(sw, h, removed):
        assert h.flow_mods([fm(O.ADD, in_port(3), out(1), priority=10,
                               flags=SEND_FLOW_REM)]) == [None]
        await run_command(sw, ["del-port", "c"])
        assert h.flow_mods([fm(O.DELETE, in_port(3), table=0xFF)]) == [None]
        [(_, msg)] = removed
        assert struct.pack("!II", 0x80000004, 3) in msg       # OXM in_port = 3

    run(tmp_path, scenario)
