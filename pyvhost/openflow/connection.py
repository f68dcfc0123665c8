"""One OpenFlow 1.3 connection (asyncio streams): HELLO exchange and version negotiation,
framing with length checks, ECHO both ways, the inactivity probe, and requests answered
one after the other in the order they came. FLOW_MODs that arrived together (pipelined,
as ``ovs-ofctl add-flows`` sends them) go to the handler as one batch, stored in one
transaction; their errors still come back in order. A malformed or refused message gets
the spec's ERROR reply and a log line; the connection goes on unless it cannot be framed
any more (a length below 8) or the HELLO fails. Nothing raised by a request escapes: a
bug is logged and answered with an ERROR. The requests themselves are the handler's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from . import codec as C
from . import errors as E
from .errors import OFError

log = logging.getLogger("pyvhost.openflow")

DEFAULT_PROBE = 5.0       # seconds without a message before an ECHO_REQUEST (OVS: 5 s)
HELLO_TIMEOUT = 10.0      # seconds for the peer's HELLO, and for the rest of a message
DRAIN_TIMEOUT = 30.0      # seconds replies may wait for a peer that does not read them
READ_SIZE = 256 * 1024
MAX_BATCH = 1000          # FLOW_MODs stored in one transaction
ASYNC_BUFFER = 1 << 20    # bytes of unread messages after which async ones are dropped
LOG_WINDOW, LOG_LINES = 10.0, 20    # refusals logged per connection per window


class Connection:
    """``handler`` has ``handle(header, body) -> [reply bytes]`` and
    ``flow_mods([body, ...]) -> [OFError or None, ...]``; ``probe`` is the inactivity probe
    interval in seconds (an unanswered probe closes the connection after another interval;
    None: no probe)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler,
                 name: str, probe: float | None = DEFAULT_PROBE):
        self.reader = reader
        self.writer = writer
        self.handler = handler
        self.name = name
        self.probe = probe
        self.version = 0
        self.xid = 0x10000
        self.received = 0
        self.errors_sent = 0
        self.buf = bytearray()
        self._log_window = -LOG_WINDOW
        self._logged = self._unlogged = 0
        self.async_sent = 0
        self.on_ready = None            # called once the HELLO exchange is done
        self.async_dropped = 0          # asynchronous messages the peer was too slow for
        self._held: list[bytes] | None = None   # async messages hold() keeps for release()
        self._held_bytes = 0

    def _next_xid(self) -> int:
        self.xid = (self.xid + 1) & 0xFFFFFFFF
        return self.xid

    next_xid = _next_xid

    def wants(self, msg_type: int, reason: int = 0) -> bool:
        """Does the peer take asynchronous messages of this type and reason now? (After the
        HELLO, as its role and SET_ASYNC say.)"""
        wants = getattr(self.handler, "wants", None)
        return bool(self.version) and not self.writer.is_closing() and \
            (wants is None or wants(msg_type, reason))

    def send_async(self, message: bytes) -> bool:
        """Queue an asynchronous message without waiting: dropped (and counted) when the
        peer has ASYNC_BUFFER bytes unread already (the switch never waits for it)."""
        transport = self.writer.transport
        if transport.is_closing() or \
                transport.get_write_buffer_size() + self._held_bytes > ASYNC_BUFFER:
            self.async_dropped += 1
            return False
        if self._held is not None:
            self._held.append(message)
            self._held_bytes += len(message)
        else:
            self.writer.write(message)
        self.async_sent += 1
        return True

    @property
    def holding(self) -> bool:
        return self._held is not None

    def hold(self) -> None:
        """Asynchronous messages wait for ``release()`` and go out in one write (the caller
        releases before it yields to the loop, so nothing overtakes them)."""
        if self._held is None:
            self._held, self._held_bytes = [], 0

    def release(self) -> None:
        held, self._held, self._held_bytes = self._held, None, 0
        if held and not self.writer.transport.is_closing():
            self.writer.write(b"".join(held))

    async def _send(self, *messages: bytes) -> None:
        self.writer.write(messages[0] if len(messages) == 1 else b"".join(messages))
        transport = self.writer.transport
        if not transport.get_write_buffer_size() and not transport.is_closing():
            return                        # all in the kernel's socket buffer: no wait
        try:                              # a peer that sends but never reads: closed
            async with asyncio.timeout(max(self.probe or 0, DRAIN_TIMEOUT)):
                await self.writer.drain()
        except TimeoutError:
            raise ConnectionError("the peer reads none of the replies") from None

    async def _error(self, err: OFError, h: C.Header | None, raw: bytes) -> None:
        self.errors_sent += 1
        what = C.TYPE_NAMES.get(h.type, f"type {h.type}") if h else "message"
        now = time.monotonic()
        if now - self._log_window >= LOG_WINDOW:           # a log line per refusal, but
            if self._unlogged:                             # at most LOG_LINES per window
                log.warning("openflow %s: %d more requests refused (not logged)", self.name,
                            self._unlogged)
            self._log_window, self._logged, self._unlogged = now, 0, 0
        if self._logged < LOG_LINES:
            self._logged += 1
            log.warning("openflow %s: %s refused: %s", self.name, what, err)
        else:
            self._unlogged += 1
        await self._send(err.reply(self.version or C.VERSION, h.xid if h else 0, raw))

    # -- framing --------------------------------------------------------------------------
    async def _fill(self, timeout: float | None) -> None:
        """More bytes into the buffer (TimeoutError if none come in ``timeout``)."""
        async with asyncio.timeout(timeout):          # (no task per read, as wait_for)
            data = await self.reader.read(READ_SIZE)
        if not data:
            raise asyncio.IncompleteReadError(bytes(self.buf), None)
        self.buf += data

    def _frames(self) -> tuple[list[tuple[C.Header, bytes, bytes]], OFError | None]:
        """The complete messages in the buffer, and the error that ends the stream (a
        length below 8) if one comes after them."""
        out = []
        off = 0
        buf = self.buf
        err = None
        while len(buf) - off >= C.HEADER.size:
            try:
                h = C.parse_header(bytes(buf[off:off + C.HEADER.size]))
            except OFError as e:
                err = e
                break
            if len(buf) - off < h.length:
                break
            raw = bytes(buf[off:off + h.length])
            out.append((h, raw[C.HEADER.size:], raw))
            off += h.length
        del buf[:off]
        return out, err

    async def _next(self, timeout: float | None) -> tuple[list, OFError | None]:
        """At least one message (or the stream's end): TimeoutError if nothing starts
        within ``timeout``; ConnectionError if a started message does not finish."""
        while True:
            frames, err = self._frames()
            if frames or err:
                return frames, err
            try:
                await self._fill(timeout if not self.buf else max(timeout or 0, HELLO_TIMEOUT))
            except TimeoutError:
                if self.buf:
                    raise ConnectionError(f"a message stopped after {len(self.buf)} "
                                          "bytes") from None
                raise

    # -- the connection -------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.IncompleteReadError as e:
            log.info("openflow %s: closed by the peer%s", self.name,
                     " in the middle of a message" if e.partial else "")
        except (ConnectionError, TimeoutError) as e:
            log.info("openflow %s: closed (%s)", self.name, e or type(e).__name__)
        except OFError as e:
            log.warning("openflow %s: closed: %s", self.name, e)
        except Exception:
            log.exception("openflow %s: closed by an internal error", self.name)
        finally:
            with contextlib.suppress(Exception):
                self.writer.close()
                await asyncio.wait_for(self.writer.wait_closed(), 2)

    async def _run(self) -> None:
        await self._send(C.hello(self._next_xid()))
        frames, err = await self._next(HELLO_TIMEOUT)
        if not frames:
            await self._send(err.reply(C.VERSION, 0, b""))
            raise err
        h, body, raw = frames[0]
        if h.type != C.HELLO:
            err = OFError(E.HELLO_FAILED, E.HFC_INCOMPATIBLE,
                          f"expected HELLO, got {C.TYPE_NAMES.get(h.type, h.type)}")
            await self._send(err.reply(C.VERSION, h.xid, raw))
            raise err
        try:
            self.version = C.negotiate(h.version, body)
        except OFError as e:
            await self._send(e.reply(C.VERSION, h.xid, raw))
            raise
        log.info("openflow %s: connected (OpenFlow 1.3)", self.name)
        if self.on_ready is not None:
            self.on_ready()
        await self._serve(frames[1:], err)
        probing = False
        while True:
            try:
                frames, err = await self._next(self.probe)
            except TimeoutError:
                if probing:
                    log.warning("openflow %s: no answer to the inactivity probe in %.1f s: "
                                "closing", self.name, self.probe)
                    return
                probing = True
                await self._send(C.message(C.ECHO_REQUEST, self._next_xid()))
                continue
            probing = False
            await self._serve(frames, err)

    async def _serve(self, frames: list, err: OFError | None) -> None:
        """Answer ``frames`` in order; then, if the stream cannot be framed any more, the
        ERROR, and the connection ends."""
        i = 0
        while i < len(frames):
            h = frames[i][0]
            j = i
            while j < len(frames) and j - i < MAX_BATCH and frames[j][0].type == C.FLOW_MOD \
                    and frames[j][0].version == self.version:
                j += 1
            if j > i:
                batch = frames[i:j]
                for (h, _, raw), e in zip(batch, self._flow_mods([b for _, b, _ in batch]),
                                          strict=True):
                    if e is not None:
                        await self._error(e, h, raw)
                i = j
            else:
                await self._dispatch(*frames[i])
                i += 1
        self.received += len(frames)
        if err is not None:
            await self._error(err, None, b"")
            raise err

    def _flow_mods(self, bodies: list[bytes]) -> list[OFError | None]:
        batch = getattr(self.handler, "flow_mods", None)
        if batch is not None:
            return batch(bodies)
        out: list[OFError | None] = []
        for body in bodies:
            try:
                self.handler.handle(C.Header(self.version, C.FLOW_MOD, 8 + len(body), 0),
                                    body)
                out.append(None)
            except OFError as e:
                out.append(e)
        return out

    async def _dispatch(self, h: C.Header, body: bytes, raw: bytes) -> None:
        if h.type == C.HELLO:
            return                               # (a second HELLO: nothing to do)
        if h.version != self.version:
            await self._error(OFError(E.BAD_REQUEST, E.BRC_BAD_VERSION,
                                      f"version 0x{h.version:02x} after negotiating "
                                      f"0x{self.version:02x}"), h, raw)
            return
        if h.type == C.ECHO_REQUEST:
            await self._send(C.message(C.ECHO_REPLY, h.xid, body))
            return
        if h.type == C.ECHO_REPLY:
            return
        if h.type == C.ERROR:
            code = body[:4].hex() if len(body) >= 4 else body.hex()
            log.warning("openflow %s: the peer sent an ERROR (%s)", self.name, code)
            return
        try:
            replies = self.handler.handle(h, body)
        except OFError as e:
            await self._error(e, h, raw)
            return
        except Exception as e:                   # a bug must not take the connection down
            log.exception("openflow %s: %s failed", self.name,
                          C.TYPE_NAMES.get(h.type, h.type))
            code = (E.FLOW_MOD_FAILED, E.FMFC_UNKNOWN) if h.type == C.FLOW_MOD else \
                (E.BAD_REQUEST, E.BRC_EPERM)
            await self._error(OFError(*code, f"internal error: {e}"), h, raw)
            return
        if replies:
            await self._send(*replies)
