"""``pyvhost guest``: a Linux network namespace as a vhost-user guest, no VM needed.

A virtio-net front-end (pyvhost.frontend.Guest) on --socket, bridged to a tap interface
(--ifname, default eth0) created inside namespace --netns (made if missing, deleted at exit
only if made here) with --mac (default: a stable locally administered one), --ip and --mtu
set and the link up. Any program in the namespace (ping, iperf3, curl, a web server) is
then a guest on the switch port behind the socket. Frames move in a compiled loop without
the GIL; checksum and TSO offloads pass through as virtio-net headers where the backend
negotiated them (--offloads csum|none offers fewer). Client by default (reconnects when
the backend goes away); --server listens on the socket instead.

Runs in the foreground: one line when the interface is up, one per (re)connection on
stderr, counters on SIGUSR1, a summary at exit (SIGINT/SIGTERM; with --json its last line
is a JSON object). Exit status 2 for bad options or a setup failure (namespace, tap), 1
when the interface is deleted under it.

Only options, signals and printing here: the namespace, the tap and the data path are
pyvhost.frontend.Guest's (and its compiled loop's); nothing of the switch.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import sys
import threading

from pyvhost.frontend.guest import MAX_QUEUES, Guest
from pyvhost.frontend.netns import GuestNetError


def add_parser(sub) -> None:
    p = sub.add_parser("guest", help="a network namespace as a vhost-user guest (tap bridge)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True, help="vhost-user socket path")
    p.add_argument("--server", action="store_true",
                   help="listen on the socket and let the backend connect")
    p.add_argument("--netns", help="network namespace of the interface (made if missing); "
                                   "default: this process's")
    p.add_argument("--ifname", default="eth0", help="interface name (default eth0)")
    p.add_argument("--mac", help="MAC address (default: stable, locally administered)")
    p.add_argument("--ip", help="address of the interface, CIDR (e.g. 10.1.0.1/24)")
    p.add_argument("--mtu", type=int, help="MTU of the interface")
    p.add_argument("--queues", type=int, default=1,
                   help="queue pairs (default 1; more: a multiqueue tap, a thread per pair)")
    p.add_argument("--offloads", choices=("tso", "csum", "none"), default="tso",
                   help="offloads offered to the backend: checksum and TSO (default), "
                        "checksum only, or none (everything completed in software)")
    p.add_argument("--ring-size", type=int, default=256, help="descriptors per ring")
    p.add_argument("--packed", action="store_true",
                   help="packed virtqueues (VIRTIO_F_RING_PACKED; the backend must offer them)")
    p.add_argument("--json", action="store_true", help="print JSON stats as the last line")
    p.set_defaults(run=run)


def check_args(args) -> str | None:
    if not 1 <= args.queues <= MAX_QUEUES:
        return f"--queues must be 1..{MAX_QUEUES}"
    if args.ip is not None:
        try:
            iface = ipaddress.ip_interface(args.ip)
        except ValueError as e:
            return f"bad --ip: {e}"
        if "/" not in args.ip:
            return f"--ip {args.ip}: give a prefix length (CIDR, e.g. {iface.ip}/24)"
    if args.mtu is not None and not 68 <= args.mtu <= 65517:
        return "--mtu must be 68..65517"
    if args.ring_size < 64 or args.ring_size > 32768 or args.ring_size & (args.ring_size - 1):
        return "--ring-size must be a power of 2 in 64..32768"
    return None


def format_counters(stats: dict) -> str:
    state = "connected" if stats["connected"] else \
        f"not connected ({stats['error']})" if stats["error"] else "not connected"
    lines = [f"guest {stats['interface']}: {state}, connections {stats['connections']}",
             f"to device: {stats['to_device_packets']} pkts {stats['to_device_bytes']} B, "
             f"to tap: {stats['to_tap_packets']} pkts {stats['to_tap_bytes']} B"]
    other = {k: v for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)
             and k not in ("to_device_packets", "to_device_bytes", "to_tap_packets",
                           "to_tap_bytes", "connections", "features") and v}
    if other:
        lines.append(" ".join(f"{k}={v}" for k, v in other.items()))
    for q, st in enumerate(stats.get("queues", [])):
        lines.append(f"queue {q}: to device {st['to_device_packets']} pkts, to tap "
                     f"{st['to_tap_packets']} pkts")
    for ring in ("rx_ring", "tx_ring"):
        drops = {k: v for k, v in stats.get(ring, {}).items()
                 if (k.startswith("drop") or k in ("ring_errors", "ring_full")) and v}
        if drops:
            lines.append(f"{ring}: " + " ".join(f"{k}={v}" for k, v in drops.items()))
    return "\n".join(lines)


def run(args) -> int:
    problem = check_args(args)
    if problem:
        print(f"guest: {problem}", file=sys.stderr)
        return 2
    try:
        guest = Guest(args.socket, server=args.server, netns=args.netns, ifname=args.ifname,
                      mac=args.mac, ip=args.ip, mtu=args.mtu, queues=args.queues,
                      offloads=args.offloads, ring_size=args.ring_size, packed=args.packed)
    except (GuestNetError, ValueError) as e:
        print(f"guest: {e}", file=sys.stderr)
        return 2
    glog = logging.getLogger("pyvhost.guest")
    if glog.getEffectiveLevel() > logging.INFO:
        glog.setLevel(logging.INFO)          # each (re)connection is worth a line
    wake = threading.Event()
    flags = {"stop": False, "usr1": False}

    def on_signal(signum, frame):
        flags["usr1" if signum == signal.SIGUSR1 else "stop"] = True
        wake.set()

    old = {sig: signal.signal(sig, on_signal)
           for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    status = 0
    try:
        try:
            guest.start()
        except (GuestNetError, OSError, ValueError) as e:
            print(f"guest: {e}", file=sys.stderr)
            return 2
        print(f"guest: {guest.describe()}", flush=True)
        while not flags["stop"]:
            wake.wait(1.0)
            wake.clear()
            if flags["usr1"]:
                flags["usr1"] = False
                print(format_counters(guest.stats()), flush=True)
            if not guest.alive and not flags["stop"]:
                print(f"guest: {guest.last_error}", file=sys.stderr)
                status = 1
                break
    finally:
        guest.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    stats = guest.stats()
    print(format_counters(stats), flush=True)
    print("guest: stopped", flush=True)
    if args.json:
        print(json.dumps(stats), flush=True)
    return status
