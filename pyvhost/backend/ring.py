"""One vring's control state in a back-end: fds, started/enabled, and its compiled queue.

The spec's ring rules live here (started by a kick fd, stopped by GET_VRING_BASE, enable
and disable independent of start/stop). Every change to the compiled ``VirtQueue`` happens
with its lock held, so a data-path thread never sees half a change. No socket I/O here.
"""

from __future__ import annotations

import fcntl
import logging
import os

from pyvhost._vring import VirtQueue

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

    def describe(self) -> str:
        state = "started" if self.started else "stopped"
        state += ",enabled" if self.enabled else ",disabled"
        if self.vq.ready:
            state += ",ready"
        if self.vq.broken:
            state += ",broken"
        return f"ring {self.index}: {state} size {self.vq.size} base {self.vq.base}"

    def _refresh(self) -> None:
        """Let the data path in exactly when started, addressed and mapped (lock held)."""
        self.vq.enabled = self.enabled
        if not (self.started and self.addr_set and self.mem is not None and self.vq.size):
            self.vq.stop()
            return
        try:
            warning = self.vq.start()
        except ValueError as e:
            log.error("ring %d cannot start: %s", self.index, e)
            self.vq.stop()
            return
        if warning:
            log.warning("ring %d: %s", self.index, warning)

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
        with self.vq:
            self.vq.set_features(**kw)

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
            self.vq.enabled = False
            self.vq.base = 0
        self.set_err(-1)
