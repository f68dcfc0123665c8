"""Run pyvhost's own commands as child processes for tests: start, wait, signal, stop.

Each child runs in its own process group with stdout/stderr in files under a work dir;
``stop()`` sends SIGTERM, then SIGKILL after a timeout, and always reaps. Nothing here
knows what the command does beyond the line it prints once it is up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]     # children import this checkout's pyvhost


def python_for(user: str | int | None) -> str:
    """An interpreter ``user`` can run: ours, or the system's of the same version when ours
    lives where others cannot reach (e.g. under /root)."""
    if user is None:
        return sys.executable
    path = Path(sys.executable)
    if all(os.stat(p).st_mode & 0o001 for p in path.parents):
        return sys.executable
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    return system if os.path.exists(system) else sys.executable


def _groups(user: str) -> list[int]:
    """The supplementary groups the group database gives ``user`` (what login would)."""
    import grp
    return [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]


class PyvhostProcess:
    """``pyvhost ARGS...`` as a child process, output in ``workdir/<name>.out|.err``."""

    def __init__(self, args: list[str], workdir: str | os.PathLike, name: str, *,
                 user: str | None = None, group: str | None = None):
        self.args = [python_for(user), "-m", "pyvhost.cli.main", *args]
        self.user = user              # run as this user (and group): tests of privileges
        self.group = group
        self.out_path = Path(workdir) / f"{name}.out"
        self.err_path = Path(workdir) / f"{name}.err"
        self.proc: subprocess.Popen | None = None

    def start(self, ready_text: str | None = None, timeout: float = 20.0) -> PyvhostProcess:
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=REPO, env=env, user=self.user, group=self.group,
                                         extra_groups=_groups(self.user) if self.user else None)
        if ready_text:
            try:
                self.wait_output(ready_text, timeout)
            except BaseException:
                self.stop()          # never leave a half-started child behind
                raise
        return self

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def errors(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float, start: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output()[start:]:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited {self.proc.returncode}:\n{self.errors()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} from {self.args} in {timeout}s:\n"
                                   f"{self.output()[-2000:]}\n{self.errors()[-2000:]}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def counters(self, timeout: float = 5.0) -> str:
        """Ask for counters (SIGUSR1) and return what was printed."""
        start = len(self.output())
        self.signal(signal.SIGUSR1)
        self.wait_output("queue 0:", timeout, start)
        time.sleep(0.1)
        return self.output()[start:]

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL to the group after ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


def reflector(workdir, socket: str, *, mode: str = "echo", client: bool = False,
              queues: int = 1, extra: list[str] = (), name: str = "reflector") -> PyvhostProcess:
    """A started ``pyvhost reflector`` (waits until it has said it is up)."""
    args = ["-v", "reflector", "--socket", str(socket), "--mode", mode, "--queues", str(queues)]
    if client:
        args.append("--client")
    proc = PyvhostProcess(args + list(extra), workdir, name)
    return proc.start(ready_text="reflector: mode")


def switch(workdir, run_dir, *, config: str | None = None, extra: list[str] = (),
           name: str = "switch", user: str | None = None) -> PyvhostProcess:
    """A started ``pyvhost switch`` on ``run_dir`` (waits for its control socket)."""
    args = ["-v", "switch", "--run-dir", str(run_dir), *extra]
    if config is not None:
        path = Path(workdir) / f"{name}.conf"
        path.write_text(config)
        args += ["--config", str(path)]
    return PyvhostProcess(args, workdir, name, user=user).start(ready_text="switch: running")


def ctl(run_dir, *argv: str, check: bool = True) -> str:
    """Run a ``pyvhost ctl`` command against the switch on ``run_dir``; its output."""
    from pyvhost.switch.wire import request
    answer = request(str(Path(run_dir) / "ctl.sock"), list(argv))
    if check and not answer["ok"]:
        raise RuntimeError(f"ctl {' '.join(argv)}: {answer['error']}")
    return answer.get("output", "") if answer["ok"] else answer["error"]
