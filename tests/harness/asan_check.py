"""pytest plugin for runs under AddressSanitizer (``-p tests.harness.asan_check``): refuse
to run unless every compiled pyvhost module was loaded from ``PYVHOST_ASAN_LIB``."""

from __future__ import annotations

import importlib
import os

MODULES = ("_memory", "_pktpool", "_vring", "_poll", "_flow", "_switch", "_driver")


def pytest_configure(config):
    lib = os.environ.get("PYVHOST_ASAN_LIB")
    if not lib:
        raise RuntimeError("PYVHOST_ASAN_LIB is not set")
    for name in MODULES:
        mod = importlib.import_module(f"pyvhost.{name}")
        if not os.path.realpath(mod.__file__).startswith(os.path.realpath(lib)):
            raise RuntimeError(f"pyvhost.{name} came from {mod.__file__}, not {lib}")
    print(f"asan: {len(MODULES)} sanitized modules from {lib}")
