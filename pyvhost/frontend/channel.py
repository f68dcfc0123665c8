"""The frontend's end of the vhost-user control socket: connect or accept, then send
requests and read their replies (blocking, every read bounded by a timeout).

Message layouts, the request table and framing all come from pyvhost.protocol; this module
only sequences them. Any socket error, EOF, bad framing or timeout is ``BackendGone``.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
import time

from pyvhost.protocol import constants as C
from pyvhost.protocol import payloads as P
from pyvhost.protocol import wire
from pyvhost.protocol.constants import Request as R
from pyvhost.protocol.messages import SPECS

RETRY_INTERVAL = 0.05


class BackendGone(ConnectionError):
    """The backend closed the connection, broke the protocol or stopped answering."""


class BackendRefused(RuntimeError):
    """The backend answered a request with a failure ack."""


class Channel:
    """One control connection; ``ack`` requests a REPLY_ACK for requests without a reply."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0):
        self.sock = sock
        self.timeout = timeout
        self.ack = False
        sock.setblocking(True)

    @classmethod
    def connect(cls, path: str, timeout: float, reply_timeout: float = 5.0) -> Channel:
        """Client mode: connect to the backend's socket, retrying until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return cls(sock, reply_timeout)
            except OSError as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise BackendGone(f"cannot connect to {path}: {e}") from None
            time.sleep(RETRY_INTERVAL)

    @classmethod
    def accept(cls, listener: socket.socket, timeout: float,
               reply_timeout: float = 5.0) -> Channel:
        """Server mode: wait up to ``timeout`` for the backend to connect to us."""
        ready, _, _ = select.select([listener], [], [], timeout)
        if not ready:
            raise BackendGone(f"no backend connected within {timeout:g} s")
        sock, _ = listener.accept()
        return cls(sock, reply_timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def request(self, req: R, payload=None, fds: list[int] | tuple[int, ...] = ()):
        """Send ``req``; return its reply payload (requests that have one), else None.

        With ``ack`` set, requests without a reply ask for REPLY_ACK and a non-zero ack
        raises BackendRefused."""
        spec = SPECS[req]
        payload = payload if payload is not None else P.Empty()
        want_ack = self.ack and spec.reply is None
        flags = C.VERSION | (C.FLAG_NEED_REPLY if want_ack else 0)
        try:
            wire.send_message(self.sock, req, flags, payload.pack(), fds)
            if spec.reply is None and not want_ack:
                return None
            msg = wire.recv_message_blocking(self.sock, expect_reply=True,
                                             timeout=self.timeout)
        except (OSError, EOFError) as e:
            if isinstance(e, wire.WireError) and "reply flag missing" in str(e):
                # both ends sent requests: two front-ends on one socket (issue 16)
                raise BackendGone(f"peer is not a vhost-user back-end: it sent a request "
                                  f"where the reply to {req.name} was due ({e}); another "
                                  "front-end?") from None
            raise BackendGone(f"{req.name}: {e or type(e).__name__}") from None
        msg.close_fds()
        if msg.request != req:
            raise BackendGone(f"{req.name}: the reply is for request {msg.request}")
        reply_type = spec.reply if spec.reply is not None else P.U64
        try:
            reply = reply_type.unpack(msg.payload)
        except P.PayloadError as e:
            raise BackendGone(f"{req.name}: bad reply: {e}") from None
        if spec.reply is None and reply.value != 0:
            raise BackendRefused(f"{req.name} failed (ack {reply.value})")
        return reply

    def alive(self) -> bool:
        """False once the backend has closed its end (it sends nothing unasked)."""
        if self.sock.fileno() < 0:
            return False
        r, _, _ = select.select([self.sock], [], [], 0)
        if not r:
            return True
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def listen(path: str) -> socket.socket:
    """A listening socket at ``path`` for server mode (a stale socket there is replaced;
    FileExistsError if something else is there: a file, a link or a directory is never
    ours to delete)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    sock.listen(1)
    return sock
