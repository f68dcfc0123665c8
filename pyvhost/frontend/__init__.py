"""pyvhost.frontend: the driver side of vhost-user ("virtio-user" in Python). It owns memfd
guest memory and split rings and attaches to any vhost-user backend (pyvhost's, DPDK's vhost
PMD, OVS-DPDK). Built on pyvhost.protocol and the compiled pyvhost._driver; may not import
backend, switch or cli."""

from .channel import BackendGone, BackendRefused
from .memory import FrontendMemory, MemoryFull
from .negotiate import DEFAULT_FEATURES, DEFAULT_PROTOCOL_FEATURES, Negotiated
from .port import VirtioUser

__all__ = ["BackendGone", "BackendRefused", "DEFAULT_FEATURES", "DEFAULT_PROTOCOL_FEATURES",
           "FrontendMemory", "Guest", "MemoryFull", "Negotiated", "VirtioUser"]


def __getattr__(name: str):
    # Guest (a tap in a namespace as a guest) loads its compiled loop only when asked for
    if name == "Guest":
        from .guest import Guest
        return Guest
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
