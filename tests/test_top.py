"""``pyvhost top``: the rates between two readings (a counter that went down gives no rate),
the screen fits the terminal, a switch that is not running is exit status 2 with the reason,
and in a real terminal (tmux, a private server) against a switch with traffic its screen
shows the counters moving, says so when the switch goes away and recovers when it is back,
and q ends it with status 0. Also the ``top-flows`` command it reads the busiest rules with."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvhost.cli import topdata
from pyvhost.cli.topscreen import render
from pyvhost.frontend import VirtioUser
from tests.harness import processes
from tests.harness.limits import time_limit
from tests.test_flow_table_switch import CONFIG, MAC, udp

RULE = "priority=9,in_port=a,actions=output:b"


def sample(at, rx, pmd_packets, busy_ns, rule_packets, drop_no_buffer=0):
    s = topdata.Sample(at=at)
    s.ports["br0", "a"] = {"type": "vhostuser", "datapath": {
        "rx_packets": rx, "rx_bytes": rx * 60, "tx_packets": 0, "tx_bytes": 0,
        "drop_police": 0}, "rx_rings": {"packets": rx, "drop_no_buffer": drop_no_buffer},
        "tx_rings": {}}
    s.states["br0", "a"] = "connected"
    s.pmds = [{"pmd": 0, "busy_ns": busy_ns, "idle_ns": 0, "packets": pmd_packets,
               "emc_hits": pmd_packets, "megaflow_hits": 0, "upcalls": 0, "megaflows": 1}]
    s.rxqs = [{"pmd": 0, "cpu": 0, "rxqs": [{"port": "a", "queue": 0, "enabled": True,
                                              "usage": 90}]}]
    s.flows["br0", RULE] = {"flow": RULE, "table": 0, "n_packets": rule_packets,
                            "n_bytes": rule_packets * 60}
    return s


def test_rates_are_differences_over_the_interval():
    v = topdata.diff(sample(10.0, 1000, 1000, 0, 1000, 5),
                     sample(12.0, 3000, 3000, 500_000_000, 2000, 25))
    port = v.ports[0]
    assert (port.rx_pps, port.rx_bps, port.tx_pps) == (1000.0, 1000.0 * 60 * 8, 0.0)
    assert port.drop_rates["rx_no_buffer"] == 10.0 and port.drop_totals["rx_no_buffer"] == 25
    assert v.pmds[0].busy == 0.25 and v.pmds[0].pps == 1000.0 and v.pmds[0].hit == 1.0
    assert v.pmds[0].queues == ["a/0 90%"]
    assert v.flows[0].pps == 500.0 and v.flows[0].packets == 2000


def test_a_counter_that_went_down_gives_no_rate():
    """The switch restarted (or pmd-stats-clear): no negative rate, none at all."""
    v = topdata.diff(sample(10.0, 5000, 5000, 10**9, 5000), sample(11.0, 10, 10, 0, 10))
    assert v.ports[0].rx_pps is None and v.pmds[0].busy is None and v.flows[0].pps is None
    first = topdata.diff(None, sample(1.0, 10, 10, 0, 10))
    assert first.ports[0].rx_pps is None and first.interval is None


def test_the_screen_fits_the_terminal():
    v = topdata.diff(sample(10.0, 0, 0, 0, 0), sample(11.0, 2_500_000, 2_500_000, 10**8,
                                                        2_500_000, 3))
    lines = render(v, 60, 12, control="/run/ctl.sock", status="")
    assert len(lines) <= 12 and all(len(t) <= 60 for t, _ in lines)
    text = "\n".join(t for t, _ in render(v, 200, 40, control="x"))
    assert "br0/a" in text and "2.50M" in text and "rx_no_buffer=3(+3/s)" in text
    assert "10.0%" in text and RULE in text
    warn = render(v, 200, 40, control="x", status="switch not answering")
    assert warn[1] == ("switch not answering", "warn")


def test_no_switch_is_a_clear_error(workdir):
    r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "top", "--batch", "--run-dir",
                        str(workdir / "nothing")], capture_output=True, text=True, timeout=30,
                       cwd=processes.REPO)
    assert r.returncode == 2 and "cannot reach the switch" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "pyvhost.cli.main", "top", "--interval", "0"],
                       capture_output=True, text=True, timeout=30, cwd=processes.REPO)
    assert r.returncode == 2 and "--interval" in r.stderr, r.stderr


def test_top_flows_command(workdir):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=CONFIG)
    try:
        processes.ctl(run_dir, "add-flow", "br0", RULE)
        processes.ctl(run_dir, "add-flow", "br0", "priority=8,in_port=b,actions=output:a")
        a = VirtioUser(str(run_dir / "a.sock"), ring_size=256).open()
        b = VirtioUser(str(run_dir / "b.sock"), ring_size=256).open()
        try:
            a.send_all([udp(MAC["a"], MAC["b"], "10.0.0.1", "10.0.0.2")] * 30, timeout=5)
            deadline = time.monotonic() + 10
            got = 0
            while got < 30 and time.monotonic() < deadline:
                got += len(b.recv(timeout=0.5))
        finally:
            a.close()
            b.close()
        rows = json.loads(processes.ctl(run_dir, "top-flows", "--json", "br0", "5"))
        assert rows == [{"flow": RULE, "table": 0, "n_packets": 30, "n_bytes": 30 * 60}]
        assert "n_packets=30" in processes.ctl(run_dir, "top-flows", "br0")
        for bad, why in ((["nobr"], "no bridge"), (["br0", "0"], "out of range"),
                         (["br0", "x"], "not a number")):
            assert why in processes.ctl(run_dir, "top-flows", *bad, check=False)
    finally:
        assert sw.stop() == 0


class Traffic:
    """a sends to b (rule a -> b) from a thread until stopped."""

    def __init__(self, run_dir):
        self.a = VirtioUser(str(run_dir / "a.sock"), ring_size=256).open()
        self.b = VirtioUser(str(run_dir / "b.sock"), ring_size=256).open()
        self.frame = udp(MAC["a"], MAC["b"], "10.0.0.1", "10.0.0.2")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.is_set():
            self.a.send_all([self.frame] * 32, timeout=5)
            self.b.recv_nowait(max_packets=64)
            time.sleep(0.002)

    def stop(self):
        self.done.set()
        self.thread.join(10)
        self.a.close()
        self.b.close()


class Tmux:
    """One command in a private tmux server (its own socket name), killed at the end."""

    def __init__(self, command: str, width: int = 220, height: int = 50):
        self.name = f"pvtop-{os.getpid()}-{time.monotonic_ns()}"
        self.tmux(["new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height),
                   command])

    def tmux(self, argv: list[str]) -> str:
        return subprocess.run(["tmux", "-L", self.name, "-f", "/dev/null", *argv],
                              capture_output=True, text=True, timeout=10, check=True).stdout

    def screen(self) -> str:
        return self.tmux(["capture-pane", "-p", "-t", "top"])

    def wait(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"{what}; the screen:\n{self.screen()}")

    def kill(self):
        subprocess.run(["tmux", "-L", self.name, "kill-server"], capture_output=True,
                       timeout=10)
        sock = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}" / self.name
        sock.unlink(missing_ok=True)            # kill-server leaves it behind


def exit_status(path, tmux, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, tmux.screen()
        time.sleep(0.1)
    return path.read_text().strip()


def rule_packets(screen: str) -> int | None:
    m = re.search(r"^br0\s+\S+\s+\S+\s+(\d+)\s+" + re.escape(RULE[:20]), screen, re.M)
    return int(m.group(1)) if m else None


def rx_rate(screen: str) -> str | None:
    m = re.search(r"^br0/a\s+vhostuser\s+connected\s+(\S+)", screen, re.M)
    return m.group(1) if m else None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux missing")
def test_top_in_a_terminal_shows_moving_counters(workdir):
    with time_limit(180, "top in tmux"):
        _top_in_tmux(workdir)


def _top_in_tmux(workdir):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=CONFIG, name="switch1")
    status, status2 = workdir / "status", workdir / "status2"
    traffic = tmux = None
    try:
        processes.ctl(run_dir, "add-flow", "br0", RULE)
        traffic = Traffic(run_dir)
        top = f"{sys.executable} -m pyvhost.cli.main top --run-dir {run_dir} --interval 0.5"
        tmux = Tmux(f"cd {processes.REPO} && {top}; echo $? > {status}; {top}; "
                    f"echo $? > {status2}; sleep 60")
        first = tmux.wait(lambda s: (rule_packets(s) or 0) > 0 and
                          rx_rate(s) not in (None, "-", "0"), 30,
                          "no rate for port a and no packets for the rule")
        tmux.wait(lambda s: (rule_packets(s) or 0) > rule_packets(first), 15,
                  "the rule's packet count did not move")
        assert re.search(r"^0\s+(any|\d+)\s+[\d.]+%", first, re.M), first      # PMD 0's busy share
        traffic.stop()
        traffic = None
        assert sw.stop() == 0                                           # the switch goes away
        tmux.wait(lambda s: "switch not answering" in s, 20, "no word of the switch leaving")
        sw = processes.switch(workdir, run_dir, config=CONFIG, name="switch2")
        tmux.wait(lambda s: "switch not answering" not in s and "br0/a" in s, 20,
                  "did not recover when the switch came back")
        assert not status.exists()
        tmux.tmux(["send-keys", "-t", "top", "q"])
        assert exit_status(status, tmux) == "0"
        # a second top in the same terminal: Ctrl-C ends it with 0 too
        tmux.wait(lambda s: "br0/a" in s and "PMD" in s, 20, "the second top did not draw")
        tmux.tmux(["send-keys", "-t", "top", "C-c"])
        assert exit_status(status2, tmux) == "0"
    finally:
        if traffic is not None:
            traffic.stop()
        if tmux is not None:
            tmux.kill()
        sw.stop()
