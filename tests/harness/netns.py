"""Network namespaces and veth pairs for tests of the switch's host ports: every name is
unique to the test (a random tag), every address private and only inside namespaces made
here, and ``close()`` deletes all of it (processes started in a namespace first, by PID).
A test process that dies cannot close: each HostNet keeps a ledger of what it made
(LEDGER_DIR, one file per HostNet naming its process), and ``sweep_orphans()`` (run when a
test session starts) deletes what the ledgers of dead processes name, and nothing else.
Needs root (CAP_NET_ADMIN); ``available()`` says whether this machine can."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

LEDGER_DIR = Path("/run/pyvhost-tests")


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and \
        os.path.exists("/dev/net/tun")


def sh(cmd: list[str] | str, *, check: bool = True, timeout: float = 30.0,
       ns: str | None = None) -> subprocess.CompletedProcess:
    if isinstance(cmd, str):
        cmd = cmd.split()
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True)


class HostNet:
    """What one test builds on the host's network; delete it all with ``close()``."""

    def __init__(self):
        self.tag = secrets.token_hex(2)            # 4 hex digits: names stay <= 15 chars
        self.subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        self.namespaces: list[str] = []
        self.links: list[str] = []                 # root-namespace ends of veth pairs
        self.procs: list[subprocess.Popen] = []
        self.ledger = LEDGER_DIR / f"{os.getpid()}-{self.tag}-{secrets.token_hex(4)}.json"

    def _record(self) -> None:
        """Write down, before it exists, what this HostNet is about to make."""
        LEDGER_DIR.mkdir(mode=0o700, exist_ok=True)
        tmp = self.ledger.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid()),
                                   "namespaces": self.namespaces, "links": self.links}))
        tmp.replace(self.ledger)

    def name(self, what: str) -> str:
        """A unique interface or namespace name (at most 15 characters)."""
        return f"{what[:9]}{self.tag}"

    def ip(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    def netns(self, what: str) -> str:
        ns = self.name(what)
        self.namespaces.append(ns)
        self._record()
        sh(["ip", "netns", "add", ns])
        sh(["ip", "link", "set", "lo", "up"], ns=ns)
        return ns

    def veth(self, host_end: str, ns: str, peer: str, address: str | None,
             *, up: bool = True) -> None:
        """A veth pair: ``host_end`` here (up), ``peer`` in ``ns`` with ``address``/24."""
        if host_end not in self.links:
            self.links.append(host_end)
            self._record()
        sh(["ip", "link", "add", host_end, "numtxqueues", "1", "numrxqueues", "1", "type",
            "veth", "peer", "name", peer, "numtxqueues", "1", "numrxqueues", "1"])
        sh(["ip", "link", "set", peer, "netns", ns])
        if up:
            sh(["ip", "link", "set", host_end, "up"])
        self.configure(ns, peer, address)

    def configure(self, ns: str, dev: str, address: str | None) -> None:
        if address:
            sh(["ip", "addr", "add", f"{address}/24", "dev", dev], ns=ns)
        sh(["ip", "link", "set", dev, "up"], ns=ns)

    def popen(self, ns: str, args: list[str], **kw) -> subprocess.Popen:
        """A process in ``ns`` that close() ends (by its PID) if it still runs."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], **kw)
        self.procs.append(proc)
        return proc

    def ping(self, ns: str, address: str, count: int = 3, timeout: float = 20.0,
             interval: float = 0.2) -> bool:
        """True once ``count`` pings in a row answered, retried until ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = sh(["ping", "-c", str(count), "-i", str(interval), "-W", "1", address],
                   ns=ns, check=False, timeout=count * interval + 10)
            if r.returncode == 0:
                return True
            time.sleep(0.2)
        return False

    def link_flags(self, dev: str, ns: str | None = None) -> str:
        return sh(["ip", "-o", "-d", "link", "show", dev], ns=ns, check=False).stdout

    def link_index(self, dev: str, ns: str | None = None) -> int:
        return int(self.link_flags(dev, ns).split(":", 1)[0])

    def exists(self, dev: str, ns: str | None = None) -> bool:
        return sh(["ip", "link", "show", dev], ns=ns, check=False).returncode == 0

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)
        for link in self.links:
            sh(["ip", "link", "del", link], check=False)
        for ns in self.namespaces:
            sh(["ip", "netns", "del", ns], check=False)
        with contextlib.suppress(FileNotFoundError):
            self.ledger.unlink()


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (a PID reused later differs)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def sweep_orphans() -> list[str]:
    """Delete the namespaces and links named by the ledgers of test processes that are gone
    (died without closing their HostNet); returns what was deleted. A ledger that cannot be
    read is left alone and said so."""
    swept: list[str] = []
    for ledger in sorted(LEDGER_DIR.glob("*.json")) if LEDGER_DIR.is_dir() else []:
        try:
            got = json.loads(ledger.read_text())
            pid, start = int(got["pid"]), got["start"]
            namespaces, links = list(got["namespaces"]), list(got["links"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            swept.append(f"{ledger}: unreadable ledger left alone ({e})")
            continue
        if start is not None and _start_time(pid) == start:
            continue                                   # its process still runs
        for link in links:
            if sh(["ip", "link", "del", str(link)], check=False).returncode == 0:
                swept.append(f"link {link}")
        for ns in namespaces:
            if sh(["ip", "netns", "del", str(ns)], check=False).returncode == 0:
                swept.append(f"namespace {ns}")
        with contextlib.suppress(FileNotFoundError):
            ledger.unlink()
    return swept
