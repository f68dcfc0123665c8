"""The request table: for every front-end request, its payload type, fd rule and reply.

One declarative table, checked in one place (``check_request``) before any handler runs,
as DPDK's vhost_user.c and rust-vmm's message.rs do. No I/O, no device state here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from . import constants as C
from . import payloads as P
from .constants import ProtocolFeature as PF
from .constants import Request as R


class FdRule(Enum):
    NONE = "none"          # no fd may come with it
    ONE = "one"            # exactly one fd
    VRING = "vring"        # one fd unless the payload's no-fd bit is set
    PER_REGION = "regions"  # one fd per memory region of the payload
    OPTIONAL = "optional"  # zero or one (tolerated, e.g. REM_MEM_REG)


@dataclass(frozen=True)
class RequestSpec:
    payload: type
    fds: FdRule = FdRule.NONE
    reply: type | None = None          # payload type of the mandatory reply
    gate: PF | None = None             # protocol feature that must be negotiated first


SPECS: dict[R, RequestSpec] = {
    R.GET_FEATURES: RequestSpec(P.Empty, reply=P.U64),
    R.SET_FEATURES: RequestSpec(P.U64),
    R.SET_OWNER: RequestSpec(P.Empty),
    R.RESET_OWNER: RequestSpec(P.Empty),
    R.SET_MEM_TABLE: RequestSpec(P.MemTable, FdRule.PER_REGION),
    R.SET_LOG_BASE: RequestSpec(P.LogBase, FdRule.ONE, reply=P.U64, gate=PF.LOG_SHMFD),
    R.SET_LOG_FD: RequestSpec(P.Empty, FdRule.ONE, gate=PF.LOG_SHMFD),
    R.SET_VRING_NUM: RequestSpec(P.VringState),
    R.SET_VRING_ADDR: RequestSpec(P.VringAddr),
    R.SET_VRING_BASE: RequestSpec(P.VringState),
    R.GET_VRING_BASE: RequestSpec(P.VringState, reply=P.VringState),
    R.SET_VRING_KICK: RequestSpec(P.VringFd, FdRule.VRING),
    R.SET_VRING_CALL: RequestSpec(P.VringFd, FdRule.VRING),
    R.SET_VRING_ERR: RequestSpec(P.VringFd, FdRule.VRING),
    R.GET_PROTOCOL_FEATURES: RequestSpec(P.Empty, reply=P.U64),
    R.SET_PROTOCOL_FEATURES: RequestSpec(P.U64),
    R.GET_QUEUE_NUM: RequestSpec(P.Empty, reply=P.U64, gate=PF.MQ),
    R.SET_VRING_ENABLE: RequestSpec(P.VringState),
    R.SEND_RARP: RequestSpec(P.U64, gate=PF.RARP),
    R.NET_SET_MTU: RequestSpec(P.U64, gate=PF.NET_MTU),
    R.SET_BACKEND_REQ_FD: RequestSpec(P.Empty, FdRule.ONE, gate=PF.BACKEND_REQ),
    R.IOTLB_MSG: RequestSpec(P.IotlbMsg, reply=P.U64),
    R.SET_VRING_ENDIAN: RequestSpec(P.VringState, gate=PF.CROSS_ENDIAN),
    R.GET_CONFIG: RequestSpec(P.Config, reply=P.Config, gate=PF.CONFIG),
    R.SET_CONFIG: RequestSpec(P.Config, gate=PF.CONFIG),
    R.CREATE_CRYPTO_SESSION: RequestSpec(P.Empty, gate=PF.CRYPTO_SESSION),
    R.CLOSE_CRYPTO_SESSION: RequestSpec(P.U64, gate=PF.CRYPTO_SESSION),
    R.POSTCOPY_ADVISE: RequestSpec(P.Empty, gate=PF.PAGEFAULT),
    R.POSTCOPY_LISTEN: RequestSpec(P.Empty, gate=PF.PAGEFAULT),
    R.POSTCOPY_END: RequestSpec(P.Empty, reply=P.U64, gate=PF.PAGEFAULT),
    R.GET_INFLIGHT_FD: RequestSpec(P.Inflight, gate=PF.INFLIGHT_SHMFD),
    R.SET_INFLIGHT_FD: RequestSpec(P.Inflight, FdRule.ONE, gate=PF.INFLIGHT_SHMFD),
    R.GPU_SET_SOCKET: RequestSpec(P.Empty, FdRule.ONE),
    R.RESET_DEVICE: RequestSpec(P.Empty, gate=PF.RESET_DEVICE),
    R.VRING_KICK: RequestSpec(P.VringState, gate=PF.INBAND_NOTIFICATIONS),
    R.GET_MAX_MEM_SLOTS: RequestSpec(P.Empty, reply=P.U64, gate=PF.CONFIGURE_MEM_SLOTS),
    R.ADD_MEM_REG: RequestSpec(P.SingleMemRegion, FdRule.ONE, gate=PF.CONFIGURE_MEM_SLOTS),
    R.REM_MEM_REG: RequestSpec(P.SingleMemRegion, FdRule.OPTIONAL,
                               gate=PF.CONFIGURE_MEM_SLOTS),
    R.SET_STATUS: RequestSpec(P.U64, gate=PF.STATUS),
    R.GET_STATUS: RequestSpec(P.Empty, reply=P.U64, gate=PF.STATUS),
    R.GET_SHARED_OBJECT: RequestSpec(P.Empty, gate=PF.SHARED_OBJECT),
    R.SET_DEVICE_STATE_FD: RequestSpec(P.DeviceStateParams, FdRule.ONE, gate=PF.DEVICE_STATE),
    R.CHECK_DEVICE_STATE: RequestSpec(P.Empty, reply=P.U64, gate=PF.DEVICE_STATE),
}


class RequestError(ValueError):
    """A request that must not reach a handler: the connection that sent it is closed."""


def expected_fds(spec: RequestSpec, payload) -> tuple[int, int]:
    """The (min, max) number of fds a request with this payload may carry."""
    if spec.fds is FdRule.NONE:
        return 0, 0
    if spec.fds is FdRule.ONE:
        return 1, 1
    if spec.fds is FdRule.OPTIONAL:
        return 0, 1
    if spec.fds is FdRule.VRING:
        return (0, 0) if payload.nofd else (1, 1)
    n = len(payload.regions)
    return n, n


def check_request(request: int, body: bytes, nfds: int, protocol_features: int):
    """Decode and validate a request; returns (Request, RequestSpec, payload).

    Raises RequestError naming the request and the reason. The caller closes the fds.
    """
    try:
        req = R(request)
    except ValueError:
        raise RequestError(f"unknown request id {request}") from None
    spec = SPECS[req]
    if spec.gate is not None and not protocol_features & C.bit(spec.gate):
        raise RequestError(f"{req.name} needs protocol feature {spec.gate.name}, not negotiated")
    try:
        payload = spec.payload.unpack(body)
        payload.validate()
    except P.PayloadError as e:
        raise RequestError(f"{req.name}: {e}") from None
    lo, hi = expected_fds(spec, payload)
    if not lo <= nfds <= hi:
        want = str(lo) if lo == hi else f"{lo}..{hi}"
        raise RequestError(f"{req.name} carries {nfds} fds, expected {want}")
    return req, spec, payload
