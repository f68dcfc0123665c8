"""OpenFlow 1.3 from the controller's side, for tests: message builders written from the
spec's layouts (independently of pyvhost.openflow, so they check it), a blocking client
that does the HELLO exchange and reads replies with timeouts, and ``ofctl`` running the
real ``ovs-ofctl -O OpenFlow13`` with a timeout."""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import threading
import time

OVS_OFCTL = shutil.which("ovs-ofctl") or "/usr/bin/ovs-ofctl"
V = 4
HELLO, ERROR, ECHO_REQUEST, ECHO_REPLY, FEATURES_REQUEST, FEATURES_REPLY = 0, 1, 2, 3, 5, 6
GET_CONFIG_REQUEST, GET_CONFIG_REPLY, SET_CONFIG, FLOW_MOD = 7, 8, 9, 14
MULTIPART_REQUEST, MULTIPART_REPLY, BARRIER_REQUEST, BARRIER_REPLY = 18, 19, 20, 21
ADD, MODIFY, MODIFY_STRICT, DELETE, DELETE_STRICT = range(5)
ANY = 0xFFFFFFFF


def msg(type_: int, body: bytes = b"", xid: int = 1, version: int = V) -> bytes:
    return struct.pack("!BBHI", version, type_, 8 + len(body), xid) + body


def hello(bitmap_versions=(4,), version: int = V) -> bytes:
    bits = sum(1 << v for v in bitmap_versions)
    return msg(HELLO, struct.pack("!HHI", 1, 8, bits), xid=0, version=version)


def oxm(field: int, value: bytes, mask: bytes | None = None) -> bytes:
    if mask is None:
        return struct.pack("!I", 0x8000 << 16 | field << 9 | len(value)) + value
    return struct.pack("!I", 0x8000 << 16 | field << 9 | 1 << 8 | 2 * len(value)) + value + mask


def match(*tlvs: bytes) -> bytes:
    body = b"".join(tlvs)
    length = 4 + len(body)
    return struct.pack("!HH", 1, length) + body + bytes((length + 7) // 8 * 8 - length)


def output(port: int) -> bytes:
    return struct.pack("!HHIH6x", 0, 16, port, 0)


def packet_out(in_port: int, actions: bytes, data: bytes, *, buffer_id: int = 0xFFFFFFFF,
               actions_len: int | None = None, xid: int = 1) -> bytes:
    alen = len(actions) if actions_len is None else actions_len
    return msg(13, struct.pack("!IIH6x", buffer_id, in_port, alen) + actions + data, xid)


def apply_actions(*actions: bytes) -> bytes:
    body = b"".join(actions)
    return struct.pack("!HH4x", 4, 8 + len(body)) + body


def goto(table: int) -> bytes:
    return struct.pack("!HHB3x", 1, 8, table)


def flow_mod(command: int = ADD, m: bytes = match(), instructions: bytes = b"", *,
             cookie: int = 0, cookie_mask: int = 0, table: int = 0, idle: int = 0,
             hard: int = 0, priority: int = 0x8000, buffer_id: int = ANY,
             out_port: int = ANY, out_group: int = ANY, flags: int = 0, xid: int = 1) -> bytes:
    body = struct.pack("!QQBBHHHIIIH2x", cookie, cookie_mask, table, command, idle, hard,
                       priority, buffer_id, out_port, out_group, flags) + m + instructions
    return msg(FLOW_MOD, body, xid)


def multipart(mtype: int, body: bytes = b"", xid: int = 1, flags: int = 0) -> bytes:
    return msg(MULTIPART_REQUEST, struct.pack("!HH4x", mtype, flags) + body, xid)


def flow_stats_request(table: int = 0xFF, m: bytes = match(), *, out_port: int = ANY,
                       cookie: int = 0, cookie_mask: int = 0, aggregate: bool = False,
                       xid: int = 1) -> bytes:
    body = struct.pack("!B3xII4xQQ", table, out_port, ANY, cookie, cookie_mask) + m
    return multipart(2 if aggregate else 1, body, xid)


class Client:
    """A controller-side connection: ``request`` sends and returns (type, xid, body)."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, do_hello: bool = True):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        if do_hello:
            self.sock.sendall(hello())
            t, _, _ = self.recv()
            assert t == HELLO

    @classmethod
    def over(cls, sock: socket.socket, timeout: float = 5.0) -> Client:
        """The controller's end of a connection the switch made (accepted by the test):
        HELLO both ways."""
        self = cls.__new__(cls)
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = b""
        self.sock.sendall(hello())
        t, _, _ = self.recv()
        assert t == HELLO
        return self

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> tuple[int, int, bytes]:
        while True:
            if len(self.buf) >= 8:
                _, t, length, xid = struct.unpack_from("!BBHI", self.buf)
                if len(self.buf) >= length:
                    m, self.buf = self.buf[:length], self.buf[length:]
                    return t, xid, m[8:]
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the switch")
            self.buf += chunk

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the switch has closed the connection (what it sent is skipped)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                continue
            except ConnectionError:
                return True
        return False

    def request(self, data: bytes) -> tuple[int, int, bytes]:
        self.send(data)
        return self.recv()

    def error_of(self, data: bytes) -> tuple[int, int] | None:
        """(type, code) of the ERROR ``data`` gets, or None if a barrier comes first."""
        self.send(data + msg(BARRIER_REQUEST, xid=0xBA))
        t, xid, body = self.recv()
        if t == ERROR:
            etype, code = struct.unpack_from("!HH", body)
            assert self.recv()[0] == BARRIER_REPLY
            return etype, code
        assert (t, xid) == (BARRIER_REPLY, 0xBA), (t, xid, body)
        return None

    def alive(self) -> bool:
        t, xid, body = self.request(msg(ECHO_REQUEST, b"ping", xid=0xEC))
        return (t, xid, body) == (ECHO_REPLY, 0xEC, b"ping")


def ofctl(target: str, *args: str, check: bool = True, timeout: float = 60.0,
          stdin: str | None = None) -> subprocess.CompletedProcess:
    """``ovs-ofctl -O OpenFlow13 [--options] COMMAND TARGET [ARGS]``."""
    n = next(i for i, a in enumerate(args) if not a.startswith("--"))
    r = subprocess.run([OVS_OFCTL, "-O", "OpenFlow13", *args[:n + 1], target, *args[n + 1:]],
                       capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and r.returncode != 0:
        raise AssertionError(f"ovs-ofctl {' '.join(args)}: exit {r.returncode}\n{r.stderr}")
    return r


def flow_lines(dump: str) -> list[str]:
    """dump-flows lines without the changing parts (duration, idle_age), sorted."""
    out = []
    for line in dump.splitlines():
        if "actions=" not in line:
            continue
        line = re.sub(r" duration=[0-9.]+s,", "", line)
        line = re.sub(r" idle_age=\d+,", "", line)
        out.append(line.strip())
    return sorted(out)


def packet_in_fields(body: bytes) -> tuple[int, bytes]:
    """(in_port, frame) of a PACKET_IN's body (in_port 0 if its match has none)."""
    _, mlen = struct.unpack_from("!HH", body, 16)
    oxm = body[20:16 + mlen]
    in_port = 0
    if oxm[:4] == struct.pack("!HBB", 0x8000, 0, 4):
        in_port = struct.unpack_from("!I", oxm, 4)[0]
    return in_port, body[16 + (mlen + 7) // 8 * 8 + 2:]


class Responder:
    """A controller that answers every PACKET_IN with a PACKET_OUT of its frame to
    ``out_port`` (benchmarks: PACKET_IN -> PACKET_OUT round trips). It listens on
    127.0.0.1 (``port``) or, given ``unix_path``, on that Unix socket (a switch in another
    network namespace reaches it), takes one switch connection (an active ``tcp:`` target), says
    HELLO, asks for whole frames (SET_CONFIG miss_send_len NO_BUFFER: a passive OVS
    connection sends PACKET_INs only then), answers ECHO_REQUESTs, and runs in a thread
    until ``stop()``. ``packet_ins`` counts what it answered."""

    def __init__(self, out_port: int, unix_path: str | None = None):
        self.out_port = out_port
        if unix_path is None:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.port = self.listener.getsockname()[1]
        else:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(unix_path)
            self.listener.listen()
            self.port = None
        self.packet_ins = 0
        self.connected = False
        self.error: BaseException | None = None
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="responder")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.listener.settimeout(0.5)
            while not self._stop:
                try:
                    sock, _ = self.listener.accept()
                except TimeoutError:
                    continue
                with sock:
                    self._serve(sock)
        except BaseException as e:               # noqa: BLE001 (reported by stop())
            self.error = e

    def _serve(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(0.5)
        sock.sendall(hello() + msg(SET_CONFIG, struct.pack("!HH", 0, 0xFFFF), xid=2))
        self.connected = True
        action = output(self.out_port)
        buf = b""
        while not self._stop:
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                self.connected = False
                return
            buf += chunk
            out = []
            off = 0
            while len(buf) - off >= 8:
                _, t, length, xid = struct.unpack_from("!BBHI", buf, off)
                if length < 8:
                    raise ConnectionError(f"a message of length {length}")
                if len(buf) - off < length:
                    break
                body = buf[off + 8:off + length]
                off += length
                if t == 10:                                              # PACKET_IN
                    in_port, frame = packet_in_fields(body)
                    out.append(packet_out(in_port or 0xFFFFFFFD, action, frame, xid=xid))
                    self.packet_ins += 1
                elif t == ECHO_REQUEST:
                    out.append(msg(ECHO_REPLY, body, xid))
            buf = buf[off:]
            if out:
                sock.sendall(b"".join(out))

    def stop(self) -> None:
        self._stop = True
        self.thread.join(10)
        self.listener.close()
        if self.error is not None:
            raise self.error
