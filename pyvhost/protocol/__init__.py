"""pyvhost.protocol: the vhost-user wire protocol (ids, payloads, framing, request table).

The lowest layer: it imports no other pyvhost package and touches no guest memory.
"""

from . import constants, messages, payloads, wire
from .constants import BackendRequest, DeviceStatus, Feature, ProtocolFeature, Request

__all__ = [
    "BackendRequest", "DeviceStatus", "Feature", "ProtocolFeature", "Request",
    "constants", "messages", "payloads", "wire",
]
