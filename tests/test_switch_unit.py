"""The switch's slow path and control plane without peers: the ovs-ofctl rule syntax,
MAC learning, bridge classification, the compiled key extraction, the store, and the
commands of ``pyvhost ctl`` against a switch run in-process and as a process."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import ipaddress
import socket
import subprocess
import sys

import pytest

from pyvhost._classifier import Classifier
from pyvhost._fdb import MacTable
from pyvhost._flow import frame_key, key_dict
from pyvhost.switch import CommandError, Switch, read_config, run_command
from pyvhost.switch.bridge import OP_NORMAL, OP_OUTPUT, OP_SET_VLAN, Bridge
from pyvhost.switch.bulk import collector_paused
from pyvhost.switch.flows import (
    INSTRUCTIONS_CACHED,
    FlowSyntaxError,
    Prefix,
    match_key,
    parse_flow,
    parse_match,
    parse_selector,
    split_canonical,
)
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
                       "nw_dst": Prefix(bytes([10, 0, 0, 0]), 24)}
    assert f.actions == (("mod_vlan_vid", 5), ("output", "vm2"))
    assert parse_flow(f.format()) == f
    assert parse_flow("actions=normal").priority == 32768
    g = parse_flow("table=3,cookie=0x1f,idle_timeout=5,hard_timeout=9,priority=7,udp,"
                   "tp_dst=0x0050/0xfff0,dl_dst=01:00:00:00:00:00/01:00:00:00:00:00,"
                   "actions=strip_vlan,goto_table:4")
    assert (g.table, g.cookie, g.idle_timeout, g.hard_timeout, g.goto_table) == (3, 31, 5, 9, 4)
    h = parse_flow("in_port=01,actions=output:002")         # one spelling per port number
    assert h.match["in_port"] == "1" and h.actions == (("output", "2"),)
    assert parse_flow(g.format()) == g


def test_format_round_trips_random_flows():
    """parse(format(f)) == f and format is a fixed point, over random combinations of
    the match fields and shorthands (the canonical text is what rules are kept as)."""
    import random
    rng = random.Random(7)
    l3 = ["ip", "tcp", "udp", "icmp", "arp", "dl_type=0x0800,nw_proto=47", "dl_type=0x86dd",
          "dl_type=0x0800", "dl_type=0x0800,nw_proto=6"]
    for _ in range(500):
        pool = [rng.choice(["in_port=p1", "in_port=3"]),
                rng.choice(["dl_vlan=5", "dl_vlan=0xffff"]), "dl_src=02:00:00:00:00:01",
                "dl_dst=01:00:00:00:00:00/01:00:00:00:00:00"]
        parts = rng.sample(pool, rng.randint(0, 3))
        kind = rng.choice(l3)
        parts.append(kind)
        if kind not in ("dl_type=0x86dd",):
            parts.append(rng.choice(["nw_src=10.0.0.0/8", "nw_dst=192.168.1.7", ""]))
        if kind not in ("dl_type=0x86dd", "arp"):
            parts.append(rng.choice(["nw_tos=4", ""]))
        if kind in ("tcp", "udp", "dl_type=0x0800,nw_proto=6"):
            parts.append(rng.choice(["tp_dst=80", "tp_src=0x1000/0xf000", ""]))
        rng.shuffle(parts)
        f = parse_flow(f"priority={rng.randint(0, 65535)},{','.join(p for p in parts if p)},"
                       f"actions=output:p2")
        assert parse_flow(f.format()) == f, f.format()
        assert parse_flow(f.format()).format() == f.format()


@pytest.mark.parametrize("text", [
    "10.1.2.3", "10.1.2.3/32", "10.1.2.3/0", "10.1.2.3/8", "0.0.0.0/0", "255.255.255.255",
    "10.1.2.3/255.255.0.0", "010.1.2.3", "10.1.2.256", "10.1.2", "10.1.2.3/33", "10.1.2.3/",
    "10.1.2.3/08", "1.2.3.4.5", "１.2.3.4", "+1.2.3.4", " 1.2.3.4",
])
def test_prefix_parse_agrees_with_ipaddress(text):
    """The quick path for plain addresses answers exactly what ipaddress does (the
    same prefix, or an error). (A netmask that is no prefix, which ipaddress refuses, is
    a mask here, as in OVS: test_a_netmask_means_what_ovs_means.)"""
    try:
        net = ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        with pytest.raises(ValueError):
            Prefix.parse(text)
        return
    assert Prefix.parse(text) == Prefix(net.network_address.packed, net.prefixlen)


def test_split_canonical_is_format_spec_and_body():
    """dump-flows takes a stored rule text apart without parsing it: the same head fields
    and body the parsed flow prints."""
    for text in ["actions=drop", "priority=0,actions=normal",
                 "table=3,cookie=0x1f,idle_timeout=5,hard_timeout=9,priority=7,udp,"
                 "tp_dst=0x0050/0xfff0,actions=strip_vlan,goto_table:4",
                 "cookie=0xffffffffffffffff,in_port=p1,ip,nw_dst=10.0.0.0/8,actions=output:p2"]:
        f = parse_flow(text)
        head, body = split_canonical(f.format())
        assert body == f.format_body()
        assert "".join(f"{k}={v}, " for k, v in head.items()) + body == f.format_spec()
        assert int(head.get("cookie", "0"), 0) == f.cookie
        assert int(head.get("table", "0")) == f.table


def test_action_names_are_case_insensitive_as_in_ovs():
    """ovs-ofctl takes actions=NORMAL as actions=normal (OVS compares action names without
    case); port names stay as written."""
    for upper, lower in [("actions=NORMAL", "actions=normal"), ("actions=FLOOD", "actions=flood"),
                         ("actions=Strip_Vlan,OUTPUT:p2", "actions=strip_vlan,output:p2"),
                         ("actions=DROP", "actions=drop"), ("actions=Controller:64",
                                                             "actions=controller:64"),
                         ("actions=output:CONTROLLER:128", "actions=controller:128"),
                         ("actions=output:IN_PORT", "actions=in_port"),
                         ("actions=output:controller", "actions=CONTROLLER")]:
        assert parse_flow(upper) == parse_flow(lower)
    assert parse_flow("actions=output:P2") != parse_flow("actions=output:p2")


@pytest.mark.parametrize("text", [
    "in_port=1", "actions=jump", "foo=1,actions=drop", "nw_proto=300,actions=drop",
    "dl_src=zz:00:00:00:00:00,actions=drop", "nw_dst=10.0.0.300,actions=drop",
    "actions=drop,output:1", "actions=output:", "priority=x,actions=drop", "tcp6,actions=drop",
    "tp_dst=80,actions=drop", "nw_dst=10.0.0.1,actions=drop", "ip,tp_src=1,actions=drop",
    "table=2,actions=goto_table:1", "actions=goto_table:1,output:2", "table=300,actions=drop",
    "dl_vlan=5000,actions=drop", "actions=" + ",".join(["strip_vlan"] * 33),
    "ip,ip,nw_src=1.2.3.4,nw_src=1.2.3.5,actions=drop",
])
def test_parse_flow_rejects(text):
    with pytest.raises(FlowSyntaxError):
        parse_flow(text)


def test_a_netmask_means_what_ovs_means():
    """ADDR/NETMASK matches the netmask's 1 bits (ovs-ofctl): a contiguous one is the prefix
    it spells; any other matches those bits, written back as ADDR/NETMASK with the other
    bits cleared. (Python's ipaddress reads 0.0.255.255 as a Cisco host mask, /16: the rule
    silently matched the other half of the address.)"""
    assert parse_flow("ip,nw_dst=10.1.2.3/255.255.0.0,actions=drop") == \
        parse_flow("ip,nw_dst=10.1.0.0/16,actions=drop")
    assert parse_flow("ip,nw_src=10.1.2.3/255.255.255.255,actions=drop") == \
        parse_flow("ip,nw_src=10.1.2.3,actions=drop")
    assert parse_flow("ip,nw_src=10.1.2.3/0.0.0.0,actions=drop") == \
        parse_flow("ip,nw_src=0.0.0.0/0,actions=drop")
    assert parse_flow("tun_src=10.1.2.3/255.255.255.0,actions=drop") == \
        parse_flow("tun_src=10.1.2.0/24,actions=drop")
    for mask, addr in (("0.0.255.255", "0.0.0.7"), ("255.0.255.0", "10.0.0.0"),
                       ("0.0.0.255", "0.0.0.7"), ("255.255.0.255", "10.0.0.7")):
        f = parse_flow(f"ip,nw_dst=10.0.0.7/{mask},actions=drop")
        assert f.match["nw_dst"] == Prefix(socket.inet_aton(addr), -1, socket.inet_aton(mask))
        assert f.match["nw_dst"].mask == socket.inet_aton(mask)
        assert f.format() == f"priority=32768,ip,nw_dst={addr}/{mask},actions=drop"
        assert parse_flow(f.format()) == f
    assert parse_flow("tun_src=10.1.2.3/255.0.255.0,actions=drop").match["tun_src"] == \
        Prefix(socket.inet_aton("10.0.2.0"), -1, socket.inet_aton("255.0.255.0"))
    with pytest.raises(FlowSyntaxError, match="one address"):
        parse_flow("ip,actions=set_field:10.0.0.7/255.0.255.0->ip_dst,output:p2")
    for bad in ("10.0.0.7/255.255.0", "10.0/255.0.0.0", "10.0.0.7/255.255.0.256",
                "010.0.0.7/255.0.0.0", "0x0a.0.0.7/255.0.0.0", "10.0.0.7/0xff.0.0.0",
                "10.0.0.7/255.255.0.0 junk", "10.0.0.7 /255.255.0.0"):
        with pytest.raises(FlowSyntaxError, match="not an IPv4 address or prefix"):
            parse_flow(f"ip,nw_dst={bad},actions=drop")


def matches(text: str, raw_key: bytes, in_port: int = 0) -> bool:
    """Does the compiled classifier match this frame key with this one rule?"""
    cls = Classifier()
    mask, value = match_key(parse_match(text), in_port)
    cls.insert(0, 1, mask, value, [])
    return bool(cls.lookup(raw_key)[0])


def test_key_extraction_and_matching():
    raw = frame_key(udp_frame(), in_port=7)
    key = key_dict(raw)
    assert key["in_port"] == 7 and key["nw_proto"] == 17 and key["tp_dst"] == 53
    assert matches("udp,tp_dst=53,nw_src=10.0.0.0/8", raw)
    assert matches("in_port=x,udp", raw, in_port=7) and not matches("in_port=x", raw, 8)
    assert not matches("udp,tp_dst=54", raw)
    assert matches("udp,tp_dst=0x30/0xfff0", raw) and not matches("udp,tp_dst=0x40/0xfff0", raw)
    assert not matches("icmp", raw)
    tagged = frame_key(icmp_frame(vlan=42))
    assert key_dict(tagged)["dl_vlan"] == 42 and key_dict(tagged)["nw_proto"] == 1
    assert matches("dl_vlan=42,icmp", tagged) and not matches("dl_vlan=0xffff", tagged)
    assert matches("dl_vlan=0xffff", raw) and not matches("dl_vlan=42", raw)
    short = key_dict(frame_key(b"\x01\x02"))
    assert short["dl_type"] == 0                           # a runt is a key, not a crash


# -- learning and classification ------------------------------------------------------------

def test_mac_table_learn_move_age():
    macs = MacTable(16, 10)
    assert macs.learn(0, MAC1, 1, now=0) == 1
    assert macs.learn(0, MAC1, 1, now=1) == 0
    assert macs.learn(0, MAC1, 2, now=2) == 2              # moved
    assert macs.lookup(0, MAC1) == 2 and macs.lookup(5, MAC1) is None
    assert macs.learn(0, b"\x01" + MAC1[1:], 1) == -1      # multicast source
    assert macs.learn(0, MAC2, 1, now=30000) == 1
    assert macs.expire(now=29999) == 1                      # MAC1 went, MAC2 stamped
    assert macs.lookup(0, MAC1) is None and macs.lookup(0, MAC2) == 1   # "after" now: age 0


class FakePort:
    per_remote = False

    def __init__(self, name, port_id, ofport):
        self.name, self.port_id, self.ofport = name, port_id, ofport


def test_same_priority_index_follows_every_change():
    """The (table, priority) index CHECK_OVERLAP uses is made on the first question and then
    kept in step with adds, modifies and deletes (checked against a scan of all rules)."""
    import random
    rng = random.Random(7)
    br = Bridge("br0", 0)
    flows = [parse_flow(f"table={t},priority={p},tcp,tp_dst={d},actions=drop")
             for t in (0, 1) for p in (5, 6, 7) for d in range(20)]

    def scan(t, p):
        return sorted(r.id for r in br.rules.values() if br.cls.rule(r.id)[:2] == (t, p))

    br.apply(add=flows[:30])
    for step in range(60):
        t, p = rng.choice((0, 1)), rng.choice((5, 6, 7))
        assert sorted(r.id for r in br.same_priority(t, p)) == scan(t, p), step
        if br.rules and rng.random() < 0.4:
            br.apply(remove=rng.sample(list(br.rules.values()), min(3, len(br.rules))))
        else:
            present = {r.text for r in br.rules.values()}
            new = [f for f in rng.sample(flows, 4) if f.format() not in present]
            br.apply(add=new)


def test_bridge_rules_and_trace():
    br = Bridge("br0", 0)
    p1, p2 = FakePort("p1", 10, 1), FakePort("p2", 11, 2)
    br.attach(p1)
    br.attach(p2)
    br.apply(add=[parse_flow("priority=0,actions=normal")])
    icmp12 = parse_match("in_port=p1,dl_src=52:54:00:00:00:01,dl_dst=52:54:00:00:00:02,icmp")
    t = br.trace(icmp12)
    assert t["outputs"] == ["p2"] and [r.flow.format() for _, r in t["rules"]] == \
        ["priority=0,actions=normal"]                       # MAC2 unknown: flooded
    br.macs.learn(0, MAC2, 10)
    assert br.trace(icmp12)["outputs"] == []                # MAC2 is behind p1 itself
    br.apply(add=[parse_flow("priority=100,icmp,actions=mod_vlan_vid:3,output:2")])
    hops, ops, _, _ = br.cls.lookup(frame_key(icmp_frame(MAC1, MAC2), 10))
    assert ops == [(OP_SET_VLAN, 3), (OP_OUTPUT, 11)]
    br.apply(add=[parse_flow("priority=200,in_port=p1,actions=drop")])
    hops, ops, mask, _ = br.cls.lookup(frame_key(icmp_frame(MAC1, MAC2), 10))
    assert ops == [] and mask == match_key({"in_port": "p1"}, 0xFFFF)[0]   # only in_port
    by_ofport = br.select(parse_selector("in_port=1"))
    assert [r.flow.format() for r in by_ofport] == ["priority=200,in_port=p1,actions=drop"]
    br.apply(remove=list(br.rules.values()))
    assert br.cls.lookup(frame_key(icmp_frame(MAC1, MAC2), 10))[:2] == ([], [])
    with pytest.raises(ValueError):
        br.check(parse_flow("actions=output:nope"))
    br.apply(add=[parse_flow("actions=normal")])
    assert br.cls.lookup(frame_key(icmp_frame(MAC1, MAC2), 10))[1] == [(OP_NORMAL, 0)]


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
            assert rxq.count("port: a") == 1 and rxq.count("port: b") == 1  # until enabled
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


async def two_ports(tmp_path, *argvs) -> Switch:
    """A started in-process switch with bridge br0 and vhostuser ports a and b, then
    ``argvs`` run; stopped again if one fails."""
    sw = Switch(tmp_path / "run")
    await sw.start()
    try:
        for argv in (["add-br", "br0"], ["add-port", "br0", "a", "type=vhostuser"],
                     ["add-port", "br0", "b", "type=vhostuser"], *argvs):
            await run_command(sw, list(argv))
    except BaseException:
        await sw.stop()
        raise
    return sw


def test_rules_naming_a_port_survive_its_removal_and_stay_in_step_with_the_store(tmp_path):
    """A rule naming a port is compiled again when the port goes and comes back; deleting
    it afterwards deletes its stored row too (it does not come back at a restart)."""
    async def scenario():
        sw = await two_ports(tmp_path,
                             ["add-flow", "br0", "priority=7,in_port=a,actions=output:b"],
                             ["add-flow", "br0", "priority=8,in_port=b,actions=output:a"],
                             ["del-port", "a"], ["add-port", "br0", "a", "type=vhostuser"])
        try:
            a = sw.bridges["br0"].ports["a"].port_id
            key = frame_key(udp_frame(), a)
            assert sw.bridges["br0"].cls.lookup(key)[1] == [(OP_OUTPUT, sw.ports["b"].port_id)]
            assert await run_command(sw, ["del-flows", "br0", "in_port=a"]) == "1 flows deleted"
        finally:
            await sw.stop()
        sw = Switch(tmp_path / "run")
        await sw.start()
        try:
            flows = await run_command(sw, ["dump-flows", "br0"])
            assert "in_port=a" not in flows and "priority=8,in_port=b" in flows, flows
        finally:
            await sw.stop()

    asyncio.run(scenario())


def test_one_rule_per_compiled_match_whatever_the_port_spelling(tmp_path):
    """in_port=1 and in_port=a name one port (a is OpenFlow port 1): adding both makes one
    rule, the later actions win (OpenFlow ADD), and replace-flows keeps it unchanged."""
    async def scenario():
        sw = await two_ports(tmp_path,
                             ["add-flow", "br0", "priority=7,in_port=1,actions=drop"],
                             ["add-flow", "br0", "priority=7,in_port=a,actions=output:b"])
        try:
            flows = (await run_command(sw, ["dump-flows", "--no-stats", "br0"])).splitlines()
            assert flows == [" priority=7,in_port=a actions=output:b",
                             " priority=0 actions=normal"], flows      # add-br's NORMAL
            assert sw.replace_flows("br0", [parse_flow("priority=7,in_port=1,actions=drop"),
                                            parse_flow("priority=0,actions=normal")]) \
                == {"added": 0, "deleted": 0, "modified": 1}
            assert len(sw.bridges["br0"].rules) == 2
        finally:
            await sw.stop()

    asyncio.run(scenario())


def test_one_rule_per_match_whatever_the_bits_outside_its_mask(tmp_path):
    """tp_dst=0x35/0xff00 and tp_dst=0x12/0xff00 are one match, as are two MACs that differ
    outside their mask (OVS keeps the value under the mask): the later ADD replaces the
    rule, and replace-flows in the other spelling finds it (modified, not added)."""
    async def scenario():
        sw = await two_ports(
            tmp_path,
            ["add-flow", "br0", "priority=7,udp,tp_dst=0x35/0xff00,actions=drop"],
            ["add-flow", "br0", "priority=7,udp,tp_dst=0x12/0xff00,actions=output:b"],
            ["add-flow", "br0", "priority=6,dl_dst=01:00:00:00:00:01/01:00:00:00:00:00,"
                                "actions=drop"],
            ["add-flow", "br0", "priority=6,dl_dst=01:02:03:04:05:06/01:00:00:00:00:00,"
                                "actions=output:b"])
        try:
            assert len(sw.bridges["br0"].rules) == 3            # with add-br's NORMAL
            flows = await run_command(sw, ["dump-flows", "--no-stats", "br0"])
            assert flows.count("actions=output:b") == 2 and "drop" not in flows, flows
            assert sw.replace_flows("br0", [
                parse_flow("priority=7,udp,tp_dst=0x99/0xff00,actions=drop"),
                parse_flow("priority=6,dl_dst=ff:00:00:00:00:00/01:00:00:00:00:00,"
                           "actions=drop"),
                parse_flow("priority=0,actions=normal")]) \
                == {"added": 0, "deleted": 0, "modified": 2}
            assert len(sw.bridges["br0"].rules) == 3
        finally:
            await sw.stop()

    asyncio.run(scenario())


def test_bulk_changes_pause_the_cycle_collector_and_restore_it():
    """collector_paused: no collection inside, the collector as it was after (also when
    the block raises, and left off when it was off)."""
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), collector_paused():
        raise ValueError("a bad rule")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_action_texts_parse_the_same_every_time():
    """parse_flow keeps the last action texts' parses: a text that is refused is refused
    every time, and past the cache's size every rule still gets its own actions."""
    for _ in range(2):
        with pytest.raises(FlowSyntaxError, match="unknown action"):
            parse_flow("priority=1,actions=output:a,bogus")
    flows = [parse_flow(f"priority=1,in_port=a,actions=output:p{i}")
             for i in range(INSTRUCTIONS_CACHED + 10)]
    again = [parse_flow(f"priority=1,in_port=a,actions=output:p{i}")
             for i in range(INSTRUCTIONS_CACHED + 10)]
    assert [f.actions for f in flows] == [f.actions for f in again] == \
        [(("output", f"p{i}"),) for i in range(INSTRUCTIONS_CACHED + 10)]
    assert [f.format() for f in flows] == \
        [f"priority=1,in_port=a,actions=output:p{i}" for i in range(INSTRUCTIONS_CACHED + 10)]
    # rules of one text share its parse: nothing of it can be changed in place
    a, b = (parse_flow(f"priority={p},actions=clear_actions,write_actions(output:a)")
            for p in (1, 2))
    assert a.inst is b.inst and isinstance(a.actions, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.inst.clear_actions = False
    assert b.inst.clear_actions


def test_a_store_that_cannot_be_written_changes_no_rules(tmp_path):
    """When the store refuses a change (here: full, by SQLite's max_page_count), the rules
    in the datapath are put back as they were, the command says so, and the store and the
    datapath still agree after a restart."""
    async def scenario():
        sw = await two_ports(tmp_path,
                             ["add-flow", "br0", "priority=7,in_port=a,actions=output:b"],
                             ["add-flow", "br0", "priority=8,ip,nw_dst=10.0.0.1,actions=output:a"])
        try:
            br = sw.bridges["br0"]
            key = frame_key(udp_frame(), br.ports["a"].port_id)
            before = await run_command(sw, ["dump-flows", "--no-stats", "br0"])
            decided = br.cls.lookup(key)[1]
            pages = sw.store.db.execute("PRAGMA page_count").fetchone()[0]
            sw.store.db.execute(f"PRAGMA max_page_count={pages}")
            many = "".join(f"priority=9,ip,nw_dst=10.1.{i >> 8}.{i & 255},actions=drop\n"
                           for i in range(3000))
            with pytest.raises(CommandError, match="store could not be written"):
                await run_command(sw, ["add-flows", "br0",
                                       many + "priority=7,in_port=a,actions=drop\n"])
            with pytest.raises(CommandError, match="store could not be written"):
                sw.replace_flows("br0", [parse_flow(line) for line in many.splitlines()] +
                                 [parse_flow("priority=8,ip,nw_dst=10.0.0.1,actions=drop")])
            assert await run_command(sw, ["dump-flows", "--no-stats", "br0"]) == before
            assert br.cls.lookup(key)[1] == decided and len(br.cls) == len(br.rules) == 3
            sw.store.db.execute("PRAGMA max_page_count=1073741823")
            assert await run_command(sw, ["add-flow", "br0", "priority=7,in_port=a,"
                                          "actions=drop"]) == ""
            assert await run_command(sw, ["del-flows", "br0", "ip"]) == "1 flows deleted"
            after = await run_command(sw, ["dump-flows", "--no-stats", "br0"])
        finally:
            await sw.stop()
        sw = Switch(tmp_path / "run")                      # the store agrees
        await sw.start()
        try:
            assert await run_command(sw, ["dump-flows", "--no-stats", "br0"]) == after
        finally:
            await sw.stop()

    asyncio.run(scenario())


def test_every_read_command_takes_json(tmp_path):
    """show, dump-flows, fdb-show, pmd-rxq-show, pmd-stats-show (and dump-ports, trace) take
    --json: one JSON document saying what the text says."""
    import json

    async def scenario():
        sw = await two_ports(tmp_path,
                             ["add-flow", "br0", "table=1,cookie=0x5,idle_timeout=9,priority=7,"
                             "in_port=a,actions=output:b"])
        try:
            sw.bridges["br0"].macs.learn(0, MAC1, sw.ports["a"].port_id)
            show = json.loads(await run_command(sw, ["show", "--json"]))
            assert show["bridges"]["br0"]["ports"]["a"]["ofport"] == 1
            assert show["bridges"]["br0"]["ports"]["b"]["type"] == "vhostuser"
            flows = json.loads(await run_command(sw, ["dump-flows", "--json", "br0"]))
            text = await run_command(sw, ["dump-flows", "br0"])
            assert [f["flow"] for f in flows] == [
                "priority=0,actions=normal",
                "cookie=0x5,table=1,idle_timeout=9,priority=7,in_port=a,actions=output:b"]
            assert flows[1]["cookie"] == "0x5" and flows[1]["table"] == 1
            assert all(f["body"] in text for f in flows)
            fdb = json.loads(await run_command(sw, ["fdb-show", "--json", "br0"]))
            assert fdb == [{"port": "a", "vlan": 0, "mac": MAC1.hex(":"), "age": fdb[0]["age"]}]
            rxq = json.loads(await run_command(sw, ["pmd-rxq-show", "--json"]))
            assert {r["port"] for pmd in rxq for r in pmd["rxqs"]} == {"a", "b"}
            stats = json.loads(await run_command(sw, ["pmd-stats-show", "--json"]))
            assert stats and all("upcalls" in s and "busy_ns" in s for s in stats)
            assert json.loads(await run_command(sw, ["dump-ports", "--json", "br0"]))["a"]
            with pytest.raises(CommandError, match="unknown option"):
                await run_command(sw, ["show", "--yaml"])
        finally:
            await sw.stop()

    asyncio.run(scenario())
