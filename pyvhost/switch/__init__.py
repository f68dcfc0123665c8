"""pyvhost.switch: bridges of vhost-user and host ports (internal taps, afpacket and afxdp
attachments) over the compiled datapath (pyvhost._switch): rules in ovs-ofctl syntax, MAC
learning, QoS, PMD threads and RX-queue assignment, the persistent store and the control
socket. May import backend, memory, protocol; not cli.

The names below load on first use, so ``pyvhost ctl`` (which needs only ``.wire``) does not
pay for the datapath's imports."""

from __future__ import annotations

import importlib

_EXPORTS = {"CommandError": ".commands", "read_config": ".commands",
            "run_command": ".commands", "Switch": ".switch"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
