"""``pyvhost gen`` against ``pyvhost reflector``: every frame back from echo mode (with
latency and no reordering), ARP + ICMP echo against reply mode, option checking, and the
backend killed mid-run (gen says so and exits non-zero, without hanging)."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.harness import processes
from tests.harness.processes import PyvhostProcess

GEN_TIMEOUT = 60


def gen(workdir, *args, name="gen") -> PyvhostProcess:
    return PyvhostProcess(["gen", *map(str, args), "--json"], workdir, name).start()


def finish(proc: PyvhostProcess, timeout: float = GEN_TIMEOUT) -> tuple[int, dict]:
    """Wait for gen to exit; (exit status, its JSON summary)."""
    try:
        status = proc.proc.wait(timeout)
    finally:
        proc.stop()
    lines = proc.output().strip().splitlines()
    assert lines, proc.errors()
    return status, json.loads(lines[-1])


@pytest.mark.parametrize("size", [64, 1500, 9000])
def test_txrx_against_echo_reflector(workdir, reflectors, size):
    sock = workdir / "r.sock"
    reflectors(sock, mode="echo")
    status, out = finish(gen(workdir, "--socket", sock, "--mode", "txrx", "--count", 20000,
                             "--size", size, "--flows", 16))
    assert status == 0, out
    assert out["sent"] == 20000 and out["received"] == 20000 and out["lost"] == 0, out
    assert out["reordered"] == 0
    lat = out["latency_us"]
    assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"]
    assert out["tx_pps"] > 0 and out["rx_pps"] > 0


def test_ping_against_reply_reflector(workdir, reflectors):
    sock = workdir / "r.sock"
    refl = reflectors(sock, mode="reply")
    status, out = finish(gen(workdir, "--socket", sock, "--mode", "ping", "--count", 3,
                             "--rate", 20, "--target", "10.0.0.254"))
    assert status == 0, out
    assert out["sent"] == 3 and out["received"] == 3 and out["lost"] == 0, out
    assert out["target_mac"] == "02:00:00:fe:00:01"
    assert "arp_replies=1" in refl.counters() and "icmp_replies=3" in refl.counters()


def test_ping_unanswered_address_fails(workdir, reflectors):
    sock = workdir / "r.sock"
    reflectors(sock, mode="reply")
    status, out = finish(gen(workdir, "--socket", sock, "--mode", "ping", "--count", 1,
                             "--target", "10.0.0.77", "--timeout", 1))
    assert status == 1 and out["received"] == 0 and "ARP" in out["error"], out


@pytest.mark.parametrize("mode", ["tx", "txrx"])
def test_backend_killed_mid_run(workdir, reflectors, mode):
    sock = workdir / "r.sock"
    refl = reflectors(sock, mode="echo")
    proc = gen(workdir, "--socket", sock, "--mode", mode, "--duration", 30, "--rate", 200000)
    time.sleep(1.5)
    assert proc.alive()
    refl.signal(signal.SIGKILL)
    t0 = time.monotonic()
    status, out = finish(proc, timeout=10)
    assert time.monotonic() - t0 < 5
    assert status == 1
    assert "went away" in out["error"] and out["sent"] > 0, out
    assert "FAILED: the backend went away" in proc.output()


def test_no_backend_is_an_error(workdir):
    status, out = finish(gen(workdir, "--socket", workdir / "nobody.sock", "--timeout", 0.5))
    assert status == 1 and "cannot connect" in out["error"]


@pytest.mark.parametrize("option", [["--size", "20"], ["--run-id", "65536"]])
def test_bad_options_exit_2(workdir, option):
    proc = PyvhostProcess(["gen", "--socket", str(workdir / "x"), *option], workdir,
                          "gen").start()
    assert proc.proc.wait(20) == 2
    assert option[0] in proc.errors()


def test_tx_count_is_all_taken_by_the_switch(workdir):
    """gen --mode tx --count N hangs up only after the switch took every frame (the switch
    stops reading a port whose front-end hung up): the port counts exactly N received.
    (Without the wait, a run at full rate lost its last 40-100 frames about 1 time in 4.)"""
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config="add-br br0\n"
                          "add-port br0 p1 type=vhostuser queues=1\n")
    try:
        total = 0
        for rate in (2500, 0):
            status, out = finish(gen(workdir, "--socket", run_dir / "p1.sock", "--mode", "tx",
                                     "--count", 5000, "--size", 64, "--flows", 16,
                                     *(["--rate", rate] if rate else [])))
            assert status == 0 and out["sent"] == 5000, out
            total += 5000
            ports = json.loads(processes.ctl(run_dir, "dump-ports", "--json", "br0"))
            assert ports["p1"]["datapath"]["rx_packets"] == total, ports["p1"]
    finally:
        sw.stop()


def test_rx_run_id_counts_one_senders_frames(workdir):
    """gen --run-id: a sender's test frames carry it, and a receiver given it counts only
    them as received (another sender's, flooded to the same port, are other frames): bench
    flows' storm rows count p1's frames at p2 while p3's storm is flooded there too."""
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config="add-br br0\n" + "".join(
        f"add-port br0 {p} type=vhostuser queues=1\n" for p in ("p1", "p2", "p3")))
    rx = None
    try:
        rx = gen(workdir, "--socket", run_dir / "p3.sock", "--mode", "rx", "--run-id", 7,
                 "--count", 3000, "--timeout", 20, name="rx")
        deadline = time.monotonic() + 20
        while "connected to" not in rx.errors():
            assert time.monotonic() < deadline and rx.alive(), rx.errors()
            time.sleep(0.05)
        for sock, run_id, count in (("p2.sock", 8, 2000), ("p1.sock", 7, 3000)):
            status, out = finish(gen(workdir, "--socket", run_dir / sock, "--mode", "tx",
                                     "--run-id", run_id, "--count", count, "--rate", 20000,
                                     name=f"tx{run_id}"))
            assert status == 0 and out["sent"] == count, out
        status, out = finish(rx)
        assert status == 0, out
        assert (out["received"], out["rx_other"]) == (3000, 2000), out
    finally:
        if rx is not None:
            rx.stop()
        sw.stop()
