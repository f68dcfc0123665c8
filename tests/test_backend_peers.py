"""Peers that are not what a vhost-user socket expects: a second back-end started on a
socket another back-end listens on is refused (the first keeps its socket), and a back-end
that connects where a front-end was expected (a reflector in client mode on a switch port)
is reported on both sides instead of both waiting in silence."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.harness import processes


def wait_for_text(proc, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.errors():
            return True
        time.sleep(0.1)
    return False


def test_a_second_backend_on_a_live_socket_is_refused(workdir, reflectors):
    sock = workdir / "r.sock"
    first = reflectors(sock, mode="echo")
    r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "reflector", "--socket",
                        str(sock), "--mode", "echo"], capture_output=True, text=True,
                       timeout=60, cwd=processes.REPO)
    assert r.returncode == 2 and "another process is listening" in r.stderr, r.stderr
    assert sock.exists() and first.proc.poll() is None       # the first one still serves
    status = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "gen", "--socket",
                             str(sock), "--mode", "txrx", "--count", "100", "--json"],
                            capture_output=True, text=True, timeout=60, cwd=processes.REPO)
    assert status.returncode == 0, status.stdout + status.stderr


def test_a_backend_where_a_frontend_was_expected_is_reported(workdir, reflectors):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config="add-br br0\n"
                          "add-port br0 p1 type=vhostuser queues=1\n")
    try:
        refl = reflectors(run_dir / "p1.sock", mode="echo", client=True)
        assert wait_for_text(sw, "sent no request", 15), sw.errors()[-2000:]
        assert "is it a vhost-user front-end?" in sw.errors()
        assert wait_for_text(refl, "is it a vhost-user front-end?", 15), refl.errors()[-2000:]
    finally:
        assert sw.stop() == 0
