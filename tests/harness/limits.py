"""A time limit for a whole test: SIGALRM raises TimeoutError in the test's thread after the
given seconds, so the test fails and every fixture's finally block still cleans up (the
processes, namespaces and interfaces it made). Main thread only."""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def time_limit(seconds: int, what: str = "test"):
    def expired(signum, frame):
        raise TimeoutError(f"{what} ran longer than {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
