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
from collections.abc import Callable

from pyvhost._memory import Mapping
from pyvhost.memory import GuestMemory, GuestMemoryError
from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol.constants import Feature as F
from pyvhost.protocol.constants import ProtocolFeature as PF
from pyvhost.protocol.constants import Request as R

from .ring import Ring

log = logging.getLogger("pyvhost.backend")


class DeviceError(ValueError):
    """Input the device cannot accept: the connection is closed."""


class Refused(Exception):
    """A request the device declines without ending the connection."""


class VhostUserDevice:
    """Generic device state; subclasses say what they offer (``features``) and how rings are
    configured for the negotiated features (``ring_features``)."""

    features_offered = C.bit(F.VERSION_1) | C.bit(F.PROTOCOL_FEATURES)
    protocol_features_offered = C.bits(PF.MQ, PF.REPLY_ACK, PF.CONFIGURE_MEM_SLOTS)

    def __init__(self, num_rings: int, name: str = "vhost"):
        if not 1 <= num_rings <= C.MAX_RINGS:
            raise ValueError(f"{num_rings} rings: 1..{C.MAX_RINGS}")
        self.name = name
        self.rings = [Ring(i) for i in range(num_rings)]
        self.memory = GuestMemory()
        self.listeners: list[Callable[[], None]] = []
        self.log: tuple[Mapping, int, int] | None = None   # mapping, bitmap address, bytes
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
                "mrg_rxbuf": False, "hdr_len": 12, "packed": self.has(F.RING_PACKED)}

    def _swap_memory(self, retired) -> None:
        table = self.memory.table
        for ring in self.rings:
            ring.set_memory(table)
        for mapping in retired:
            mapping.close()
        self.changed()

    def reset(self) -> None:
        """Initial state: the front-end went away, or asked for a reset."""
        for ring in self.rings:
            ring.reset()
        retired = self.memory.clear()
        for mapping in retired:
            mapping.close()
        self._drop_log()
        for fd in (self.backend_req_fd, self.log_fd):
            if fd >= 0:
                os.close(fd)
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
        self.features = p.value
        self.features_set = True
        kw = self.ring_features()
        for ring in self.rings:
            ring.set_features(**kw)
        self._apply_logging()
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

    def on_set_backend_req_fd(self, p, fds):
        if self.backend_req_fd >= 0:
            os.close(self.backend_req_fd)
        self.backend_req_fd = fds.pop(0)
