"""A vhost-user device, back-end side: one handler per front-end request.

``VhostUserDevice`` holds the per-connection state (features, protocol features, memory,
rings, status) and answers requests already decoded and validated by
pyvhost.protocol.messages. Handlers return a reply payload or None, raise ``Refused`` for a
request they decline (the front-end gets a failure ack when it asked for one), or
``DeviceError`` for input that ends the connection. Sockets are the connection's job.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

from pyvhost._memory import Mapping
from pyvhost.memory import GuestMemory, GuestMemoryError, check_sealed
from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol import wire
from pyvhost.protocol.constants import BackendRequest as BR
from pyvhost.protocol.constants import Feature as F
from pyvhost.protocol.constants import IotlbType
from pyvhost.protocol.constants import ProtocolFeature as PF
from pyvhost.protocol.constants import Request as R

from .iotlb import ADDR_END, Iotlb
from .ring import Ring

log = logging.getLogger("pyvhost.backend")

MISS_RETRY = 1.0        # seconds before the same IOTLB miss is asked for again


class DeviceError(ValueError):
    """Input the device cannot accept: the connection is closed."""


class Refused(Exception):
    """A request the device declines without ending the connection."""


class VhostUserDevice:
    """Generic device state; subclasses say what they offer (``features``) and how rings are
    configured for the negotiated features (``ring_features``)."""

    features_offered = C.bit(F.VERSION_1) | C.bit(F.PROTOCOL_FEATURES)
    protocol_features_offered = C.bits(PF.MQ, PF.REPLY_ACK, PF.CONFIGURE_MEM_SLOTS)

    def __init__(self, num_rings: int, name: str = "vhost", *, strict_fds: bool | None = None):
        """``strict_fds``: refuse memory and dirty-log fds that cannot be sealed against
        shrinking (None: the process-wide pyvhost.memory.set_strict_fds setting)."""
        if not 1 <= num_rings <= C.MAX_RINGS:
            raise ValueError(f"{num_rings} rings: 1..{C.MAX_RINGS}")
        self.name = name
        self.rings = [Ring(i) for i in range(num_rings)]
        self.memory = GuestMemory(strict_fds=strict_fds)
        self.listeners: list[Callable[[], None]] = []
        self.log: tuple[Mapping, int, int] | None = None   # mapping, bitmap address, bytes
        self.iotlb = Iotlb()
        self.iotlb_event_fd = -1    # eventfd the data path signals on a miss (ACCESS_PLATFORM)
        self.backend_req: socket.socket | None = None
        self._misses_sent: dict[tuple[int, int], float] = {}
        self._reset_state()

    def _reset_state(self) -> None:
        self.owner = False
        self.features = 0
        self.features_set = False
        self.protocol_features = 0
        self.status = 0
        self.mtu = 0
        self.rarp_mac: bytes | None = None
        self.backend_req_fd = -1
        self.log_fd = -1

    # -- helpers --------------------------------------------------------------------
    def has(self, feature: int) -> bool:
        return bool(self.features & C.bit(feature))

    def has_protocol(self, feature: int) -> bool:
        return bool(self.protocol_features & C.bit(feature))

    def changed(self) -> None:
        """Ring state changed: tell the data path (poll threads, waiters)."""
        for fn in list(self.listeners):
            fn()

    def ring(self, index: int) -> Ring:
        if index >= len(self.rings):
            raise DeviceError(f"ring {index} does not exist (device has {len(self.rings)})")
        return self.rings[index]

    def ring_features(self) -> dict:
        """Keyword arguments for VirtQueue.set_features under the negotiated features."""
        return {"event_idx": self.has(F.RING_EVENT_IDX),
                "indirect": self.has(F.RING_INDIRECT_DESC),
                "mrg_rxbuf": False, "hdr_len": 12, "packed": self.has(F.RING_PACKED),
                "in_order": self.has(F.IN_ORDER)}

    def _swap_memory(self, retired) -> None:
        table = self.memory.table
        for ring in self.rings:
            ring.set_memory(table)
        for mapping in retired:
            mapping.close()
        self.changed()

    def set_fault_fd(self, fd: int) -> None:
        """The eventfd every ring signals when guest memory or the dirty log faults (-1: none)."""
        for ring in self.rings:
            with ring.vq:
                ring.vq.faultfd = fd

    def faulted_rings(self) -> list[int]:
        """Rings whose guest memory or dirty log faulted (SIGBUS) since the last reset."""
        return [ring.index for ring in self.rings if ring.vq.faults]

    def reset(self) -> None:
        """Initial state: the front-end went away, or asked for a reset."""
        for ring in self.rings:
            ring.reset()
        retired = self.memory.clear()
        for mapping in retired:
            mapping.close()
        self._drop_log()
        self._close_backend_req()
        if self.log_fd >= 0:
            os.close(self.log_fd)
        self.iotlb.clear()
        self._misses_sent.clear()
        if self.iotlb_event_fd >= 0:
            os.close(self.iotlb_event_fd)
            self.iotlb_event_fd = -1
        self._reset_state()
        self.changed()

    def handle(self, req: R, payload, fds: list[int]):
        """Run the handler of ``req``; it takes the fds it keeps out of ``fds``."""
        method = getattr(self, "on_" + req.name.lower(), None)
        if method is None:
            raise Refused(f"{req.name} is not supported by this device")
        return method(payload, fds)

    # -- features ---------------------------------------------------------------------
    def on_get_features(self, p, fds):
        return P.U64(self.features_offered)

    def on_set_features(self, p, fds):
        if p.value & ~self.features_offered:
            raise DeviceError(f"features {p.value:#x} include bits not offered "
                              f"({p.value & ~self.features_offered:#x})")
        changed = (p.value ^ self.features) & ~C.bit(F.LOG_ALL)
        if self.features_set and changed and any(r.started for r in self.rings):
            # only dirty logging may change under running rings (migration toggles it);
            # anything else would change the ring layout under the data path
            raise DeviceError(f"features change {changed:#x} while rings are running")
        self.features = p.value
        self.features_set = True
        kw = self.ring_features()
        for ring in self.rings:
            try:
                ring.set_features(**kw)
            except ValueError as e:
                raise DeviceError(f"ring {ring.index}: {e}") from None
        self._apply_logging()
        self._apply_iotlb()
        if not self.has(F.PROTOCOL_FEATURES):
            for ring in self.rings:        # spec: without bit 30 rings start enabled
                ring.set_enabled(True)
        self.changed()

    def on_get_protocol_features(self, p, fds):
        return P.U64(self.protocol_features_offered)

    def on_set_protocol_features(self, p, fds):
        if p.value & ~self.protocol_features_offered:
            raise DeviceError(f"protocol features {p.value:#x} include bits not offered")
        self.protocol_features = p.value

    def on_set_owner(self, p, fds):
        self.owner = True

    def on_reset_owner(self, p, fds):
        for ring in self.rings:
            ring.reset()
        self.features = 0
        self._apply_iotlb()
        self.changed()

    def on_reset_device(self, p, fds):
        protocol = self.protocol_features
        self.reset()
        self.owner = True
        self.protocol_features = protocol

    def on_get_queue_num(self, p, fds):
        return P.U64(len(self.rings) // 2)

    # -- memory -----------------------------------------------------------------------
    def on_set_mem_table(self, p, fds):
        try:
            retired = self.memory.replace(p.regions, [fds.pop(0) for _ in p.regions])
        except GuestMemoryError as e:
            raise DeviceError(str(e)) from None
        self._swap_memory(retired)

    def on_get_max_mem_slots(self, p, fds):
        return P.U64(self.memory.max_regions)

    def on_add_mem_reg(self, p, fds):
        try:
            retired = self.memory.add(p.region, fds.pop(0))
        except GuestMemoryError as e:
            raise DeviceError(str(e)) from None
        self._swap_memory(retired)

    def on_rem_mem_reg(self, p, fds):
        try:
            retired = self.memory.remove(p.region)
        except GuestMemoryError as e:
            raise Refused(str(e)) from None
        self._swap_memory(retired)

    # -- rings ------------------------------------------------------------------------
    def on_set_vring_num(self, p, fds):
        try:
            self.ring(p.index).set_num(p.num)
        except ValueError as e:
            raise DeviceError(f"ring {p.index}: {e}") from None

    def on_set_vring_addr(self, p, fds):
        ring = self.ring(p.index)
        ring.set_addr(p.desc, p.used, p.avail, p.log if p.flags & C.VRING_F_LOG else None)
        self._apply_logging([ring])
        self.changed()

    def on_set_vring_base(self, p, fds):
        if p.num > 0xFFFF and not self.has(F.RING_PACKED):
            raise DeviceError(f"ring {p.index}: split-ring base {p.num:#x} has reserved bits")
        self.ring(p.index).set_base(p.num)

    def on_get_vring_base(self, p, fds):
        base = self.ring(p.index).stop()
        self.changed()
        return P.VringState(p.index, base)

    def _vring_fd(self, p, fds) -> int:
        self.ring(p.index)
        return -1 if p.nofd else fds.pop(0)

    def on_set_vring_kick(self, p, fds):
        fd = self._vring_fd(p, fds)
        self.rings[p.index].set_kick(fd)
        self.changed()

    def on_set_vring_call(self, p, fds):
        fd = self._vring_fd(p, fds)
        self.rings[p.index].set_call(fd)

    def on_set_vring_err(self, p, fds):
        fd = self._vring_fd(p, fds)
        self.rings[p.index].set_err(fd)

    def on_set_vring_enable(self, p, fds):
        if p.num > 1:
            raise DeviceError(f"ring {p.index}: enable value {p.num}")
        self.ring(p.index).set_enabled(bool(p.num))
        self.changed()

    # -- dirty logging (live migration) -------------------------------------------------
    def _apply_logging(self, rings=None) -> None:
        addr, size = (self.log[1], self.log[2]) if self.log else (0, 0)
        for ring in rings or self.rings:
            ring.set_logging(self.has(F.LOG_ALL), addr, size)

    def _drop_log(self) -> None:
        old, self.log = self.log, None
        self._apply_logging()
        if old is not None:
            old[0].close()

    def on_set_log_base(self, p, fds):
        """The shared bitmap: one bit per 4 KiB of guest memory we write while migrating."""
        fd = fds.pop(0)
        try:
            if p.mmap_size == 0 or p.mmap_size > 1 << 40:
                raise DeviceError(f"dirty log of {p.mmap_size} bytes")
            try:
                check_sealed(fd, "dirty log", self.memory.strict_fds)   # before the size check
            except GuestMemoryError as e:
                raise DeviceError(str(e)) from None
            if os.fstat(fd).st_size < p.mmap_offset + p.mmap_size:
                raise DeviceError("dirty log runs past the end of its file")  # else SIGBUS
            try:
                mapping = Mapping(fd, p.mmap_offset + p.mmap_size)
            except (OSError, ValueError) as e:
                raise DeviceError(f"cannot map the dirty log: {e}") from None
        finally:
            os.close(fd)
        old, self.log = self.log, (mapping, mapping.addr + p.mmap_offset, p.mmap_size)
        self._apply_logging()
        if old is not None:
            old[0].close()
        log.info("%s: dirty log of %d bytes", self.name, p.mmap_size)
        return P.U64(0)

    def on_set_log_fd(self, p, fds):
        if self.log_fd >= 0:
            os.close(self.log_fd)
        self.log_fd = fds.pop(0)

    # -- device -----------------------------------------------------------------------
    def on_set_status(self, p, fds):
        if p.value > 0xFF:
            raise DeviceError(f"status {p.value:#x} is not a status byte")
        self.status = p.value

    def on_get_status(self, p, fds):
        return P.U64(self.status)

    def _close_backend_req(self) -> None:
        if self.backend_req is not None:
            self.backend_req.close()            # closes backend_req_fd
        elif self.backend_req_fd >= 0:
            os.close(self.backend_req_fd)
        self.backend_req = None
        self.backend_req_fd = -1

    def on_set_backend_req_fd(self, p, fds):
        self._close_backend_req()
        fd = fds.pop(0)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise DeviceError(f"the back-end request fd is not a socket: {e}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise DeviceError("the back-end request fd is not a Unix stream socket")
        sock.setblocking(False)     # the asyncio thread never blocks on the front-end
        self.backend_req = sock
        self.backend_req_fd = fd

    # -- IOTLB (VIRTIO_F_ACCESS_PLATFORM) -------------------------------------------------
    @property
    def iotlb_active(self) -> bool:
        return self.has(F.ACCESS_PLATFORM)

    def _apply_iotlb(self) -> None:
        """Rings translate through the IOTLB exactly when ACCESS_PLATFORM is negotiated."""
        if self.iotlb_active and self.iotlb_event_fd < 0:
            self.iotlb_event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            if not self.has_protocol(PF.BACKEND_REQ):
                log.warning("%s: ACCESS_PLATFORM without BACKEND_REQ: IOTLB misses cannot "
                            "be reported; the front-end must send every mapping", self.name)
        for ring in self.rings:
            ring.vq.missfd = self.iotlb_event_fd if self.iotlb_active else -1
        self._swap_iotlb()

    def _swap_iotlb(self, invalidated: tuple[int, int] | None = None) -> None:
        table = self.iotlb.table if self.iotlb_active else None
        for ring in self.rings:
            ring.set_iotlb(table, invalidated)
        for key in [k for k in self._misses_sent if self.iotlb.covers(*k)]:
            del self._misses_sent[key]
        self.changed()

    def on_iotlb_msg(self, p: P.IotlbMsg, fds):
        """Update or invalidate; anything else (or a nonsensical range) is refused with a
        failure reply and a log line, and the connection goes on."""
        if p.type == IotlbType.UPDATE:
            if p.size == 0 or p.iova + p.size > ADDR_END or p.uaddr + p.size > ADDR_END \
                    or p.perm not in (1, 2, 3):
                log.warning("%s: IOTLB update refused: iova %#x size %#x uaddr %#x perm %d",
                            self.name, p.iova, p.size, p.uaddr, p.perm)
                return P.U64(1)
            self.iotlb.update(p.iova, p.size, p.uaddr, p.perm)
            self._swap_iotlb()
        elif p.type == IotlbType.INVALIDATE:
            # size 0 (or a range past 2^64) reaches to the end of the IOVA space: QEMU sends
            # a global device-IOTLB flush as addr_mask + 1 == 0, vhost-net reads it so
            size = ADDR_END - p.iova if p.size == 0 or p.iova + p.size > ADDR_END else p.size
            self.iotlb.invalidate(p.iova, size)
            self._swap_iotlb((p.iova, size))
        else:
            log.warning("%s: IOTLB message of type %d refused", self.name, p.type)
            return P.U64(1)
        return P.U64(0)

    def iotlb_misses(self) -> list[tuple[int, int]]:
        """(iova, perm) of every translation some ring waits for."""
        out = []
        for ring in self.rings:
            with ring.vq:
                miss = ring.start_miss or ring.vq.take_miss()
            if miss is not None:
                out.append(miss)
        return out

    def send_iotlb_misses(self) -> bool:
        """Ask the front-end for every missing translation not asked for in the last
        MISS_RETRY seconds (on the non-blocking back-end request socket). True while some
        are outstanding (the caller asks again later)."""
        misses = self.iotlb_misses() if self.iotlb_active else []
        now = time.monotonic()
        for iova, perm in misses:
            key = (iova & ~0xFFF, perm)
            if now - self._misses_sent.get(key, -MISS_RETRY) < MISS_RETRY:
                continue
            if self.iotlb.covers(iova, perm):
                continue            # answered meanwhile; the swap already woke the ring
            if self._send_miss(iova, perm):
                self._misses_sent[key] = now
        return bool(misses)

    def _send_miss(self, iova: int, perm: int) -> bool:
        if self.backend_req is None:
            return False
        data = wire.encode_header(BR.IOTLB_MSG, C.VERSION, 32) + \
            P.IotlbMsg(iova, 0, 0, perm, IotlbType.MISS).pack()
        try:
            sent = self.backend_req.send(data)
        except (BlockingIOError, InterruptedError):
            return False            # the front-end is not reading; try again later
        except OSError as e:
            log.error("%s: back-end request channel failed: %s", self.name, e)
            self._close_backend_req()
            return False
        if sent < len(data):
            log.error("%s: back-end request channel full mid-message; closing it", self.name)
            self._close_backend_req()
            return False
        log.debug("%s: IOTLB miss sent for IOVA %#x perm %d", self.name, iova, perm)
        return True
