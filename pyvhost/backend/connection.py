"""One front-end connection of a back-end: read requests, validate, dispatch, reply.

Runs on an asyncio loop (add_reader on a non-blocking Unix socket). Every request passes
pyvhost.protocol.messages.check_request before its handler; a malformed request or a
handler's DeviceError closes this connection only, with a log line naming the request and
the reason; unused fds are always closed. REPLY_ACK is honoured here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol import wire
from pyvhost.protocol.constants import ProtocolFeature as PF
from pyvhost.protocol.messages import RequestError, check_request

from .device import DeviceError, Refused, VhostUserDevice

log = logging.getLogger("pyvhost.backend")
MAX_PENDING = 64 * 1024   # bytes of unread replies before a front-end is dropped


class Connection:
    """Serves ``device`` to the front-end on ``sock`` until EOF or an error."""

    def __init__(self, sock: socket.socket, device: VhostUserDevice, label: str):
        self.sock = sock
        self.device = device
        self.label = label
        self.reader = wire.MessageReader(sock)
        self._out = bytearray()             # replies the socket has not taken yet
        self.requests = 0                   # requests received (a silent peer sends none)
        self._shut = False
        self._writing = False
        self.closed = asyncio.get_running_loop().create_future()
        self.loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)
        self._miss_fd = -1                  # the device's IOTLB miss eventfd we watch
        self._miss_timer: asyncio.TimerHandle | None = None
        # signalled by a ring whose guest memory or dirty log faulted (a truncated fd)
        self._fault_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        device.set_fault_fd(self._fault_fd)
        self.loop.add_reader(self._fault_fd, self._fault_event)

    def _readable(self) -> None:
        msgs: list[wire.Message] = []
        try:
            msgs = self.reader.read()
            while msgs:
                self._dispatch(msgs.pop(0))
        except EOFError:
            log.info("%s: front-end disconnected", self.label)
            self.close()
        except (wire.WireError, RequestError, DeviceError) as e:
            log.error("%s: closing connection: %s", self.label, e)
            self.close()
        except OSError as e:
            log.error("%s: socket error, closing connection: %s", self.label, e)
            self.close()
        except Exception:
            log.exception("%s: internal error, closing connection", self.label)
            self.close()
        finally:
            for msg in msgs:        # read in the same burst, behind the one that failed
                msg.close_fds()
        if not self.closed.done():
            self._watch_misses()

    def _fault_event(self) -> None:
        try:
            os.eventfd_read(self._fault_fd)
        except (BlockingIOError, InterruptedError):
            pass
        rings = self.device.faulted_rings()
        if rings and not self.closed.done():
            log.error("%s: closing connection: guest memory or dirty log became inaccessible "
                      "(SIGBUS on ring %s: the front-end truncated an fd it handed over)",
                      self.label, ",".join(map(str, rings)))
            self.close()

    # -- IOTLB misses: the data path signals an eventfd, we ask the front-end ---------------
    def _watch_misses(self) -> None:
        fd = self.device.iotlb_event_fd
        if fd != self._miss_fd:
            if self._miss_fd >= 0:
                self.loop.remove_reader(self._miss_fd)
            if fd >= 0:
                self.loop.add_reader(fd, self._miss_event)
            self._miss_fd = fd
        if fd >= 0:
            self._send_misses()             # ring starts that missed during this request

    def _miss_event(self) -> None:
        try:
            os.eventfd_read(self._miss_fd)
        except (BlockingIOError, InterruptedError):
            pass
        self._send_misses()

    def _send_misses(self) -> None:
        try:
            outstanding = self.device.send_iotlb_misses()
        except Exception:
            log.exception("%s: sending IOTLB misses failed", self.label)
            return
        if outstanding and self._miss_timer is None:
            self._miss_timer = self.loop.call_later(0.25, self._miss_retry)

    def _miss_retry(self) -> None:
        self._miss_timer = None
        if not self.closed.done():
            self._send_misses()

    def _dispatch(self, msg: wire.Message) -> None:
        self.requests += 1
        try:
            req, spec, payload = check_request(msg.request, msg.payload, len(msg.fds),
                                               self.device.protocol_features)
            log.debug("%s: %s %s fds=%s", self.label, req.name, payload, msg.fds)
            try:
                reply = self.device.handle(req, payload, msg.fds)
            except Refused as e:
                if spec.reply is not None:
                    raise DeviceError(f"{req.name} refused: {e}") from None
                log.warning("%s: %s refused: %s", self.label, req.name, e)
                self._ack(msg, 1)
                return
            except DeviceError as e:
                self._ack(msg, 1)
                raise DeviceError(f"{req.name}: {e}") from None
        finally:
            msg.close_fds()
        if spec.reply is not None:
            self._send(msg.request, reply)
        else:
            self._ack(msg, 0)

    def _ack(self, msg: wire.Message, value: int) -> None:
        if msg.need_reply and self.device.has_protocol(PF.REPLY_ACK):
            self._send(msg.request, P.U64(value))

    def _send(self, request: int, payload) -> None:
        """Queue a reply and write what the socket takes now; never block the loop. A peer
        that lets MAX_PENDING bytes of replies pile up unread is disconnected."""
        body = payload.pack()
        if len(self._out) + len(body) > MAX_PENDING:
            raise wire.WireError(f"front-end leaves {len(self._out)} bytes of replies unread")
        self._out += wire.encode_header(request, C.VERSION | C.FLAG_REPLY, len(body)) + body
        self._flush()

    def _flush(self) -> None:
        while self._out:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            del self._out[:n]
        if self._out and not self._writing:
            self.loop.add_writer(self.sock.fileno(), self._writable)
            self._writing = True
        elif not self._out and self._writing:
            self.loop.remove_writer(self.sock.fileno())
            self._writing = False

    def _writable(self) -> None:
        try:
            self._flush()
        except OSError as e:
            log.error("%s: socket error, closing connection: %s", self.label, e)
            self.close()

    def close(self) -> None:
        # a flag of its own, not ``closed``: a waiter cancelled while awaiting ``closed``
        # cancels that future, and the socket must still be closed afterwards
        if self._shut:
            return
        self._shut = True
        self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        if self._miss_fd >= 0:
            self.loop.remove_reader(self._miss_fd)
            self._miss_fd = -1
        if self._miss_timer is not None:
            self._miss_timer.cancel()
            self._miss_timer = None
        self.loop.remove_reader(self._fault_fd)
        self.reader.close()
        self.sock.close()
        self.device.reset()
        self.device.set_fault_fd(-1)
        os.close(self._fault_fd)
        self._fault_fd = -1
        if not self.closed.done():
            self.closed.set_result(None)
