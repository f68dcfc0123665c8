"""The control socket's wire format, light enough for ``pyvhost ctl`` to import alone: one
JSON request per line ({"argv": [...]}) answered by one JSON line ({"ok": true, "output":
"..."} or {"ok": false, "error": "..."}), the size limits, and the client side. Imports
nothing of the switch."""

from __future__ import annotations

import json
import socket

MAX_FLOW_FILE = 64 << 20                 # bytes of one add-flows/replace-flows file
MAX_REQUEST = MAX_FLOW_FILE + 65536      # a flow file of MAX_FLOW_FILE and its envelope


def request(path: str, argv: list[str], timeout: float = 30.0) -> dict:
    """Send one command, return the decoded answer (OSError if unreachable; a request
    over MAX_REQUEST is refused here, before it is sent)."""
    data = json.dumps({"argv": argv}).encode() + b"\n"
    if len(data) > MAX_REQUEST:
        return {"ok": False, "error": f"request of {len(data)} bytes is larger than the "
                                      f"limit of {MAX_REQUEST} bytes"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(data)
        except BrokenPipeError:
            pass                 # refused before it read the request: its answer says why
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                break
    reply = b"".join(chunks)
    if not reply:
        raise ConnectionResetError("the switch closed the connection without an answer")
    return json.loads(reply)
