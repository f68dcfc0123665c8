"""Live captures of a port (``pyvhost capture``): each is a hidden capture port in the
datapath (pyvhost._capture: a ring of pcap records) fed by a transient mirror of the
bridge (the port's input, its output or both, and a flow-match filter), streamed over the
control connection that asked for it. After the JSON answer line the switch sends
chunks: a type byte and a 4-byte little-endian length, then the payload: ``D`` pcap bytes
(the file header first, then records), ``S`` a JSON object of counters (every second, and
last with the reason it ended). The client ends a capture by sending a line or closing
the connection; the switch ends it when the port or its bridge goes or the switch stops.
A reader too slow for the traffic loses frames (counted, sent in ``S``); no PMD waits.

No datapath code and no files here; the switch's ports, bridges and mirrors are changed
only through their own methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
from dataclasses import dataclass, field

from .mirrors import Mirror

log = logging.getLogger("pyvhost.switch")
CHUNK = struct.Struct("<cI")
PCAP_HEADER = struct.Struct("<IHHiIII")     # magic, 2.4, zone, sigfigs, snaplen, linktype
DEFAULT_SNAPLEN = 262144
RING_BYTES = 4 << 20
DRAIN_BYTES = 1 << 20                        # per write; the ring holds 4 of these
WRITE_BACKLOG = 2 << 20                      # bytes buffered for a reader before the ring
                                             # is left to fill
MAX_CAPTURES = 8                             # at once, over the whole switch
USAGE = ("capture BRIDGE PORT [--direction in|out|both] [--snaplen N] [FILTER] "
         "(FILTER in the flow-match syntax, e.g. tcp,tp_dst=80)")


class CaptureError(ValueError):
    """A capture that cannot start: the message is for the user."""


@dataclass
class Session:
    port_id: int
    bridge: str
    port: str
    direction: str
    snaplen: int
    dev: object = field(repr=False)
    mirror: str = ""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    dropped: int = 0                  # the capture port's drop_tx_full, last read


def parse(args: list[str]) -> tuple[str, str, str, int, str | None]:
    """(bridge, port, direction, snaplen, filter) from the capture command's words."""
    words, direction, snaplen = [], "both", DEFAULT_SNAPLEN
    it = iter(args)
    for a in it:
        if a in ("--direction", "--snaplen"):
            value = next(it, None)
            if value is None:
                raise CaptureError(f"{a} needs a value; usage: {USAGE}")
            if a == "--direction":
                if value not in ("in", "out", "both"):
                    raise CaptureError("--direction: in, out or both")
                direction = value
            else:
                if not value.isdigit() or not 14 <= int(value) <= DEFAULT_SNAPLEN:
                    raise CaptureError(f"--snaplen: 14..{DEFAULT_SNAPLEN}")
                snaplen = int(value)
        elif a.startswith("--"):
            raise CaptureError(f"unknown option {a}; usage: {USAGE}")
        else:
            words.append(a)
    if not 2 <= len(words) <= 3:
        raise CaptureError(f"usage: {USAGE}")
    return words[0], words[1], direction, snaplen, words[2] if len(words) == 3 else None


class Captures:
    """The switch's running captures (control thread only)."""

    def __init__(self, switch):
        self.sw = switch
        self.sessions: dict[int, Session] = {}          # by capture port id
        self.stuck: list[object] = []                   # devices a stuck PMD may be in

    def port_ids(self) -> set[int]:
        return set(self.sessions)

    # -- start and end (under the control lock) -------------------------------------------
    def _start(self, args: list[str]) -> Session:
        from pyvhost._capture import CaptureDev
        bridge_name, port_name, direction, snaplen, filt = parse(args)
        bridge = self.sw.bridges.get(bridge_name)
        if bridge is None:
            raise CaptureError(f"no bridge named {bridge_name}")
        if port_name not in bridge.ports:
            raise CaptureError(f"no port {port_name} on bridge {bridge_name}")
        if len(self.sessions) >= MAX_CAPTURES:
            raise CaptureError(f"at most {MAX_CAPTURES} captures at once")
        try:
            port_id = self.sw.new_port_id()
        except ValueError as e:                          # (CommandError: no id left)
            raise CaptureError(str(e)) from None
        name = f"capture:{port_id}"
        try:
            mirror = Mirror.from_options(name, {
                "output": name, "filter": filt,
                "src": [port_name] if direction in ("in", "both") else [],
                "dst": [port_name] if direction in ("out", "both") else []})
        except ValueError as e:
            raise CaptureError(str(e).replace(f"mirror {name}: ", "")) from None
        mirror.transient, mirror.out_id = True, port_id
        try:
            dev = CaptureDev(RING_BYTES, snaplen)
            # a mirror's output from its first moment: floods never reach it
            self.sw.datapath.add_port(port_id, bridge.bridge_id, dev, mirror_only=True)
        except (ValueError, OSError) as e:
            raise CaptureError(f"the capture port: {e}") from None
        session = Session(port_id, bridge_name, port_name, direction, snaplen, dev, name)
        self.sessions[port_id] = session
        try:
            self.sw.mirrors.add(bridge, mirror)
        except Exception as e:                          # (ValueError, TimeoutError, ...)
            self._end(session, "")
            raise CaptureError(str(e)) from None
        log.info("capture of %s (%s) on %s started%s", port_name, direction, bridge_name,
                 f", filter {filt}" if filt else "")
        return session

    def _end(self, s: Session, reason: str) -> None:
        if s.port_id not in self.sessions:
            return
        bridge = self.sw.bridges.get(s.bridge)
        if bridge is not None:
            with contextlib.suppress(ValueError):
                self.sw.mirrors.remove(bridge, s.mirror)
        try:
            self.sw.datapath.remove_port(s.port_id)
        except TimeoutError:
            self.stuck.append(s.dev)                     # never freed under a PMD
        except KeyError:
            pass
        del self.sessions[s.port_id]
        s.reason = s.reason or reason
        s.ended.set()
        if reason:
            log.info("capture of %s on %s ended: %s", s.port, s.bridge, reason)

    def end_bridge(self, bridge_name: str) -> None:
        """The bridge is going: its captures end first (their ports leave the datapath)."""
        for s in [s for s in self.sessions.values() if s.bridge == bridge_name]:
            self._end(s, f"bridge {bridge_name} was deleted")

    def end_all(self, reason: str) -> None:
        for s in list(self.sessions.values()):
            self._end(s, reason)

    # -- the stream ---------------------------------------------------------------------
    def _counters(self, s: Session) -> dict:
        st = s.dev.stats()
        if s.port_id in self.sessions:                     # its port is in the datapath
            s.dropped = self.sw.datapath.port_stats(s.port_id)["drop_tx_full"]
        return {"captured": st["frames"], "bytes": st["bytes"], "dropped": s.dropped}

    async def serve(self, args: list[str], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
        async with lock:
            try:
                s = self._start(args)
            except CaptureError as e:
                log.info("control: capture: %s", e)
                writer.write(json.dumps({"ok": False, "error": str(e)}).encode() + b"\n")
                return
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        fd = s.dev.fileno()
        armed = False

        def woken():
            # once per fill: the eventfd stays readable until drain() reads it, and a
            # reader left on it would run on every turn of the loop (a spinning core)
            nonlocal armed
            loop.remove_reader(fd)
            armed = False
            wake.set()
        client_done = asyncio.ensure_future(reader.readline())    # a line or EOF: stop
        waits: list[asyncio.Future] = []
        last = dropped_seen = 0.0
        try:
            writer.write(json.dumps({"ok": True, "output": f"capturing {s.port} on "
                                     f"{s.bridge} ({s.direction})"}).encode() + b"\n")
            header = PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, s.snaplen, 1)
            writer.write(CHUNK.pack(b"D", len(header)) + header)
            while not s.ended.is_set() and not client_done.done():
                # a reader that does not keep up: its socket and our buffer are full; the
                # ring is left to fill (the datapath drops and counts), never waited on
                backlog = writer.transport.get_write_buffer_size() > WRITE_BACKLOG
                if not backlog and not armed and not wake.is_set():
                    loop.add_reader(fd, woken)
                    armed = True
                waits = [asyncio.ensure_future(s.ended.wait())] + \
                    ([] if backlog else [asyncio.ensure_future(wake.wait())])
                await asyncio.wait([client_done, *waits], timeout=0.2 if backlog else 1.0,
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
                if not backlog and wake.is_set():
                    wake.clear()
                    data = s.dev.drain(DRAIN_BYTES)
                    if data:
                        writer.write(CHUNK.pack(b"D", len(data)) + data)
                    if s.dev.pending:
                        wake.set()                   # more than one write's worth waits
                now = time.monotonic()
                if now - last >= 1.0:
                    last = now
                    counters = self._counters(s)
                    if counters["dropped"] > dropped_seen:
                        log.warning("capture of %s: %d frames dropped, the reader is too "
                                    "slow", s.port, counters["dropped"] - dropped_seen)
                        dropped_seen = counters["dropped"]
                    self._send_counters(writer, counters)
                    if s.port not in getattr(self.sw.bridges.get(s.bridge), "ports", {}):
                        s.reason = f"port {s.port} was deleted"
                        break
        except (ConnectionError, OSError) as e:
            s.reason = s.reason or f"the reader went away ({e})"
        finally:
            loop.remove_reader(fd)
            client_done.cancel()
            for w in waits:
                w.cancel()
            self._counters(s)                    # the drops, while its port is there
            async with lock:
                self._end(s, s.reason or "stopped by the reader")
            with contextlib.suppress(ConnectionError, OSError, RuntimeError, TimeoutError):
                data = s.dev.drain(RING_BYTES)
                if data:
                    writer.write(CHUNK.pack(b"D", len(data)) + data)
                counters = self._counters(s)
                counters["ended"] = s.reason or "stopped by the reader"
                self._send_counters(writer, counters)
                await asyncio.wait_for(writer.drain(), 5.0)   # a reader that never reads

    @staticmethod
    def _send_counters(writer, counters: dict) -> None:
        body = json.dumps(counters).encode()
        writer.write(CHUNK.pack(b"S", len(body)) + body)
