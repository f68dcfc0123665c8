"""Fuzzing knobs shared by the fuzz tests: how many examples a run tries, and its seed.

``make test`` runs each fuzzer a bounded number of times; ``make fuzz`` sets
``PYVHOST_FUZZ_SCALE`` (a multiplier, default 1) or ``PYVHOST_FUZZ_EXAMPLES`` (an absolute
number for every fuzzer) to run them for longer. Every fuzzer goes through ``fuzz_settings``
(its example count and the run's seed) and a ``Counter``, which prints the seed when the
fuzzer starts and the number of cases it ran at the end (``pytest -s``, or the captured
output of a failed test). ``PYVHOST_FUZZ_SEED=N`` repeats a run."""

from __future__ import annotations

import os
import random

from hypothesis import HealthCheck, seed, settings

SCALE = float(os.environ.get("PYVHOST_FUZZ_SCALE", "1"))
ABSOLUTE = int(os.environ.get("PYVHOST_FUZZ_EXAMPLES", "0"))
SEED = int(os.environ.get("PYVHOST_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))


def examples(n: int) -> int:
    """The number of examples for a fuzzer whose bounded (``make test``) count is ``n``."""
    if ABSOLUTE:
        return ABSOLUTE
    return max(1, int(n * SCALE))


def fuzz_settings(n: int, **kw):
    """Decorator for a ``@given`` fuzzer of ``n`` examples in ``make test``: hypothesis
    settings scaled by the environment, and the run's seed."""
    s = settings(max_examples=examples(n), deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much],
                 **kw)

    def apply(test):
        return seed(SEED)(s(test))
    return apply


def minimum(n: int) -> int:
    """The fewest cases a fuzzer of ``n`` examples must have run to count as having run
    (hypothesis may stop early when the space is exhausted; it must not stop far short)."""
    return max(1, examples(n) // 3)


class Counter:
    """Counts cases; prints the seed at once and, from ``report``, the count."""

    def __init__(self, name: str):
        self.name = name
        self.n = 0
        print(f"\n[fuzz] {self.name}: seed {SEED} (PYVHOST_FUZZ_SEED={SEED} repeats it)")

    def __call__(self) -> None:
        self.n += 1

    def report(self, n: int) -> None:
        print(f"[fuzz] {self.name}: {self.n} cases, seed {SEED}")
        assert self.n >= minimum(n), f"{self.name}: only {self.n} cases ran"
