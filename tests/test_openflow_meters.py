"""OpenFlow meters: the compiled token buckets (a burst, then the rate; bands counted),
METER_MOD and the meter multiparts against a switch run in-process (each refusal with
the spec's METER_MOD_FAILED code, the METER instruction round trip), and the real
``ovs-ofctl -O OpenFlow13`` against a running switch with pyvhost front-end guests:
add-meter/mod-meter/del-meter, dump-meters, meter-stats and meter-features checked,
``meter:N`` rules made by ovs-ofctl and by ``ctl`` shown alike by both dump-flows, guest
traffic limited by pktps and kbps meters (frames counted, every frame accounted for in
the meter's counters), a meter changed under a cached flow, deleting a meter deletes its
rules, meters surviving a switch restart."""

from __future__ import annotations

import os
import re
import struct
import time

import pytest

from pyvhost import _meter
from pyvhost.openflow import errors as E
from pyvhost.switch.flows import FlowSyntaxError, parse_flow
from tests.harness import openflow as O
from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports
from tests.harness.openflow import ofctl
from tests.test_openflow_codec import IN1, TO2, running  # noqa: F401 (a fixture)
from tests.test_openflow_packets import CONFIG, MAC, listening_port, udp

METER_MOD, ERROR = 29, 1
KBPS, PKTPS, BURST, STATS = 1, 2, 4, 8
SEC = 1_000_000_000


def MMOD(command: int, flags: int, mid: int, *bands: bytes, xid: int = 1) -> bytes:  # noqa: N802
    return O.msg(METER_MOD, struct.pack("!HHI", command, flags, mid) + b"".join(bands), xid)


def DROP(rate: int, burst: int = 0, btype: int = 1, length: int = 16) -> bytes:  # noqa: N802
    return struct.pack("!HHII", btype, length, rate, burst) + bytes(length - 12)


def METER_INSTR(mid: int) -> bytes:  # noqa: N802
    return struct.pack("!HHI", 6, 8, mid)


def test_meter_buckets_pass_a_burst_then_the_rate():
    t = _meter.MeterTable()
    t.set(3, True, [(10, 5)])                    # 10 packets/s, a burst of 5
    now = time.monotonic_ns() + SEC              # (the buckets start full at set())
    assert [t.admit(3, 60, now) for _ in range(7)] == [True] * 5 + [False] * 2
    assert [t.admit(3, 60, now + SEC // 2) for _ in range(7)] == [True] * 5 + [False] * 2
    assert t.stats(3) == (14, 840, [(4, 240)])
    t.set(3, True, [(1000, 1000)], keep_counters=True)      # modified: counters stay
    assert all(t.admit(3, 60, now + SEC) for _ in range(100))
    assert t.stats(3) == (114, 6840, [(4, 240)])
    t.set(4, False, [(1000, 1500), (100000, 100000)])       # bytes: 1000 B/s, 1500 B
    assert [t.admit(4, 1000, now) for _ in range(2)] == [True, False]
    assert t.stats(4)[2] == [(1, 1000), (0, 0)]              # the exceeded band counts
    assert t.admit(4, 500, now) and not t.admit(4, 100, now)
    assert t.admit(4, 1000, now + SEC)
    t.clear(4)
    assert all(t.admit(4, 9000, now) for _ in range(10))      # no meter there: passes
    assert t.admit(_meter.SLOTS + 5, 60, now)
    for bad in ([], [(0, 1)], [(1, 0)], [(1, 1)] * (_meter.BANDS + 1)):
        with pytest.raises(ValueError):
            t.set(1, True, bad)


def test_meter_in_rule_syntax():
    f = parse_flow("in_port=1,actions=meter:7,output:2")
    assert f.actions == (("meter", 7), ("output", "2"))
    assert f.format() == "priority=32768,in_port=1,actions=meter:7,output:2"
    for bad in ("actions=output:2,meter:7", "actions=meter:0", "actions=meter:1,meter:2",
                "actions=meter:0xffff0001"):
        with pytest.raises(FlowSyntaxError):
            parse_flow(bad)


def _error(c: O.Client, data: bytes) -> tuple[int, int] | None:
    c.send(data)
    c.send(O.msg(O.BARRIER_REQUEST, xid=99))
    got = None
    while True:
        t, xid, body = c.recv()
        if t == ERROR:
            got = struct.unpack_from("!HH", body)
        elif t == O.BARRIER_REPLY and xid == 99:
            return got


def test_meter_mods_follow_the_spec(running):  # noqa: F811
    MF = E.METER_MOD_FAILED                                      # noqa: N806
    with running.client() as c:
        assert _error(c, MMOD(0, PKTPS | BURST | STATS, 1, DROP(10, 5))) is None
        assert _error(c, MMOD(0, KBPS, 2, DROP(80), DROP(800))) is None
        for data, code in (
                (MMOD(0, PKTPS, 1, DROP(10)), E.MMFC_METER_EXISTS),
                (MMOD(1, PKTPS, 9, DROP(10)), E.MMFC_UNKNOWN_METER),
                (MMOD(0, PKTPS | KBPS, 3, DROP(10)), E.MMFC_BAD_FLAGS),
                (MMOD(0, BURST, 3, DROP(10)), E.MMFC_BAD_FLAGS),
                (MMOD(0, PKTPS | 0x10, 3, DROP(10)), E.MMFC_BAD_FLAGS),
                (MMOD(0, PKTPS, 3, DROP(0)), E.MMFC_BAD_RATE),
                (MMOD(0, PKTPS, 3), E.MMFC_BAD_BAND),
                (MMOD(0, PKTPS, 3, DROP(10, btype=2)), E.MMFC_BAD_BAND),
                (MMOD(0, PKTPS, 3, DROP(10, length=24)), E.MMFC_BAD_BAND),
                (MMOD(0, PKTPS, 3, DROP(10)[:12]), E.MMFC_BAD_BAND),
                (MMOD(0, PKTPS, 3, DROP(10), DROP(10)), E.MMFC_BAD_BAND_VALUE),
                (MMOD(0, PKTPS, 3, *[DROP(i + 1) for i in range(_meter.BANDS + 1)]),
                 E.MMFC_OUT_OF_BANDS),
                (MMOD(0, PKTPS, 0, DROP(10)), E.MMFC_INVALID_METER),
                (MMOD(0, PKTPS, 0xFFFFFFFE, DROP(10)), E.MMFC_INVALID_METER),
                (MMOD(7, PKTPS, 3, DROP(10)), E.MMFC_BAD_COMMAND),
                (O.flow_mod(O.ADD, IN1, METER_INSTR(5) + TO2), E.MMFC_UNKNOWN_METER),
                (O.flow_mod(O.ADD, IN1, METER_INSTR(0) + TO2), E.MMFC_INVALID_METER)):
            assert _error(c, data) == (MF, code), (data.hex(), code)
        # the METER instruction: stored as meter:N, read back as an instruction
        assert _error(c, O.flow_mod(O.ADD, IN1, METER_INSTR(1) + TO2, priority=5)) is None
        assert "priority=5,in_port=1 actions=meter:1,output:2" in \
            running.ctl("dump-flows", "--no-stats", "br0")
        t, _, body = c.request(O.flow_stats_request())
        assert METER_INSTR(1) + TO2 in body
        # METER_CONFIG, METER_FEATURES, METER
        t, _, body = c.request(O.multipart(10, struct.pack("!I4x", 0xFFFFFFFF)))
        assert body[8:] == struct.pack("!HHI", 24, PKTPS | BURST | STATS, 1) + DROP(10, 5) + \
            struct.pack("!HHI", 40, KBPS, 2) + DROP(80) + DROP(800), body[8:].hex()
        t, _, body = c.request(O.multipart(11))
        assert body[8:] == struct.pack("!IIIBB2x", _meter.SLOTS, 2, 15, _meter.BANDS, 0)
        t, _, body = c.request(O.multipart(9, struct.pack("!I4x", 1)))
        mid, length, flow_count, packets, bytes_ = struct.unpack_from("!IH6xIQQ", body, 8)
        assert (mid, length, flow_count, packets, bytes_) == (1, 56, 1, 0, 0)
        assert len(body) == 8 + 56
        for mtype, req in ((9, b""), (10, bytes(4)), (11, b"x")):
            assert _error(c, O.multipart(mtype, req)) == (E.BAD_REQUEST, E.BRC_BAD_LEN)
        # MODIFY keeps the rule; DELETE takes the rules using the meter with it
        assert _error(c, MMOD(1, KBPS, 1, DROP(1000))) is None
        assert "meter:1" in running.ctl("dump-flows", "br0")
        assert _error(c, MMOD(2, 0, 1)) is None
        assert "meter:1" not in running.ctl("dump-flows", "br0")
        assert _error(c, MMOD(2, 0, 0xFFFFFFFF)) is None
        t, _, body = c.request(O.multipart(10, struct.pack("!I4x", 0xFFFFFFFF)))
        assert body[8:] == b""


def _send_paced(src, frame: bytes, seconds: float, burst: int = 5) -> tuple[int, float]:
    """(frames sent, seconds it took): ``burst`` frames every 50 ms."""
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() < t0 + seconds:
        src.send_all([frame] * burst)
        sent += burst
        time.sleep(0.05)
    return sent, time.monotonic() - t0


def _meter_counts(target: str, mid: int) -> tuple[int, int]:
    """(packet_in_count, band 0's packet_count) from ovs-ofctl meter-stats."""
    out = ofctl(target, "meter-stats", f"meter={mid}").stdout
    m = re.search(rf"meter:{mid} flow_count:\d+ packet_in_count:(\d+) .*\n0: packet_count:(\d+)",
                  out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


@pytest.mark.skipif(not os.path.exists(O.OVS_OFCTL),
                    reason="ovs-ofctl (Debian openvswitch-common) is not installed")
def test_meters_through_ofctl(workdir):
    with switch_with_ports(workdir, CONFIG, "abc") as (run_dir, ports):
        target = f"tcp:127.0.0.1:{listening_port(run_dir)}"
        a, b, c = ports["a"], ports["b"], ports["c"]
        ofctl(target, "add-meter", "meter=1,pktps,burst,stats,band=type=drop,rate=10,"
              "burst_size=10")
        ofctl(target, "add-meter", "meter=2,kbps,band=type=drop,rate=80")
        dump = ofctl(target, "dump-meters").stdout
        assert "meter=1 pktps burst stats bands=\ntype=drop rate=10 burst_size=10" in dump, dump
        assert "meter=2 kbps bands=\ntype=drop rate=80\n" in dump, dump
        features = ofctl(target, "meter-features").stdout
        assert "max_meter:1024 max_bands:4" in features and "band_types: drop" in features
        assert "capabilities: kbps pktps burst stats" in features, features
        r = ofctl(target, "add-meter", "meter=1,pktps,band=type=drop,rate=5", check=False)
        assert r.returncode != 0 and "OFPMMFC_METER_EXISTS" in r.stderr, r.stderr
        r = ofctl(target, "mod-meter", "meter=9,pktps,band=type=drop,rate=5", check=False)
        assert r.returncode != 0 and "OFPMMFC_UNKNOWN_METER" in r.stderr, r.stderr
        r = ofctl(target, "add-meter", "meter=3,pktps,band=type=dscp_remark,rate=5,"
                  "prec_level=1", check=False)
        assert r.returncode != 0 and "OFPMMFC_BAD_BAND" in r.stderr, r.stderr
        r = ofctl(target, "add-flow", "priority=9,actions=meter:7,output:2", check=False)
        assert r.returncode != 0 and "OFPMMFC_UNKNOWN_METER" in r.stderr, r.stderr
        # a rule from ovs-ofctl and one from ctl, shown alike by both dump-flows
        ofctl(target, "add-flow", "priority=10,in_port=1,udp,tp_dst=53,actions=meter:1,output:2")
        processes.ctl(run_dir, "add-flow", "br0",
                      "priority=10,in_port=a,udp,tp_dst=54,actions=meter:2,output:c")
        of_dump = ofctl(target, "dump-flows").stdout
        ctl_dump = processes.ctl(run_dir, "dump-flows", "br0")
        for dump in (of_dump, ctl_dump):
            assert "priority=10,udp,in_port=1,tp_dst=53 actions=meter:1,output:2" in dump, dump
        assert "priority=10,udp,in_port=1,tp_dst=54 actions=meter:2,output:3" in of_dump, of_dump
        assert "actions=meter:2,output:c" in ctl_dump, ctl_dump
        # pktps: 10 a second after a burst of 10; every frame counted by the meter
        f53 = udp(MAC["a"], MAC["b"], dport=53)
        sent, elapsed = _send_paced(a, f53, 2.0)
        got = len(drain(b))
        # at least the burst, at most the burst and the rate over the time (and a second)
        assert 10 <= got <= 10 + 10 * (elapsed + 1) < sent, (got, sent, elapsed)
        assert _meter_counts(target, 1) == (sent, sent - got)
        # the meter changed under the cached flow: a high rate lets everything through
        ofctl(target, "mod-meter", "meter=1,pktps,band=type=drop,rate=100000")
        a.send_all([f53] * 50)
        assert len(drain(b)) == 50
        # ... and a low one limits it again, without touching the rule
        ofctl(target, "mod-meter", "meter=1,pktps,burst,band=type=drop,rate=1,burst_size=2")
        t0 = time.monotonic()
        a.send_all([f53] * 40)
        got = len(drain(b))
        assert 2 <= got <= 2 + (time.monotonic() - t0 + 1), got
        # kbps: 80 kbit/s = 10000 bytes/s, a burst of one second: frames of ~1000 bytes
        f54 = udp(MAC["a"], MAC["c"], dport=54, size=960)
        t0 = time.monotonic()
        a.send_all([f54] * 30)
        a.send_all([f54] * 30)
        got = len(drain(c))
        assert 5 <= got <= 10 + 10 * (time.monotonic() - t0 + 1) < 60, got
        assert _meter_counts(target, 2) == (60, 60 - got)
        # other traffic is not metered
        f55 = udp(MAC["a"], MAC["b"], dport=55)
        a.send_all([f55] * 60)
        assert len(drain(b)) == 60
    # meters (and the rules using them) come back with the switch
    sw = processes.switch(workdir, run_dir, name="switch2")
    try:
        target = f"tcp:127.0.0.1:{listening_port(run_dir)}"
        dump = ofctl(target, "dump-meters").stdout
        assert "meter=1 pktps burst bands=\ntype=drop rate=1 burst_size=2" in dump, dump
        assert "meter=2 kbps bands=" in dump, dump
        assert "actions=meter:2,output:3" in ofctl(target, "dump-flows").stdout
        ofctl(target, "del-meter", "meter=2")
        flows = ofctl(target, "dump-flows").stdout
        assert "meter:2" not in flows and "meter:1" in flows, flows
        ofctl(target, "del-meters")
        assert "meter" not in ofctl(target, "dump-flows").stdout
    finally:
        assert sw.stop() == 0
