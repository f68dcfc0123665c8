"""pyvhost.switch: bridges of vhost-user ports over the compiled datapath (pyvhost._switch):
rules in ovs-ofctl syntax, MAC learning, QoS, PMD threads and RX-queue assignment, the
persistent store and the control socket. May import backend, memory, protocol; not cli."""

from .commands import CommandError, read_config, run_command
from .switch import Switch

__all__ = ["CommandError", "Switch", "read_config", "run_command"]
