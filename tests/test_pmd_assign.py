"""RX-queue assignment of the switch's PMD threads (pyvhost.switch.pmd), on a stand-in
datapath whose per-queue processing times the test sets: round robin, cycles-based
placement, manual rebalance, and pmd-auto-lb rebalancing by itself once the measured load
is uneven (and only then)."""

from __future__ import annotations

import json
import os

from pyvhost.switch.pmd import LOAD_WINDOW, PmdSet
from tests.harness import processes

RXQS = [(1, 0), (1, 1), (2, 0), (2, 1)]


class FakePmd:
    def __init__(self, i):
        self.pmd_id, self._rxqs = i, []

    def set_rxqs(self, rxqs):
        self._rxqs = list(rxqs)

    def rxqs(self):
        return list(self._rxqs)

    def run(self):
        pass

    def set_sleep_max(self, us):
        self.sleep_max = us

    def stop(self):
        pass


class FakeDatapath:
    def __init__(self):
        self.ns = {rxq: 0 for rxq in RXQS}

    def new_pmd(self, i):
        return FakePmd(i)

    def remove_pmd(self, pmd):
        self.removed = getattr(self, "removed", []) + [pmd.pmd_id]

    def rxq_load(self, port):
        return [(self.ns[(port, q)], 0) for q in range(2)]

    def run_for(self, busy: dict, pmds: PmdSet, seconds: int) -> None:
        for _ in range(seconds):
            for rxq, ns in busy.items():
                self.ns[rxq] += ns
            pmds.sample()


def owners(pmds: PmdSet) -> dict:
    return {rxq: i for i, pmd in enumerate(pmds.pmds) for rxq in pmd.rxqs()}


def test_round_robin():
    dp = FakeDatapath()
    pmds = PmdSet(dp, 2)
    pmds.set_rxqs(RXQS)
    assert owners(pmds) == {(1, 0): 0, (1, 1): 1, (2, 0): 0, (2, 1): 1}
    pmds.stop()
    assert dp.removed == [0, 1]              # stopped PMDs are forgotten (set-pmd leaks none)


def test_cycles_rebalance_spreads_the_busy_queues():
    dp = FakeDatapath()
    pmds = PmdSet(dp, 2, assign="cycles")
    pmds.set_rxqs(RXQS)
    assert owners(pmds)[(1, 0)] == owners(pmds)[(2, 0)]     # no load known yet: together
    dp.run_for({(1, 0): 900_000, (2, 0): 800_000, (1, 1): 10_000}, pmds, LOAD_WINDOW)
    pmds.rebalance()
    placed = owners(pmds)
    assert placed[(1, 0)] != placed[(2, 0)]
    assert sorted(placed) == sorted(RXQS)                     # every queue still polled
    pmds.stop()


def test_auto_lb_moves_queues_only_when_uneven():
    dp = FakeDatapath()
    pmds = PmdSet(dp, 2, assign="cycles", auto_lb=True)
    pmds.set_rxqs(RXQS)
    before = owners(pmds)
    dp.run_for({(1, 0): 500_000, (1, 1): 500_000}, pmds, LOAD_WINDOW)   # already even
    assert owners(pmds) == before
    dp.run_for({(1, 0): 900_000, (2, 0): 900_000}, pmds, LOAD_WINDOW)   # both on one PMD
    after = owners(pmds)
    assert after[(1, 0)] != after[(2, 0)]
    pmds.stop()


def pinned_threads(pid: int) -> list[str]:
    """Cpus_allowed_list of each of the process's threads that is not allowed every CPU."""
    every = _cpu_list(sorted(os.sched_getaffinity(0)))
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            allowed = next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list"))
        if allowed != every:
            out.append(allowed)
    return out


def _cpu_list(cpus: list[int]) -> str:
    return f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 and cpus == list(
        range(cpus[0], cpus[-1] + 1)) else ",".join(map(str, cpus))


def test_pmds_are_pinned_by_default_and_as_set(workdir):
    """Like OVS's pmd-cpu-mask: by default the PMD thread is pinned to a CPU chosen at start
    (the highest usable), never left floating next to the traffic; cpus= lists them, and
    cpus=any leaves them to the scheduler."""
    cpus = sorted(os.sched_getaffinity(0))
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config="add-br br0\n")
    try:
        assert pinned_threads(sw.proc.pid) == [str(cpus[-1])]
        rxq = json.loads(processes.ctl(run_dir, "pmd-rxq-show", "--json"))
        assert [p["cpu"] for p in rxq] == [cpus[-1]]
        processes.ctl(run_dir, "set-pmd", f"cpus={cpus[0]}")
        assert pinned_threads(sw.proc.pid) == [str(cpus[0])]
        processes.ctl(run_dir, "set-pmd", "cpus=any")
        assert pinned_threads(sw.proc.pid) == []
        assert "(cpu any)" in processes.ctl(run_dir, "pmd-rxq-show")
        processes.ctl(run_dir, "set-pmd", "cpus=auto")
        assert pinned_threads(sw.proc.pid) == [str(cpus[-1])]
    finally:
        sw.stop()


def switch_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_load_based_sleeping_gives_the_core_back_and_delivers_everything(workdir):
    """set-pmd sleep-max=US (OVS's pmd-sleep-max): a lightly loaded PMD (a frame every
    0.3 ms: never idle for the 1 ms after which it sleeps in epoll) naps between rounds
    instead of busy-polling, and still forwards every frame; sleep-max=0 polls again."""
    import time

    from tests.harness.frontends import drain, switch_with_ports
    config = "add-br br0\n" + "".join(f"add-port br0 {n} type=vhostuser queues=1\n"
                                      for n in "ab") + \
        "add-flow br0 priority=5,in_port=a,actions=output:b\n"
    frame = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x88\xb5" + bytes(50)

    def trickle(ports, seconds=2.0) -> int:
        sent, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            sent += ports["a"].send([frame])
            time.sleep(0.0003)
            got[0] += len(ports["b"].recv_nowait(max_packets=64))
        return sent

    with switch_with_ports(workdir, config, "ab") as (run_dir, ports):
        pid = int((run_dir / "pyvhost.pid").read_text().split()[0])
        used = {}
        for sleep_max in (0, 500, 0):
            processes.ctl(run_dir, "set-pmd", f"sleep-max={sleep_max}")
            got = [0]
            before = switch_cpu_seconds(pid)
            sent = trickle(ports)
            used.setdefault(sleep_max, []).append(switch_cpu_seconds(pid) - before)
            got[0] += len(drain(ports["b"], 0.3))
            assert got[0] == sent, (sleep_max, got[0], sent)
        stats = processes.ctl(run_dir, "pmd-stats-show")
        assert "while lightly loaded" in stats
        # busy-polling takes most of a core for the 2 s; napping, a small part of it
        assert max(used[500]) < 0.5 * min(used[0]), used
