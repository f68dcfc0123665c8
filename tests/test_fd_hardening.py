"""A front-end cannot crash the back-end through an fd it handed over (issue 10, item 6).

Guest-memory and dirty-log fds are sealed against shrinking when they allow it. One that
cannot be sealed (a memfd created without MFD_ALLOW_SEALING, hugetlbfs, tmpfs files) and is
truncated under traffic makes the next access to it raise SIGBUS: the rings catch it, that
front-end's connection is closed with a log line and every other port keeps working. With
``--strict-fds`` such fds are refused up front.

Tests that would kill the process running them on a back-end without the guard run the
ring-level part in a child interpreter (``_isolated``), and the switch and the reflector as
child processes, so a regression is a failed test, not a dead test run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvhost.backend import NetDevice
from pyvhost.frontend import VirtioUser
from pyvhost.memory import GuestMemory, GuestMemoryError
from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol.constants import Feature as F
from pyvhost.protocol.constants import ProtocolFeature as PF
from pyvhost.protocol.constants import Request as R
from tests.harness import processes
from tests.harness.driver import DriverRing, GuestImage, PackedDriverRing
from tests.harness.frontends import drain
from tests.harness.vhost_client import (
    FEATURES,
    PROTOCOL,
    Frontend,
    Server,
    eventfd,
    fd_count,
    frontend,
    mem_table,
    negotiate,
    setup_ring,
    wait_closed,
)

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
LOG_BYTES = 4096
LOG_FEATURES = FEATURES | C.bit(F.LOG_ALL)
LOG_PROTOCOL = PROTOCOL | C.bit(PF.LOG_SHMFD)
FAULT_LINE = "guest memory or dirty log became inaccessible"
STRICT_LINE = "cannot be sealed against shrinking"
BCAST = b"\xff" * 6


def memfd(size: int, *, sealable: bool) -> int:
    fd = os.memfd_create("test-fd", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    os.ftruncate(fd, size)
    return fd


def frame(src: int, dst: bytes = BCAST) -> bytes:
    return dst + bytes([2, 0, 0, 0, 0, src]) + b"\x88\xb5" + b"x" * 50


def wait_for(cond, timeout: float = 5.0, what: str = "condition", proc=None) -> None:
    """Wait for ``cond()``; fail at once if ``proc`` (a PyvhostProcess) dies meanwhile."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and not proc.alive():
            raise AssertionError(f"the process died (status {proc.proc.returncode}) while "
                                 f"waiting for {what}:\n{proc.errors()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- sealing and --strict-fds in the memory layer and the device (in process) -----------

def test_sealable_memory_fd_is_sealed():
    with GuestImage((MiB,), sealable=True) as img:
        gm = img.guest_memory()
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(img.regions[0].fd, 0)
        finally:
            for m in gm.clear():
                m.close()


def test_strict_memory_refuses_unsealable_region_and_closes_its_fd():
    with GuestImage((MiB, MiB)) as img:
        base = fd_count()
        with pytest.raises(GuestMemoryError, match=STRICT_LINE):
            GuestMemory(strict_fds=True).replace(img.descs(), img.dup_fds())
        assert fd_count() == base
        gm = GuestMemory(strict_fds=False)          # the default takes it
        gm.replace(img.descs(), img.dup_fds())
        assert len(gm.regions) == 2
        for m in gm.clear():
            m.close()


def test_dirty_log_fd_is_sealed(server, image):
    log_fd = memfd(LOG_BYTES, sealable=True)
    try:
        with frontend(server) as fe:
            negotiate(fe, features=LOG_FEATURES, protocol=LOG_PROTOCOL)
            mem_table(fe, image)
            reply = fe.get(R.SET_LOG_BASE, P.LogBase(LOG_BYTES, 0), [log_fd])
            assert P.U64.unpack(reply.payload).value == 0
            with pytest.raises(PermissionError):       # the back-end sealed it
                os.ftruncate(log_fd, 0)
    finally:
        os.close(log_fd)


@pytest.fixture
def strict_server(sockdir):
    s = Server(os.path.join(sockdir, "strict.sock"), NetDevice(2, name="strict", strict_fds=True))
    yield s
    s.close()


def test_strict_device_refuses_unsealable_memory(strict_server, caplog):
    frontend(strict_server).__enter__().close()         # the server's own fds settle
    strict_server.sync()
    base = fd_count()
    with GuestImage((MiB, MiB)) as img, frontend(strict_server) as fe:
        negotiate(fe)
        mem_table(fe, img)
        wait_closed(strict_server, fe)
    assert f"SET_MEM_TABLE: memory region fd {STRICT_LINE}" in caplog.text
    assert "Traceback" not in caplog.text
    from tests.harness import vhost_client
    while vhost_client._TO_CLOSE:               # our copies of the fds we sent
        os.close(vhost_client._TO_CLOSE.pop())
    assert fd_count() == base
    with GuestImage((MiB, MiB), sealable=True) as img, frontend(strict_server) as fe:
        negotiate(fe)
        mem_table(fe, img)
        assert fe.get_u64(R.GET_FEATURES)             # sealable memory is taken
        assert len(strict_server.device.memory.regions) == 2


def test_strict_device_refuses_unsealable_log(strict_server, caplog):
    log_fd = memfd(LOG_BYTES, sealable=False)
    try:
        with GuestImage((MiB,), sealable=True) as img, frontend(strict_server) as fe:
            negotiate(fe, features=LOG_FEATURES, protocol=LOG_PROTOCOL)
            mem_table(fe, img)
            fe.send(R.SET_LOG_BASE, P.LogBase(LOG_BYTES, 0), [log_fd])
            wait_closed(strict_server, fe)
    finally:
        os.close(log_fd)
    assert f"SET_LOG_BASE: dirty log fd {STRICT_LINE}" in caplog.text
    assert strict_server.device.log is None
    with frontend(strict_server) as fe:
        assert fe.get_u64(R.GET_FEATURES)


# -- the rings survive a truncation (each in a child interpreter) -------------------------

def _isolated(name: str) -> None:
    """Run ``name()`` of this module in a child interpreter; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-c", f"import tests.test_fd_hardening as t; t.{name}()"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    if proc.returncode < 0:
        pytest.fail(f"{name} was killed by {signal.Signals(-proc.returncode).name}\n"
                    f"{proc.stdout}\n{proc.stderr}")
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "OK" in proc.stdout


def _child_truncated_memory(packed: bool) -> None:
    import faulthandler
    faulthandler.enable()               # installed after the guard: chained, not in the way
    from pyvhost._pktpool import PacketPool
    img = GuestImage((MiB, MiB))
    pool = PacketPool(8, 2048)
    tx = PackedDriverRing(img, 16) if packed else DriverRing(img, 16)
    rx = PackedDriverRing(img, 16) if packed else DriverRing(img, 16)
    vq_tx = tx.make_queue(img.guest_memory(), index=1)
    vq_rx = rx.make_queue(img.guest_memory(), index=0)
    if packed:
        for vq in (vq_tx, vq_rx):
            with vq:
                vq.set_features(event_idx=False, indirect=True, mrg_rxbuf=False, hdr_len=12,
                                packed=True)
                vq.start()
    tx.post_tx(b"a" * 60)
    assert vq_tx.recv_burst(pool) == [b"a" * 60]
    for _ in range(4):
        tx.post_tx(b"b" * 60)
        rx.post_rx()
    for r in img.regions:
        os.ftruncate(r.fd, 0)           # from here on nobody may touch the image
    assert vq_tx.recv_burst(pool) == []
    assert pool.available == pool.count, "packets taken before the fault were not returned"
    assert vq_tx.faults == 1 and vq_tx.broken and not vq_tx.ready
    assert vq_tx.recv_burst(pool) == []                 # stays out: no second fault
    assert vq_tx.faults == 1
    faultfd = eventfd()
    vq_rx.faultfd = faultfd
    assert vq_rx.send_burst(pool, [b"c" * 60]) == 0
    assert vq_rx.faults == 1 and pool.available == pool.count
    assert os.eventfd_read(faultfd) == 1                # the control side is told
    with vq_rx:
        try:
            vq_rx.start()
        except ValueError as e:
            assert "gone" in str(e)
        else:
            raise AssertionError("a ring over truncated memory started")
    print("OK")


def _child_truncated_memory_split() -> None:
    _child_truncated_memory(False)


def _child_truncated_memory_packed() -> None:
    _child_truncated_memory(True)


def _child_truncated_dirty_log() -> None:
    from pyvhost._memory import Mapping
    from pyvhost._pktpool import PacketPool
    img = GuestImage((MiB,), sealable=True)
    pool = PacketPool(8, 2048)
    rx = DriverRing(img, 16)
    vq = rx.make_queue(img.guest_memory())
    log_fd = memfd(LOG_BYTES, sealable=False)
    log_map = Mapping(log_fd, LOG_BYTES)
    with vq:
        vq.set_log(log_map.addr, LOG_BYTES)
        vq.set_log_flags(log_all=True, log_used=True, log_used_gpa=rx.used_gpa)
    rx.post_rx()
    assert vq.send_burst(pool, [b"a" * 60]) == 1
    assert any(os.pread(log_fd, LOG_BYTES, 0)), "nothing was logged"
    rx.post_rx()
    os.ftruncate(log_fd, 0)
    assert vq.send_burst(pool, [b"b" * 60]) == 0
    assert vq.faults == 1 and vq.broken
    vq.set_notify(True)                                 # not ready: no access, no crash
    print("OK")


def _child_unguarded_sigbus_is_still_fatal() -> None:
    import ctypes
    import mmap

    import pyvhost._vring  # noqa: F401  (installs the handler)
    fd = memfd(8192, sealable=False)
    m = mmap.mmap(fd, 8192)
    os.ftruncate(fd, 0)
    print((ctypes.c_char * 8192).from_buffer(m)[100])   # outside any ring: must die
    print("OK")


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rings_survive_truncated_memory(packed):
    _isolated("_child_truncated_memory_packed" if packed else "_child_truncated_memory_split")


def test_rings_survive_truncated_dirty_log():
    _isolated("_child_truncated_dirty_log")


def test_sigbus_outside_the_rings_still_kills():
    proc = subprocess.run(
        [sys.executable, "-c",
         "import tests.test_fd_hardening as t; t._child_unguarded_sigbus_is_still_fatal()"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stdout, proc.stderr)
    assert "OK" not in proc.stdout


# -- a front-end of our own that can truncate what it handed over ------------------------

class Attacker:
    """A QEMU-like front-end over GuestImage memory: RX ring 0 and TX ring 1 set up."""

    def __init__(self, path, *, sealable: bool = False, log: bool = False):
        self.image = GuestImage((MiB, MiB), sealable=sealable)
        self.rx = DriverRing(self.image, 64)
        self.tx = DriverRing(self.image, 64)
        self.image.mark_fixed()
        self.fds = [eventfd() for _ in range(3)]
        self.kick = self.fds[0]
        self.log_fd = -1
        self.fe = Frontend(str(path))
        self.log = log

    def setup(self) -> None:
        if self.log:
            negotiate(self.fe, features=LOG_FEATURES, protocol=LOG_PROTOCOL)
        else:
            negotiate(self.fe)
        mem_table(self.fe, self.image)
        for _ in range(16):
            self.rx.post_rx()
        setup_ring(self.fe, self.rx, 0, call=self.fds[1])
        setup_ring(self.fe, self.tx, 1, kick=self.kick, call=self.fds[2])
        self.fe.get_u64(R.GET_FEATURES)         # a reply: every request before it ran

    def set_log(self, *, sealable: bool) -> int:
        self.log_fd = memfd(LOG_BYTES, sealable=sealable)
        reply = self.fe.get(R.SET_LOG_BASE, P.LogBase(LOG_BYTES, 0), [self.log_fd])
        return P.U64.unpack(reply.payload).value

    def received(self) -> int:
        return len(self.rx.used())

    def truncate_memory(self) -> None:
        for r in self.image.regions:        # nobody may touch the image after this
            os.ftruncate(r.fd, 0)

    def close(self) -> None:
        self.fe.close()
        self.image.close()                  # munmap: no access to the truncated pages
        for fd in self.fds + ([self.log_fd] if self.log_fd >= 0 else []):
            os.close(fd)


SWITCH_CONFIG = """add-br br0
add-port br0 a type=vhostuser queues=1
add-port br0 b type=vhostuser queues=1
add-port br0 c type=vhostuser queues=1
"""


@contextlib.contextmanager
def _switch(workdir, *, strict: bool):
    """A switch; without ``--strict-fds`` with VirtioUser ports b and c (pyvhost's own
    front-end hands over unsealable memfds, which a strict switch refuses)."""
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=SWITCH_CONFIG,
                          extra=["--strict-fds"] if strict else [])
    ports = {}
    try:
        if not strict:
            for name in "bc":
                ports[name] = VirtioUser(str(run_dir / f"{name}.sock"), ring_size=256).open()
        yield sw, run_dir, ports
    finally:
        for p in ports.values():
            p.close()
        status = sw.stop()
        errors = sw.errors()
        assert "Traceback" not in errors, errors[-3000:]
        assert status == 0, errors[-3000:]


@pytest.fixture
def switch_bc(workdir):
    with _switch(workdir, strict=False) as s:
        yield s


@pytest.fixture
def strict_switch(workdir):
    with _switch(workdir, strict=True) as s:
        yield s


def _others_still_forward(ports) -> None:
    ports["b"].send([frame(2)])
    assert frame(2) in drain(ports["c"])
    ports["c"].send([frame(3)])
    assert frame(3) in drain(ports["b"])


@pytest.mark.parametrize("attack", ["memory", "dirty-log"])
def test_switch_survives_a_truncated_fd_under_traffic(switch_bc, attack):
    sw, run_dir, ports = switch_bc
    atk = Attacker(run_dir / "a.sock", sealable=attack == "dirty-log", log=attack == "dirty-log")
    try:
        atk.setup()
        if attack == "dirty-log":
            assert atk.set_log(sealable=False) == 0
        ports["b"].send([frame(2)])                       # flooded into a's RX ring
        wait_for(lambda: atk.received() >= 1, what="a frame flooded to the front-end")
        if attack == "dirty-log":
            assert any(os.pread(atk.log_fd, LOG_BYTES, 0)), "the switch logged nothing"
            os.ftruncate(atk.log_fd, 0)
        else:
            atk.truncate_memory()
        os.eventfd_write(atk.kick, 1)
        for _ in range(20):                               # traffic into a's ring
            ports["b"].send([frame(2)])
            if atk.fe.closed_by_peer(timeout=0.1):
                break
        else:
            pytest.fail("the switch did not drop the front-end whose fd was truncated")
    finally:
        atk.close()
    wait_for(lambda: FAULT_LINE in sw.errors(), what="the fault log line", proc=sw)
    drain(ports["b"], 0.2)
    drain(ports["c"], 0.2)
    _others_still_forward(ports)
    with VirtioUser(str(run_dir / "a.sock"), ring_size=256) as a:     # port a serves again
        ports["b"].send([frame(2)])
        assert frame(2) in drain(a)
    assert sw.alive()


def test_switch_strict_fds_refuses_unsealable_fds(strict_switch):
    sw, run_dir, _ = strict_switch
    base = proc_fds(sw.proc.pid)                        # before any front-end connects
    atk = Attacker(run_dir / "a.sock")                  # memory without MFD_ALLOW_SEALING
    try:
        negotiate(atk.fe)
        mem_table(atk.fe, atk.image)
        assert atk.fe.closed_by_peer(timeout=5)
    finally:
        atk.close()
    wait_for(lambda: STRICT_LINE in sw.errors(), what="the refusal log line")
    assert f"SET_MEM_TABLE: memory region fd {STRICT_LINE}" in sw.errors()
    atk = Attacker(run_dir / "a.sock", sealable=True, log=True)   # sealed memory, bad log
    try:
        atk.setup()
        atk.log_fd = memfd(LOG_BYTES, sealable=False)
        atk.fe.send(R.SET_LOG_BASE, P.LogBase(LOG_BYTES, 0), [atk.log_fd])
        assert atk.fe.closed_by_peer(timeout=5)
    finally:
        atk.close()
    wait_for(lambda: f"SET_LOG_BASE: dirty log fd {STRICT_LINE}" in sw.errors(),
             what="the log refusal line")
    wait_for(lambda: proc_fds(sw.proc.pid) == base, what="the switch's fd count to settle")
    sealed = {n: Attacker(run_dir / f"{n}.sock", sealable=True, log=True) for n in "ab"}
    try:                                                # sealed memory and log: served
        for atk in sealed.values():
            atk.setup()
            assert atk.set_log(sealable=True) == 0
        sealed["b"].tx.post_tx(frame(2))
        os.eventfd_write(sealed["b"].kick, 1)
        wait_for(lambda: sealed["a"].received() >= 1, what="a frame from b to a")
    finally:
        for atk in sealed.values():
            atk.close()
    assert sw.alive()


def _arp_request(src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    return (BCAST + src_mac + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x01"
            + src_mac + src_ip + bytes(6) + target_ip + bytes(18))


@pytest.mark.parametrize("mode", ["echo", "reply"])
def test_reflector_survives_truncated_memory(reflectors, workdir, mode):
    sock = workdir / "refl.sock"
    refl = reflectors(str(sock), mode=mode)
    atk = Attacker(sock)
    try:
        atk.setup()
        probe = (_arp_request(bytes([2, 0, 0, 0, 0, 1]), bytes([10, 0, 0, 1]),
                              bytes([10, 0, 0, 254])) if mode == "reply" else frame(1))
        atk.tx.post_tx(probe)
        os.eventfd_write(atk.kick, 1)
        wait_for(lambda: atk.received() >= 1, what="the reflector's answer")
        atk.tx.post_tx(probe)               # pending in the ring when the memory goes
        atk.truncate_memory()
        os.eventfd_write(atk.kick, 1)
        assert atk.fe.closed_by_peer(timeout=5), "the reflector kept the front-end"
    finally:
        atk.close()
    wait_for(lambda: FAULT_LINE in refl.errors(), what="the fault log line", proc=refl)
    with VirtioUser(str(sock), ring_size=256) as port:      # a fresh front-end is served
        port.send([probe])
        assert port.recv(timeout=5), "no answer on a fresh connection"
    assert refl.alive()
    assert refl.stop() == 0, refl.errors()[-3000:]       # ends promptly (nothing hangs)
    assert "Traceback" not in refl.errors(), refl.errors()[-3000:]


def test_reflector_strict_fds(reflectors, workdir):
    sock = workdir / "refl.sock"
    refl = reflectors(str(sock), mode="echo", extra=["--strict-fds"])
    atk = Attacker(sock)
    try:
        negotiate(atk.fe)
        mem_table(atk.fe, atk.image)
        assert atk.fe.closed_by_peer(timeout=5)
    finally:
        atk.close()
    wait_for(lambda: STRICT_LINE in refl.errors(), what="the refusal log line")
    atk = Attacker(sock, sealable=True)
    try:
        atk.setup()
        atk.tx.post_tx(frame(1))
        os.eventfd_write(atk.kick, 1)
        wait_for(lambda: atk.received() >= 1, what="the echo of a sealed front-end")
    finally:
        atk.close()
    assert refl.stop() == 0
    assert "Traceback" not in refl.errors()
