"""Real SDN controllers from PyPI for tests, each in its own venv (never the system
Python; made and filled with pip when missing, ``venv()`` says why it cannot):

- os-ken (OpenStack's OpenFlow library) running the learning switch of
  osken_learning.py (PYVHOST_OSKEN_VENV, default /tmp/pyvhost-osken-venv);
- Faucet, a production controller, with a YAML config (PYVHOST_FAUCET_VENV, default
  /tmp/pyvhost-faucet-venv; it pins its own os-ken).

Each runs as a child process stopped by its PID (os-ken ignores SIGTERM: SIGKILL after a
grace period); what it prints goes to a log file the test reads."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import processes

OSKEN = ("os-ken==4.2.2", "os_ken",
         Path(os.environ.get("PYVHOST_OSKEN_VENV", "/tmp/pyvhost-osken-venv")))
FAUCET = ("faucet==1.10.12", "faucet",
          Path(os.environ.get("PYVHOST_FAUCET_VENV", "/tmp/pyvhost-faucet-venv")))
APP = Path(__file__).with_name("osken_learning.py")


def venv(which: tuple[str, str, Path]) -> tuple[Path | None, str]:
    """(the venv's bin directory, "") or (None, why it could not be made)."""
    requirement, module, path = which
    python = path / "bin" / "python"
    check = [str(python), "-c", f"import {module}"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python.parent, ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True,
                       capture_output=True, timeout=120)
        r = subprocess.run([str(python), "-m", "pip", "install", "-q", requirement],
                           capture_output=True, text=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        return None, f"cannot make the venv for {requirement} at {path}: {e}"
    if r.returncode != 0:
        return None, f"pip could not install {requirement} (package index unreachable?): " \
                     f"{r.stderr.strip()[-300:]}"
    return python.parent, ""


def venv_or_skip(which: tuple[str, str, Path]) -> Path:
    """The venv's bin directory, or the test is skipped saying why there is none."""
    bin_dir, why = venv(which)
    if bin_dir is None:
        pytest.skip(why)
    return bin_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_show(run_dir, pred, what: str, timeout: float = 40.0) -> str:
    """``ctl show`` once ``pred`` holds for it (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        show = processes.ctl(run_dir, "show")
        if pred(show):
            return show
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {show}")
        time.sleep(0.2)


def controlled_switch(workdir, target: str, *extra: str):
    """A started ``pyvhost switch`` (stop it by its PID) with bridge br0 holding vhostuser
    ports a and b and no rules, secure, whose controller is ``target``; ``extra`` config
    lines come before the controller. Returns (the process, the run dir)."""
    run_dir = workdir / "run"
    config = "".join(f"{line}\n" for line in (
        "add-br br0", "add-port br0 a type=vhostuser queues=1",
        "add-port br0 b type=vhostuser queues=1", "del-flows br0", *extra,
        "set-fail-mode br0 secure", f"set-controller br0 {target}"))
    return processes.switch(workdir, run_dir, config=config), run_dir


@contextlib.contextmanager
def qemu_pair(workdir, run_dir, ips: tuple[str, str]):
    """Two QEMU guests, vma on port a and vmb on port b of ``controlled_switch``, with
    ``ips`` (/24), booted and their links up; stopped afterwards."""
    from pyvhost.cli.qemu_guest import NicSpec, QemuGuest
    vms = []
    try:
        for name, sock, ip in zip(("vma", "vmb"), ("a.sock", "b.sock"), ips, strict=True):
            vms.append(QemuGuest(name, workdir, nics=[NicSpec(run_dir / sock, ip=f"{ip}/24")]))
            vms[-1].start()
        for vm in vms:
            vm.wait_ready(timeout=180)
            vm.wait_link_up(timeout=30)
        yield vms
    finally:
        for vm in vms:
            vm.stop()


class Controller:
    """A controller process; ``lines()`` is what it printed so far."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None,
                 cwd: Path | None = None):
        self.argv, self.log, self.env, self.cwd = argv, log, env, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> Controller:
        out = open(self.log, "a")
        try:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT)
        finally:
            out.close()
        return self

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def wait_for(self, word: str, count: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(line.startswith(word) for line in self.lines()) < count:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the controller exited: {self.lines()[-20:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {word} x{count}: {self.lines()[-20:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def osken_learning(bin_dir: Path, host: str, port: int, log: Path) -> Controller:
    """The os-ken learning switch listening on HOST:PORT."""
    return Controller([str(bin_dir / "python"), str(APP), host, str(port)], log,
                      cwd=APP.parent)


def faucet(bin_dir: Path, host: str, port: int, config: Path, workdir: Path) -> Controller:
    """Faucet listening on HOST:PORT with ``config``; its own log in workdir/faucet.log
    (the returned Controller's log is its stdout)."""
    env = dict(os.environ, FAUCET_CONFIG=str(config), FAUCET_LOG=str(workdir / "faucet.log"),
               FAUCET_EXCEPTION_LOG=str(workdir / "faucet_exception.log"),
               FAUCET_PROMETHEUS_ADDR="127.0.0.1", FAUCET_PROMETHEUS_PORT="0",
               PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    return Controller([str(bin_dir / "faucet"), f"--ryu-ofp-listen-host={host}",
                       f"--ryu-ofp-tcp-listen-port={port}"], workdir / "faucet.out", env)


@contextlib.contextmanager
def faucet_switch(bin_dir: Path, workdir: Path, config: str):
    """Faucet (started, with the YAML ``config``) on a free loopback port and a
    ``controlled_switch`` of datapath id 1 connected to it: yields (the Faucet Controller,
    the run dir, the controller target); both stopped afterwards."""
    port = free_port()
    target = f"tcp:127.0.0.1:{port}"
    (workdir / "faucet.yaml").write_text(config)
    controller = faucet(bin_dir, "127.0.0.1", port, workdir / "faucet.yaml", workdir)
    controller.start()
    try:
        sw, run_dir = controlled_switch(workdir, target, "set-dpid br0 1")
        try:
            wait_show(run_dir, lambda s: f'"{target}"  connected' in s, "connected")
            yield controller, run_dir, target
        finally:
            sw.stop()
    finally:
        controller.stop()
