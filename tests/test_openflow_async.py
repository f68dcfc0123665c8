"""PORT_STATUS and FLOW_REMOVED from a running ``pyvhost switch`` to a connected test
controller (the harness's OpenFlow client): a port added, its link up when a front-end
attaches and down when it goes, the port deleted; rules ``ovs-ofctl`` installed with
send_flow_rem removed by their idle or hard timeout and by deletes (OpenFlow's and
``ctl del-flows``), with their last counters; a rule without the flag says nothing."""

from __future__ import annotations

import os
import struct
import time

import pytest

from pyvhost.frontend import VirtioUser
from tests.harness import openflow as O
from tests.harness import processes
from tests.harness.frontends import switch_with_ports
from tests.harness.openflow import ofctl
from tests.test_openflow_packets import CONFIG, MAC, listening_port, udp

pytestmark = pytest.mark.skipif(not os.path.exists(O.OVS_OFCTL),
                                reason="ovs-ofctl (Debian openvswitch-common) is not installed")

FLOW_REMOVED, PORT_STATUS = 11, 12
ADD, DELETE, MODIFY = 0, 1, 2
IDLE, HARD, DELETED = 0, 1, 2
LINK_DOWN, LIVE = 1, 4


def next_async(c: O.Client, want: int, timeout: float = 8.0) -> bytes:
    """The body of the next message of type ``want`` (echo requests answered);
    TimeoutError if none comes within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no message of type {want} in {timeout} s")
        c.sock.settimeout(left)
        t, xid, body = c.recv()
        if t == O.ECHO_REQUEST:
            c.send(O.msg(O.ECHO_REPLY, body, xid))
        elif t == want:
            return body


def nothing_more(c: O.Client, want: int, wait: float = 2.5) -> bool:
    try:
        next_async(c, want, wait)
    except TimeoutError:
        return True
    return False


def port_status(body: bytes) -> tuple:
    reason = body[0]
    port_no, = struct.unpack_from("!I", body, 8)
    name = body[8 + 16:8 + 32].rstrip(b"\0").decode()
    _config, state = struct.unpack_from("!II", body, 8 + 32)
    return reason, port_no, name, state


def status_of(c: O.Client, name: str) -> tuple:
    """The next PORT_STATUS about port ``name`` (others' links may change meanwhile)."""
    while True:
        st = port_status(next_async(c, PORT_STATUS))
        if st[2] == name:
            return st


def flow_removed(body: bytes) -> dict:
    (cookie, priority, reason, table, sec, _nsec, idle, hard, packets,
     bytes_) = struct.unpack_from("!QHBBIIHHQQ", body)
    return {"cookie": cookie, "priority": priority, "reason": reason, "table": table,
            "idle": idle, "hard": hard, "packets": packets, "bytes": bytes_,
            "match": body[40:]}


def test_port_status(workdir):
    with switch_with_ports(workdir, CONFIG.replace("add-port br0 c type=vhostuser queues=1\n",
                                                   ""), "ab") as (run_dir, _):
        with O.Client("127.0.0.1", listening_port(run_dir)) as c:
            assert c.alive()         # (its HELLO is taken: async messages come)
            processes.ctl(run_dir, "add-port", "br0", "c", "type=vhostuser", "queues=1")
            assert status_of(c, "c") == (ADD, 3, "c", LINK_DOWN)
            guest = VirtioUser(str(run_dir / "c.sock"), ring_size=256).open()
            try:
                assert status_of(c, "c") == (MODIFY, 3, "c", LIVE)
            finally:
                guest.close()
            assert status_of(c, "c") == (MODIFY, 3, "c", LINK_DOWN)
            processes.ctl(run_dir, "del-port", "c")
            assert status_of(c, "c") == (DELETE, 3, "c", LINK_DOWN)
            assert c.alive()


def test_flow_removed(workdir):
    with switch_with_ports(workdir, CONFIG, "abc") as (run_dir, ports):
        target = f"tcp:127.0.0.1:{listening_port(run_dir)}"
        with O.Client("127.0.0.1", listening_port(run_dir)) as c:
            assert c.alive()         # (its HELLO is taken: async messages come)
            ofctl(target, "add-flow", "send_flow_rem,cookie=0x11,idle_timeout=1,priority=5,"
                  "udp,tp_dst=7,actions=output:2")
            ofctl(target, "add-flow", "cookie=0x12,idle_timeout=1,priority=6,udp,tp_dst=8,"
                  "actions=output:2")                        # no flag: no message
            ofctl(target, "add-flow", "send_flow_rem,cookie=0x13,hard_timeout=2,priority=7,"
                  "in_port=1,udp,tp_dst=9,actions=output:2")
            ofctl(target, "add-flow", "send_flow_rem,cookie=0x14,table=1,priority=8,udp,"
                  "actions=drop")
            ports["a"].send_all([udp(MAC["a"], MAC["b"], dport=9)] * 3)
            got = {}
            for _ in range(2):
                fr = flow_removed(next_async(c, FLOW_REMOVED))
                got[fr["cookie"]] = fr
            assert set(got) == {0x11, 0x13}, got
            assert (got[0x11]["reason"], got[0x11]["idle"], got[0x11]["packets"]) == \
                (IDLE, 1, 0)
            assert (got[0x13]["reason"], got[0x13]["hard"], got[0x13]["packets"],
                    got[0x13]["bytes"]) == (HARD, 2, 3, 3 * 60)
            assert O.oxm(0, struct.pack("!I", 1)) in got[0x13]["match"]     # in_port=1
            assert "tp_dst=8" not in ofctl(target, "dump-flows").stdout     # (it expired)
            # deletes: OpenFlow's (table 1) and ctl's
            ofctl(target, "add-flow", "send_flow_rem,cookie=0x15,priority=9,udp,tp_dst=10,"
                  "actions=drop")
            ofctl(target, "del-flows", "table=1")
            fr = flow_removed(next_async(c, FLOW_REMOVED))
            assert (fr["cookie"], fr["reason"], fr["table"], fr["priority"]) == \
                (0x14, DELETED, 1, 8)
            processes.ctl(run_dir, "del-flows", "br0", "udp,tp_dst=10")
            fr = flow_removed(next_async(c, FLOW_REMOVED))
            assert (fr["cookie"], fr["reason"]) == (0x15, DELETED)
            ofctl(target, "add-flow", "cookie=0x16,priority=9,udp,actions=drop")
            ofctl(target, "del-flows", "udp")                  # no flag: no message
            assert nothing_more(c, FLOW_REMOVED)
