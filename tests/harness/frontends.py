"""pyvhost frontends as guests of a ``pyvhost switch`` child process (no VM, no DPDK): start
the switch with a config, attach one VirtioUser per port, drain what a port receives."""

from __future__ import annotations

import contextlib

from pyvhost.frontend import VirtioUser

from . import processes


def drain(port: VirtioUser, wait: float = 0.5) -> list[bytes]:
    """Everything ``port`` receives until it has been quiet for ``wait`` seconds."""
    out = []
    while True:
        got = port.recv(timeout=wait)
        if not got:
            return out
        out += got


@contextlib.contextmanager
def switch_with_ports(workdir, config: str, names: str | list[str], extra: list[str] = ()):
    """(run dir, {name: VirtioUser}) for a switch started with ``config`` (and the switch
    options ``extra``) whose vhostuser ports ``names`` each get a frontend; everything is
    stopped afterwards."""
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=config, extra=list(extra))
    ports = {}
    try:
        for name in names:
            # open() returns once the switch acked every setup request: rings are ready
            ports[name] = VirtioUser(str(run_dir / f"{name}.sock"), ring_size=256).open()
        yield run_dir, ports
    finally:
        for p in ports.values():
            p.close()
        assert sw.stop() == 0
