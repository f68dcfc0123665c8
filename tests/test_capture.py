"""``pyvhost capture``: a live pcap of a port with nothing configured. The file it writes
is read by tcpdump and tshark and holds exactly the frames sent (count and bytes), in the
direction asked for and through the filter; written to a pipe it is readable while the
capture runs; a reader that does not keep up loses frames that are counted, and nothing
elsewhere in the switch; the capture ends when its port goes; bad requests are refused."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests.harness import processes
from tests.harness.frontends import drain, switch_with_ports

MAC = {n: bytes([0x02, 0, 0, 0, 0, i + 1]) for i, n in enumerate("abc")}
BCAST = b"\xff" * 6
CONFIG = "add-br br0\n" + "".join(f"add-port br0 {n} type=vhostuser queues=1\n"
                                  for n in "abc")
CAPTURE = [sys.executable, "-m", "pyvhost.cli.main", "capture"]


def udp_frame(src: bytes, dst: bytes, dport: int, size: int = 100) -> bytes:
    payload = bytes(size - 42)
    udp = struct.pack("!HHHH", 1000, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return dst + src + b"\x08\x00" + ip + udp


@pytest.fixture
def switch_ports(workdir):
    with switch_with_ports(workdir, CONFIG, "abc") as (run_dir, ports):
        for n in "abc":                                  # every MAC learned
            ports[n].send([udp_frame(MAC[n], BCAST, 9)])
        for n in "abc":
            drain(ports[n], 0.3)
        yield run_dir, ports


def start_capture(run_dir, *args, **popen) -> subprocess.Popen:
    return subprocess.Popen([*CAPTURE, "--control", str(run_dir / "ctl.sock"), *args],
                            stderr=subprocess.PIPE, text=popen.pop("text", True), **popen)


def wait_capturing(proc: subprocess.Popen) -> None:
    """Until the switch has said it is capturing (its first line on standard error)."""
    line = proc.stderr.readline()
    assert line.startswith("capture: capturing"), line


def pcap_records(path) -> list[tuple[int, bytes]]:
    data = path.read_bytes()
    magic, _, _, _, _, snaplen, link = struct.unpack("<IHHiIII", data[:24])
    assert magic == 0xA1B2C3D4 and link == 1
    out, off = [], 24
    while off < len(data):
        _, _, caplen, length = struct.unpack("<IIII", data[off:off + 16])
        out.append((length, data[off + 16:off + 16 + caplen]))
        off += 16 + caplen
    return out


def test_capture_to_a_file_read_by_tcpdump_and_tshark(switch_ports, workdir):
    run_dir, ports = switch_ports
    path = workdir / "a.pcap"
    sent = [udp_frame(MAC["a"], MAC["b"], 53, 60 + 37 * i) for i in range(20)]
    proc = start_capture(run_dir, "br0", "a", "--direction", "in", "-w", str(path),
                         "-c", "20")
    wait_capturing(proc)
    ports["b"].send([udp_frame(MAC["b"], MAC["a"], 53)])        # a's output: not asked for
    assert ports["a"].send_all(sent) == 20
    assert proc.wait(15) == 0
    err = proc.stderr.read()
    assert "20 frames written" in err, err
    assert pcap_records(path) == [(len(f), f) for f in sent]
    tcpdump = subprocess.run(["tcpdump", "-n", "-r", str(path)], capture_output=True,
                             text=True, timeout=30)
    assert tcpdump.returncode == 0 and tcpdump.stdout.count("10.0.0.1.1000 > 10.0.0.2.53") \
        == 20, tcpdump
    if shutil.which("tshark") is None:
        pytest.fail("tshark is missing (make test installs it)")
    tshark = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.len"],
                            capture_output=True, text=True, timeout=60)
    assert tshark.returncode == 0, tshark.stderr
    assert [int(n) for n in tshark.stdout.split()] == [len(f) for f in sent]


def test_a_pipe_into_tcpdump_is_readable_while_the_capture_runs(switch_ports):
    run_dir, ports = switch_ports
    proc = start_capture(run_dir, "br0", "b", "--direction", "out", "udp,tp_dst=53",
                         "-w", "-", stdout=subprocess.PIPE, text=False)
    tcpdump = subprocess.Popen(["tcpdump", "-l", "-n", "-r", "-"], stdin=proc.stdout,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.close()
    try:
        assert proc.stderr.readline().startswith(b"capture: capturing")
        ports["a"].send([udp_frame(MAC["a"], MAC["b"], 53), udp_frame(MAC["a"], MAC["b"], 54),
                         udp_frame(MAC["a"], MAC["c"], 53)])         # to c: not b's output
        ports["c"].send([udp_frame(MAC["c"], MAC["b"], 53)])
        text = b""                         # (os.read: no buffer for select to miss)
        deadline = time.monotonic() + 10
        while text.count(b"\n") < 2 and time.monotonic() < deadline:
            if select.select([tcpdump.stdout], [], [], 0.5)[0]:
                text += os.read(tcpdump.stdout.fileno(), 4096)
        lines = text.decode().splitlines()
        assert len(lines) == 2 and all(".53:" in line for line in lines), lines
        assert proc.poll() is None                     # still capturing
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert b"2 frames written" in proc.stderr.read()
        assert tcpdump.wait(10) == 0 and tcpdump.stdout.read() == b""
    finally:
        for p in (proc, tcpdump):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_text_output_and_the_capture_ends_with_its_port(switch_ports):
    run_dir, ports = switch_ports
    proc = start_capture(run_dir, "br0", "c", stdout=subprocess.PIPE)
    wait_capturing(proc)
    ports["c"].send([udp_frame(MAC["c"], MAC["a"], 7)])
    line = proc.stdout.readline()
    assert "02:00:00:00:00:03 > 02:00:00:00:00:01, ethertype 0x0800, IPv4 10.0.0.1 > " \
           "10.0.0.2 proto 17, length 100" in line, line
    ports["c"].close()
    processes.ctl(run_dir, "del-port", "c")
    assert proc.wait(10) == 0
    err = proc.stderr.read()
    assert "ended: port c was deleted" in err and "1 frames written" in err, err
    # its datapath port went with it: the switch has every id back, no mirror is left
    assert json.loads(processes.ctl(run_dir, "list-mirrors", "--json")) == []


def test_a_reader_that_does_not_read_loses_frames_that_are_counted(switch_ports):
    """A capture client that never reads: the capture ring fills and its frames are
    dropped and counted; the captured port's traffic to b is not touched."""
    run_dir, ports = switch_ports
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(str(run_dir / "ctl.sock"))
    s.settimeout(30)
    s.sendall(json.dumps({"argv": ["capture", "br0", "a", "--direction", "in"]}).encode()
              + b"\n")
    reply = b""
    while not reply.endswith(b"\n"):
        reply += s.recv(1)
    assert json.loads(reply)["ok"]
    frame = udp_frame(MAC["a"], MAC["b"], 53, 1400)
    total = 0
    for _ in range(40):                      # 10000 frames, 14 MB: more than the ring's 4 MiB
        total += ports["a"].send_all([frame] * 250)
        assert len(drain(ports["b"], 0.05)) == 250
    assert total == 10000
    stats = json.loads(processes.ctl(run_dir, "dump-ports", "--json", "br0"))
    assert stats["b"]["datapath"]["tx_packets"] >= 10000
    assert stats["b"]["datapath"]["drop_tx_full"] == 0
    # the reader still does not read: the switch is idle, not spinning on its capture
    time.sleep(1.0)
    pid = int((run_dir / "pyvhost.pid").read_text().split()[0])
    before = cpu_seconds(pid)
    time.sleep(1.5)
    assert cpu_seconds(pid) - before < 0.3, "the switch spins on a stalled capture"
    s.sendall(b"stop\n")                     # now read it all: the last S says what happened
    data = b""
    s.setblocking(True)
    while chunk := s.recv(1 << 20):
        data += chunk
    s.close()
    off, counters, pcap = 0, {}, 0
    while off < len(data):
        kind, length = struct.unpack("<cI", data[off:off + 5])
        body = data[off + 5:off + 5 + length]
        if kind == b"S":
            counters = json.loads(body)
        else:
            pcap += len(body)
        off += 5 + length
    assert counters["dropped"] > 0, counters
    assert counters["captured"] + counters["dropped"] == 10000, counters
    assert counters["ended"] == "stopped by the reader"
    # what was captured is whole records: 24 + captured * (16 + 1400) bytes were sent
    assert pcap >= 24 + counters["captured"] * (16 + 1400) - 4 * (16 + 1400)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_capture_port_never_takes_the_bridges_floods(switch_ports):
    """A capture's port is a mirror's output from its first moment to its last: broadcasts
    flooding the bridge while captures start and stop never land in one (a capture of
    a's input whose filter, tcp, selects none of them captures nothing)."""
    import threading
    run_dir, ports = switch_ports
    stop = threading.Event()

    def flood():
        end = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < end:
            ports["b"].send([udp_frame(MAC["b"], BCAST, 67)] * 8)
            drain(ports["a"], 0)
            drain(ports["c"], 0)
    t = threading.Thread(target=flood)
    t.start()
    try:
        for _ in range(4):
            proc = start_capture(run_dir, "br0", "a", "--direction", "in", "tcp",
                                 "-w", "/dev/null")
            wait_capturing(proc)
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
            err = proc.stderr.read()
            assert "the switch captured 0 " in err, err
    finally:
        stop.set()
        t.join(30)


@pytest.mark.parametrize("args,error,code", [
    (["br9", "a"], "no bridge named br9", 1),
    (["br0", "zz"], "no port zz on bridge br0", 1),
    (["br0", "a", "tp_dst=99999"], "filter", 1),
    (["br0", "a", "--snaplen", "5"], "--snaplen", 1),
])
def test_bad_captures_are_refused(switch_ports, args, error, code):
    run_dir, _ = switch_ports
    r = subprocess.run([*CAPTURE, "--control", str(run_dir / "ctl.sock"), *args],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == code and error in r.stderr, r.stderr


def test_no_switch_is_exit_2(workdir):
    r = subprocess.run([*CAPTURE, "--control", str(workdir / "nothing.sock"), "br0", "a"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot reach the switch" in r.stderr, r.stderr
