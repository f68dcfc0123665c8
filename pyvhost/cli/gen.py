"""``pyvhost gen``: a packet generator and sink on a vhost-user socket (pyvhost.frontend).

Modes: ``tx`` sends, ``rx`` receives, ``txrx`` sends and expects every frame back (an
echoing or MAC-swapping backend), ``ping`` resolves --target with ARP and sends ICMP echo
requests. Split rings by default, packed with --packed (IN_ORDER offered unless
--no-in-order; --chain-seg posts buffers as descriptor chains). Test frames carry a
sequence number and a send timestamp, so the receiver counts
lost and reordered frames and latency percentiles; the per-packet work is compiled
(pyvhost._gen), this module only drives it in short slices and reports. A progress line
goes to stderr each second; the summary to stdout, and with --json its last line is one JSON
object. Exit status 1 when the backend fails or goes away, 2 for bad options.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time

from pyvhost import _gen
from pyvhost.frontend import DEFAULT_FEATURES, BackendGone, BackendRefused, VirtioUser, ping
from pyvhost.protocol.constants import Feature, bit

MODES = ("tx", "rx", "txrx", "ping")
SLICE = 0.1          # seconds per compiled run
DRAIN = 1.0          # txrx: give up waiting for stragglers after this long without one
SETTLE = 1.0         # tx: at most this long for the backend to take the last frames
DEFAULT_DURATION = 5.0
SRC_MAC = bytes.fromhex("020000000001")


def add_parser(sub) -> None:
    p = sub.add_parser("gen", help="packet generator/sink on a vhost-user socket (frontend)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True, help="vhost-user socket path")
    p.add_argument("--server", action="store_true",
                   help="listen on the socket and let the backend connect")
    p.add_argument("--queues", type=int, default=1, help="queue pairs (default 1)")
    p.add_argument("--size", type=int, default=64, help="frame size in bytes (default 64)")
    p.add_argument("--rate", type=float, default=0.0, help="frames/s in all (default: max)")
    p.add_argument("--count", type=int, default=None, help="frames to send (rx: to receive)")
    p.add_argument("--duration", type=float, default=None,
                   help=f"seconds to send (rx: to receive); default {DEFAULT_DURATION:g}")
    p.add_argument("--flows", type=int, default=1, help="flows to cycle through")
    p.add_argument("--vary", choices=sorted(_gen.VARY), default="sport",
                   help="what differs between flows: the UDP source port (default), the "
                        "source MAC (a learning storm) or the destination IP")
    p.add_argument("--mode", choices=MODES, default="txrx")
    p.add_argument("--ip", default="10.0.0.1", help="our IPv4 address")
    p.add_argument("--target", default="10.0.0.254", help="destination IPv4 address")
    p.add_argument("--dst-mac", default="ff:ff:ff:ff:ff:ff", help="destination MAC of frames")
    p.add_argument("--window", type=int, default=None,
                   help="txrx: frames in flight at most (default: half the RX ring)")
    p.add_argument("--ring-size", type=int, default=256, help="descriptors per ring")
    p.add_argument("--mem", type=int, default=64, help="guest memory per region in MiB")
    p.add_argument("--regions", type=int, default=1, help="memory regions (1..8)")
    p.add_argument("--no-mrg-rxbuf", action="store_true", help="do not offer MRG_RXBUF")
    p.add_argument("--packed", action="store_true",
                   help="packed virtqueues (VIRTIO_F_RING_PACKED; fail if the backend lacks it)")
    p.add_argument("--no-in-order", action="store_true", help="do not offer IN_ORDER")
    p.add_argument("--chain-seg", type=int, default=0,
                   help="packed: post buffers as descriptor chains (header, then pieces of "
                        "this many bytes); default one descriptor per buffer")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the peer")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--run-id", type=int, default=None,
                   help="tx: the run id test frames carry (default: from the process id); "
                        "rx: count as received only test frames of this run, the rest as "
                        "other frames (default: every frame)")
    p.set_defaults(run=run)


def check_args(args) -> str | None:
    """The first problem with the options, or None."""
    if not 1 <= args.queues <= 128:
        return "--queues must be 1..128"
    if not _gen.MIN_SIZE <= args.size <= 9216:
        return f"--size must be {_gen.MIN_SIZE}..9216"
    if not 1 <= args.flows <= _gen.MAX_FLOWS_BY_VARY[args.vary]:
        return f"--flows must be 1..{_gen.MAX_FLOWS_BY_VARY[args.vary]} with --vary {args.vary}"
    if args.count is not None and args.duration is not None:
        return "give --count or --duration, not both"
    if (args.count is not None and args.count < 1) or (args.duration or 1) <= 0:
        return "--count and --duration must be positive"
    if args.rate < 0:
        return "--rate must be >= 0"
    if args.run_id is not None and not 0 <= args.run_id <= 0xFFFF:
        return "--run-id must be 0..65535"
    if args.chain_seg and (not args.packed or args.chain_seg < 64):
        return "--chain-seg needs --packed and at least 64 bytes"
    try:
        ipaddress.IPv4Address(args.ip)
        ipaddress.IPv4Address(args.target)
        if len(bytes.fromhex(args.dst_mac.replace(":", ""))) != 6:
            raise ValueError("MAC")
    except ValueError as e:
        return f"bad address: {e}"
    return None


def open_port(args) -> VirtioUser:
    features = DEFAULT_FEATURES & ~(bit(Feature.NET_MRG_RXBUF) if args.no_mrg_rxbuf else 0)
    features &= ~(bit(Feature.IN_ORDER) if args.no_in_order else 0)
    port = VirtioUser(args.socket, server=args.server, queues=args.queues,
                      ring_size=args.ring_size, mem_size=args.mem << 20, regions=args.regions,
                      max_frame=max(args.size, 1518), features=features,
                      connect_timeout=args.timeout, pool_size=4096, packed=args.packed,
                      chain_seg=args.chain_seg)
    try:
        port.open()
    except BaseException:
        port.close()
        raise
    return port


def default_window(port: VirtioUser, size: int) -> int:
    """Half of what the RX ring holds in frames of ``size`` bytes."""
    q = port.rx_queue(0)
    per_frame = 1
    if port.negotiated.mrg_rxbuf:
        per_frame = -(-(size + 12) // port.rx_buf_len)
    return max(1, q.capacity // per_frame // 2)


class Progress:
    """One stderr line per second while running."""

    def __init__(self, gen):
        self.gen = gen
        self.last = time.monotonic()
        self.sent = self.received = 0

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last < 1.0:
            return
        g, dt = self.gen, now - self.last
        print(f"gen: {g.elapsed:6.1f} s  sent {g.sent} ({(g.sent - self.sent) / dt / 1e3:.1f} "
              f"kpps)  received {g.received} ({(g.received - self.received) / dt / 1e3:.1f} "
              f"kpps)", file=sys.stderr, flush=True)
        self.last, self.sent, self.received = now, g.sent, g.received


def drive(port: VirtioUser, gen, args) -> str | None:
    """Run the generator to the end; returns an error string if the backend failed."""
    ctl = port.channel.fileno()
    progress = Progress(gen)
    duration = args.duration if args.count is None else None
    if duration is None and args.count is None:
        duration = DEFAULT_DURATION
    end = time.monotonic() + duration if duration else None
    while True:
        reason = gen.run(SLICE, ctl)
        progress.tick()
        if reason == _gen.STOP_CONTROL or not port.alive:
            return "the backend went away"
        if reason == _gen.STOP_BROKEN:
            return "the backend broke a ring (used index out of range)"
        if reason == _gen.STOP_DONE:
            if args.mode == "tx":
                settle(port)
            return None
        if end is not None and time.monotonic() >= end:
            break
        if (args.mode == "txrx" and gen.tx_target and gen.sent >= gen.tx_target
                and gen.elapsed - gen.rx_seconds > DRAIN):
            return None               # the rest are lost
    if args.mode == "tx":
        settle(port)
    if args.mode != "txrx":
        return None
    gen.tx_target = gen.rx_target = max(gen.sent, 1)     # stop sending, wait for the rest
    while gen.received < gen.sent and gen.elapsed - gen.rx_seconds <= DRAIN:
        if gen.run(SLICE, ctl) == _gen.STOP_CONTROL or not port.alive:
            return "the backend went away"
    return None


def settle(port: VirtioUser, seconds: float = SETTLE) -> None:
    """Wait (bounded) until the backend has taken every frame posted: hanging up with
    frames still in the ring would make them look lost at the other side."""
    end = time.monotonic() + seconds
    while port.alive and time.monotonic() < end:
        if all(q.reclaim() >= 0 and q.in_flight == 0 for q in port.tx_queues):
            return
        time.sleep(0.001)


def summary(args, port: VirtioUser | None, stats: dict, error: str | None) -> int:
    lat = stats.get("latency_us") or {}
    lines = [f"gen {args.mode} on {args.socket}: {args.size} B, {args.queues} queue pair(s)"]
    if port is not None and port.negotiated is not None:
        lines.append("negotiated " + port.negotiated.describe())
    lines.append(f"sent      {stats.get('sent', 0):>12}   {stats.get('tx_pps', 0) / 1e6:8.3f} Mpps")
    lines.append(f"received  {stats.get('received', 0):>12}   "
                 f"{stats.get('rx_pps', 0) / 1e6:8.3f} Mpps")
    lines.append(f"lost      {stats.get('lost', 0):>12}   reordered {stats.get('reordered', 0)}"
                 f"   other frames {stats.get('rx_other', 0)}")
    if lat.get("p50") is not None:
        lines.append(f"latency   p50 {lat['p50']} us  p99 {lat['p99']} us  max {lat['max']} us"
                     f"  mean {lat['mean']} us")
    if error:
        lines.append(f"FAILED: {error}")
    print("\n".join(lines), flush=True)
    if args.json:
        print(json.dumps({**stats, "mode": args.mode, "size": args.size,
                          "queues": args.queues, "error": error}), flush=True)
    return 1 if error else 0


def gen_stats(gen, mode: str, any_run: bool = True) -> dict:
    """The run's numbers; in rx mode ``received`` counts every frame unless only one run's
    test frames are asked for (``any_run`` False: --run-id)."""
    received = gen.received + (gen.rx_other if mode == "rx" and any_run else 0)
    lost = max(0, gen.sent - gen.received) if mode == "txrx" else 0
    tx_s, rx_s = gen.tx_seconds, gen.rx_seconds
    return {"sent": gen.sent, "received": received, "lost": lost, "reordered": gen.reordered,
            "rx_other": gen.rx_other, "tx_pps": round(gen.sent / tx_s, 1) if tx_s > 0 else 0.0,
            "rx_pps": round(received / rx_s, 1) if rx_s > 0 else 0.0,
            "window_stalls": gen.window_stalls, "duration_s": round(gen.elapsed, 3),
            "latency_us": gen.latency_us()}


def run(args) -> int:
    problem = check_args(args)
    if problem:
        print(f"gen: {problem}", file=sys.stderr)
        return 2
    port = None
    stats: dict = {"sent": 0, "received": 0, "lost": 0, "reordered": 0, "tx_pps": 0.0,
                   "rx_pps": 0.0, "latency_us": {"p50": None, "p99": None, "max": None}}
    try:
        port = open_port(args)
        print(f"gen: connected to {args.socket}: {port.negotiated.describe()}",
              file=sys.stderr, flush=True)
        if args.mode == "ping":
            stats, error = run_ping(port, args)
        else:
            gen = make_gen(port, args)
            error = drive(port, gen, args)
            stats = gen_stats(gen, args.mode, args.run_id is None)
    except (BackendGone, BackendRefused, OSError) as e:
        error = f"backend failed: {e}"
    except KeyboardInterrupt:
        error = "interrupted"
    try:
        return summary(args, port, stats, error)
    finally:
        if port is not None:
            port.close()


def make_gen(port: VirtioUser, args):
    txqs = port.tx_queues if args.mode in ("tx", "txrx") else []
    rxqs = port.rx_queues if args.mode in ("rx", "txrx") else []
    gen = _gen.Gen(txqs, rxqs, port.pool, SRC_MAC,
                   bytes.fromhex(args.dst_mac.replace(":", "")),
                   ipaddress.IPv4Address(args.ip).packed,
                   ipaddress.IPv4Address(args.target).packed, args.size, args.flows,
                   os.getpid() & 0xFFFF if args.run_id is None else args.run_id,
                   any_run=args.mode == "rx" and args.run_id is None, vary=_gen.VARY[args.vary])
    gen.rate = args.rate
    if args.count is not None:
        if args.mode in ("tx", "txrx"):
            gen.tx_target = args.count
        if args.mode in ("rx", "txrx"):
            gen.rx_target = args.count
    if args.mode == "txrx":
        gen.window = args.window or default_window(port, args.size)
    return gen


def run_ping(port: VirtioUser, args) -> tuple[dict, str | None]:
    count = args.count or 5
    interval = 1.0 / args.rate if args.rate else 0.2
    pinger = ping.Pinger(port, SRC_MAC, args.ip, args.target)
    try:
        result = pinger.run(count, interval, timeout=args.timeout)
    except ping.Unreachable as e:
        return {"sent": 0, "received": 0, "lost": count, "reordered": 0, "tx_pps": 0.0,
                "rx_pps": 0.0, "latency_us": {"p50": None, "p99": None, "max": None}}, str(e)
    return result, None
