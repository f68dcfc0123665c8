"""Port mirrors (``ctl add-mirror``): a mirror's output port receives exactly the frames
its selection names (received on select-src ports, sent to select-dst ports, one VLAN, a
flow-match filter) and nothing else, frames it sends are dropped and counted, mirrors are
stored and come back at a restart, follow their ports going and coming, and bad options
are refused with a reason."""

from __future__ import annotations

import json

import pytest

from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports
from tests.test_capture import udp_frame

MAC = {n: bytes([0x02, 0, 0, 0, 0, i + 1]) for i, n in enumerate("abcm")}
BCAST = b"\xff" * 6
CONFIG = "add-br br0\n" + "".join(f"add-port br0 {n} type=vhostuser queues=1\n"
                                  for n in "abcm")


def frame(src: bytes, dst: bytes, payload: bytes = b"x" * 50, vlan: int | None = None) -> bytes:
    tag = b"\x81\x00" + vlan.to_bytes(2, "big") if vlan is not None else b""
    return dst + src + tag + b"\x88\xb5" + payload          # local experimental ethertype


@pytest.fixture
def switch_ports(workdir):
    with switch_with_ports(workdir, CONFIG, "abcm") as (run_dir, ports):
        yield run_dir, ports


def learn(ports) -> None:
    """Every port's MAC known to the bridge (each sends one broadcast), queues drained."""
    for n in "abc":
        ports[n].send([frame(MAC[n], BCAST, b"hello")])
    for n in "abcm":
        drain(ports[n], 0.3)


def refused(run_dir, *argv: str) -> str:
    """The error of a command that must fail."""
    from pyvhost.switch.wire import request
    answer = request(str(run_dir / "ctl.sock"), list(argv))
    assert not answer["ok"], argv
    return answer["error"]


def mirrors(run_dir) -> dict:
    return {r["name"]: r for r in json.loads(processes.ctl(run_dir, "list-mirrors", "--json"))}


def test_select_src_copies_exactly_what_the_port_received(switch_ports):
    run_dir, ports = switch_ports
    learn(ports)
    processes.ctl(run_dir, "add-mirror", "br0", "m1", "select-src=a", "output=m")
    from_a = [frame(MAC["a"], MAC["b"], bytes([i]) * 40) for i in range(20)]
    assert ports["a"].send_all(from_a) == 20
    assert drain(ports["b"]) == from_a
    ports["b"].send([frame(MAC["b"], MAC["a"])])         # b's input: not selected
    ports["c"].send([frame(MAC["c"], BCAST)])            # a flood: never to a mirror port
    assert len(drain(ports["a"])) == 2 and len(drain(ports["b"])) == 1
    assert drain(ports["m"]) == from_a
    row = mirrors(run_dir)["m1"]
    assert row["active"] and row["tx_packets"] == 20
    assert row["tx_bytes"] == sum(len(f) for f in from_a)
    # what the mirror port sends goes nowhere, and is counted
    ports["m"].send([frame(MAC["m"], BCAST)] * 3)
    assert drain(ports["a"], 0.3) == [] and drain(ports["b"], 0.3) == []
    stats = json.loads(processes.ctl(run_dir, "dump-ports", "--json", "br0"))
    assert stats["m"]["datapath"]["drop_mirror_port"] == 3, stats["m"]


def test_select_dst_copies_frames_as_sent_including_floods_and_tags(switch_ports):
    run_dir, ports = switch_ports
    learn(ports)
    processes.ctl(run_dir, "add-flow", "br0", "priority=10,in_port=c,actions=mod_vlan_vid:7,"
                                              "output:b")
    processes.ctl(run_dir, "add-mirror", "br0", "out-b", "select-dst=b", "output=m")
    ports["a"].send([frame(MAC["a"], MAC["b"], b"unicast")])
    ports["a"].send([frame(MAC["a"], BCAST, b"flood")])
    ports["c"].send([frame(MAC["c"], MAC["b"], b"tagged")])
    ports["a"].send([frame(MAC["a"], MAC["c"], b"to c")])           # not to b
    sent_to_b = [frame(MAC["a"], MAC["b"], b"unicast"), frame(MAC["a"], BCAST, b"flood"),
                 frame(MAC["c"], MAC["b"], b"tagged", vlan=7)]
    got = drain(ports["b"])                     # (two input ports: any order between them)
    assert sorted(got) == sorted(sent_to_b)
    assert drain(ports["m"]) == got
    # a frame to b and c, both selected: one copy, as sent to the first
    processes.ctl(run_dir, "del-mirror", "br0", "out-b")
    processes.ctl(run_dir, "add-mirror", "br0", "out-bc", "select-dst=b,c", "output=m")
    ports["a"].send([frame(MAC["a"], BCAST, b"twice?")])
    assert drain(ports["m"]) == [frame(MAC["a"], BCAST, b"twice?")]


def test_select_all_vlan_and_filter(switch_ports):
    run_dir, ports = switch_ports
    learn(ports)
    processes.ctl(run_dir, "add-mirror", "br0", "dns", "select-all", "filter=udp,tp_dst=53",
                  "output=m")
    dns, other = udp_frame(MAC["a"], MAC["b"], 53), udp_frame(MAC["a"], MAC["b"], 54)
    ports["a"].send([dns, other, frame(MAC["a"], MAC["b"])])
    assert len(drain(ports["b"])) == 3
    # select-all: a's input and b's output both select it; a mirror copies a frame once
    assert drain(ports["m"]) == [dns]
    processes.ctl(run_dir, "del-mirror", "br0", "dns")
    processes.ctl(run_dir, "add-mirror", "br0", "v5", "select-src=a,c", "select-vlan=5",
                  "output=m")
    tagged = frame(MAC["a"], MAC["b"], vlan=5)
    ports["a"].send([tagged, frame(MAC["a"], MAC["b"], vlan=6), frame(MAC["a"], MAC["b"])])
    assert len(drain(ports["b"])) == 3
    assert drain(ports["m"]) == [tagged]
    assert list(mirrors(run_dir)) == ["v5"]


def test_mirrors_are_stored_and_follow_their_ports(workdir):
    with switch_with_ports(workdir, CONFIG, "abcm") as (run_dir, ports):
        learn(ports)
        processes.ctl(run_dir, "add-mirror", "br0", "m1", "select-src=a", "output=m")
    with switch_with_ports(workdir, CONFIG, "abcm") as (run_dir, ports):
        assert mirrors(run_dir)["m1"]["active"]
        learn(ports)
        ports["a"].send([frame(MAC["a"], MAC["b"])])
        assert drain(ports["m"]) == [frame(MAC["a"], MAC["b"])]
        assert len(drain(ports["b"])) == 1
        # the output port goes: inactive (and kept); back: active again
        ports["m"].close()
        processes.ctl(run_dir, "del-port", "m")
        assert not mirrors(run_dir)["m1"]["active"]
        ports["a"].send([frame(MAC["a"], MAC["b"])])
        assert len(drain(ports["b"])) == 1
        processes.ctl(run_dir, "add-port", "br0", "m", "type=vhostuser", "queues=1")
        from pyvhost.frontend import VirtioUser
        ports["m"] = VirtioUser(str(run_dir / "m.sock"), ring_size=256).open()
        assert mirrors(run_dir)["m1"]["active"]
        ports["a"].send([frame(MAC["a"], MAC["b"], b"again")])
        assert drain(ports["m"]) == [frame(MAC["a"], MAC["b"], b"again")]
        assert "m1" in processes.ctl(run_dir, "list-mirrors", "br0")
        processes.ctl(run_dir, "del-mirror", "br0", "m1")
        ports["a"].send([frame(MAC["a"], MAC["b"])])
        assert drain(ports["m"], 0.3) == []
        # the mirror port is an ordinary port again: floods reach it
        ports["a"].send([frame(MAC["a"], BCAST)])
        assert len(drain(ports["m"])) == 1


@pytest.mark.parametrize("args,error", [
    (["select-src=a"], "needs output=PORT"),
    (["output=m"], "selects nothing"),
    (["select-src=a", "output=a"], "cannot be selected too"),
    (["select-src=a", "select-vlan=4096", "output=m"], "out of range"),
    (["select-src=a", "select-vlan=x", "output=m"], "not a number"),
    (["select-src=a", "filter=tp_dst=99999", "output=m"], "filter"),
    (["select-all=yes", "output=m"], "expected"),
    (["select-src=a", "select-src=b", "output=m"], "given twice"),
    (["bogus=1", "output=m"], "expected"),
])
def test_bad_mirrors_are_refused(switch_ports, args, error):
    run_dir, _ = switch_ports
    assert error in refused(run_dir, "add-mirror", "br0", "bad", *args)
    assert mirrors(run_dir) == {}


def test_mirror_names_and_limits(switch_ports):
    run_dir, _ = switch_ports
    processes.ctl(run_dir, "add-mirror", "br0", "m0", "select-src=a", "output=m")
    assert "already exists" in refused(run_dir, "add-mirror", "br0", "m0", "select-src=b",
                                       "output=m")
    for i in range(1, 16):
        processes.ctl(run_dir, "add-mirror", "br0", f"m{i}", "select-src=a", "output=m")
    assert "at most 16" in refused(run_dir, "add-mirror", "br0", "m16", "select-src=a",
                                   "output=m")
    assert "no mirror nope" in refused(run_dir, "del-mirror", "br0", "nope")
    assert "no bridge" in refused(run_dir, "add-mirror", "br9", "x", "select-src=a", "output=m")
