"""Faults around a running ``pyvhost switch``: a front-end that vanishes at every step of
the setup sequence or under traffic, kick/call fds and the memory table replaced under
traffic, a guest that stops reading its RX ring, and 1000 connect/disconnect cycles. Each
time the switch lives on, the other ports keep forwarding with exact counters, and its fds,
mappings and RSS stay bounded."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from pyvhost.frontend import BackendGone, VirtioUser
from pyvhost.frontend import channel as channel_mod
from pyvhost.protocol import payloads as P
from pyvhost.protocol.constants import Request as R
from tests.harness import processes

MAC = {n: bytes([0x02, 0, 0, 0, 0, i + 1]) for i, n in enumerate("abc")}
CONFIG = """add-br br0
add-port br0 a type=vhostuser queues=1
add-port br0 b type=vhostuser queues=1
add-port br0 c type=vhostuser queues=1
add-flow br0 priority=10,in_port=a,actions=output:b
add-flow br0 priority=10,in_port=b,actions=output:a
add-flow br0 priority=10,in_port=c,actions=output:a
"""


def frame(src: str, dst: str, n: int) -> bytes:
    return MAC[dst] + MAC[src] + b"\x88\xb5" + n.to_bytes(4, "big") + bytes(46)


@pytest.fixture
def rig(workdir):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=CONFIG)
    ports = {}
    try:
        for name in "ab":
            ports[name] = VirtioUser(str(run_dir / f"{name}.sock")).open()   # acked: ready
        yield sw, run_dir, ports
    finally:
        for p in ports.values():
            p.close()
        status = sw.stop()
        errors = sw.errors()
        assert "Traceback" not in errors and "internal error" not in errors, errors[-3000:]
        assert status == 0, errors[-3000:]


def exchange(ports, count: int = 200) -> None:
    """a -> b and b -> a, every frame arrives exactly once, in order."""
    for src, dst in (("a", "b"), ("b", "a")):
        frames = [frame(src, dst, i) for i in range(count)]
        got = []
        for i in range(0, count, 32):
            assert ports[src].send_all(frames[i:i + 32], timeout=5) == len(frames[i:i + 32])
            deadline = time.monotonic() + 5
            while len(got) < min(i + 32, count) and time.monotonic() < deadline:
                got += ports[dst].recv(timeout=0.5)
        assert got == frames, f"{src}->{dst}: {len(got)} of {count}"


def settle(condition, timeout: float = 5.0):
    """Poll ``condition()`` until it returns something true or ``timeout``; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def steady_usage(pid: int, timeout: float = 5.0) -> tuple[int, int, int]:
    """process_usage once the fd count has stopped changing (the switch closes a departed
    front-end's side on its own time): the same count over 4 samples 0.1 s apart."""
    deadline = time.monotonic() + timeout
    seen = [process_usage(pid)]
    while time.monotonic() < deadline:
        time.sleep(0.1)
        seen = seen[-3:] + [process_usage(pid)]
        if len(seen) == 4 and len({u[0] for u in seen}) == 1:
            break
    return seen[-1]


def process_usage(pid: int) -> tuple[int, int, int]:
    """(open fds, mappings, RSS kB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    maps = sum(1 for _ in open(f"/proc/{pid}/maps"))
    rss = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1))
    return fds, maps, rss


class CutAfter:
    """Make a front-end's control channel vanish after ``n`` requests."""

    def __init__(self, n: int):
        self.n = n
        self.seen = 0
        self.real = channel_mod.Channel.request

    def __enter__(self):
        cut = self

        def request(ch, req, payload=None, fds=()):
            cut.seen += 1
            if cut.seen > cut.n:
                ch.sock.close()
                raise BackendGone("cut by the test")
            return cut.real(ch, req, payload, fds)

        channel_mod.Channel.request = request
        return self

    def __exit__(self, *exc):
        channel_mod.Channel.request = self.real


def test_frontend_vanishes_at_every_setup_step(rig):
    sw, run_dir, ports = rig
    with CutAfter(10_000) as counter:                      # count a full setup first
        port = VirtioUser(str(run_dir / "c.sock")).open()
        steps = counter.seen
    port.close()
    assert steps > 15
    before = process_usage(sw.proc.pid)
    for k in range(steps):
        with CutAfter(k):
            port = VirtioUser(str(run_dir / "c.sock"))
            with pytest.raises(BackendGone):
                port.open()
            port.close()
        if k % 8 == 0:
            exchange(ports, 64)
    exchange(ports)
    # the switch closes its side of the last cut connection on its own time
    settle(lambda: process_usage(sw.proc.pid)[0] <= before[0] + 2)
    after = process_usage(sw.proc.pid)
    assert after[0] <= before[0] + 2 and after[1] <= before[1] + 4, (before, after)
    assert sw.alive() and "internal error" not in sw.errors()


def test_frontend_vanishes_under_traffic(rig):
    sw, run_dir, ports = rig
    for cycle in range(30):
        c = VirtioUser(str(run_dir / "c.sock")).open()
        c.send([frame("c", "a", 10_000 + i) for i in range(32)])
        c.channel.sock.close()                            # gone, no GET_VRING_BASE
        c.channel = None
        c.close()
        got = ports["a"].recv(timeout=0.3)
        while got and ports["a"].recv_nowait():
            pass
        if cycle % 10 == 0:
            exchange(ports, 64)
    while ports["a"].recv(timeout=0.3):                   # the last cycle's frames
        pass
    exchange(ports)
    assert sw.alive() and "internal error" not in sw.errors()


def test_fds_and_memory_table_replaced_under_traffic(rig):
    sw, run_dir, ports = rig
    stop = threading.Event()
    failures = []

    def churn():
        b = ports["b"]
        n = 0
        while not stop.is_set():
            try:
                fd = os.eventfd(0, os.EFD_NONBLOCK)
                b.channel.request(R.SET_VRING_CALL, P.VringFd(0), [fd])   # guest RX ring
                os.close(fd)
                # b's TX kick fd: the switch closes the one its PMD may be sleeping on and
                # takes a new descriptor of the same eventfd
                b.channel.request(R.SET_VRING_KICK, P.VringFd(1), [b.rings[1].kickfd])
                b.channel.request(R.SET_MEM_TABLE, b.memory.table(), b.memory.fds())
                n += 1
            except Exception as e:                          # pragma: no cover - reported
                failures.append(e)
                return
            time.sleep(0.005)

    t = threading.Thread(target=churn)
    t.start()
    try:
        sent, got = [frame("a", "b", i) for i in range(3000)], []
        for i in range(0, len(sent), 32):
            ports["a"].send_all(sent[i:i + 32], timeout=5)
            got += ports["b"].recv_nowait(max_packets=64)
        deadline = time.monotonic() + 5
        while len(got) < len(sent) and time.monotonic() < deadline:
            got += ports["b"].recv_nowait(max_packets=64) or []
            time.sleep(0.001)
    finally:
        stop.set()
        t.join(10)
    assert not failures, failures
    text = processes.ctl(run_dir, "dump-ports", "br0")
    full = int(re.search(r"\(b\).*\n.*full=(\d+)", text).group(1))
    assert len(got) + full == len(sent), (len(got), full, text)   # every frame accounted
    assert got == [f for f in sent if f in set(got)]                  # in order
    exchange(ports)                      # b's TX still works with its kick fd replaced


def test_guest_stops_reading_rx(rig):
    sw, run_dir, ports = rig
    c = VirtioUser(str(run_dir / "c.sock")).open()
    try:
        flood = [frame("a", "b", i) for i in range(5000)]
        for i in range(0, len(flood), 32):
            ports["a"].send_all(flood[i:i + 32], timeout=5)   # b never reads meanwhile

        def b_counters():
            text = processes.ctl(run_dir, "dump-ports", "br0")
            m = re.search(r"port 2\(b\).*\n\s+tx pkts=(\d+).*full=(\d+)", text)
            return int(m.group(1)), int(m.group(2)), text

        settle(lambda: sum(b_counters()[:2]) >= len(flood))     # the PMD's last bursts
        delivered, full, text = b_counters()
        assert delivered + full == len(flood) and full > 0, text
        got = []
        while True:
            more = ports["b"].recv(timeout=0.3)
            if not more:
                break
            got += more
        assert got == flood[:delivered]                      # what fitted, nothing else
        sent = c.send_all([frame("c", "a", i) for i in range(100)], timeout=5)
        got_a = []
        deadline = time.monotonic() + 5
        while len(got_a) < sent and time.monotonic() < deadline:
            got_a += ports["a"].recv(timeout=0.5)
        assert len(got_a) == sent == 100                     # other ports unaffected
    finally:
        c.close()
    exchange(ports)


def test_thousand_connect_disconnect_cycles_do_not_leak(rig):
    sw, run_dir, ports = rig
    path = str(run_dir / "c.sock")
    for _ in range(20):
        VirtioUser(path, mem_size=8 << 20).open().close()
    before = steady_usage(sw.proc.pid)         # the warm-up connections fully closed
    t0 = time.monotonic()
    for i in range(1000):
        VirtioUser(path, mem_size=8 << 20).open().close()
        if i % 250 == 0:
            exchange(ports, 32)
    settle(lambda: process_usage(sw.proc.pid)[0] <= before[0] + 2)
    after = process_usage(sw.proc.pid)
    print(f"1000 cycles in {time.monotonic() - t0:.1f} s; (fds, maps, RSS kB) "
          f"before {before}, after {after}")
    assert after[0] <= before[0] + 2, (before, after)
    assert after[1] <= before[1] + 8, (before, after)
    assert after[2] <= before[2] + 16 * 1024, (before, after)
    exchange(ports)


def test_frontend_that_never_reads_replies(rig):
    """It asks and asks but never reads: the switch drops it once its unread replies pile up,
    without ever blocking (the control socket answers at once, forwarding goes on)."""
    import socket

    from pyvhost.protocol import constants as C
    from pyvhost.protocol import wire
    sw, run_dir, ports = rig
    rogue = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rogue.connect(str(run_dir / "c.sock"))
    rogue.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rogue.settimeout(0.2)
    request = wire.encode_header(R.GET_FEATURES, C.VERSION, 0)
    sent = 0
    try:
        while sent < 100_000:
            rogue.sendall(request * 100)
            sent += 100
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    t0 = time.monotonic()
    assert "Bridge br0" in processes.ctl(run_dir, "show")
    assert time.monotonic() - t0 < 1.0
    exchange(ports)
    deadline = time.monotonic() + 5
    while "leaves" not in sw.errors() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "replies unread" in sw.errors()
    rogue.close()
    c = VirtioUser(str(run_dir / "c.sock")).open()            # the port takes a new one
    c.close()
