"""The switch's control socket: one JSON request per line ({"argv": [...]}) answered by
one JSON line ({"ok": true, "output": "..."} or {"ok": false, "error": "..."}). A bad
request gets an error answer and a log line; it never disturbs the switch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os

from .commands import CommandError, run_command

log = logging.getLogger("pyvhost.switch")
MAX_REQUEST = (64 << 20) + 65536        # a flow file of MAX_FLOW_FILE and its envelope


class ControlServer:
    def __init__(self, switch, path: str):
        self.switch = switch
        self.path = path
        self.server: asyncio.base_events.Server | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.server = await asyncio.start_unix_server(self._client, self.path,
                                                      limit=MAX_REQUEST)

    async def close(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 60)
            except ValueError:                   # over the limit: say so, then hang up
                log.warning("control: request over %d bytes refused", MAX_REQUEST)
                reply = {"ok": False, "error": f"request larger than {MAX_REQUEST} bytes"}
            else:
                reply = await self._answer(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError) as e:
            log.warning("control: bad client: %s", e)
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
            argv = req["argv"]
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise ValueError("argv must be a list of strings")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("control: malformed request: %s", e)
            return {"ok": False, "error": f"malformed request: {e}"}
        async with self._lock:
            try:
                return {"ok": True, "output": await run_command(self.switch, argv)}
            except CommandError as e:
                log.info("control: %s: %s", " ".join(argv), e)
                return {"ok": False, "error": str(e)}
            except Exception as e:       # a bug must not take the switch down
                log.exception("control: %s failed", " ".join(argv))
                return {"ok": False, "error": f"internal error: {e}"}


def request(path: str, argv: list[str], timeout: float = 30.0) -> dict:
    """Client side: send one command, return the decoded answer (OSError if unreachable)."""
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"argv": argv}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
