"""Smoke test of the QEMU guest harness: boot a NIC-less guest and drive its shell."""

import os
import time

import pytest

from pyvhost.cli.qemu_guest import (
    KERNEL_VERSION,
    GuestError,
    QemuGuest,
    build_initramfs,
)

pytestmark = pytest.mark.slow   # never skipped: `make test` installs QEMU and the kernel


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_build_initramfs_is_cached():
    kernel, initrd = build_initramfs()
    mtime = initrd.stat().st_mtime_ns
    assert kernel.exists()
    assert build_initramfs() == (kernel, initrd)
    assert initrd.stat().st_mtime_ns == mtime


def test_boot_run_and_stop(tmp_path):
    began = time.monotonic()
    guest = QemuGuest("smoke", tmp_path, nics=[])
    with guest:
        guest.wait_ready(timeout=40)
        assert guest.run("echo hello", timeout=10) == (0, "hello\n")
        assert guest.run("uname -r", timeout=10) == (0, f"{KERNEL_VERSION}\n")
        assert guest.run("printf 'no newline'; false", timeout=10) == (1, "no newline")
        assert guest.qmp({"execute": "query-status"})["status"] == "running"
        pid = guest.pid
    assert guest.returncode is not None
    assert _process_gone(pid)
    assert time.monotonic() - began < 50
    guest.stop()  # idempotent
    with pytest.raises(GuestError):
        guest.run("true")
    assert "PYVHOST-GUEST-READY" in (tmp_path / "smoke.console.log").read_text()
