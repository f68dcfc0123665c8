"""PMD threads and RX-queue assignment: start N poll threads (with load-based sleeping
when ``sleep-max`` is set, as OVS's pmd-sleep-max), each pinned to a CPU (the
ones ``set-pmd cpus=`` lists, or by default CPUs chosen once at start, the highest usable
first, as OVS's pmd-cpu-mask pins; ``cpus=any`` leaves them to the scheduler), assign
every (port, queue) round-robin or by measured processing time, rebalance on request or
automatically when the load is uneven (like OVS's pmd-rxq-assign=cycles and pmd-auto-lb).
The loop itself is compiled (pyvhost._switch.Pmd); this module only decides who polls what.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("pyvhost.switch")

ASSIGN_MODES = ("roundrobin", "cycles")
LOAD_WINDOW = 10          # samples (one per second) the cycles measure covers
AUTO_LB_IMPROVEMENT = 0.25


def _is_int(v, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def stored_settings(stored: dict) -> dict:
    """PmdSet's keyword arguments from the store's settings (set-pmd's), each checked as
    set-pmd checks it: a value the store holds but set-pmd would refuse (a hand-edited or
    damaged store) is logged and the default used, so the switch still starts."""
    from pyvhost._switch import limits
    checks = {
        # (up to 64: what earlier versions let set-pmd store; more than this machine's
        # CPUs share them, as pmd_cpus assigns them in turn)
        "threads": (1, lambda v: _is_int(v, 1, 64)),
        "assign": ("roundrobin", lambda v: v in ASSIGN_MODES),
        "auto_lb": (False, lambda v: type(v) is bool),
        "cpus": ([], lambda v: v == "any" or type(v) is list and
                 all(_is_int(c, 0, 4095) for c in v)),
        "flow_limit": (None, lambda v: v is None or _is_int(v, 1, 50000000)),
        "sleep_max": (0, lambda v: _is_int(v, 0, limits()["sleep_max_us"])),
        "emc_insert_inv_prob": (None, lambda v: v is None or _is_int(v, 0, 0xFFFFFFFF)),
    }
    out, bad = {}, []
    for key, (default, ok) in checks.items():
        value = stored.get(key, default)
        if not ok(value):
            bad.append(f"{key}={value!r} ({default!r} used)")
            value = default
        out[key] = value
    if bad:                                     # one line: the log damps repeated ones
        log.error("stored PMD settings set-pmd would refuse: %s", ", ".join(bad))
    usable = len(os.sched_getaffinity(0))
    if out["threads"] > usable:
        log.warning("%d PMD threads stored, %d CPUs usable here: they share CPUs",
                    out["threads"], usable)
    return out


def pmd_cpus(cpus: list[int] | str | None, n: int) -> list[int | None]:
    """The CPU each of ``n`` PMDs is pinned to: ``cpus`` in turn; by default (None or
    empty) the usable CPUs from the highest down, in turn (so traffic generators and the
    control thread, which the kernel starts low, rarely share a PMD's core); "any": none."""
    if cpus == "any":
        return [None] * n
    if not isinstance(cpus, list) or not all(isinstance(c, int) for c in cpus):
        log.error("PMD CPUs %r are not a list of CPU numbers: chosen as by default", cpus)
        cpus = []
    if not cpus:
        cpus = sorted(os.sched_getaffinity(0), reverse=True)
    return [cpus[i % len(cpus)] for i in range(n)]


def _pmd_main(pmd, cpu: int | None) -> None:
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError as e:
            log.error("PMD %d: cannot pin to CPU %d: %s", pmd.pmd_id, cpu, e)
    pmd.run()


class PmdSet:
    """The poll threads of one datapath and who polls which RX queue."""

    def __init__(self, datapath, n: int = 1, cpus: list[int] | str | None = None,
                 assign: str = "roundrobin", auto_lb: bool = False,
                 flow_limit: int | None = None, sleep_max: int = 0,
                 emc_insert_inv_prob: int | None = None):
        if n < 1:
            raise ValueError("at least one PMD thread")
        if assign not in ASSIGN_MODES:
            raise ValueError(f"assign mode {assign!r}: one of {', '.join(ASSIGN_MODES)}")
        self.datapath = datapath
        self.cpus = pmd_cpus(cpus, n)            # per PMD: its CPU, or None (floating)
        self.assign_mode = assign
        self.auto_lb = auto_lb
        self.flow_limit = flow_limit
        self.sleep_max = sleep_max if isinstance(sleep_max, int) else 0   # us (pmd-sleep-max)
        self.emc_insert_inv_prob = emc_insert_inv_prob      # None: the PMD's default
        self.rxqs: list[tuple[int, int]] = []
        self.samples: list[dict] = []          # per second: {(port, q): ns in that second}
        self._last_totals: dict = {}
        self.pmds = []
        self.threads = []
        for i in range(n):
            self._start(i)

    def _start(self, i: int) -> None:
        pmd = self.datapath.new_pmd(i) if self.flow_limit is None else \
            self.datapath.new_pmd(i, flow_limit=self.flow_limit)
        try:
            pmd.set_sleep_max(self.sleep_max)
        except ValueError as e:
            log.error("PMD %d: %s: no load-based sleeping", i, e)
        if self.emc_insert_inv_prob is not None:
            try:
                pmd.set_emc_insert_inv_prob(self.emc_insert_inv_prob)
            except ValueError as e:             # (a hand-edited store)
                log.error("PMD %d: %s: the default kept", i, e)
        t = threading.Thread(target=_pmd_main, args=(pmd, self.cpus[i]), name=f"pmd{i}",
                             daemon=True)
        t.start()
        self.pmds.append(pmd)
        self.threads.append(t)

    def stop(self) -> None:
        for pmd in self.pmds:
            pmd.stop()
        for pmd, t in zip(self.pmds, self.threads, strict=True):
            t.join(timeout=5)
            if t.is_alive():
                log.error("PMD %d did not stop; its memory stays", pmd.pmd_id)
            else:
                self.datapath.remove_pmd(pmd)

    # -- load -----------------------------------------------------------------------------
    def sample(self) -> None:
        """Once a second: the processing time each RX queue used since the last sample."""
        totals, delta = {}, {}
        for port, q in self.rxqs:
            try:
                ns = self.datapath.rxq_load(port)[q][0]
            except (KeyError, IndexError):
                continue
            totals[(port, q)] = ns
            delta[(port, q)] = ns - self._last_totals.get((port, q), ns)
        self._last_totals = totals
        self.samples = (self.samples + [delta])[-LOAD_WINDOW:]
        if self.auto_lb and len(self.samples) == LOAD_WINDOW and self._imbalance_gain() > \
                AUTO_LB_IMPROVEMENT:
            log.info("pmd-auto-lb: rebalancing")
            self.rebalance()

    def loads(self) -> dict[tuple[int, int], int]:
        out: dict = {}
        for s in self.samples:
            for k, v in s.items():
                out[k] = out.get(k, 0) + v
        return {k: out.get(k, 0) for k in self.rxqs}

    def _pmd_loads(self, assignment: dict[int, list]) -> list[int]:
        loads = self.loads()
        return [sum(loads.get(r, 0) for r in assignment.get(i, [])) for i in range(len(self.pmds))]

    def _imbalance_gain(self) -> float:
        now = self._pmd_loads(self.current())
        planned = self._pmd_loads(self._plan("cycles"))
        if max(now) == 0:
            return 0.0
        return (max(now) - max(planned)) / max(now)

    # -- assignment -----------------------------------------------------------------------
    def current(self) -> dict[int, list]:
        return {i: pmd.rxqs() for i, pmd in enumerate(self.pmds)}

    def _plan(self, mode: str) -> dict[int, list]:
        plan: dict[int, list] = {i: [] for i in range(len(self.pmds))}
        if mode == "roundrobin":
            for n, rxq in enumerate(sorted(self.rxqs)):
                plan[n % len(self.pmds)].append(rxq)
            return plan
        loads = self.loads()
        totals = [0] * len(self.pmds)
        for rxq in sorted(self.rxqs, key=lambda r: (-loads.get(r, 0), r)):
            i = min(range(len(self.pmds)), key=lambda j: (totals[j], len(plan[j])))
            plan[i].append(rxq)
            totals[i] += loads.get(rxq, 0)
        return plan

    def set_rxqs(self, rxqs: list[tuple[int, int]]) -> None:
        """The RX queues that exist now (ports added or removed); assign them."""
        self.rxqs = list(rxqs)
        self.apply(self._plan(self.assign_mode))

    def rebalance(self) -> dict[int, list]:
        plan = self._plan(self.assign_mode)
        self.apply(plan)
        return plan

    def apply(self, plan: dict[int, list]) -> None:
        for i, pmd in enumerate(self.pmds):
            pmd.set_rxqs(plan.get(i, []))

