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

    def __init__(self, sizes=(1 << 20,), *, gpa: int = GPA_BASE, uva: int = UVA_BASE,
                 sealable: bool = False):
        """``sealable``: memfds created with MFD_ALLOW_SEALING (as QEMU's are), which a
        back-end can seal against shrinking; by default they cannot be sealed."""
        self.regions: list[ImageRegion] = []
        at = gpa
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
        for i, size in enumerate(sizes):
            assert size % 4096 == 0 and size < UVA_STRIDE
            offset = i * OFFSET_STEP
            fd = os.memfd_create(f"guest{i}", flags)
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


# ======================================================================================
# packed virtqueues (VIRTIO 1.1 section 2.7), driver side
# ======================================================================================

PACKED_F_AVAIL = 1 << 7
PACKED_F_USED = 1 << 15
EVENT_ENABLE = 0
EVENT_DISABLE = 1
EVENT_DESC = 2
PDESC = struct.Struct("<QIHH")      # addr, len, id, flags


def packed_flags(wrap: int, flags: int = 0) -> int:
    """``flags`` plus the AVAIL/USED bits that make a descriptor available under ``wrap``."""
    return flags | (PACKED_F_AVAIL if wrap else 0) | (0 if wrap else PACKED_F_USED)


class PackedDriverRing:
    """The driver side of one packed virtqueue of ``size`` entries (any size 1..32768) in
    ``image``: a descriptor ring and the two event-suppression areas.

    Buffers are posted as chains of consecutive descriptors (or one indirect descriptor)
    carrying one buffer id; ``used()`` reads the device's used descriptors back in order.
    ``write_desc``/``read_desc`` give raw access for hostile tests."""

    def __init__(self, image: GuestImage, size: int = 256):
        self.image = image
        self.size = size
        self.desc_gpa = image.alloc(16 * size, 4096)
        self.driver_event_gpa = image.alloc(4, 64)     # the device's "avail" pointer
        self.device_event_gpa = image.alloc(4, 64)     # the device's "used" pointer
        image.fill(self.desc_gpa, 16 * size)
        image.fill(self.driver_event_gpa, 4)
        image.fill(self.device_event_gpa, 4)
        image.mark_fixed()
        self.next_avail = 0
        self.avail_wrap = 1
        self.next_used = 0
        self.used_wrap = 1
        self.free_ids: deque[int] = deque(range(size))
        self.slots_of: dict[int, int] = {}            # buffer id -> ring slots it took
        self.in_flight = 0                            # ring slots not yet returned
        self.buffers: dict[int, list[tuple[int, int]]] = {}

    # -- addresses --------------------------------------------------------------------
    @property
    def desc_uva(self) -> int:
        return self.image.uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:          # what SET_VRING_ADDR calls avail: driver area
        return self.image.uva(self.driver_event_gpa)

    @property
    def used_uva(self) -> int:           # ... and used: the device area
        return self.image.uva(self.device_event_gpa)

    # -- raw access ---------------------------------------------------------------------
    def write_desc(self, slot: int, addr: int, length: int, id: int = 0, flags: int = 0) -> None:
        self.image.write(self.desc_gpa + 16 * (slot % self.size),
                         PDESC.pack(addr & (1 << 64) - 1, length & 0xFFFFFFFF, id & 0xFFFF,
                                    flags & 0xFFFF))

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        return PDESC.unpack(self.image.read(self.desc_gpa + 16 * (slot % self.size), 16))

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        self.image.write(self.driver_event_gpa, struct.pack("<HH", off_wrap, flags))

    def device_event(self) -> tuple[int, int]:
        """(flags, off_wrap) the device wrote."""
        off_wrap, flags = struct.unpack("<HH", self.image.read(self.device_event_gpa, 4))
        return flags, off_wrap

    # -- posting ------------------------------------------------------------------------
    def _post(self, segs: list[tuple[int, int]], write: bool, indirect: bool) -> int:
        if not self.free_ids:
            raise RuntimeError("packed driver ring: no free buffer id")
        base_flags = F_WRITE if write else 0
        if indirect:
            table = self.image.alloc(16 * len(segs), 16)
            for k, (addr, length) in enumerate(segs):
                self.image.write(table + 16 * k, PDESC.pack(addr, length, 0, base_flags))
            descs = [(table, 16 * len(segs), F_INDIRECT)]
        else:
            descs = [(addr, length, base_flags | (F_NEXT if k + 1 < len(segs) else 0))
                     for k, (addr, length) in enumerate(segs)]
        if self.in_flight + len(descs) > self.size:
            raise RuntimeError("packed driver ring: full")
        buf_id = self.free_ids.popleft()
        first, first_wrap = self.next_avail, self.avail_wrap
        for k, (addr, length, flags) in enumerate(descs):
            if k:       # the head's flags are written last: it publishes the chain
                self.write_desc(self.next_avail, addr, length, buf_id,
                                packed_flags(self.avail_wrap, flags))
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail = 0
                self.avail_wrap ^= 1
        addr, length, flags = descs[0]
        self.write_desc(first, addr, length, buf_id, packed_flags(first_wrap, flags))
        self.slots_of[buf_id] = len(descs)
        self.in_flight += len(descs)
        self.buffers[buf_id] = segs
        return buf_id

    def post_tx(self, frame: bytes, *, hdr: bytes | None = None, splits=None,
                indirect: bool = False) -> int:
        data = (vnet_hdr() if hdr is None else hdr) + frame
        segs, at = [], 0
        for length in _lengths(len(data), splits):
            gpa = self.image.alloc(length, 8)
            self.image.write(gpa, data[at:at + length])
            segs.append((gpa, length))
            at += length
        return self._post(segs, False, indirect)

    def post_rx(self, sizes=(2048,), *, indirect: bool = False) -> int:
        segs = []
        for length in sizes:
            gpa = self.image.alloc(length, 8)
            self.image.fill(gpa, length, 0xEE)
            segs.append((gpa, length))
        return self._post(segs, True, indirect)

    # -- completions --------------------------------------------------------------------
    def used(self) -> list[tuple[int, int]]:
        """Used buffers (id, len) since the last call, in the order the device wrote them."""
        out = []
        while self.in_flight:
            _, length, buf_id, flags = self.read_desc(self.next_used)
            avail = bool(flags & PACKED_F_AVAIL)
            used = bool(flags & PACKED_F_USED)
            if not (avail == used == bool(self.used_wrap)):
                break
            out.append((buf_id, length))
            n = self.slots_of.pop(buf_id, 1)
            self.free_ids.append(buf_id)
            self.in_flight -= n
            self.next_used += n
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap ^= 1
        return out

    def rx_bytes(self, buf_id: int, length: int) -> bytes:
        out = bytearray()
        for gpa, seg in self.buffers[buf_id]:
            if len(out) >= length:
                break
            out += self.image.read(gpa, min(seg, length - len(out)))
        return bytes(out)

    # -- the device side over the same memory ---------------------------------------------
    def make_queue(self, table, *, index: int = 0, event_idx: bool = False,
                   indirect: bool = True, mrg_rxbuf: bool = False, hdr_len: int = 12,
                   callfd: int = -1, enabled: bool = True) -> VirtQueue:
        """A started packed device-side VirtQueue for this ring."""
        table = getattr(table, "table", table)
        vq = VirtQueue(index)
        with vq:
            vq.set_features(event_idx=event_idx, indirect=indirect, mrg_rxbuf=mrg_rxbuf,
                            hdr_len=hdr_len, packed=True)
            vq.set_memory(table)
            vq.set_size(self.size)
            vq.set_addresses(self.desc_uva, self.used_uva, self.avail_uva)
            vq.callfd = callfd
            vq.enabled = enabled
            vq.start()
        return vq
