"""PORT_MOD through the real ``ovs-ofctl -O OpenFlow13 mod-port`` against a running switch
with three pyvhost front-end guests: down/up, no-receive, no-forward, no-flood (as Open
vSwitch encodes it in 1.3) and no-packet-in change what the datapath does at once,
dump-ports-desc shows the config, controllers get a PORT_STATUS; malformed PORT_MODs get
the spec's PORT_MOD_FAILED codes."""

from __future__ import annotations

import os
import re
import struct
import time

import pytest

from tests.harness import openflow as O
from tests.harness.frontends import drain, switch_with_ports
from tests.harness.openflow import ofctl
from tests.test_openflow_async import PORT_STATUS, next_async
from tests.test_openflow_packets import CONFIG, MAC, listening_port, udp

pytestmark = pytest.mark.skipif(not os.path.exists(O.OVS_OFCTL),
                                reason="ovs-ofctl (Debian openvswitch-common) is not installed")
BROADCAST = b"\xff" * 6
PORT_MOD, PORT_MOD_FAILED = 16, 7


def port_mod(port_no: int, config: int, mask: int, hw_addr: bytes = bytes(6),
             advertise: int = 0) -> bytes:
    return O.msg(PORT_MOD, struct.pack("!I4x6s2xIII4x", port_no, hw_addr, config, mask,
                                       advertise))


def config_of(desc: str, port: str) -> str:
    m = re.search(rf" \d+\({port}\): addr:\S+\n\s+config:\s+(.*)\n", desc)
    assert m, desc
    return m.group(1).strip()


def test_mod_port(workdir):
    with switch_with_ports(workdir, CONFIG, "abc") as (run_dir, ports):
        port = listening_port(run_dir)
        target = f"tcp:127.0.0.1:{port}"
        a, b, c = ports["a"], ports["b"], ports["c"]
        bcast = udp(MAC["a"], BROADCAST)
        with O.Client("127.0.0.1", port) as ctl, O.Client("127.0.0.1", port) as cmd:
            assert ctl.alive()
            cmd.send(O.msg(28, bytes(24)))       # SET_ASYNC: no async messages on this one
            assert cmd.alive()
            # no-flood: ovs-ofctl does not encode it in 1.3 (nor decode it), Open vSwitch
            # takes bit 0x10 all the same: sent here as a raw PORT_MOD
            assert cmd.error_of(port_mod(2, 0x10, 0x10)) is None
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:     # (the guests' links came up meanwhile)
                body = next_async(ctl, PORT_STATUS)
                if body[8 + 16:8 + 18] == b"b\0" and struct.unpack_from("!I", body, 8 + 32)[0]:
                    break
            assert body[0] == 2 and struct.unpack_from("!I", body, 8 + 32)[0] == 0x10
            a.send_all([bcast])
            assert drain(c) == [bcast] and drain(b, 0.2) == []
            assert cmd.error_of(port_mod(2, 0, 0x10)) is None
            a.send_all([bcast])
            assert drain(b) == [bcast] and drain(c) == [bcast]
            # down: nothing in, nothing out (b's MAC is known: a unicast to it is lost)
            b.send_all([udp(MAC["b"], MAC["a"])])
            assert drain(a) == [udp(MAC["b"], MAC["a"])]
            ofctl(target, "mod-port", "b", "down")
            assert config_of(ofctl(target, "dump-ports-desc").stdout, "b") == "PORT_DOWN"
            a.send_all([udp(MAC["a"], MAC["b"])] * 2)
            b.send_all([udp(MAC["b"], MAC["a"])] * 3)
            assert drain(b, 0.3) == [] and drain(a, 0.3) == []
            stats = ofctl(target, "dump-ports", "2").stdout
            assert re.search(r"rx pkts=\d+, bytes=\d+, drop=3,", stats), stats
            ofctl(target, "mod-port", "b", "up")
            a.send_all([udp(MAC["a"], MAC["b"])])
            assert drain(b) == [udp(MAC["a"], MAC["b"])]
            # no-receive and no-forward one at a time
            ofctl(target, "mod-port", "b", "no-receive")
            b.send_all([udp(MAC["b"], MAC["a"])])
            a.send_all([udp(MAC["a"], MAC["b"])])
            assert drain(a, 0.3) == [] and drain(b) == [udp(MAC["a"], MAC["b"])]
            ofctl(target, "mod-port", "b", "receive")
            ofctl(target, "mod-port", "b", "no-forward")
            b.send_all([udp(MAC["b"], MAC["a"])])
            a.send_all([udp(MAC["a"], MAC["b"])])
            assert drain(a) == [udp(MAC["b"], MAC["a"])] and drain(b, 0.3) == []
            ofctl(target, "mod-port", "b", "forward")
            # no-packet-in: b's frames reach no controller, a's do
            ofctl(target, "add-flow", "priority=100,udp,tp_dst=77,actions=controller")
            ofctl(target, "mod-port", "b", "no-packet-in")
            b.send_all([udp(MAC["b"], MAC["a"], dport=77)])
            a.send_all([udp(MAC["a"], MAC["b"], dport=77)])
            pin = next_async(ctl, 10)
            assert pin[-len(udp(MAC["a"], MAC["b"], dport=77)):] == \
                udp(MAC["a"], MAC["b"], dport=77)
            # the spec's refusals
            for msg, code in ((port_mod(9, 1, 1), 0), (port_mod(2, 1, 1, b"\x01" * 6), 1),
                              (port_mod(2, 0x2, 0x2), 2), (port_mod(2, 0, 0, advertise=1), 3)):
                assert cmd.error_of(msg) == (PORT_MOD_FAILED, code), msg.hex()
            assert cmd.error_of(O.msg(PORT_MOD, bytes(16))) == (1, 6)      # BAD_LEN
