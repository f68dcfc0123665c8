"""What a guest's memory already holds is not stored again (DPDK's ASSIGN_UNLESS_EQUAL).
Device side: the RX header of a buffer whose header bytes are already the ones the device
would write (a header that ends a line, as DPDK's virtio driver lays buffers out: where the
frame starts in the header's line, that line is stored anyway and the header with it), and
a split used element whose slot already holds the same id and length.
Driver side (split): a descriptor and an avail entry that already hold the buffer being
posted again. Those lines are ones the other side's core reads for every frame; a store
moves them to our core and back. Shown with the writer's view of the page read-only
(mprotect): a store there is a SIGSEGV, which kills the child process the ring runs in.
Each case also runs once with a byte that differs, which must be stored: the child must
then die, so the protection is real and the test can fail."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import ctypes, struct, sys
from pyvhost._pktpool import PacketPool
from tests.harness.driver import DriverRing, GuestImage

PAGE, PROT_READ = 4096, 1
what, same = sys.argv[1], sys.argv[2] == "same"
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def read_only(gm, gpa):
    host, _ = gm.table.gpa_to_host(gpa)
    if libc.mprotect(host, PAGE, PROT_READ) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")


frame = bytes(range(60))
pool = PacketPool(8, 2048)
with GuestImage((1 << 20,)) as image:
    d = DriverRing(image, 64)
    if what == "used":                     # the used index in one page, the elements in
        pages = image.alloc(3 * PAGE, PAGE)     # the next: the ring starts 4 bytes before it
        d.used_gpa = pages + PAGE - 4
        image.fill(d.used_gpa, 6 + 8 * d.size)
    gm = image.guest_memory()
    vq = d.make_queue(gm, hdr_len=12)
    if what == "header":                   # the header ends a page, the frame starts the next
        pages = image.alloc(2 * PAGE, PAGE)
        head = d.post_rx((12 + 2036,), addrs=[pages + PAGE - 12])
        hdr = bytes(10) + struct.pack("<H", 1 if same else 2)   # num_buffers: 1 is right
        image.write(pages + PAGE - 12, hdr)
        read_only(gm, pages)
        assert vq.send_burst(pool, [frame]) == 1
        assert d.used() == [(head, 72)]
        assert d.rx_bytes(head, 72) == bytes(10) + struct.pack("<H", 1) + frame
    else:
        head = d.post_tx(frame)
        image.write(d.used_gpa + 4, struct.pack("<II", head, 0 if same else 9))
        read_only(gm, pages + PAGE)
        assert vq.recv_burst(pool) == [frame]
        assert d.used() == [(head, 0)]
    assert vq.stats()["packets"] == 1 and not vq.broken
print("delivered")
"""


DRIVER_CHILD = r"""
import ctypes, mmap, struct, sys
from pyvhost._driver import DriverQueue
from pyvhost._pktpool import PacketPool

PAGE, PROT_READ, SIZE, BUF, SLOTS_GPA = 4096, 1, 8, 256, 0x100000
what, same = sys.argv[1], sys.argv[2] == "same"
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
m = mmap.mmap(-1, 8 * PAGE)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
# descriptors in page 0; the avail flags and index end page 1, its entries start page 2
desc, avail, used, slots = 0, 2 * PAGE - 4, 3 * PAGE, 4 * PAGE
q = DriverQueue(0, True, SIZE, base + desc, base + avail, base + used, base + slots,
                SLOTS_GPA, BUF, BUF, m, False)
q.configure(event_idx=False, mrg_rxbuf=True, hdr_len=12, kickfd=-1, callfd=-1)
q.reset()
q.post_rx()
first = struct.unpack_from("<H", m, avail + 4)[0]          # the device takes slot 0's
assert struct.unpack_from("<QIHH", m, desc + 16 * first) == \
    (SLOTS_GPA + first * BUF, BUF, 2, 0)                    # (VRING_DESC_F_WRITE)
frame = bytes(range(60))
m[slots + first * BUF:slots + first * BUF + 72] = bytes(10) + struct.pack("<H", 1) + frame
struct.pack_into("<II", m, used + 4, first, 72)
struct.pack_into("<H", m, used + 2, 1)
if not same:                   # what the driver posts again differs from what is there
    if what == "desc":
        struct.pack_into("<I", m, desc + 16 * first + 8, BUF - 1)
    else:
        struct.pack_into("<H", m, avail + 4, (first + 1) % SIZE)
page = desc if what == "desc" else avail + 4
if libc.mprotect(base + page, PAGE, PROT_READ) != 0:
    raise OSError(ctypes.get_errno(), "mprotect")
got = q.recv(PacketPool(8, 2048))          # the frame, and its buffer posted again
assert [bytes(f) for f in got] == [frame], got
assert struct.unpack_from("<H", m, avail + 2)[0] == SIZE + 1   # published in slot 0
print("delivered")
"""


def run_child(what: str, same: bool) -> subprocess.CompletedProcess:
    script = DRIVER_CHILD if what in ("desc", "avail") else CHILD
    return subprocess.run([sys.executable, "-c", script, what, "same" if same else "other"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("what", ["header", "used", "desc", "avail"])
def test_a_value_already_there_is_not_stored(what):
    r = run_child(what, same=True)
    assert r.returncode == 0 and r.stdout.strip() == "delivered", (r.returncode, r.stderr)


@pytest.mark.parametrize("what", ["header", "used", "desc", "avail"])
def test_a_different_value_is_stored(what):
    """The control: the same page read-only, one byte different, and the store happens."""
    r = run_child(what, same=False)
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stdout, r.stderr[-2000:])

