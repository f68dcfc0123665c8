"""Framing: the 12-byte header, and moving messages with their fds over a Unix socket.

``MessageReader`` assembles messages from a non-blocking socket as bytes arrive, keeping
the fds that came with each header. ``send_message`` writes one message with its fds.
This layer only moves bytes and fds; it knows no request semantics beyond the header.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from dataclasses import dataclass, field

from . import constants as C
from .constants import request_name

HEADER = struct.Struct("=III")
_FD_SPACE = socket.CMSG_SPACE(C.MAX_FDS * array.array("i").itemsize)


class WireError(ConnectionError):
    """The byte stream broke the framing rules; the connection cannot go on."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & C.FLAG_NEED_REPLY)

    def close_fds(self) -> None:
        """Close every fd this message still owns (handlers take the ones they keep)."""
        while self.fds:
            os.close(self.fds.pop())


def encode_header(request: int, flags: int, size: int) -> bytes:
    return HEADER.pack(request, flags, size)


def check_header(request: int, flags: int, size: int, *, reply: bool) -> None:
    """Header rules: version 1, the reply bit as expected, no unknown flags, bounded size."""
    if flags & C.VERSION_MASK != C.VERSION:
        raise WireError(f"{request_name(request)}: bad version in flags {flags:#x}")
    if flags & ~C.KNOWN_FLAGS:
        raise WireError(f"{request_name(request)}: unknown flags {flags:#x}")
    if bool(flags & C.FLAG_REPLY) != reply:
        raise WireError(f"{request_name(request)}: reply flag {'missing' if reply else 'set'}")
    if size > C.MAX_PAYLOAD:
        raise WireError(f"{request_name(request)}: payload size {size} exceeds {C.MAX_PAYLOAD}")


def _take_fds(ancdata, into: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
            into.extend(fds)


class MessageReader:
    """Incremental reader of messages from one non-blocking socket.

    ``expect_reply`` selects which direction's header rule applies (a back-end reads
    requests, a front-end reads replies).
    """

    def __init__(self, sock: socket.socket, *, expect_reply: bool = False):
        self.sock = sock
        self.expect_reply = expect_reply
        self._buf = bytearray()
        self._fds: list[int] = []
        self._header: tuple[int, int, int] | None = None

    def _want(self) -> int:
        if self._header is None:
            return HEADER.size - len(self._buf)
        return self._header[2] - len(self._buf)

    def read(self, limit: int = 64) -> list[Message]:
        """Read what the socket has, up to ``limit`` messages. EOF raises EOFError.

        On any error (EOF, broken framing, socket error) the messages already assembled in
        this call, and a partial one, are dropped and every fd they carried is closed."""
        out: list[Message] = []
        try:
            self._read_into(out, limit)
        except BaseException:
            for msg in out:
                msg.close_fds()
            self.close()
            raise
        return out

    def _read_into(self, out: list[Message], limit: int) -> None:
        while len(out) < limit:
            want = self._want()
            if want > 0:
                try:
                    data, anc, msg_flags, _ = self.sock.recvmsg(want, _FD_SPACE)
                except (BlockingIOError, InterruptedError):
                    return
                _take_fds(anc, self._fds)
                if msg_flags & socket.MSG_CTRUNC:
                    self.close()
                    raise WireError("fds truncated: more than 8 fds in one message")
                if not data:
                    self.close()
                    raise EOFError("peer closed the connection")
                self._buf += data
                if len(data) < want:
                    continue
            if self._header is None:
                self._header = HEADER.unpack(self._buf)
                self._buf.clear()
                check_header(*self._header, reply=self.expect_reply)
                if self._header[2]:
                    continue
            request, flags, _ = self._header
            out.append(Message(request, flags, bytes(self._buf), self._fds))
            self._buf.clear()
            self._fds = []
            self._header = None

    def close(self) -> None:
        """Drop a partial message and close the fds it carried."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._buf.clear()
        self._header = None


def send_message(sock: socket.socket, request: int, flags: int, payload: bytes = b"",
                 fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one message (header, payload and fds in one sendmsg)."""
    data = encode_header(request, flags, len(payload)) + payload
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_message_blocking(sock: socket.socket, *, expect_reply: bool,
                          timeout: float | None = None) -> Message:
    """Read exactly one message from a blocking socket (front-end side and tests)."""
    old = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        reader = MessageReader(sock, expect_reply=expect_reply)
        while True:
            msgs = reader.read(limit=1)
            if msgs:
                return msgs[0]
    finally:
        sock.settimeout(old)
