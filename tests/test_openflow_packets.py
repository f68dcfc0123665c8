"""PACKET_IN and PACKET_OUT against a running ``pyvhost switch`` with two pyvhost front-end
guests as traffic sources: ``ovs-ofctl packet-out`` (output to a port, FLOOD, ALL,
IN_PORT, NORMAL, TABLE through the rules), and a small test controller (the harness's
OpenFlow client) that gets PACKET_INs from a table-miss rule (NO_MATCH) and from a rule's
``controller:N`` (ACTION, its cookie and table, the frame cut to N bytes) and answers with
PACKET_OUTs; a guest flooding the control plane is bounded and every frame accounted."""

from __future__ import annotations

import os
import re
import struct
import time

import pytest

from tests.harness import openflow as O
from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports
from tests.harness.openflow import ofctl
from tests.test_edit import frame as frame_of
from tests.test_edit import layers, verify

pytestmark = pytest.mark.skipif(not os.path.exists(O.OVS_OFCTL),
                                reason="ovs-ofctl (Debian openvswitch-common) is not installed")

MAC = {n: bytes([0x02, 0, 0, 0, 0, i + 1]) for i, n in enumerate("abc")}
CONFIG = "add-br br0\n" + "".join(f"add-port br0 {n} type=vhostuser queues=1\n" for n in "abc") \
    + "set-controller br0 ptcp:0:127.0.0.1\n"
PACKET_IN, PACKET_OUT = 10, 13
OFPP_CONTROLLER, OFPP_TABLE = 0xFFFFFFFD, 0xFFFFFFF9


def udp(src: bytes, dst: bytes, dport: int = 53, size: int = 18) -> bytes:
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    return dst + src + b"\x08\x00" + ip + (1000).to_bytes(2, "big") + \
        dport.to_bytes(2, "big") + bytes(4) + b"p" * size


def listening_port(run_dir) -> int:
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", processes.ctl(run_dir, "show"))
    assert m
    return int(m.group(1))


@pytest.fixture
def of_switch(workdir):
    with switch_with_ports(workdir, CONFIG, "abc") as (run_dir, ports):
        port = listening_port(run_dir)
        yield run_dir, ports, port


def parse_packet_in(body: bytes) -> dict:
    buffer_id, total_len, reason, table, cookie = struct.unpack_from("!IHBBQ", body)
    mtype, mlen = struct.unpack_from("!HH", body, 16)
    oxm = body[20:16 + mlen]
    in_port = None
    if oxm[:4] == struct.pack("!HBB", 0x8000, 0, 4):
        in_port = struct.unpack_from("!I", oxm, 4)[0]
    data = body[16 + (mlen + 7) // 8 * 8 + 2:]
    return {"buffer_id": buffer_id, "total_len": total_len, "reason": reason,
            "table": table, "cookie": cookie, "in_port": in_port, "data": data}


def next_packet_in(c: O.Client) -> dict:
    while True:
        t, _, body = c.recv()
        if t == PACKET_IN:
            return parse_packet_in(body)


def test_packet_out_from_ofctl(of_switch):
    run_dir, ports, port = of_switch
    target = f"tcp:127.0.0.1:{port}"
    a, b, c = ports["a"], ports["b"], ports["c"]
    frame = udp(MAC["a"], MAC["b"])
    hexed = frame.hex()

    def out(in_port: str, actions: str, data: str = hexed) -> None:
        ofctl(target, "packet-out", in_port, actions, data)

    out("1", "output:2")
    assert drain(b) == [frame] and drain(a, 0.2) == [] and drain(c, 0.2) == []
    for flood in ("FLOOD", "ALL"):                         # every port but the input
        out("1", flood)
        assert drain(b) == [frame] and drain(c) == [frame] and drain(a, 0.2) == []
    out("1", "in_port")                                    # back out of the input port
    assert drain(a) == [frame] and drain(b, 0.2) == []
    out("1", "output:1")                                   # (OpenFlow: not without IN_PORT)
    assert drain(a, 0.3) == []
    out("controller", "output:3,mod_vlan_vid:7,output:2")  # edits apply to later outputs
    tagged = frame[:12] + b"\x81\x00\x00\x07" + frame[12:]
    assert drain(c) == [frame] and drain(b) == [tagged]
    # NORMAL: unknown destination floods; once b's MAC is learned, only to b
    out("1", "NORMAL")
    assert drain(b) == [frame] and drain(c) == [frame]
    out("2", "NORMAL", udp(MAC["b"], MAC["a"]).hex())
    assert drain(a) == [udp(MAC["b"], MAC["a"])] and drain(c, 0.2) == []
    out("1", "NORMAL")
    assert drain(b) == [frame] and drain(c, 0.2) == []
    # TABLE: through the rules as if received on in_port (their counters count it)
    ofctl(target, "add-flow", "priority=50,in_port=1,udp,tp_dst=53,actions=output:3")
    out("1", "TABLE")
    assert drain(c) == [frame] and drain(b, 0.2) == []
    assert re.search(r"n_packets=1, .*priority=50", ofctl(target, "dump-flows").stdout)
    out("2", "TABLE", udp(MAC["b"], MAC["a"]).hex())      # in_port 2: NORMAL, a learned
    assert drain(a) == [udp(MAC["b"], MAC["a"])] and drain(c, 0.2) == []
    # refusals ovs-ofctl reports by their spec names
    for args, error in ((("1", "output:9"), "OFPBAC_BAD_OUT_PORT"),
                        (("9", "output:1"), "OFPBRC_BAD_PORT")):
        r = ofctl(target, "packet-out", *args, hexed, check=False)
        assert r.returncode != 0 and error in r.stderr, (args, r.stderr)


def test_packet_in_to_a_controller_and_its_packet_out(of_switch):
    run_dir, ports, port = of_switch
    target = f"tcp:127.0.0.1:{port}"
    a, b = ports["a"], ports["b"]
    ofctl(target, "del-flows")
    ofctl(target, "add-flow", "priority=0,actions=controller")           # the table-miss
    ofctl(target, "add-flow", "priority=9,cookie=0x77,udp,tp_dst=99,actions=goto_table:2")
    ofctl(target, "add-flow", "table=2,priority=1,actions=controller:32,output:3")
    assert "actions=CONTROLLER:65535" in processes.ctl(run_dir, "dump-flows", "br0")
    assert "actions=CONTROLLER:65535" in ofctl(target, "dump-flows").stdout
    with O.Client("127.0.0.1", port) as ctl:
        assert ctl.alive()         # (its HELLO is taken: async messages come)
        big = udp(MAC["a"], MAC["b"], size=600)
        a.send_all([big])
        pin = next_packet_in(ctl)
        assert pin == {"buffer_id": 0xFFFFFFFF, "total_len": len(big), "reason": 0,
                       "table": 0, "cookie": 0, "in_port": 1, "data": big}
        a.send_all([udp(MAC["a"], MAC["b"], dport=99)])
        pin = next_packet_in(ctl)
        assert (pin["reason"], pin["table"], pin["in_port"], pin["total_len"]) == \
            (1, 2, 1, 60)
        assert pin["data"] == udp(MAC["a"], MAC["b"], dport=99)[:32]
        assert drain(ports["c"]) == [udp(MAC["a"], MAC["b"], dport=99)]
        # cookie of the rule whose action sent it (ctl rules too)
        processes.ctl(run_dir, "add-flow", "br0",
                      "table=2,priority=5,cookie=0xabc,in_port=b,actions=controller")
        ofctl(target, "add-flow", "priority=9,in_port=2,actions=goto_table:2")
        b.send_all([udp(MAC["b"], MAC["a"])])
        pin = next_packet_in(ctl)
        assert (pin["reason"], pin["table"], pin["cookie"], pin["in_port"]) == \
            (1, 2, 0xABC, 2)
        # the controller answers with a PACKET_OUT (in_port from the PACKET_IN)
        actions = O.output(2)
        ctl.send(O.packet_out(1, actions, big))
        assert drain(b) == [big]
        ctl.send(O.packet_out(OFPP_CONTROLLER, O.output(OFPP_TABLE), big))   # table-miss:
        pin = next_packet_in(ctl)                                          # back to it
        assert (pin["reason"], pin["in_port"], pin["data"]) == (0, OFPP_CONTROLLER, big)
        assert ctl.alive()


def test_a_guest_cannot_flood_the_controller(of_switch):
    run_dir, ports, port = of_switch
    target = f"tcp:127.0.0.1:{port}"
    ofctl(target, "add-flow", "priority=100,udp,actions=controller")
    sent = 4000
    with O.Client("127.0.0.1", port) as ctl:
        assert ctl.alive()         # (its HELLO is taken: async messages come)
        t0 = time.monotonic()
        for i in range(0, sent, 200):
            ports["a"].send_all([udp(MAC["a"], MAC["b"], dport=1000 + i % 7)] * 200)
        elapsed = time.monotonic() - t0
        got = 0
        ctl.sock.settimeout(1.0)
        try:
            while True:
                t, _, _ = ctl.recv()
                got += t == PACKET_IN
        except TimeoutError:
            pass
        assert ctl.alive()              # the connection still answers at once
    show = processes.ctl(run_dir, "show")
    m = re.search(r"packet_in: queued (\d+), sent (\d+), dropped: rate (\d+), full (\d+), "
                  r"busy (\d+), no controller (\d+)", show)
    assert m, show
    queued, out, rate, full, busy, none = map(int, m.groups())
    print(f"[packet_in] {sent} frames in {elapsed:.2f} s: {got} PACKET_INs, dropped: rate "
          f"{rate}, full {full}, busy {busy}")
    stats = ofctl(target, "dump-flows").stdout
    matched = int(re.search(r"n_packets=(\d+), .*priority=100", stats).group(1))
    assert matched == sent
    assert queued + rate + full + busy == sent and out == got == queued - none
    # at most the burst (100) plus the rate (1000/s) over the time the guest sent
    assert got <= 100 + 1000 * (elapsed + 1.5), (got, elapsed)
    assert rate + full + busy > 0 or elapsed > (sent - 100) / 1000


@pytest.mark.parametrize("text", [
    "priority=0,actions=controller",
    "cookie=0x5a,table=3,idle_timeout=9,priority=7,in_port=a,udp,tp_dst=53,actions=drop",
    "table=1,priority=0,actions=meter:2,controller:40",
    "cookie=0xffffffffffffffff,priority=65535,dl_vlan=0xffff,actions=normal",
])
def test_canonical_head_is_what_parsing_says(text):
    """A PACKET_IN names its rule's table, priority and cookie (and NO_MATCH for a
    table-miss rule) from the stored text without parsing it: the same as parsing."""
    from pyvhost.switch.flows import canonical_head, parse_flow
    f = parse_flow(parse_flow(text).format())
    assert canonical_head(f.format()) == (f.table, f.priority, f.cookie, bool(f.match))


def test_packet_out_set_field_checked_against_the_frame(of_switch):
    """A PACKET_OUT's set_field is checked against the frame's own headers: an ip/udp edit
    of a UDP frame is done (true checksums at the guest), a tcp one is refused as
    MATCH_INCONSISTENT; a group bucket's set_field is refused as not supported here (only
    outputs in buckets), not as a prerequisite no match could meet."""
    run_dir, ports, port = of_switch
    target = f"tcp:127.0.0.1:{port}"
    a, b = ports["a"], ports["b"]
    f = frame_of(17)
    ofctl(target, "packet-out", "1", "set_field:10.0.0.99->ip_dst,set_field:5353->udp_dst,"
          "output:2", f.hex())
    got = drain(b)
    assert len(got) == 1, got
    verify(got[0])
    ip, l4 = layers(got[0])
    assert ip[16:20] == bytes([10, 0, 0, 99]) and l4[2:4] == (5353).to_bytes(2, "big")
    r = ofctl(target, "packet-out", "1", "set_field:80->tcp_dst,output:2", f.hex(),
              check=False)
    assert r.returncode != 0 and "OFPBAC_MATCH_INCONSISTENT" in r.stderr, r.stderr
    assert drain(b, 0.2) == [] and drain(a, 0.1) == []
    r = ofctl(target, "add-group", "group_id=1,type=all,bucket=set_field:10.0.0.1->ip_dst,"
              "output:2", check=False)
    assert r.returncode != 0 and "OFPBAC_BAD_TYPE" in r.stderr, r.stderr


def test_packet_out_edits_apply_before_table(of_switch):
    """PACKET_OUT set_field(s) then output:TABLE: the tables see the edited frame (as OVS
    runs the actions on the packet before resubmitting it): the rule for the new address
    and port matches, the one for the old ones does not, and the frame that arrives
    carries the edits with true checksums."""
    run_dir, ports, port = of_switch
    target = f"tcp:127.0.0.1:{port}"
    b, c = ports["b"], ports["c"]
    f = frame_of(17)                                   # UDP to DST, port 53
    ip, _ = layers(f)
    ofctl(target, "del-flows")
    ofctl(target, "add-flow", f"cookie=0x2,priority=10,udp,nw_dst={'.'.join(map(str, ip[16:20]))},"
          "tp_dst=53,actions=output:2")
    ofctl(target, "add-flow", "cookie=0x9,priority=10,udp,nw_dst=10.0.0.9,tp_dst=5353,"
          "actions=output:3")
    ofctl(target, "packet-out", "1", "set_field:10.0.0.9->ip_dst,set_field:5353->udp_dst,"
          "output:TABLE", f.hex())
    got = drain(c)
    assert len(got) == 1 and drain(b, 0.1) == [], got
    verify(got[0])
    ip, l4 = layers(got[0])
    assert ip[16:20] == bytes([10, 0, 0, 9]) and l4[2:4] == (5353).to_bytes(2, "big")
    dump = ofctl(target, "dump-flows").stdout
    assert re.search(r"cookie=0x9, .*n_packets=1,", dump) and \
        re.search(r"cookie=0x2, .*n_packets=0,", dump), dump
    # dec_ttl before TABLE: the tables see TTL - 1; a TTL it expires goes no further
    ofctl(target, "packet-out", "1", "dec_ttl,output:TABLE", frame_of(17, ttl=9).hex())
    got = drain(b)
    assert len(got) == 1 and layers(got[0])[0][8] == 8, got
    verify(got[0])
    ofctl(target, "packet-out", "1", "dec_ttl,output:TABLE", frame_of(17, ttl=1).hex())
    assert drain(b, 0.3) == [] and drain(c, 0.1) == []
