"""Who may program the switch over OpenFlow (pyvhost.openflow.peers): a TCP peer on this
host is known by the owner of its socket (/proc/net/tcp, IPv4 and IPv6) and must be root,
the switch's user or in its control group, as on the control socket; a Unix peer by
SO_PEERCRED."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from pyvhost.openflow.peers import allowed, tcp_peer_uid
from tests.harness import processes

CONNECT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("connected", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"),
                                         (socket.AF_INET6, "::1")])
def test_a_local_tcp_peer_is_known_by_its_uid(family, host):
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        for user, uid in ((None, os.getuid()), ("nobody", 65534)):
            client = subprocess.Popen([processes.python_for(user), "-c", CONNECT, host,
                                       str(port)], user=user, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert client.stdout.readline().strip() == "connected"
                conn, _ = listener.accept()
                with conn:
                    assert tcp_peer_uid(conn) == uid
                    ok, who = allowed(conn, None)
                    assert ok == (user is None), who
                    assert f"uid {uid}" in who
            finally:
                client.stdin.close()
                client.wait(10)


def test_a_unix_peer_by_its_credentials():
    a, b = socket.socketpair()
    with a, b:
        ok, who = allowed(a, None)
        assert ok and f"uid {os.getuid()}" in who
