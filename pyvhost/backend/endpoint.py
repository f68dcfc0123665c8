"""Where a back-end meets its front-end: a listening socket (server mode) or a connecting
one that retries with backoff and reconnects after the peer goes away (client mode).

One front-end at a time per device, as vhost-user has it: a server refuses a second
connection while one is active. The device is reset between connections, so a back-end
process survives any number of disconnects. Nothing here parses messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat

from .connection import Connection
from .device import VhostUserDevice

log = logging.getLogger("pyvhost.backend")

BACKOFF_START = 0.05
BACKOFF_MAX = 1.0
SILENT_PEER = 3.0      # client mode: a front-end that accepted but sent nothing this long is
                       # retried (QEMU may take a connection into its backlog while still
                       # closing the previous one, and then never serve it); server mode: a
                       # peer that sent nothing this long is reported (another back-end?)
NOT_A_FRONTEND = ("is it a vhost-user front-end? a back-end (a switch port, a reflector) "
                  "waits for requests too")


def listening_there(path: str | os.PathLike) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path`` now."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
        return True
    except OSError:
        return False                        # refused or absent: a stale socket at most
    finally:
        probe.close()


def unlink_socket(path: str | os.PathLike, inode: tuple[int, int] | None = None) -> bool:
    """Remove the socket at ``path`` (only the one with this (st_dev, st_ino) if given);
    FileExistsError if something that is not a socket is there: a file, a link or a
    directory is never ours to delete. True if a socket was removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
    if inode is not None and (st.st_dev, st.st_ino) != inode:
        return False                      # someone else's socket now: leave it
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


class Endpoint:
    """Serve ``device`` on ``path`` as server (default) or client (``client=True``).
    A server's socket gets ``mode`` and group ``gid`` when given; it only ever replaces or
    removes a socket at its path, never another kind of file."""

    def __init__(self, device: VhostUserDevice, path: str, *, client: bool = False,
                 mode: int | None = None, gid: int | None = None):
        self.device = device
        self.path = path
        self.client = client
        self.mode = mode
        self.gid = gid
        self._inode: tuple[int, int] | None = None
        self.connection: Connection | None = None
        self.connections = 0
        self._task: asyncio.Task | None = None
        self._listener: socket.socket | None = None
        self.connected = asyncio.Event()

    @property
    def label(self) -> str:
        return f"{self.device.name}[{self.path}]"

    async def start(self) -> None:
        if self.client:
            self._task = asyncio.get_running_loop().create_task(self._client_loop())
        else:
            self._listen()

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                unlink_socket(self.path, self._inode)
            self._inode = None
        if self.connection:
            self.connection.close()

    # -- server mode ------------------------------------------------------------------
    def _listen(self) -> None:
        if os.path.exists(self.path) and listening_there(self.path):
            raise FileExistsError(f"{self.path}: another process is listening there (two "
                                  "back-ends on one socket?); not replacing it")
        unlink_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            st = os.lstat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            if self.gid is not None:
                os.chown(self.path, -1, self.gid)
            if self.mode is not None:
                os.chmod(self.path, self.mode)
            sock.listen(4)
        except BaseException:
            sock.close()
            if self._inode is not None:
                with contextlib.suppress(OSError):
                    unlink_socket(self.path, self._inode)
                self._inode = None
            raise
        sock.setblocking(False)
        self._listener = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        log.info("%s: listening", self.label)

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.error("%s: accept failed: %s", self.label, e)
            return
        if self.connection is not None and not self.connection.closed.done():
            log.warning("%s: refusing a second front-end while one is connected", self.label)
            conn.close()
            return
        self._serve(conn)

    def _serve(self, conn: socket.socket) -> Connection:
        self.connections += 1
        log.info("%s: front-end connected (#%d)", self.label, self.connections)
        self.connection = Connection(conn, self.device, self.label)
        self.connected.set()
        self.connection.closed.add_done_callback(lambda _: self.connected.clear())
        if not self.client:
            asyncio.get_running_loop().call_later(SILENT_PEER, self._check_silent,
                                                  self.connection)
        return self.connection

    def _check_silent(self, conn: Connection) -> None:
        """Server mode: a peer that connected and sent nothing is reported (it is kept: a
        slow front-end may still speak)."""
        if conn is self.connection and not conn.closed.done() and conn.requests == 0:
            log.warning("%s: the peer connected but sent no request in %.0f s: %s",
                        self.label, SILENT_PEER, NOT_A_FRONTEND)

    # -- client mode ------------------------------------------------------------------
    async def _connect_once(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.path)
            return sock
        except OSError:
            sock.close()
            return None

    async def _client_loop(self) -> None:
        delay = BACKOFF_START
        waiting_logged = False
        while True:
            sock = await self._connect_once()
            if sock is None:
                if not waiting_logged:
                    log.info("%s: waiting for the front-end to listen", self.label)
                    waiting_logged = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            waiting_logged = False
            conn = self._serve(sock)
            started = asyncio.get_running_loop().time()
            await asyncio.wait({conn.closed}, timeout=SILENT_PEER)
            if not conn.closed.done() and conn.requests == 0:
                log.warning("%s: the peer accepted but sent nothing in %.0f s (%s); "
                            "connecting again", self.label, SILENT_PEER, NOT_A_FRONTEND)
                conn.close()
            await asyncio.shield(conn.closed)        # cancelling us must not cancel it
            log.info("%s: will reconnect", self.label)
            if conn.requests and asyncio.get_running_loop().time() - started > BACKOFF_MAX:
                delay = BACKOFF_START          # it served: reconnect at once
            else:                              # it ended at once: never a tight loop
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
