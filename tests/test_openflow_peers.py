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


def test_a_local_user_who_may_not_use_the_control_socket_may_not_program_the_bridge(workdir):
    """ptcp: on loopback admits the peers the control socket admits: root's ovs-ofctl
    programs the bridge, nobody's connection is refused and logged."""
    import shutil
    if shutil.which("ovs-ofctl") is None:
        pytest.fail("ovs-ofctl missing (make test installs openvswitch-common)")
    run_dir = workdir / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sw = processes.switch(workdir, run_dir, config="add-br br0\n"
                          f"set-controller br0 ptcp:{port}\n")
    try:
        target = f"tcp:127.0.0.1:{port}"
        ok = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "add-flow", target,
                             "priority=5,actions=drop"], capture_output=True, text=True,
                            timeout=30)
        assert ok.returncode == 0, ok.stderr
        refused = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "add-flow", target,
                                  "priority=6,actions=drop"], capture_output=True, text=True,
                                 timeout=30, user="nobody")
        assert refused.returncode != 0
        flows = processes.ctl(run_dir, "dump-flows", "br0")
        assert "priority=5" in flows and "priority=6" not in flows, flows
        assert "connection from uid 65534 on this host refused" in sw.errors()
    finally:
        sw.stop()
