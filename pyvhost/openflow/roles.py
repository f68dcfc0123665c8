"""Several controllers on one bridge (OpenFlow 1.3.5, 6.3.7): each connection's role
(EQUAL, MASTER, SLAVE) set by ROLE_REQUEST with the bridge's generation id guarding
against stale masters, and its asynchronous-message configuration (GET/SET_ASYNC): which
PACKET_IN, PORT_STATUS and FLOW_REMOVED reasons it is sent in the master/equal role and
in the slave role. The wire layouts and the rules; no sockets, no switch."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from . import codec as C
from . import errors as E
from .errors import OFError

NOCHANGE, EQUAL, MASTER, SLAVE = 0, 1, 2, 3
ROLE_NAMES = {EQUAL: "equal", MASTER: "master", SLAVE: "slave"}
ROLE = struct.Struct("!I4xQ")
ROLE_REPLY = 25
GET_ASYNC_REPLY = 27
ASYNC = struct.Struct("!6I")
# ofp_role_request_failed_code
RRFC_STALE, RRFC_UNSUP, RRFC_BAD_ROLE = 0, 1, 2
# the spec's defaults: [master/equal, slave] per message type
DEFAULT_ASYNC = {C.PACKET_IN: (0b011, 0), C.PORT_STATUS: (0b111, 0b111),
                 C.FLOW_REMOVED: (0b1111, 0)}
# requests a slave may not make (they change the switch)
WRITES = {C.FLOW_MOD, C.PACKET_OUT, C.GROUP_MOD, C.PORT_MOD, C.TABLE_MOD, C.METER_MOD}


@dataclass
class Generation:
    """A bridge's generation id: None until a MASTER or SLAVE request sets it."""

    value: int | None = None

    def check(self, gen: int) -> None:
        if self.value is not None and ((gen - self.value) & 0xFFFFFFFFFFFFFFFF) >= 1 << 63:
            raise OFError(E.ROLE_REQUEST_FAILED, RRFC_STALE,
                          f"generation id {gen} is older than {self.value}")
        self.value = gen


@dataclass(eq=False)
class Role:
    """One connection's role and asynchronous configuration (hashed by identity: a
    bridge keeps its connections' roles in a WeakSet)."""

    role: int = EQUAL
    masks: dict[int, tuple[int, int]] = field(default_factory=lambda: dict(DEFAULT_ASYNC))

    @property
    def is_slave(self) -> bool:
        return self.role == SLAVE

    def wants(self, msg_type: int, reason: int) -> bool:
        pair = self.masks.get(msg_type)
        if pair is None:
            return True
        mask = pair[1] if self.is_slave else pair[0]
        return bool(mask >> reason & 1)

    def check_write(self, msg_type: int) -> None:
        if self.is_slave and msg_type in WRITES:
            raise OFError(E.BAD_REQUEST, E.BRC_IS_SLAVE,
                          f"{C.TYPE_NAMES.get(msg_type, msg_type)} from a slave controller")


def parse_role_request(body: bytes) -> tuple[int, int]:
    C.need(body, ROLE.size, "ROLE_REQUEST", exact=True)
    role, gen = ROLE.unpack(body)
    if role not in (NOCHANGE, EQUAL, MASTER, SLAVE):
        raise OFError(E.ROLE_REQUEST_FAILED, RRFC_BAD_ROLE, f"role {role}")
    return role, gen


def role_reply(xid: int, role: int, gen: int | None) -> bytes:
    return C.message(ROLE_REPLY, xid, ROLE.pack(role, 0 if gen is None else gen))


def parse_set_async(body: bytes) -> dict[int, tuple[int, int]]:
    C.need(body, ASYNC.size, "SET_ASYNC", exact=True)
    pi0, pi1, ps0, ps1, fr0, fr1 = ASYNC.unpack(body)
    return {C.PACKET_IN: (pi0, pi1), C.PORT_STATUS: (ps0, ps1),
            C.FLOW_REMOVED: (fr0, fr1)}


def async_reply(xid: int, masks: dict[int, tuple[int, int]]) -> bytes:
    return C.message(GET_ASYNC_REPLY, xid, ASYNC.pack(*masks[C.PACKET_IN],
                                                      *masks[C.PORT_STATUS],
                                                      *masks[C.FLOW_REMOVED]))
