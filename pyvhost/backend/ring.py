"""One vring's control state in a back-end: fds, started/enabled, and its compiled queue.

The spec's ring rules live here (started by a kick fd, stopped by GET_VRING_BASE, enable
and disable independent of start/stop). Every change to the compiled ``VirtQueue`` happens
with its lock held, so a data-path thread never sees half a change. No socket I/O here.
"""

from __future__ import annotations

import fcntl
import logging
import os

from pyvhost._memory import IotlbMiss
from pyvhost._vring import VirtQueue

from .iotlb import overlaps

log = logging.getLogger("pyvhost.backend")


def _nonblocking(fd: int) -> int:
    """Our side never blocks on a peer's eventfd (a hostile peer may send a full pipe)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return fd


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


class Ring:
    """Control side of vring ``index``: what the front-end told us, and the compiled queue."""

    def __init__(self, index: int):
        self.index = index
        self.vq = VirtQueue(index)
        self.started = False
        self.enabled = False
        self.addr_set = False
        self.errfd = -1
        self.mem = None
        self.log_used_gpa: int | None = None   # VHOST_VRING_F_LOG: log used-ring writes here
        self.packed = False
        self.iotlb = None           # ACCESS_PLATFORM: ring addresses are IOVAs (IotlbTable)
        self.start_miss: tuple[int, int] | None = None   # (iova, perm) the start waits for

    def describe(self) -> str:
        state = "started" if self.started else "stopped"
        state += ",enabled" if self.enabled else ",disabled"
        if self.vq.ready:
            state += ",ready"
        if self.vq.broken:
            state += ",broken"
        if self.start_miss or self.vq.take_miss():
            state += ",iotlb-miss"
        return f"ring {self.index}: {state} size {self.vq.size} base {self.vq.base}"

    def _refresh(self) -> None:
        """Let the data path in exactly when started, addressed and mapped (lock held)."""
        self.vq.enabled = self.enabled
        self.start_miss = None
        if not (self.started and self.addr_set and self.mem is not None and self.vq.size):
            self.vq.stop()
            return
        try:
            uvas = self._translate_rings() if self.iotlb is not None else None
            warning = self.vq.start(uvas)
        except IotlbMiss as e:
            # not mapped yet: ask the front-end; the update restarts the ring
            log.debug("ring %d waits for IOVA %#x (perm %d)", self.index, e.iova, e.perm)
            self.start_miss = (e.iova, e.perm)
            self.vq.stop()
            self.vq.wait_iotlb(e.iova, e.perm)
            return
        except (ValueError, PermissionError) as e:
            log.error("ring %d cannot start: %s", self.index, e)
            self.vq.stop()
            return
        if warning:
            log.warning("ring %d: %s", self.index, warning)

    def _areas(self) -> list[tuple[int, int, int]]:
        """(iova, bytes, perm) of the desc, used and avail areas, as SET_VRING_ADDR gave them."""
        n = self.vq.size
        if self.packed:
            return [(self.vq.desc_uva, 16 * n, 3), (self.vq.used_uva, 4, 3),
                    (self.vq.avail_uva, 4, 1)]
        return [(self.vq.desc_uva, 16 * n, 1), (self.vq.used_uva, 6 + 8 * n, 3),
                (self.vq.avail_uva, 6 + 2 * n, 1)]

    def _translate_rings(self) -> tuple[int, int, int]:
        """The ring addresses through the IOTLB (IotlbMiss, PermissionError, ValueError)."""
        return tuple(self.iotlb.translate(iova, size, perm) for iova, size, perm in self._areas())

    def set_iotlb(self, table, invalidated: tuple[int, int] | None = None) -> None:
        """A new IOTLB (None: ACCESS_PLATFORM off). A running ring keeps its translated
        addresses unless ``invalidated`` (iova, size) hits them, as in DPDK; a stopped one
        tries to start again."""
        with self.vq:
            mode_changed = (table is None) != (self.iotlb is None)
            self.iotlb = table
            self.vq.set_iotlb(table)
            hit = invalidated is not None and self.addr_set and any(
                overlaps(iova, size, *invalidated) for iova, size, _ in self._areas())
            if mode_changed or hit or not self.vq.ready:
                if hit and self.vq.ready:
                    log.info("ring %d: its addresses were invalidated; stopped until mapped",
                             self.index)
                    self.vq.stop()
                self._refresh()
            if table is not None:
                self.vq.flush_held()        # RX frames that waited for this mapping

    def set_memory(self, table) -> None:
        with self.vq:
            self.mem = table
            self.vq.set_memory(table)
            self._refresh()

    def set_num(self, num: int) -> None:
        with self.vq:
            self.vq.set_size(num)
            self._refresh()

    def set_addr(self, desc: int, used: int, avail: int, log_gpa: int | None = None) -> None:
        with self.vq:
            self.vq.set_addresses(desc, used, avail)
            self.addr_set = True
            self.log_used_gpa = log_gpa
            self._refresh()

    def set_logging(self, log_all: bool, log_addr: int, log_size: int) -> None:
        """Dirty logging on or off, with the current bitmap (address 0: none)."""
        with self.vq:
            self.vq.set_log(log_addr, log_size)
            self.vq.set_log_flags(log_all=log_all and log_addr != 0,
                                  log_used=self.log_used_gpa is not None,
                                  log_used_gpa=self.log_used_gpa or 0)

    def set_base(self, base: int) -> None:
        with self.vq:
            self.vq.stop()          # a new position is checked against the ring on restart
            self.vq.base = base
            self._refresh()

    def set_features(self, **kw) -> None:
        """ValueError if this would change the layout of a running ring."""
        with self.vq:
            self.vq.set_features(**kw)
            self.packed = bool(kw.get("packed", False))

    def set_kick(self, fd: int) -> None:
        """A kick fd (or -1 for polling) starts the ring."""
        if fd >= 0:
            _nonblocking(fd)
        with self.vq:
            old = self.vq.kickfd
            self.vq.kickfd = fd
            self.started = True
            self._refresh()
        _close(old)

    def set_call(self, fd: int) -> None:
        if fd >= 0:
            _nonblocking(fd)
        with self.vq:
            old = self.vq.callfd
            self.vq.callfd = fd
        _close(old)

    def set_err(self, fd: int) -> None:
        _close(self.errfd)
        self.errfd = fd

    def set_enabled(self, enabled: bool) -> None:
        with self.vq:
            self.enabled = enabled
            self._refresh()

    def stop(self) -> int:
        """GET_VRING_BASE: stop the ring, drop its kick and call fds, return the base."""
        with self.vq:
            self.vq.stop()
            self.vq.drop_held()
            self.started = False
            base = self.vq.base
            kick, call = self.vq.kickfd, self.vq.callfd
            self.vq.kickfd = -1
            self.vq.callfd = -1
        _close(kick)
        _close(call)
        return base

    def reset(self) -> None:
        """Back to the initial state (disconnect, RESET_DEVICE): stopped, disabled, no fds."""
        self.stop()
        with self.vq:
            self.enabled = False
            self.addr_set = False
            self.mem = None
            self.log_used_gpa = None
            self.vq.set_log(0, 0)
            self.vq.set_log_flags(log_all=False, log_used=False)
            self.vq.set_memory(None)
            self.vq.set_iotlb(None)
            self.iotlb = None
            self.start_miss = None
            self.vq.missfd = -1
            self.vq.enabled = False
            self.vq.reset_layout()
        self.set_err(-1)
