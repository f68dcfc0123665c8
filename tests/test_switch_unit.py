"""The switch's slow path and control plane without peers: the ovs-ofctl rule syntax,
MAC learning, bridge classification, the compiled key extraction, the store, and the
commands of ``pyvhost ctl`` against a switch run in-process and as a process."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys

import pytest

from pyvhost._flow import frame_key, key_dict
from pyvhost.switch import CommandError, Switch, read_config, run_command
from pyvhost.switch.bridge import NO_RULE, OP_FLOOD, OP_OUTPUT, OP_SET_VLAN, Bridge
from pyvhost.switch.fdb import Fdb
from pyvhost.switch.flows import FlowSyntaxError, covers, key_matches, parse_flow, parse_match
from tests.harness import processes

MAC1, MAC2 = bytes.fromhex("525400000001"), bytes.fromhex("525400000002")


def icmp_frame(src=MAC1, dst=MAC2, vlan=None) -> bytes:
    tag = b"\x81\x00" + vlan.to_bytes(2, "big") if vlan is not None else b""
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    return dst + src + tag + b"\x08\x00" + ip + bytes([8, 0, 0, 0, 0, 0, 0, 0])


def udp_frame(sport=1000, dport=53) -> bytes:
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    return MAC2 + MAC1 + b"\x08\x00" + ip + sport.to_bytes(2, "big") + dport.to_bytes(2, "big") \
        + bytes(4)


# -- flow syntax ----------------------------------------------------------------------------

def test_parse_flow_round_trip():
    f = parse_flow("priority=10,in_port=vm1,icmp,nw_dst=10.0.0.0/24,actions=mod_vlan_vid:5,"
                   "output:vm2")
    assert f.priority == 10
    assert f.match == {"in_port": "vm1", "dl_type": 0x0800, "nw_proto": 1,
                       "nw_dst": ipaddress.IPv4Network("10.0.0.0/24")}
    assert f.actions == [("mod_vlan_vid", 5), ("output", "vm2")]
    assert parse_flow(f.format()) == f
    assert parse_flow("actions=normal").priority == 32768


@pytest.mark.parametrize("text", [
    "in_port=1", "actions=jump", "foo=1,actions=drop", "nw_proto=300,actions=drop",
    "dl_src=zz:00:00:00:00:00,actions=drop", "nw_dst=10.0.0.300,actions=drop",
    "actions=drop,output:1", "actions=output:", "priority=x,actions=drop", "tcp6,actions=drop",
])
def test_parse_flow_rejects(text):
    with pytest.raises(FlowSyntaxError):
        parse_flow(text)


def test_key_extraction_and_matching():
    key = key_dict(frame_key(udp_frame(), in_port=7))
    assert key["in_port"] == 7 and key["nw_proto"] == 17 and key["tp_dst"] == 53
    assert key_matches(parse_match("udp,tp_dst=53,nw_src=10.0.0.0/8"), key, 7)
    assert not key_matches(parse_match("udp,tp_dst=54"), key, 7)
    assert not key_matches(parse_match("icmp"), key, 7)
    tagged = key_dict(frame_key(icmp_frame(vlan=42)))
    assert tagged["dl_vlan"] == 42 and tagged["nw_proto"] == 1
    assert key_matches(parse_match("dl_vlan=42,icmp"), tagged, 0)
    short = key_dict(frame_key(b"\x01\x02"))
    assert short["dl_type"] == 0                           # a runt is a key, not a crash
    assert covers(parse_match("icmp"), parse_match("icmp,in_port=1"))
    assert not covers(parse_match("udp"), parse_match("icmp"))


# -- learning and classification ------------------------------------------------------------

def test_fdb_learn_move_age():
    fdb = Fdb(aging=10)
    assert fdb.learn(0, MAC1, "a", 1, now=0)
    assert not fdb.learn(0, MAC1, "a", 1, now=1)
    assert fdb.learn(0, MAC1, "b", 2, now=2)               # moved
    assert fdb.lookup(0, MAC1) == 2 and fdb.lookup(5, MAC1) is None
    assert not fdb.learn(0, b"\x01" + MAC1[1:], "a", 1)    # multicast source
    assert fdb.expire(now=20) == 1 and fdb.lookup(0, MAC1) is None


class FakePort:
    def __init__(self, name, port_id, ofport):
        self.name, self.port_id, self.ofport = name, port_id, ofport


def test_bridge_classify_normal_rules_and_invalidation():
    changes = []
    br = Bridge("br0", 0, lambda: changes.append(1))
    p1, p2 = FakePort("p1", 10, 1), FakePort("p2", 11, 2)
    br.ports = {"p1": p1, "p2": p2}
    br.add_rule(parse_flow("priority=0,actions=normal"), slot=0, now=0)
    k12 = key_dict(frame_key(icmp_frame(MAC1, MAC2), 10))
    assert br.classify(k12, p1)[:2] == (0, [(OP_FLOOD, 0)])    # MAC2 unknown yet
    k21 = key_dict(frame_key(icmp_frame(MAC2, MAC1), 11))
    n = len(changes)
    assert br.classify(k21, p2)[:2] == (0, [(OP_OUTPUT, 10)])  # learned MAC1 behind p1
    assert len(changes) == n + 1                           # learning MAC2 invalidated
    br.add_rule(parse_flow("priority=100,icmp,actions=mod_vlan_vid:3,output:2"), 1, 0)
    assert br.classify(k12, p1)[:2] == (1, [(OP_SET_VLAN, 3), (OP_OUTPUT, 11)])
    br.add_rule(parse_flow("priority=200,in_port=p1,actions=drop"), 2, 0)
    slot, ops, fields = br.classify(k12, p1)
    assert (slot, ops) == (2, []) and fields == {"in_port"}   # nothing else looked at
    assert len(br.remove_rules(parse_match("in_port=1"))) == 1    # by ofport number
    br.remove_rules(None)
    assert br.classify(k12, p1) == (NO_RULE, [], frozenset())   # empty table: drop
    with pytest.raises(ValueError):
        br.add_rule(parse_flow("actions=output:nope"), 3, 0)


# -- control plane --------------------------------------------------------------------------

def test_read_config():
    assert read_config("# c\nadd-br br0\n\nadd-flow br0 'priority=1, actions=drop'  # x\n") == [
        ["add-br", "br0"], ["add-flow", "br0", "priority=1, actions=drop"]]


def test_switch_commands_and_persistence(tmp_path):
    async def scenario():
        sw = Switch(tmp_path / "run")
        await sw.start()
        try:
            for argv in (["add-br", "br0"], ["add-port", "br0", "a", "type=vhostuser", "queues=2"],
                         ["add-port", "br0", "b", "type=vhostuser"],
                         ["add-flow", "br0", "priority=7,in_port=a,actions=output:b"],
                         ["set-policing", "a", "rate=1000", "burst=100"],
                         ["set-qos", "b", "max-rate=5000"]):
                assert await run_command(sw, argv) == ""
            for bad in (["add-br", "br0"], ["add-port", "nobr", "x", "type=vhostuser"],
                        ["add-port", "br0", "x", "type=tap"], ["add-port", "br0", "x"],
                        ["add-flow", "br0", "in_port=zz,actions=drop"], ["dump-flows", "nobr"],
                        ["add-flow", "br0", "actions=bogus"], ["set-policing", "a", "rate=x"],
                        ["add-port", "br0", "c", "type=vhostuserclient"], ["frobnicate"],
                        ["add-port", "br0", "a", "type=vhostuser"], ["del-port", "nope"]):
                with pytest.raises(CommandError):
                    await run_command(sw, bad)
            show = await run_command(sw, ["show"])
            assert "Port a" in show and "queues: 2" in show
            rxq = await run_command(sw, ["pmd-rxq-show"])
            assert rxq.count("port: a") == 2 and rxq.count("port: b") == 8
        finally:
            await sw.stop()
        sw = Switch(tmp_path / "run")                      # restart: the store restores
        await sw.start()
        try:
            flows = await run_command(sw, ["dump-flows", "br0"])
            assert "priority=7,in_port=a actions=output:b" in flows
            assert "priority=0 actions=normal" in flows
            assert sw.store.qos() == {"a": (1000, 100, 0), "b": (0, 0, 5000)}
            await run_command(sw, ["del-port", "br0", "b"])
            await run_command(sw, ["del-br", "br0"])
            assert await run_command(sw, ["show"]) == ""
        finally:
            await sw.stop()

    asyncio.run(scenario())


def test_ctl_cli_exit_codes(workdir):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config="add-br br0\n")
    try:
        def ctl(*argv):
            return subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "ctl", "--control",
                                   str(run_dir / "ctl.sock"), *argv], capture_output=True,
                                  text=True, timeout=30)
        ok = ctl("show")
        assert ok.returncode == 0 and "Bridge br0" in ok.stdout
        bad = ctl("add-flow", "br0", "actions=explode")
        assert bad.returncode == 1 and "unknown action" in bad.stderr
        unknown = ctl("no-such-command")
        assert unknown.returncode == 1 and "unknown command" in unknown.stderr
        gone = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "ctl", "--control",
                               str(workdir / "nope.sock"), "show"], capture_output=True,
                              text=True, timeout=30)
        assert gone.returncode == 2 and "cannot reach" in gone.stderr
    finally:
        assert sw.stop() == 0
