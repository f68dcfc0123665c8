"""A minimal driver-side (guest-side) split virtqueue in pure Python, for tests.

``GuestImage`` is "guest memory": one memfd per region, mapped here with Python's mmap (the
driver's view), laid out at distinct guest-physical and front-end-virtual bases so that both
translations of the device (descriptor GPAs, ring UVAs) are exercised. Regions are adjacent in
GPA space (a buffer may cross from one into the next) but not in UVA space, and every region
but the first starts at a non-zero offset in its memfd.

``DriverRing`` lays out a descriptor table, avail ring and used ring in that memory, posts
TX chains (virtio-net header + frame, split over any number of descriptors, optionally
through an indirect table) and RX buffers, reads used entries back, and gives raw access
to every descriptor and index so that tests can write hostile ones. ``make_queue`` builds the
device-side ``VirtQueue`` over the same memory.

Ring contents are little-endian (VIRTIO 1.x); this is test code for x86/arm64 hosts.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import deque
from dataclasses import dataclass

from pyvhost._vring import VirtQueue
from pyvhost.memory import GuestMemory
from pyvhost.protocol.payloads import MemRegion

F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

GPA_BASE = 0x100000
UVA_BASE = 0x7F0000000000
UVA_STRIDE = 0x10000000      # regions are this far apart in front-end virtual space
OFFSET_STEP = 0x2000         # region i starts at i * OFFSET_STEP in its memfd

VNET_HDR_LEN = 12


def vnet_hdr(num_buffers: int = 0, flags: int = 0, gso_type: int = 0) -> bytes:
    """A 12-byte virtio_net_hdr_v1."""
    return struct.pack("<BBHHHHH", flags, gso_type, 0, 0, 0, 0, num_buffers)


@dataclass
class ImageRegion:
    gpa: int
    size: int
    uva: int
    offset: int
    fd: int
    mm: mmap.mmap

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestImage:
    """Guest memory as the driver sees it: memfd-backed regions adjacent in GPA space."""

    def __init__(self, sizes=(1 << 20,), *, gpa: int = GPA_BASE, uva: int = UVA_BASE):
        self.regions: list[ImageRegion] = []
        at = gpa
        for i, size in enumerate(sizes):
            assert size % 4096 == 0 and size < UVA_STRIDE
            offset = i * OFFSET_STEP
            fd = os.memfd_create(f"guest{i}", os.MFD_CLOEXEC)
            os.ftruncate(fd, offset + size)
            mm = mmap.mmap(fd, offset + size)
            self.regions.append(ImageRegion(at, size, uva + i * UVA_STRIDE, offset, fd, mm))
            at += size
        self.start = gpa
        self.end = at
        self._next = gpa
        self._wrap_to = gpa

    # -- layout ------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 16) -> int:
        """A fresh GPA range of ``size`` bytes (bump allocator; wraps to the start)."""
        at = (self._next + align - 1) // align * align
        if at + size > self.end:
            at = (self._wrap_to + align - 1) // align * align
        self._next = at + max(size, 1)
        return at

    def mark_fixed(self) -> None:
        """Everything allocated so far (rings) is kept when the buffer arena wraps."""
        self._wrap_to = self._next

    def boundary(self, i: int = 0) -> int:
        """The GPA where region ``i`` ends and region ``i + 1`` begins."""
        return self.regions[i].end

    # -- translation (driver view) -----------------------------------------------------
    def region_of(self, gpa: int) -> ImageRegion:
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                return r
        raise KeyError(f"gpa {gpa:#x} is in no region")

    def uva(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.uva + (gpa - r.gpa)

    def write(self, gpa: int, data: bytes) -> None:
        data = memoryview(bytes(data))
        while len(data):
            r = self.region_of(gpa)
            n = min(len(data), r.end - gpa)
            o = r.offset + gpa - r.gpa
            r.mm[o:o + n] = data[:n]
            data = data[n:]
            gpa += n

    def read(self, gpa: int, length: int) -> bytes:
        out = bytearray()
        while length:
            r = self.region_of(gpa)
            n = min(length, r.end - gpa)
            o = r.offset + gpa - r.gpa
            out += r.mm[o:o + n]
            length -= n
            gpa += n
        return bytes(out)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * length)

    # -- what a front-end hands the back-end ------------------------------------------
    def descs(self) -> list[MemRegion]:
        return [MemRegion(r.gpa, r.size, r.uva, r.offset) for r in self.regions]

    def dup_fds(self) -> list[int]:
        """One new fd per region (the receiver owns them)."""
        return [os.dup(r.fd) for r in self.regions]

    def guest_memory(self) -> GuestMemory:
        gm = GuestMemory()
        gm.replace(self.descs(), self.dup_fds())
        return gm

    def close(self) -> None:
        for r in self.regions:
            r.mm.close()
            os.close(r.fd)
        self.regions = []

    def __enter__(self) -> GuestImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DriverRing:
    """The driver side of one split virtqueue of ``size`` entries in ``image``."""

    def __init__(self, image: GuestImage, size: int = 256):
        self.image = image
        self.size = size
        self.desc_gpa = image.alloc(16 * size, 4096)
        self.avail_gpa = image.alloc(6 + 2 * size, 4096)
        self.used_gpa = image.alloc(6 + 8 * size, 4096)
        image.fill(self.desc_gpa, 16 * size)
        image.fill(self.avail_gpa, 6 + 2 * size)
        image.fill(self.used_gpa, 6 + 8 * size)
        image.mark_fixed()
        self.avail_idx = 0          # the driver's shadow of avail->idx (free-running)
        self.last_used = 0
        self.free: deque[int] = deque(range(size))
        self.chains: dict[int, list[int]] = {}                 # head -> ring descriptors
        self.buffers: dict[int, list[tuple[int, int]]] = {}   # head -> (gpa, len) segments

    # -- addresses --------------------------------------------------------------------
    @property
    def desc_uva(self) -> int:
        return self.image.uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:
        return self.image.uva(self.avail_gpa)

    @property
    def used_uva(self) -> int:
        return self.image.uva(self.used_gpa)

    # -- raw access (hostile tests) ---------------------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        self.image.write(self.desc_gpa + 16 * i, DESC.pack(addr, length, flags, next))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return DESC.unpack(self.image.read(self.desc_gpa + 16 * i, 16))

    def set_avail_entry(self, slot: int, head: int) -> None:
        self.image.write(self.avail_gpa + 4 + 2 * (slot % self.size), U16.pack(head & 0xFFFF))

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.image.write(self.avail_gpa + 2, U16.pack(self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.image.write(self.avail_gpa, U16.pack(flags))

    def set_used_event(self, value: int) -> None:
        self.image.write(self.avail_gpa + 4 + 2 * self.size, U16.pack(value & 0xFFFF))

    def used_flags(self) -> int:
        return U16.unpack(self.image.read(self.used_gpa, 2))[0]

    def used_idx(self) -> int:
        return U16.unpack(self.image.read(self.used_gpa + 2, 2))[0]

    def avail_event(self) -> int:
        return U16.unpack(self.image.read(self.used_gpa + 4 + 8 * self.size, 2))[0]

    def used_elem(self, slot: int) -> tuple[int, int]:
        return USED_ELEM.unpack(self.image.read(self.used_gpa + 4 + 8 * (slot % self.size), 8))

    def publish(self, *heads: int) -> None:
        """Put heads in the avail ring, then move avail->idx past them."""
        for h in heads:
            self.set_avail_entry(self.avail_idx, h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    # -- building chains ----------------------------------------------------------------
    def take(self, n: int) -> list[int]:
        """``n`` free ring descriptors for hand-written (hostile) chains; never reclaimed
        unless the head comes back in a used entry and was registered in ``chains``."""
        return self._take(n)

    def _take(self, n: int) -> list[int]:
        if len(self.free) < n:
            raise RuntimeError(f"driver ring: {n} descriptors wanted, {len(self.free)} free")
        return [self.free.popleft() for _ in range(n)]

    def _chain(self, segs: list[tuple[int, int]], flags: int, indirect: bool) -> int:
        """Descriptors for the (gpa, len) segments, in the ring or an indirect table."""
        if indirect:
            table = self.image.alloc(16 * len(segs), 16)
            for k, (addr, length) in enumerate(segs):
                more = k + 1 < len(segs)
                self.image.write(table + 16 * k, DESC.pack(
                    addr, length, flags | (F_NEXT if more else 0), k + 1 if more else 0))
            (head,) = self._take(1)
            self.write_desc(head, table, 16 * len(segs), F_INDIRECT)
            self.chains[head] = [head]
        else:
            idx = self._take(len(segs))
            for k, (addr, length) in enumerate(segs):
                more = k + 1 < len(segs)
                self.write_desc(idx[k], addr, length, flags | (F_NEXT if more else 0),
                                idx[k + 1] if more else 0)
            head = idx[0]
            self.chains[head] = idx
        self.buffers[head] = segs
        return head

    def add_tx(self, frame: bytes, *, hdr: bytes | None = None, splits=None,
               indirect: bool = False, addrs=None) -> int:
        """Write header + frame into guest buffers and build a read-only chain (not yet
        published). ``splits`` is a segment count or a list of segment lengths; ``addrs``
        places the segments at given GPAs."""
        data = (vnet_hdr() if hdr is None else hdr) + frame
        lengths = _lengths(len(data), splits)
        segs = []
        at = 0
        for k, length in enumerate(lengths):
            gpa = addrs[k] if addrs is not None else self.image.alloc(length, 8)
            self.image.write(gpa, data[at:at + length])
            segs.append((gpa, length))
            at += length
        return self._chain(segs, 0, indirect)

    def post_tx(self, frame: bytes, **kw) -> int:
        head = self.add_tx(frame, **kw)
        self.publish(head)
        return head

    def add_rx(self, sizes=(2048,), *, indirect: bool = False, addrs=None) -> int:
        """A write-only chain of buffers with these sizes (not yet published)."""
        segs = []
        for k, length in enumerate(sizes):
            gpa = addrs[k] if addrs is not None else self.image.alloc(length, 8)
            self.image.fill(gpa, length, 0xEE)
            segs.append((gpa, length))
        return self._chain(segs, F_WRITE, indirect)

    def post_rx(self, sizes=(2048,), **kw) -> int:
        head = self.add_rx(sizes, **kw)
        self.publish(head)
        return head

    # -- completions --------------------------------------------------------------------
    def used(self) -> list[tuple[int, int]]:
        """Used entries (id, len) published since the last call; their descriptors are freed."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            head, length = self.used_elem(self.last_used)
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
            for d in self.chains.pop(head, []):
                self.free.append(d)
        return out

    def rx_bytes(self, head: int, length: int) -> bytes:
        """The first ``length`` bytes the device wrote into the buffers of ``head``."""
        out = bytearray()
        for gpa, seg in self.buffers[head]:
            if len(out) >= length:
                break
            out += self.image.read(gpa, min(seg, length - len(out)))
        return bytes(out)

    # -- the device side over the same memory ---------------------------------------------
    def make_queue(self, table, *, index: int = 0, event_idx: bool = False,
                   indirect: bool = True, mrg_rxbuf: bool = False, hdr_len: int = 12,
                   callfd: int = -1, enabled: bool = True, base: int = 0) -> VirtQueue:
        """A started device-side VirtQueue for this ring; ``table`` is a MemTable or a
        GuestMemory (whose table is taken)."""
        table = getattr(table, "table", table)
        vq = VirtQueue(index)
        with vq:
            vq.set_memory(table)
            vq.set_size(self.size)
            vq.set_addresses(self.desc_uva, self.used_uva, self.avail_uva)
            vq.set_features(event_idx=event_idx, indirect=indirect, mrg_rxbuf=mrg_rxbuf,
                            hdr_len=hdr_len)
            vq.base = base
            vq.callfd = callfd
            vq.enabled = enabled
            vq.start()
        return vq


def _lengths(total: int, splits) -> list[int]:
    if splits is None:
        return [total]
    if isinstance(splits, int):
        n = max(1, min(splits, total))
        step, extra = divmod(total, n)
        return [step + (1 if k < extra else 0) for k in range(n)]
    lengths = list(splits)
    assert sum(lengths) == total, (lengths, total)
    return lengths
