"""``pyvhost capture BRIDGE PORT [-w FILE|-] [-c COUNT] [--direction in|out|both]
[--snaplen N] [FILTER]``: a live capture of a port of a running switch, without
configuring anything: the switch streams pcap over the control socket (switch/capture.py
says how) and this writes it to FILE (``-`` for standard output, e.g. into
``tcpdump -r -``) as it comes, or prints a line per frame. Ends after COUNT frames, on
Ctrl-C/SIGTERM, or when the switch ends it (the port went); then says on standard error
how many frames were captured and how many the switch dropped because the reader was too
slow. Exit 0, 1 for a refused capture, 2 when the switch cannot be reached. Imports only
the wire format (no switch code)."""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import sys
import time

CHUNK = struct.Struct("<cI")
RECORD = struct.Struct("<IIII")
PCAP_HEADER_LEN = 24
MAX_CHUNK = 64 << 20


USAGE = ("pyvhost capture [--control SOCK] [-w FILE|-] [-c COUNT] "
         "[--direction in|out|both] [--snaplen N] BRIDGE PORT [FILTER]")


def options() -> argparse.ArgumentParser:
    """capture's own options, parsed intermixed (options may follow BRIDGE PORT FILTER,
    as with tcpdump)."""
    p = argparse.ArgumentParser(prog="pyvhost capture", usage=USAGE)
    p.add_argument("--control", default="./run/ctl.sock", help="the switch's control socket")
    p.add_argument("-w", dest="write", metavar="FILE",
                   help="write pcap to FILE (- for standard output) instead of printing")
    p.add_argument("-c", dest="count", type=int, default=0, help="stop after COUNT frames")
    p.add_argument("--direction", choices=("in", "out", "both"), default="both",
                   help="frames the port receives (in), sends (out) or both")
    p.add_argument("--snaplen", type=int, default=262144, help="bytes kept of each frame")
    p.add_argument("bridge")
    p.add_argument("port")
    p.add_argument("filter", nargs="?", help="flow-match syntax, e.g. tcp,tp_dst=80")
    return p


def add_parser(sub) -> None:
    p = sub.add_parser("capture", usage=USAGE, add_help=False,
                       help="live pcap of a switch port (to a file, a pipe or the terminal)")
    p.set_defaults(run=run, own_parser=True)     # every word is options()' to parse


def describe(ts: float, frame: bytes, length: int) -> str:
    """One line per frame: time, MACs, and the IPv4 addresses and protocol if any."""
    t = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1e6):06d}"
    if len(frame) < 14:
        return f"{t} truncated frame, length {length}"
    mac = lambda b: ":".join(f"{x:02x}" for x in b)       # noqa: E731
    kind, off = struct.unpack("!H", frame[12:14])[0], 14
    if kind == 0x8100 and len(frame) >= 18:
        kind, off = struct.unpack("!H", frame[16:18])[0], 18
    text = f"{t} {mac(frame[6:12])} > {mac(frame[0:6])}, ethertype 0x{kind:04x}"
    if kind == 0x0800 and len(frame) >= off + 20:
        src, dst = frame[off + 12:off + 16], frame[off + 16:off + 20]
        text += (f", IPv4 {'.'.join(map(str, src))} > {'.'.join(map(str, dst))} "
                 f"proto {frame[off + 9]}")
    return f"{text}, length {length}"


class Output:
    """Where the records go: a pcap file/pipe (header once, records as whole), or text."""

    def __init__(self, path: str | None):
        self.text = path is None
        if path == "-":
            self.f = os.fdopen(sys.stdout.fileno(), "wb", closefd=False)
        elif path is not None:
            self.f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.pending = b""
        self.header_done = False
        self.frames = 0

    def feed(self, data: bytes, limit: int) -> bool:
        """Take pcap bytes; False once ``limit`` frames (0: no limit) are out. Walks an
        offset over the bytes and keeps only the unfinished tail (one copy per chunk, not
        one per record)."""
        buf = self.pending + data if self.pending else data
        view, off, out = memoryview(buf), 0, []
        if not self.header_done:
            if len(buf) < PCAP_HEADER_LEN:
                self.pending = buf
                return True
            out.append(view[:PCAP_HEADER_LEN])
            off = PCAP_HEADER_LEN
            self.header_done = True
        done = False
        while len(buf) - off >= RECORD.size:
            sec, usec, caplen, length = RECORD.unpack_from(buf, off)
            end = off + RECORD.size + caplen
            if len(buf) < end:
                break
            self.frames += 1
            if self.text:
                print(describe(sec + usec / 1e6, bytes(view[off + RECORD.size:end]), length),
                      flush=True)
            else:
                out.append(view[off:end])
            off = end
            if limit and self.frames >= limit:
                done = True
                break
        self.pending = bytes(view[off:]) if not done else b""
        if out and not self.text:
            self.f.write(b"".join(out))
            self.f.flush()                             # readable while it runs
        return not done

    def close(self) -> None:
        if not self.text:
            self.f.close()


def read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            return None
        buf += got
    return bytes(buf)


def run(parsed) -> int:
    args = options().parse_intermixed_args(parsed.words)
    argv = ["capture", args.bridge, args.port, "--direction", args.direction,
            "--snaplen", str(args.snaplen)] + ([args.filter] if args.filter else [])
    if args.count < 0:
        print("capture: -c COUNT must be 0 or more", file=sys.stderr)
        return 2
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.settimeout(30)
            sock.connect(args.control)
            sock.sendall(json.dumps({"argv": argv}).encode() + b"\n")
            line = b""
            while not line.endswith(b"\n"):
                got = sock.recv(1)
                if not got:
                    raise ConnectionResetError("the switch closed the connection")
                line += got
        except OSError as e:
            print(f"capture: cannot reach the switch at {args.control}: {e}", file=sys.stderr)
            return 2
        answer = json.loads(line)
        if not answer.get("ok"):
            print(f"capture: {answer.get('error')}", file=sys.stderr)
            return 1
        print(f"capture: {answer.get('output')}", file=sys.stderr)
        try:
            out = Output(args.write)
        except OSError as e:
            print(f"capture: {e}", file=sys.stderr)
            return 1
        return stream(sock, out, args.count, stop)
    finally:
        sock.close()
        for s, h in old.items():
            signal.signal(s, h)


def stream(sock: socket.socket, out: Output, count: int, stop: dict) -> int:
    counters: dict = {}
    asked_stop = False
    sock.settimeout(30)
    try:
        while True:
            if stop["now"] and not asked_stop:
                sock.sendall(b"stop\n")
                asked_stop = True
            if not select.select([sock], [], [], 0.2)[0]:
                continue                          # (and look at the stop flag again)
            head = read_exactly(sock, CHUNK.size)
            if head is None:
                break
            kind, length = CHUNK.unpack(head)
            if length > MAX_CHUNK:
                print(f"capture: a chunk of {length} bytes: not a pyvhost switch?",
                      file=sys.stderr)
                return 1
            body = read_exactly(sock, length) or b""
            if kind == b"S":
                counters = json.loads(body)
            elif kind == b"D" and not asked_stop:
                if not out.feed(body, count):
                    stop["now"] = True
    except BrokenPipeError:               # `pyvhost capture ... -w - | head`: fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:
        print(f"capture: {e}", file=sys.stderr)
    finally:
        try:
            out.close()
        except BrokenPipeError:
            pass
    print(f"capture: {out.frames} frames written; the switch captured "
          f"{counters.get('captured', '?')} and dropped {counters.get('dropped', '?')} "
          f"(reader too slow)" + (f"; ended: {counters['ended']}"
                                  if counters.get("ended") else ""), file=sys.stderr)
    return 0
