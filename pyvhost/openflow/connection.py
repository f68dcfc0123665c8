"""One OpenFlow 1.3 connection (asyncio streams): HELLO exchange and version negotiation,
framing with length checks, ECHO both ways, the inactivity probe, and requests answered
one after the other in the order they came. A malformed or refused message gets the
spec's ERROR reply and a log line; the connection goes on unless it cannot be framed any
more (a length below 8) or the HELLO fails. Nothing raised by a request escapes: a bug is
logged and answered with an ERROR. The requests themselves are the handler's."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from . import codec as C
from . import errors as E
from .errors import OFError

log = logging.getLogger("pyvhost.openflow")

DEFAULT_PROBE = 5.0       # seconds without a message before an ECHO_REQUEST (OVS: 5 s)
HELLO_TIMEOUT = 10.0      # seconds for the peer's HELLO, and for the rest of a message
DRAIN_TIMEOUT = 30.0      # seconds replies may wait for a peer that does not read them


class Connection:
    """``handler`` has ``handle(header, body) -> [reply bytes]``; ``probe`` is the
    inactivity probe interval in seconds (an unanswered probe closes the connection after
    another interval; None: no probe)."""

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

    def _next_xid(self) -> int:
        self.xid = (self.xid + 1) & 0xFFFFFFFF
        return self.xid

    async def _send(self, *messages: bytes) -> None:
        for m in messages:
            self.writer.write(m)
        try:                              # a peer that sends but never reads: closed
            await asyncio.wait_for(self.writer.drain(), max(self.probe or 0, DRAIN_TIMEOUT))
        except TimeoutError:
            raise ConnectionError("the peer reads none of the replies") from None

    async def _error(self, err: OFError, h: C.Header | None, raw: bytes) -> None:
        self.errors_sent += 1
        what = C.TYPE_NAMES.get(h.type, f"type {h.type}") if h else "message"
        log.warning("openflow %s: %s refused: %s", self.name, what, err)
        await self._send(err.reply(self.version or C.VERSION, h.xid if h else 0, raw))

    async def _read(self, timeout: float) -> tuple[C.Header, bytes, bytes]:
        """One message: (header, body, raw). TimeoutError if nothing starts within
        ``timeout``; OFError for an unframeable length (the caller closes)."""
        head = await asyncio.wait_for(self.reader.readexactly(C.HEADER.size), timeout)
        h = C.parse_header(head)
        try:
            body = await asyncio.wait_for(self.reader.readexactly(h.length - C.HEADER.size),
                                          max(timeout or 0, HELLO_TIMEOUT))
        except TimeoutError:
            raise ConnectionError(f"the rest of a {h.length}-byte message did not "
                                  "arrive") from None
        return h, body, head + body

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
        try:
            h, body, raw = await self._read(HELLO_TIMEOUT)
        except OFError as e:
            await self._send(e.reply(C.VERSION, 0, b""))
            raise
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
        probing = False
        while True:
            try:
                h, body, raw = await self._read(self.probe)
            except TimeoutError:
                if probing:
                    log.warning("openflow %s: no answer to the inactivity probe in %.1f s: "
                                "closing", self.name, self.probe)
                    return
                probing = True
                await self._send(C.message(C.ECHO_REQUEST, self._next_xid()))
                continue
            except OFError as e:                 # a length below 8: framing is lost
                await self._error(e, None, b"")
                raise
            probing = False
            self.received += 1
            await self._dispatch(h, body, raw)

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
