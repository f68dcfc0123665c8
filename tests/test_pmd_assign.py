"""RX-queue assignment of the switch's PMD threads (pyvhost.switch.pmd), on a stand-in
datapath whose per-queue processing times the test sets: round robin, cycles-based
placement, manual rebalance, and pmd-auto-lb rebalancing by itself once the measured load
is uneven (and only then)."""

from __future__ import annotations

from pyvhost.switch.pmd import LOAD_WINDOW, PmdSet

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
