"""os-ken (PyPI, OpenStack's OpenFlow library) as a real controller for tests: its own venv
(never the system Python; PYVHOST_OSKEN_VENV, default /tmp/pyvhost-osken-venv, made and
filled with pip when missing: ``venv()`` says why it cannot) and the learning-switch app
of osken_learning.py run in it as a child process, stopped by its PID (os-ken ignores
SIGTERM: SIGKILL after a grace period)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

OSKEN = "os-ken==4.2.2"
VENV = Path(os.environ.get("PYVHOST_OSKEN_VENV", "/tmp/pyvhost-osken-venv"))
APP = Path(__file__).with_name("osken_learning.py")


def venv() -> tuple[Path | None, str]:
    """(the venv's python, "") or (None, why it could not be made)."""
    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import os_ken"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True,
                       capture_output=True, timeout=120)
        r = subprocess.run([str(python), "-m", "pip", "install", "-q", OSKEN],
                           capture_output=True, text=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as e:
        return None, f"cannot make the os-ken venv at {VENV}: {e}"
    if r.returncode != 0:
        return None, f"pip could not install {OSKEN} (package index unreachable?): " \
                     f"{r.stderr.strip()[-300:]}"
    return python, ""


class Controller:
    """The learning switch listening on HOST:PORT; ``lines()`` is what it printed."""

    def __init__(self, python: Path, host: str, port: int, log: Path):
        self.python, self.host, self.port, self.log = python, host, port, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Controller:
        out = open(self.log, "a")
        try:
            self.proc = subprocess.Popen([str(self.python), str(APP), self.host,
                                          str(self.port)], cwd=APP.parent, stdout=out,
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
                raise RuntimeError(f"os-ken exited: {self.lines()[-20:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {word} x{count} from os-ken: {self.lines()[-20:]}")
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
