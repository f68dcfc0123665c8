"""The switch's control socket (wire format in .wire): 0600, or 0660 for a ``--ctl-group``;
every connection's peer (SO_PEERCRED) must be root, the switch's own user or a member of
that group. A bad request gets an error answer and a log line; it never disturbs the
switch. Only ever removes its own socket (lstat + inode check). After the answer to a
request of a flow file's size, the heap it freed goes back to the OS."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct

from pyvhost.backend.endpoint import unlink_socket

from .bulk import give_back_memory
from .commands import CommandError, run_command
from .wire import MAX_REQUEST

log = logging.getLogger("pyvhost.switch")
TRIM_AFTER = 1 << 20     # request bytes after whose answer freed heap goes back to the OS
__all__ = ["MAX_REQUEST", "ControlServer", "peer_allowed"]


def _groups_of(pid: int, uid: int, gid: int) -> set[int]:
    """The peer's groups: its primary group, its supplementary groups as the kernel has
    them (/proc), and the group database's memberships of its user."""
    groups = {gid}
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups |= {int(g) for g in line.split()[1:]}
    with contextlib.suppress(KeyError):
        user = pwd.getpwuid(uid).pw_name
        groups |= {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    return groups


def peer_allowed(pid: int, uid: int, gid: int, ctl_gid: int | None) -> bool:
    if uid in (0, os.geteuid()):
        return True
    return ctl_gid is not None and ctl_gid in _groups_of(pid, uid, gid)


class ControlServer:
    def __init__(self, switch, path: str, ctl_gid: int | None = None):
        self.switch = switch
        self.path = path
        self.ctl_gid = ctl_gid
        self.server: asyncio.base_events.Server | None = None
        self._lock = asyncio.Lock()
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        unlink_socket(self.path)          # a stale socket only (FileExistsError otherwise)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            st = os.lstat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            if self.ctl_gid is not None:
                os.chown(self.path, -1, self.ctl_gid)
            os.chmod(self.path, 0o660 if self.ctl_gid is not None else 0o600)
            self.server = await asyncio.start_unix_server(self._client, sock=sock,
                                                          limit=MAX_REQUEST)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                unlink_socket(self.path, self._inode)
            raise

    async def close(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()
            with contextlib.suppress(OSError):
                unlink_socket(self.path, self._inode)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        sock = writer.get_extra_info("socket")
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if not peer_allowed(pid, uid, gid, self.ctl_gid):
            log.warning("control: connection from uid %d (pid %d) refused: not root, not "
                        "uid %d and not in the control group", uid, pid, os.geteuid())
            writer.write(json.dumps({"ok": False, "error": "permission denied"}).encode() +
                         b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        line = b""
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 60)
            except ValueError:                   # over the limit: say so, then hang up
                log.warning("control: request over %d bytes refused", MAX_REQUEST)
                reply = {"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"}
            else:
                argv = self._argv(line)
                if isinstance(argv, list) and argv[:1] == ["capture"]:
                    # a stream, not one answer: the capture ends with the connection
                    await self.switch.captures.serve(argv[1:], reader, writer, self._lock)
                    await writer.drain()
                    return
                reply = await self._answer(argv)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            if len(line) >= TRIM_AFTER:          # a flow file: its text, its parse and
                line = argv = None               # the rules it replaced are gone now
                give_back_memory()
        except (TimeoutError, ConnectionError, ValueError) as e:
            log.warning("control: bad client: %s", e)
        finally:
            writer.close()

    @staticmethod
    def _argv(line: bytes) -> list[str] | dict:
        """The request's argv, or the error answer for a malformed one."""
        try:
            req = json.loads(line)
            argv = req["argv"]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise ValueError("argv must be a list of strings")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("control: malformed request: %s", e)
            return {"ok": False, "error": f"malformed request: {e}"}
        return argv

    async def _answer(self, argv: list[str] | dict) -> dict:
        if isinstance(argv, dict):
            return argv                              # the error of a malformed request
        async with self._lock:
            try:
                answer = {"ok": True, "output": await run_command(self.switch, argv)}
            except CommandError as e:
                log.info("control: %s: %s", " ".join(argv), e)
                answer = {"ok": False, "error": str(e)}
            except Exception as e:       # a bug must not take the switch down
                log.exception("control: %s failed", " ".join(argv))
                answer = {"ok": False, "error": f"internal error: {e}"}
            why = self.switch.sync_store()     # what the answer confirms is on disk
            if why:
                answer["warning"] = why
            return answer
