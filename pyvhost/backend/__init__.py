"""pyvhost.backend: a vhost-user device (back-end side) over pyvhost.protocol, pyvhost.memory
and the compiled rings: per-connection state machine, server and client sockets, the
virtio-net device and a Python packet API (``NetBackend``). May not import frontend,
switch or cli."""

from .api import NetBackend
from .device import DeviceError, Refused, VhostUserDevice
from .endpoint import Endpoint
from .net import NET_FEATURES, NET_PROTOCOL_FEATURES, NetDevice

__all__ = ["DeviceError", "Endpoint", "NET_FEATURES", "NET_PROTOCOL_FEATURES", "NetBackend",
           "NetDevice", "Refused", "VhostUserDevice"]
