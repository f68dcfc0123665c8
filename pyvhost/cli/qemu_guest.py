"""QEMU guests for pyvhost's demo and tests: a tiny Linux VM whose NICs are vhost-user ports.

It lives in the package (not the test tree) so that ``pyvhost demo`` runs from an installed
wheel; the tests import it from here too.

What lives here:

* ``build_initramfs()`` packs busybox-static, the host kernel's virtio-net
  modules and ``GUEST_INIT`` (below) into a gzip'd cpio (newc) initramfs, cached
  in the build directory under a hash of its inputs.
* ``NicSpec`` describes one vhost-user NIC (socket, MAC, guest address, ...).
* ``QemuGuest`` boots that kernel + initramfs under TCG with shareable guest
  memory, drives the guest shell on the serial console (``run``, ``ping``),
  talks QMP (``qmp``) and always tears QEMU down again (``stop``, ``with``).
* ``qemu_available()`` / ``missing_prerequisites()`` tell tests whether they
  can run here.

The guest configures only the given NICs' addresses (no routes beyond their
subnets, no IPv6), prints ``READY_MARKER`` on the serial console and then
serves a root shell there.  Kernel messages are kept off the console so that
its output can be parsed.
"""

from __future__ import annotations

import ctypes
import gzip
import hashlib
import json
import lzma
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def _default_build_dir() -> Path:
    """Where initramfs images are cached: build/guest in a source checkout, else the user's
    cache dir (an installed wheel)."""
    if (REPO_ROOT / "setup.py").is_file() and (REPO_ROOT / "pyvhost").is_dir():
        return REPO_ROOT / "build" / "guest"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pyvhost" / "guest"


DEFAULT_BUILD_DIR = _default_build_dir()
QEMU_BINARY = "qemu-system-x86_64"
BUSYBOX_PATH = Path("/bin/busybox")

VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)
REQUIRED_MODULES = ("virtio_net",)

READY_MARKER = "PYVHOST-GUEST-READY"
ERROR_MARKER = "PYVHOST-GUEST-ERROR"
KERNEL_APPEND = "console=ttyS0 quiet loglevel=1 panic=-1"
# TCG only (no working KVM here), no default devices, exit instead of rebooting.
_QEMU_ISOLATION = "-accel tcg -nodefaults -no-user-config -nographic -no-reboot".split()

_MAX_LINE = 4000  # the guest tty's canonical-mode line limit is 4095 bytes
_PR_SET_PDEATHSIG = 1
_GUEST_DIRS = "bin sbin usr usr/bin usr/sbin dev proc sys tmp lib lib/modules".split()
_TERMINAL_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|c)|\r")


def _kernel_version() -> str | None:
    """Newest kernel in /boot that also has its modules installed."""
    versions = [path.name.removeprefix("vmlinuz-") for path in Path("/boot").glob("vmlinuz-*")]
    usable = [v for v in versions if Path("/lib/modules", v, "modules.dep").exists()]
    return max(usable, key=_natural_key, default=None)


def _natural_key(version: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", version)]


KERNEL_VERSION = _kernel_version()
KERNEL_PATH = Path("/boot", f"vmlinuz-{KERNEL_VERSION}") if KERNEL_VERSION else None
MODULES_DIR = Path("/lib/modules", KERNEL_VERSION) if KERNEL_VERSION else None


class GuestError(RuntimeError):
    """The guest or QEMU did not behave as expected."""


class GuestTimeout(GuestError, TimeoutError):
    """A wait on the guest ran out of time."""


class QmpError(GuestError):
    """QMP answered a command with an error."""


# --------------------------------------------------------------------------
# Prerequisites


def missing_prerequisites() -> list[str]:
    """Why guests cannot run on this machine (an empty list if they can)."""
    missing = []
    if shutil.which(QEMU_BINARY) is None:
        missing.append(f"{QEMU_BINARY} not found (apt-get install qemu-system-x86)")
    if KERNEL_PATH is None or not os.access(KERNEL_PATH, os.R_OK):
        missing.append("no readable /boot/vmlinuz-* with modules (linux-image-amd64)")
    elif any(name not in _module_paths() for name in REQUIRED_MODULES):
        missing.append(f"kernel {KERNEL_VERSION} lacks module(s) {REQUIRED_MODULES}")
    if not BUSYBOX_PATH.exists():
        missing.append(f"{BUSYBOX_PATH} not found (apt-get install busybox-static)")
    return missing


def qemu_available() -> bool:
    """True if QEMU guests can be built and booted here."""
    return not missing_prerequisites()


# --------------------------------------------------------------------------
# Initramfs


def _module_paths() -> dict[str, Path]:
    """Loadable modules of KERNEL_VERSION by name, from modules.dep."""
    paths = {}
    for line in (MODULES_DIR / "modules.dep").read_text().splitlines():
        rel = line.split(":", 1)[0]
        name = Path(rel).name.split(".ko", 1)[0].replace("-", "_")
        paths[name] = MODULES_DIR / rel
    return paths


def _read_module(path: Path) -> bytes:
    """A module's ELF image, decompressed (busybox insmod wants plain .ko)."""
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    if path.suffix == ".zst":
        return subprocess.run(
            ["zstd", "-dc", str(path)], check=True, capture_output=True, timeout=60
        ).stdout
    return path.read_bytes()


def _guest_modules() -> list[tuple[str, bytes]]:
    """VIRTIO_MODULES in load order; built-in (absent) ones are skipped."""
    available = _module_paths()
    missing = [name for name in REQUIRED_MODULES if name not in available]
    if missing:
        raise GuestError(f"kernel {KERNEL_VERSION} has no module(s) {missing}")
    return [(name, _read_module(available[name])) for name in VIRTIO_MODULES if name in available]


class _CpioWriter:
    """Minimal writer for the cpio "newc" format the kernel unpacks."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._ino = 0

    def _entry(self, name: str, mode: int, body: bytes = b"", rdev=(0, 0)) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(body), 0, 0, *rdev, len(encoded), 0)
        self._data += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        self._pad()
        self._data += body
        self._pad()

    def _pad(self) -> None:
        self._data += b"\0" * (-len(self._data) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, body: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, body)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self._data)


def _initramfs_image(init: bytes, busybox: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    cpio = _CpioWriter()
    for name in _GUEST_DIRS:
        cpio.directory(name)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.file("init", init, 0o755)
    for name, image in modules:
        cpio.file(f"lib/modules/{name}.ko", image)
    order = "".join(f"{name}\n" for name, _ in modules).encode()
    cpio.file("lib/modules/order", order)
    return gzip.compress(cpio.finish(), mtime=0)


def build_initramfs(build_dir: str | os.PathLike = DEFAULT_BUILD_DIR) -> tuple[Path, Path]:
    """Return (kernel, initrd) paths, building the initrd unless cached.

    The initrd is cached in build_dir under a hash of the init script,
    busybox, the module images and this file, so editing any of them
    rebuilds it (and removes the superseded images).
    """
    if KERNEL_PATH is None:
        raise GuestError("no guest kernel: install linux-image-amd64")
    init = GUEST_INIT.encode()
    busybox = BUSYBOX_PATH.read_bytes()
    modules = _guest_modules()
    digest = hashlib.sha256(Path(__file__).read_bytes() + init + busybox)
    for name, image in modules:
        digest.update(name.encode() + b"\0" + image)
    build_dir = Path(build_dir)
    initrd = build_dir / f"initramfs-{KERNEL_VERSION}-{digest.hexdigest()[:16]}.cpio.gz"
    if not initrd.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        partial = initrd.with_name(f"{initrd.name}.{os.getpid()}.tmp")
        partial.write_bytes(_initramfs_image(init, busybox, modules))
        os.replace(partial, initrd)
        for stale in build_dir.glob("initramfs-*.cpio.gz"):
            if stale != initrd:
                stale.unlink(missing_ok=True)
    return KERNEL_PATH, initrd


# --------------------------------------------------------------------------
# Serial console


class _Console:
    """QEMU's stdio serial console: a reader thread logs and buffers output."""

    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        self._proc = proc
        self._log = open(log_path, "wb")
        self._buffer = bytearray()
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(
            target=self._read, name=f"console:{log_path.name}", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        fd = self._proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            self._log.write(chunk)
            self._log.flush()
            with self._changed:
                self._buffer += chunk
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def mark(self) -> int:
        """Offset of the next output byte, to search only newer output."""
        with self._changed:
            return len(self._buffer)

    def output(self, start: int = 0, end: int | None = None) -> bytes:
        with self._changed:
            return bytes(self._buffer[start:end])

    def tail(self, lines: int = 40) -> str:
        """The last lines of output, without CRs and terminal escapes."""
        text = _TERMINAL_ESCAPE.sub("", self.output().decode(errors="replace"))
        return "\n".join(text.splitlines()[-lines:])

    def wait_for(self, pattern: re.Pattern[bytes], start: int, timeout: float) -> re.Match[bytes]:
        """First match of pattern in the output after start, within timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = pattern.search(self._buffer, start)
                if match:
                    return match
                if self._eof:
                    raise GuestError(f"QEMU exited while waiting for {pattern.pattern!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestTimeout(f"no {pattern.pattern!r} within {timeout:g} s")
                self._changed.wait(remaining)

    def send(self, text: str) -> None:
        self._proc.stdin.write(text.encode())
        self._proc.stdin.flush()

    def close(self, timeout: float = 5.0) -> None:
        """Close stdin and finish logging; QEMU must have exited already."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass  # QEMU is gone, unread input may fail to flush
        self._reader.join(timeout)
        self._proc.stdout.close()
        self._log.close()


# --------------------------------------------------------------------------
# QMP


def _qmp_message(stream, deadline: float) -> dict:
    """Next non-event QMP message; raise QmpError for an error answer."""
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise GuestError("QMP connection closed")
        message = json.loads(line)
        if "error" in message:
            raise QmpError(f"{message['error'].get('class')}: {message['error'].get('desc')}")
        if "event" not in message:
            return message
    raise GuestTimeout("QMP did not answer in time")


def _qmp_connect(path: Path, deadline: float) -> socket.socket:
    """Connect to QEMU's QMP socket, retrying while QEMU starts listening."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as error:
            sock.close()
            if time.monotonic() >= deadline:
                raise GuestTimeout(f"QMP socket {path} not accepting connections") from error
            time.sleep(0.05)


def qmp_execute(path: str | os.PathLike, command: dict, timeout: float = 10.0) -> Any:
    """Run one QMP command on a fresh connection and return its "return"."""
    deadline = time.monotonic() + timeout
    with _qmp_connect(Path(path), deadline) as sock, sock.makefile("rwb") as stream:
        if "QMP" not in _qmp_message(stream, deadline):
            raise GuestError("no QMP greeting")
        for request in ({"execute": "qmp_capabilities"}, command):
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            reply = _qmp_message(stream, deadline)
        return reply.get("return")


# --------------------------------------------------------------------------
# Guests


def _escape(value: str | os.PathLike) -> str:
    """Quote a value for a QEMU -option list (commas are doubled)."""
    return os.fspath(value).replace(",", ",,")


def _default_mac(name: str, index: int) -> str:
    digest = hashlib.sha256(f"{name}:{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


@dataclass(frozen=True)
class NicSpec:
    """One vhost-user NIC; it becomes eth<index> in the guest.

    server: QEMU listens on socket_path (server=on,wait=off) and the backend
    connects, also again after a disconnect; otherwise QEMU connects to a
    listening backend, retrying every `reconnect` seconds if that is set.
    Either way QEMU's vhost-user netdev blocks before booting the guest
    until the first connection is made (even with wait=off).
    queues > 1 turns on multiqueue (mq=on).  device_opts is appended to
    -device virtio-net-pci, e.g. "mrg_rxbuf=off,packed=on".
    """

    socket_path: str | os.PathLike
    mac: str | None = None
    ip: str | None = None
    mtu: int | None = None
    server: bool = False
    reconnect: int | None = None
    queues: int = 1
    device_opts: str = ""

    def qemu_args(self, index: int, mac: str) -> list[str]:
        chardev = f"socket,id=chr{index},path={_escape(self.socket_path)}"
        if self.server:
            chardev += ",server=on,wait=off"
        elif self.reconnect:
            chardev += f",reconnect={self.reconnect}"
        netdev = f"vhost-user,id=net{index},chardev=chr{index},queues={self.queues}"
        device = f"virtio-net-pci,id=nic{index},netdev=net{index},mac={mac},vectors=0"
        if self.queues > 1:
            device += ",mq=on"
        if self.device_opts:
            device += f",{self.device_opts}"
        return ["-chardev", chardev, "-netdev", netdev, "-device", device]

    def kernel_params(self, index: int) -> list[str]:
        suffix = str(index) if index else ""
        params = [f"pv_ip{suffix}={self.ip}"] if self.ip else []
        if self.mtu:
            params.append(f"pv_mtu{suffix}={self.mtu}")
        return params


class QemuGuest:
    """A QEMU/TCG guest with vhost-user NICs, driven over its serial console.

    Files in workdir: <name>.console.log (everything the guest printed),
    <name>.qemu.log (QEMU's stderr) and the QMP socket <name>.qmp.sock
    unless qmp_path is given.  mem_path puts guest memory in a shared file
    under that directory (e.g. /dev/hugepages) instead of a memfd.
    pre_nic_args go on the command line before the NICs (extra_args after them).
    """

    def __init__(
        self,
        name: str,
        workdir: str | os.PathLike,
        nics: Sequence[NicSpec] = (),
        *,
        build_dir: str | os.PathLike = DEFAULT_BUILD_DIR,
        memory: str = "256M",
        mem_path: str | os.PathLike | None = None,
        smp: int = 1,
        extra_args: Sequence[str] = (),
        append: str = "",
        qmp_path: str | os.PathLike | None = None,
        pre_nic_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.workdir = Path(workdir)
        self.nics = list(nics)
        self.macs = [nic.mac or _default_mac(name, i) for i, nic in enumerate(self.nics)]
        self.build_dir = Path(build_dir)
        self.memory = memory
        self.mem_path = mem_path
        self.smp = smp
        self.extra_args = list(extra_args)
        self.pre_nic_args = list(pre_nic_args)
        self.append = append
        self.qmp_path = Path(qmp_path) if qmp_path else self.workdir / f"{name}.qmp.sock"
        self.console_log = self.workdir / f"{name}.console.log"
        self.qemu_log = self.workdir / f"{name}.qemu.log"
        self.ready = False
        self.boot_seconds: float | None = None
        self.returncode: int | None = None
        self._proc: subprocess.Popen | None = None
        self._console: _Console | None = None
        self._started_at = 0.0

    # -- lifecycle ---------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def kernel_cmdline(self) -> str:
        params = [KERNEL_APPEND, f"pv_nics={len(self.nics)}"]
        for index, nic in enumerate(self.nics):
            params += nic.kernel_params(index)
        if self.append:
            params.append(self.append)
        return " ".join(params)

    def _memory_args(self) -> list[str]:
        if self.mem_path is None:
            backend = f"memory-backend-memfd,id=mem,size={self.memory},share=on"
        else:
            backend = (
                f"memory-backend-file,id=mem,size={self.memory},"
                f"mem-path={_escape(self.mem_path)},share=on"
            )
        return ["-m", self.memory, "-object", backend, "-numa", "node,memdev=mem"]

    def qemu_args(self, kernel: Path, initrd: Path) -> list[str]:
        """The full QEMU command line for this guest."""
        args = [QEMU_BINARY, "-name", self.name, *_QEMU_ISOLATION, "-smp", str(self.smp)]
        args += self._memory_args()
        args += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", self.kernel_cmdline()]
        args += ["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]
        args += ["-qmp", f"unix:{_escape(self.qmp_path)},server=on,wait=off"]
        args += self.pre_nic_args     # e.g. a vIOMMU, which must precede the devices it serves
        if not self.nics:
            args += ["-nic", "none"]
        for index, nic in enumerate(self.nics):
            args += nic.qemu_args(index, self.macs[index])
        return args + self.extra_args

    def start(self) -> None:
        """Build the initramfs if needed and spawn QEMU in its own process group."""
        if self._proc is not None:
            raise GuestError(f"guest {self.name} already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = self.qemu_args(*build_initramfs(self.build_dir))
        self.ready = False
        self.returncode = None
        self._started_at = time.monotonic()
        with open(self.qemu_log, "wb") as stderr:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                process_group=0,
                preexec_fn=_die_with_parent,
            )
        try:
            self._console = _Console(self._proc, self.console_log)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait for the guest's ready marker; return seconds since start()."""
        console = self._require_console()
        try:
            ready = console.wait_for(re.compile(READY_MARKER.encode() + rb"\r?\n"), 0, timeout)
        except GuestError as error:
            raise type(error)(f"{self.name}: {error}\n{self._diagnostics()}") from None
        errors = re.findall(ERROR_MARKER.encode() + rb"[^\r\n]*", console.output(0, ready.start()))
        if errors:
            raise GuestError(f"{self.name}: guest init failed: {errors}\n{self._diagnostics()}")
        self.ready = True
        self.boot_seconds = time.monotonic() - self._started_at
        return self.boot_seconds

    def adopt_migrated(self) -> None:
        """This QEMU was started with ``-incoming`` and the guest has migrated into it: its
        console (the guest's shell, already booted) is now ours to drive."""
        self._require_console()
        self.ready = True

    def stop(self, timeout: float = 10.0) -> None:
        """Power the guest off, escalating to SIGTERM and SIGKILL; always reap.

        Safe to call at any time and any number of times.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if self.ready and proc.poll() is None:
                self._send_poweroff()
                _wait(proc, timeout / 2)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if proc.poll() is not None:
                    break
                _signal_group(proc.pid, sig)
                _wait(proc, timeout / 2)
            if proc.poll() is None:
                raise GuestError(f"QEMU pid {proc.pid} survived SIGKILL")
        finally:
            if self._console is not None:
                self._console.close()
            self._console = None
            self.ready = False
            self.returncode = proc.returncode

    def _send_poweroff(self) -> None:
        try:
            self._console.send("poweroff -f\n")
        except OSError:
            pass  # QEMU is already going away

    def __enter__(self) -> QemuGuest:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- guest shell ---------------------------------------------------------

    def run(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run a shell command in the guest; return (exit status, output).

        Output is stdout and stderr as printed on the console, with CRs
        removed.  The command's stdin is /dev/null.  It runs in the guest's
        shell itself (cd and variables persist), so use "(...; exit N)"
        rather than a bare exit.  On timeout the command is interrupted
        (Ctrl-C) and GuestTimeout raised.
        """
        console = self._require_console()
        if not self.ready:
            raise GuestError(f"{self.name}: run() before wait_ready()")
        if not cmd.strip():
            raise ValueError("empty command")
        if any(len(line) > _MAX_LINE for line in cmd.splitlines()):
            raise ValueError(f"command lines must be shorter than {_MAX_LINE} bytes")
        token = secrets.token_hex(8)
        # The markers are assembled by printf so that an echo of the typed
        # line can never match them.
        line = (
            f"printf 'PV%s%s\\n' S {token}; {{ {cmd}\n}} </dev/null; "
            f"printf 'PV%s%s:%s\\n' E {token} $?\n"
        )
        start = console.mark()
        console.send(line)
        begin_marker = re.compile(rb"PVS" + token.encode() + rb"\r?\n")
        end_marker = re.compile(rb"PVE" + token.encode() + rb":(\d+)\r?\n")
        try:
            begin = console.wait_for(begin_marker, start, timeout)
            end = console.wait_for(end_marker, begin.end(), timeout)
        except GuestTimeout as error:
            console.send("\x03")
            raise GuestTimeout(f"{self.name}: {cmd!r}: {error}\n{self._diagnostics()}") from None
        output = console.output(begin.end(), end.start())
        return int(end.group(1)), output.decode(errors="replace").replace("\r", "")

    def wait_link_up(self, index: int = 0, timeout: float = 10.0) -> None:
        """Wait until eth<index> is operationally up (carrier, qdisc active).

        The link comes up only once the vhost-user backend has started the
        device, which can be seconds after wait_ready(); the kernel reports
        it (operstate, NO-CARRIER flag) up to a second after the carrier.
        """
        tries = max(1, round(timeout / 0.1))
        status, _ = self.run(
            f"(for i in $(seq {tries}); do grep -qx up /sys/class/net/eth{index}/operstate"
            f" && exit 0; sleep 0.1; done; exit 1)",
            timeout + 10,
        )
        if status != 0:
            raise GuestTimeout(f"{self.name}: eth{index} not up after {timeout:g} s")

    def ping(
        self, ip: str, count: int = 3, interval: float = 0.2, timeout: float | None = None
    ) -> dict[str, Any]:
        """Ping from the guest; return transmitted, received, loss_pct, output."""
        deadline = int(count * interval) + 2
        status, output = self.run(
            f"ping -c {count} -i {interval:g} -W 1 -w {deadline} {ip}",
            timeout if timeout is not None else deadline + 10,
        )
        stats = re.search(
            r"(\d+) packets transmitted, (\d+) packets received.*?(\d+)% packet loss", output
        )
        if stats is None:
            raise GuestError(f"{self.name}: ping {ip} failed ({status}): {output}")
        transmitted, received, loss = map(int, stats.groups())
        return {
            "transmitted": transmitted,
            "received": received,
            "loss_pct": loss,
            "output": output,
        }

    def qmp(self, command: dict, timeout: float = 10.0) -> Any:
        """Execute one QMP command, e.g. {"execute": "query-status"}."""
        self._require_console()
        return qmp_execute(self.qmp_path, command, timeout)

    # -- helpers -------------------------------------------------------------

    def _require_console(self) -> _Console:
        if self._console is None:
            raise GuestError(f"guest {self.name} is not running")
        return self._console

    def _diagnostics(self) -> str:
        qemu_log = self.qemu_log.read_text(errors="replace") if self.qemu_log.exists() else ""
        return (
            f"--- console tail ({self.console_log}) ---\n{self._console.tail()}\n"
            f"--- qemu stderr ({self.qemu_log}) ---\n{qemu_log[-2000:]}"
        )


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the harness dies without stop().

    Linux sends it when the *thread* that started QEMU exits, so start
    guests from a thread that outlives them (pytest's main thread does).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


# PID 1 of the guest, packed into the initramfs as /init.
GUEST_INIT = r'''#!/bin/busybox sh
# PID 1 of the pyvhost guest (packed into the initramfs by pyvhost/cli/qemu_guest.py).
#
# Kernel command line parameters read here:
#   pv_nics=N            number of virtio-net NICs to wait for (eth0..eth{N-1})
#   pv_ip=ADDR/LEN       address of eth0; pv_ip1=, pv_ip2=, ... for eth1, eth2, ...
#   pv_mtu=N             MTU of eth0;     pv_mtu1=, pv_mtu2=, ... likewise
# Only the NICs' connected subnets become routable: no default route, no DHCP.
# IPv6 is disabled so that the NICs send nothing the tests did not ask for.

/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/ PS1='# '
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 1 > /proc/sys/kernel/printk

fail() { echo "PYVHOST-GUEST-ERROR $*"; }

param() {
    for arg in $(cat /proc/cmdline); do
        case "$arg" in "$1="*) echo "${arg#*=}"; return ;; esac
    done
}

load_modules() {
    for mod in $(cat /lib/modules/order); do
        insmod "/lib/modules/$mod.ko" || fail "insmod $mod"
    done
}

wait_for_nic() {
    tries=50
    while [ ! -e "/sys/class/net/$1" ] && [ "$tries" -gt 0 ]; do
        sleep 0.1
        tries=$((tries - 1))
    done
    [ -e "/sys/class/net/$1" ] || fail "missing $1"
}

configure_nic() {
    index=$1
    suffix=$index
    [ "$index" = 0 ] && suffix=
    dev=eth$index
    wait_for_nic "$dev"
    mtu=$(param "pv_mtu$suffix")
    addr=$(param "pv_ip$suffix")
    [ -n "$mtu" ] && { ip link set "$dev" mtu "$mtu" || fail "mtu $dev"; }
    [ -n "$addr" ] && { ip addr add "$addr" dev "$dev" || fail "ip $dev"; }
    ip link set "$dev" up || fail "up $dev"
}

load_modules
for conf in all default; do
    echo 1 > "/proc/sys/net/ipv6/conf/$conf/disable_ipv6"
done
ip link set lo up
nics=$(param pv_nics)
index=0
while [ "$index" -lt "${nics:-0}" ]; do
    configure_nic "$index"
    index=$((index + 1))
done

stty -echo
echo PYVHOST-GUEST-READY
while true; do
    setsid cttyhack sh
done
'''
