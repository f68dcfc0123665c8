"""``pyvhost reflector``: a standalone vhost-user virtio-net back-end.

Modes: ``reply`` answers ARP and ICMP echo for --ip through the Python device API;
``echo`` sends every frame back on its queue pair with the MACs swapped and ``sink``
counts and drops, both in the compiled poll loop on a thread of its own; ``source`` fills
the guest's receive buffers with --size-byte frames (benchmarks). Counters are printed on
SIGUSR1 and on exit; SIGINT and SIGTERM end it promptly.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import struct
import sys
import threading

from pyvhost._pktpool import PacketPool
from pyvhost._poll import Poller
from pyvhost.backend import Endpoint, NetBackend, NetDevice
from pyvhost.backend.responder import DEFAULT_MAC, Responder

log = logging.getLogger("pyvhost.reflector")
MODES = ("reply", "echo", "sink", "source")


def add_parser(sub) -> None:
    p = sub.add_parser("reflector", help="a standalone vhost-user back-end (reply/echo/sink)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True, help="vhost-user socket path")
    p.add_argument("--client", action="store_true",
                   help="connect to the front-end's socket (and reconnect) instead of listening")
    p.add_argument("--queues", type=int, default=1, help="queue pairs offered (default 1)")
    p.add_argument("--ip", default="10.0.0.254/24", help="reply mode: our address (CIDR)")
    p.add_argument("--mode", choices=MODES, default="reply")
    p.add_argument("--size", type=int, default=64, help="source mode: frame size in bytes")
    p.add_argument("--cpu", type=int, default=None, help="pin the poll thread to this CPU")
    p.add_argument("--strict-fds", action="store_true",
                   help="refuse guest-memory and dirty-log fds that cannot be sealed against "
                        "shrinking (hugetlbfs, tmpfs files, memfds without MFD_ALLOW_SEALING)")
    p.set_defaults(run=run)


def source_frame(size: int) -> bytes:
    """A broadcast UDP frame of ``size`` bytes (at least 60) for the source mode."""
    size = max(size, 60)
    payload = bytes(size - 42)
    udp = struct.pack("!HHHH", 1024, 1024, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes([10, 0, 0, 254]), bytes([10, 0, 0, 1]))
    return b"\xff" * 6 + DEFAULT_MAC + b"\x08\x00" + ip + udp


def format_counters(device: NetDevice, extra: dict) -> str:
    lines = []
    for q in range(device.queue_pairs):
        rx, tx = device.rx_ring(q).vq.stats(), device.tx_ring(q).vq.stats()
        drops = {k: rx[k] + tx[k] for k in rx if k.startswith("drop") or k == "ring_errors"}
        drops = " ".join(f"{k}={v}" for k, v in drops.items() if v)
        lines.append(f"queue {q}: from-guest {tx['packets']} pkts {tx['bytes']} B, "
                     f"to-guest {rx['packets']} pkts {rx['bytes']} B"
                     + (f", {drops}" if drops else ""))
    lines.append(" ".join(f"{k}={v}" for k, v in extra.items()))
    return "\n".join(lines)


async def _reply_loop(backend: NetBackend, queue: int, responder: Responder) -> None:
    while True:
        frames = await backend.recv(queue)
        replies = [r for r in map(responder.reply, frames) if r is not None]
        if replies:
            backend.send(replies, queue)


def _poll_thread(poller: Poller, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})     # 0: this thread
    poller.run()


async def _main(args) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks, poller, thread = [], None, None
    if args.mode == "reply":
        iface = ipaddress.IPv4Interface(args.ip)
        backend = NetBackend(args.socket, client=args.client, queues=args.queues,
                             name="reflector", strict_fds=args.strict_fds)
        device, endpoint = backend.device, backend.endpoint
        responder = Responder(str(iface.ip))
        tasks = [loop.create_task(_reply_loop(backend, q, responder))
                 for q in range(args.queues)]

        def extra():
            return {"arp_replies": responder.arp_replies, "icmp_replies": responder.icmp_replies,
                    "ignored": responder.ignored}
    else:
        device = NetDevice(args.queues, name="reflector", strict_fds=args.strict_fds)
        endpoint = Endpoint(device, args.socket, client=args.client)
        pairs = [(device.rx_ring(q).vq, device.tx_ring(q).vq) for q in range(args.queues)]
        template = source_frame(args.size) if args.mode == "source" else None
        poller = Poller(pairs, args.mode, PacketPool(2048, 65600), template)
        device.listeners.append(poller.wake)
        thread = threading.Thread(target=_poll_thread, args=(poller, args.cpu),
                                  name="pyvhost-poll", daemon=True)
        thread.start()

        def extra():
            return poller.stats()

    def print_counters():
        print(format_counters(device, extra()), flush=True)

    loop.add_signal_handler(signal.SIGUSR1, print_counters)
    try:
        await endpoint.start()
    except OSError as e:
        print(f"reflector: {e}", file=sys.stderr)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if poller is not None:
            poller.stop()
            thread.join(timeout=5)
        return 2
    print(f"reflector: mode {args.mode} on {args.socket} "
          f"({'client' if args.client else 'server'}), {args.queues} queue pair(s)", flush=True)
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await endpoint.close()
    if poller is not None:
        poller.stop()
        thread.join(timeout=5)
    print_counters()
    return 0


def run(args) -> int:
    if not 1 <= args.queues <= 128:
        print("reflector: --queues must be 1..128", file=sys.stderr)
        return 2
    if args.cpu is not None and args.cpu not in os.sched_getaffinity(0):
        print(f"reflector: --cpu {args.cpu} is not an allowed CPU", file=sys.stderr)
        return 2
    try:
        ipaddress.IPv4Interface(args.ip)
    except ValueError as e:
        print(f"reflector: bad --ip: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_main(args))
