"""Fuzzing knobs shared by the fuzz tests: how many examples a run tries.

``make test`` runs each fuzzer a bounded number of times; ``make fuzz`` sets
``PYVHOST_FUZZ_SCALE`` (a multiplier, default 1) or ``PYVHOST_FUZZ_EXAMPLES`` (an absolute
number for every fuzzer) to run them for longer. Every fuzz test counts the cases it ran
and prints the count (``pytest -s`` or the ``-rA`` summary shows it)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = float(os.environ.get("PYVHOST_FUZZ_SCALE", "1"))
ABSOLUTE = int(os.environ.get("PYVHOST_FUZZ_EXAMPLES", "0"))


def examples(n: int) -> int:
    """The number of examples for a fuzzer whose bounded (``make test``) count is ``n``."""
    if ABSOLUTE:
        return ABSOLUTE
    return max(1, int(n * SCALE))


def fuzz_settings(n: int, **kw) -> settings:
    """Hypothesis settings for a fuzzer of ``n`` examples in ``make test``."""
    return settings(max_examples=examples(n), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much],
                    **kw)


def minimum(n: int) -> int:
    """The fewest cases a fuzzer of ``n`` examples must have run to count as having run
    (hypothesis may stop early when the space is exhausted; it must not stop far short)."""
    return max(1, examples(n) // 3)


class Counter:
    """Counts cases; ``report`` prints the count in the test's output."""

    def __init__(self, name: str):
        self.name = name
        self.n = 0

    def __call__(self) -> None:
        self.n += 1

    def report(self, n: int) -> None:
        print(f"\n[fuzz] {self.name}: {self.n} cases")
        assert self.n >= minimum(n), f"{self.name}: only {self.n} cases ran"
