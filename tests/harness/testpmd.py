"""Drive DPDK ``dpdk-testpmd`` interactively for tests and benchmarks.

:class:`Testpmd` runs one testpmd process (no hugepages, no PCI, virtual devices
only) in its own process group, talks to its ``testpmd> `` prompt over
stdin/stdout pipes and copies everything it prints to ``<workdir>/<name>.log``.
:func:`virtio_user_vdev` and :func:`vhost_vdev` build ``--vdev`` strings for the
two ends of a vhost-user link; :func:`parse_port_stats` and
:func:`parse_fwd_stats` turn the text of ``show port stats all`` and of
``stop`` / ``show fwd stats all`` into numbers.

Every wait has a timeout; a process that exits or stops answering raises
:class:`TestpmdError` carrying the tail of its log. ``close()`` always reaps it.
"""

from __future__ import annotations

import codecs
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

PROMPT = "testpmd> "
# testpmd's stdout is a pipe, so stdio would buffer its output while the prompt
# (written with write(2)) goes out at once; stdbuf keeps the two in order.
_UNBUFFERED = ("stdbuf", "-o0", "-e0")
_MEMORY_MB = 1024
_TOTAL_MBUFS = 32768
_CMD_ERRORS = ("Bad arguments", "Command not found")
# testpmd still reaches its prompt when a --vdev fails to probe.
_STARTUP_ERRORS = ("probe failed", "No probed ethernet devices")
_SECTION_END = re.compile(r"^\s*[#+-]{10,}\s*$")
_COUNTER = re.compile(r"([A-Za-z][A-Za-z-]*):\s+(\d+)")
_PORT_STATS_HEADER = re.compile(r"NIC statistics for port\s+(\d+)")
_FWD_STATS_HEADER = re.compile(r"Forward statistics for port\s+(\d+)")
_LINK_STATUS = re.compile(r"Link status:\s*(\w+)")

Stats = dict[int, dict[str, int]]


class TestpmdError(RuntimeError):
    """testpmd failed to start, exited, timed out or rejected a command."""

    __test__ = False  # not a pytest test class


def _vdev(driver: str, options: dict[str, object]) -> str:
    def text(value: object) -> str:
        return str(int(value)) if isinstance(value, bool) else str(value)

    return ",".join([driver, *(f"{k}={text(v)}" for k, v in options.items())])


def virtio_user_vdev(path: str | os.PathLike, *, index: int = 0,
                     mac: str = "00:01:02:03:04:05", queues: int = 1,
                     server: bool = False, **options: object) -> str:
    """``--vdev`` for a virtio-user port (a guest without a VM) on socket ``path``.

    Without ``server`` it connects to ``path``, which must already exist when
    testpmd starts; with ``server=True`` it listens there. Extra ``options``
    (``mrg_rxbuf=1``, ``in_order=0``, ``packed_vq=1`` ...) are appended as given.
    """
    opts: dict[str, object] = {"mac": mac, "path": os.fspath(path), "queues": queues}
    if server:
        opts["server"] = 1
    return _vdev(f"net_virtio_user{index}", {**opts, **options})


def vhost_vdev(iface: str | os.PathLike, *, index: int = 0, queues: int = 1,
               client: bool = False, **options: object) -> str:
    """``--vdev`` for DPDK's own vhost-user backend port on socket ``iface``.

    It listens by default; ``client=True`` makes it connect (and reconnect).
    """
    opts: dict[str, object] = {"iface": os.fspath(iface), "queues": queues}
    if client:
        opts["client"] = 1
    return _vdev(f"net_vhost{index}", {**opts, **options})


def _parse_sections(text: str, header: re.Pattern[str]) -> Stats:
    """Counters (``Name: 123``) of each per-port section that ``header`` opens.

    A section ends at a line made only of ``#``, ``-`` or ``+``. Names are
    lower-cased with ``-`` turned into ``_`` (``RX-packets`` -> ``rx_packets``).
    """
    stats: Stats = {}
    port = None
    for line in text.splitlines():
        if m := header.search(line):
            port = int(m.group(1))
            stats[port] = {}
        elif _SECTION_END.match(line):
            port = None
        elif port is not None:
            for name, value in _COUNTER.findall(line):
                stats[port][name.lower().replace("-", "_")] = int(value)
    return stats


def parse_port_stats(text: str) -> Stats:
    """Parse ``show port stats all``: port -> rx_packets, rx_missed, rx_bytes,
    rx_errors, rx_nombuf, tx_packets, tx_errors, tx_bytes, rx_pps, rx_bps,
    tx_pps, tx_bps."""
    return _parse_sections(text, _PORT_STATS_HEADER)


def parse_fwd_stats(text: str) -> Stats:
    """Parse the output of ``stop`` or ``show fwd stats all``: port ->
    rx_packets, rx_dropped, rx_total, tx_packets, tx_dropped, tx_total (plus
    any error counters testpmd shows). Per-stream lines are ignored."""
    return _parse_sections(text, _FWD_STATS_HEADER)


def _runtime_dir(file_prefix: str) -> Path:
    """Where DPDK's EAL keeps the runtime files of ``--file-prefix``."""
    if os.geteuid() == 0:
        base = "/var/run"
    else:
        base = os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    return Path(base, "dpdk", file_prefix)


class Testpmd:
    """One interactive ``dpdk-testpmd`` process.

    ``lcores``/``main_lcore`` choose its cores: testpmd forwards on the lcores
    other than the main one, so two testpmds on a 2-core machine use
    ``main_lcore=1`` and ``main_lcore=0`` to forward on different cores.
    ``rxq``/``txq`` set the queue counts (needed for multiqueue vdevs),
    ``nb_cores`` the number of forwarding cores. ``eal_args`` and
    ``testpmd_args`` are appended to the EAL and testpmd parts of the command.

    One object runs one process: ``start()`` it, drive it, ``close()`` it (or
    use it as a context manager); to restart, make a new object.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, vdevs: Sequence[str], *, workdir: str | os.PathLike,
                 name: str = "testpmd", lcores: str = "0,1", main_lcore: int = 0,
                 rxq: int | None = None, txq: int | None = None,
                 nb_cores: int | None = None, eal_args: Sequence[str] = (),
                 testpmd_args: Sequence[str] = (),
                 binary: str = "dpdk-testpmd") -> None:
        self.name = name
        self.log_path = Path(workdir) / f"{name}.log"
        self.file_prefix = f"pv{os.getpid()}-{uuid.uuid4().hex[:8]}"
        eal = ["-l", lcores, "--main-lcore", str(main_lcore), "--no-huge",
               "-m", str(_MEMORY_MB), "--no-pci", "--no-shconf", "--no-telemetry",
               f"--file-prefix={self.file_prefix}"]
        for vdev in vdevs:
            eal += ["--vdev", vdev]
        app = ["-i", f"--total-num-mbufs={_TOTAL_MBUFS}"]
        for option, value in (("rxq", rxq), ("txq", txq), ("nb-cores", nb_cores)):
            if value is not None:
                app.append(f"--{option}={value}")
        self.argv = [*_UNBUFFERED, binary, *eal, *eal_args, "--", *app, *testpmd_args]
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._buf = ""
        self._eof = False
        self._closed = False

    # -- process lifetime ---------------------------------------------------

    def start(self, timeout: float = 60.0) -> Testpmd:
        """Launch testpmd and wait for its first prompt; return ``self``."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> Testpmd:
        """Spawn testpmd without waiting for it; return ``self``.

        For a virtio-user ``server=1`` port, whose startup blocks until the
        backend connects: launch it, start the backend, then ``wait_ready``.
        """
        if self._proc is not None:
            raise TestpmdError(f"{self.name}: already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab", buffering=0)
        log.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(self.argv)}\n".encode())
        try:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            log.close()
            raise
        self._reader = threading.Thread(target=self._pump, args=(log,),
                                        name=f"testpmd-{self.name}", daemon=True)
        self._reader.start()
        return self

    def wait_ready(self, timeout: float = 60.0) -> Testpmd:
        """Wait for the first prompt of a launched testpmd; return ``self``.

        If it exits, times out or a ``--vdev`` fails to probe (a stale
        ``server=1`` socket file, say), the process is reaped and
        :class:`TestpmdError` raised.
        """
        try:
            out = self._wait_prompt(timeout)
            if any(err in out for err in _STARTUP_ERRORS):
                raise self._error("a device failed to probe")
        except BaseException:
            self.close(timeout=2.0)
            raise
        return self

    def _pump(self, log: BinaryIO) -> None:
        """Reader thread: copy stdout to the log and to the prompt buffer."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        fd = self._proc.stdout.fileno()
        with log:
            while chunk := os.read(fd, 65536):
                log.write(chunk)
                with self._cond:
                    self._buf += decoder.decode(chunk)
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the process group (a crash, as the peer sees it) and reap."""
        self._signal_group(signal.SIGKILL)
        self.close(timeout)

    def close(self, timeout: float = 10.0) -> int | None:
        """Send ``quit``, wait up to ``timeout``, then SIGTERM and SIGKILL the
        process group; always reap. Idempotent. Returns the exit status."""
        if self._proc is None or self._closed:
            return self._proc.returncode if self._proc else None
        self._closed = True
        for step in (lambda: self._send("quit\n"), self._proc.stdin.close):
            try:
                step()
            except (OSError, ValueError):  # gone already, or stdin closed
                pass
        self._wait_or_signal(timeout)
        self._reader.join(timeout=5.0)
        self._proc.stdout.close()
        try:
            _runtime_dir(self.file_prefix).rmdir()
        except OSError:
            pass
        return self._proc.returncode

    def _wait_or_signal(self, timeout: float) -> None:
        for sig, wait in ((None, timeout), (signal.SIGTERM, 5.0),
                          (signal.SIGKILL, None)):
            if sig is not None:
                self._signal_group(sig)
            try:
                self._proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                pass

    def _signal_group(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                pass

    def __enter__(self) -> Testpmd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- prompt I/O ---------------------------------------------------------

    def _error(self, what: str) -> TestpmdError:
        status = self._proc.poll() if self._proc else None
        state = "running" if status is None else f"exit status {status}"
        return TestpmdError(f"{self.name} (pid {self.pid}, {state}): {what}\n"
                            f"--- {self.log_path} (tail) ---\n{self.log_tail()}")

    def _send(self, text: str) -> None:
        self._proc.stdin.write(text.encode())
        self._proc.stdin.flush()

    def _wait_prompt(self, timeout: float) -> str:
        """Return the output up to the next prompt and consume it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (i := self._buf.find(PROMPT)) < 0 and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if i >= 0:
                out, self._buf = self._buf[:i], self._buf[i + len(PROMPT):]
                return out
            eof = self._eof
        if not eof:
            raise self._error(f"no prompt within {timeout:g} s")
        try:
            self._proc.wait(2.0)  # for the exit status in the message
        except subprocess.TimeoutExpired:
            pass
        raise self._error("exited before the prompt")

    def cmd(self, text: str, timeout: float = 10.0) -> str:
        """Send one command line; return its output up to the next prompt.

        Raises :class:`TestpmdError` if testpmd does not understand the
        command, exits, or does not prompt again within ``timeout``. After a
        timeout the prompt is out of step: close the process.
        """
        if "\n" in text or self._proc is None or self._closed:
            raise TestpmdError(f"{self.name}: cannot send {text!r}")
        try:
            self._send(text + "\n")
        except (OSError, ValueError) as e:
            raise self._error(f"sending {text!r}: {e}") from None
        # cmdline echoes the line it reads, ending it with "\r\n".
        out = self._wait_prompt(timeout).replace(text + "\r\n", "", 1)
        if any(err in out for err in _CMD_ERRORS):
            raise self._error(f"command {text!r} rejected: {out.strip()}")
        return out

    # -- forwarding and statistics ------------------------------------------

    def set_fwd(self, mode: str) -> str:
        """``set fwd MODE`` (io, txonly, rxonly, macswap, ...)."""
        out = self.cmd(f"set fwd {mode}")
        if "packet forwarding mode" not in out:
            raise self._error(f"set fwd {mode}: {out.strip()}")
        return out

    def start_fwd(self, tx_first: bool = False, bursts: int | None = None) -> str:
        """``start``, or ``start tx_first [bursts]`` to prime io loops."""
        command = "start"
        if tx_first:
            command += " tx_first" + ("" if bursts is None else f" {bursts}")
        out = self.cmd(command)
        if "already started" in out:
            raise self._error(f"{command}: {out.strip()}")
        return out

    def stop_fwd(self) -> str:
        """``stop``; its text holds the forward statistics (parse_fwd_stats)."""
        return self.cmd("stop")

    def fwd_stats(self) -> Stats:
        """Forward statistics since the last start/clear (show fwd stats all)."""
        return parse_fwd_stats(self.cmd("show fwd stats all"))

    def port_stats(self) -> Stats:
        """Port counters (show port stats all). ``rx_pps``/``tx_pps`` cover the
        time since the previous call: the first call's rates are near 0."""
        return parse_port_stats(self.cmd("show port stats all"))

    def measure_port_stats(self, interval: float = 1.0) -> Stats:
        """Port counters whose ``rx_pps``/``tx_pps`` cover the next ``interval`` s."""
        self.port_stats()
        time.sleep(interval)
        return self.port_stats()

    def clear_stats(self) -> None:
        """Zero port and forward statistics."""
        self.cmd("clear port stats all")
        self.cmd("clear fwd stats all")

    def link_status(self, port: int = 0) -> bool:
        """True if ``show port info PORT`` says ``Link status: up``."""
        out = self.cmd(f"show port info {port}")
        if not (m := _LINK_STATUS.search(out)):
            raise self._error(f"no link status for port {port}: {out.strip()}")
        return m.group(1) == "up"

    def wait_link(self, port: int = 0, up: bool = True, timeout: float = 10.0) -> None:
        """Poll the link of ``port`` until it is up (or down, ``up=False``)."""
        deadline = time.monotonic() + timeout
        while self.link_status(port) != up:
            if time.monotonic() >= deadline:
                raise self._error(f"port {port} link not {'up' if up else 'down'}"
                                  f" after {timeout:g} s")
            time.sleep(0.2)

    def wait_link_up(self, port: int = 0, timeout: float = 10.0) -> None:
        self.wait_link(port, True, timeout)
