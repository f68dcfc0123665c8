"""``pyvhost switch``: the switch daemon (foreground, logs to stderr, clean exit on SIGTERM)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from pyvhost.memory import set_strict_fds
from pyvhost.openflow import enable as enable_openflow
from pyvhost.switch import CommandError, Switch, read_config
from pyvhost.switch.control import ControlServer
from pyvhost.switch.rundir import RunDirError, group_id
from pyvhost.switch.store import StoreError

log = logging.getLogger("pyvhost.switch")


def add_parser(sub) -> None:
    p = sub.add_parser("switch", help="run the switch daemon")
    p.add_argument("--config", help="commands that seed an empty configuration store")
    p.add_argument("--run-dir", default="./run", help="sockets and the store (default ./run)")
    p.add_argument("--control", help="control socket (default RUN_DIR/ctl.sock)")
    p.add_argument("--ctl-group", help="group whose members may use the control socket "
                                       "(then 0660; default 0600: root and this user only)")
    p.add_argument("--vhost-sock-dir", help="where type=vhostuser sockets are created "
                                            "(default RUN_DIR)")
    p.add_argument("--socket-group", help="group of the vhostuser sockets (e.g. QEMU's)")
    p.add_argument("--socket-mode", type=lambda v: int(v, 8),
                   help="mode of the vhostuser sockets, octal (default 0600, 0660 with "
                        "--socket-group)")
    p.add_argument("--strict-fds", action="store_true",
                   help="refuse guest-memory and dirty-log fds that cannot be sealed against "
                        "shrinking (hugetlbfs, tmpfs files, memfds without MFD_ALLOW_SEALING); "
                        "without it they are taken and a truncation drops that port's "
                        "front-end")
    p.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics there (e.g. 127.0.0.1:9100; off by default)")
    p.set_defaults(run=run)


async def _main(args) -> int:
    run_dir = Path(args.run_dir).resolve()
    set_strict_fds(args.strict_fds)
    if args.strict_fds:
        log.info("switch: --strict-fds: unsealable memory and dirty-log fds are refused")
    seed = read_config(Path(args.config).read_text()) if args.config else None
    os.umask(0o077)                # the store and the lock: this user only; sockets: chmod
    try:
        ctl_gid = group_id(args.ctl_group) if args.ctl_group else None
        sw = Switch(run_dir, sock_dir=args.vhost_sock_dir, socket_mode=args.socket_mode,
                    socket_group=args.socket_group)
    except (RunDirError, StoreError, ValueError) as e:
        print(f"switch: {e}", file=sys.stderr)
        return 2
    sw.ctl_gid = ctl_gid           # OpenFlow listeners admit the control socket's peers
    control = ControlServer(sw, args.control or str(run_dir / "ctl.sock"), ctl_gid)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    openflow = enable_openflow(sw)     # before start: seed commands may set controllers
    try:
        await sw.start(seed)
    except CommandError as e:
        print(f"switch: configuration: {e}", file=sys.stderr)
        await sw.stop()
        return 2
    try:
        await control.start()
    except OSError as e:
        print(f"switch: control socket {control.path}: {e}", file=sys.stderr)
        await sw.stop()
        return 2
    metrics = None
    if args.metrics:
        from pyvhost.switch.metrics import MetricsServer
        try:
            metrics = MetricsServer(sw, args.metrics)
            metrics.start()
        except (OSError, ValueError) as e:
            print(f"switch: --metrics {args.metrics}: {e}", file=sys.stderr)
            await control.close()
            await sw.stop()
            return 2
    await openflow.restore()
    print(f"switch: running, control socket {control.path}", flush=True)
    await stop.wait()
    log.info("switch: stopping")
    if metrics is not None:
        metrics.stop()
    await openflow.close()
    await control.close()
    await sw.stop()
    print("switch: stopped", flush=True)
    return 0


def run(args) -> int:
    if args.config and not Path(args.config).is_file():
        print(f"switch: no config file {args.config}", file=sys.stderr)
        return 2
    if args.socket_mode is not None and not 0 <= args.socket_mode <= 0o777:
        print(f"switch: --socket-mode {args.socket_mode:o} out of range 0..0777",
              file=sys.stderr)
        return 2
    if args.metrics:
        try:
            import prometheus_client  # noqa: F401

            from pyvhost.switch.metrics import parse_address
            parse_address(args.metrics)
        except ImportError:
            print("switch: --metrics needs the prometheus_client package "
                  "(pip install prometheus_client)", file=sys.stderr)
            return 2
        except ValueError as e:
            print(f"switch: {e}", file=sys.stderr)
            return 2
    return asyncio.run(_main(args))
