"""The fuzz corpus (hostile rings, split and packed; guest memory; message parsing; OpenFlow
messages against an in-process switch: FLOW_MODs, PACKET_OUTs into the datapath, groups,
meters and their compiled token buckets;
VXLAN/Geneve decapsulation and hostile datagrams at a tunnel port; flow extraction of any
frame, the PMD's exact-match cache and its megaflow cache) run
again with the compiled modules built with AddressSanitizer + UBSan: zero reports.

The sanitized build lives in /tmp/pyvhost-asan-<source hash> (built once per source
change, about a minute); the tests then run in a child process with those modules first on
sys.path and libasan preloaded. ``make asan-test`` runs the whole suite this way."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.harness import asan

CORPUS = ["tests/test_fuzz_rings.py", "tests/test_fuzz_onecopy.py", "tests/test_vring_hostile.py",
          "tests/test_ring_batch.py", "tests/test_ring_core.py", "tests/test_driver_core.py",
          "tests/test_memory.py", "tests/test_protocol.py", "tests/test_openflow_codec.py",
          "tests/test_tunnel_decap.py", "tests/test_edit.py", "tests/test_emc.py",
          "tests/test_megaflow.py",
          "tests/test_openflow_meters.py::test_meter_buckets_pass_a_burst_then_the_rate",
          "tests/test_openflow_meters.py::test_meter_mods_follow_the_spec"]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc for the sanitized build")
def test_fuzz_corpus_under_asan():
    lib = asan.build()
    proc = asan.run_pytest(lib, ["-q", "-rA", "-s", *CORPUS], timeout=600)
    out = proc.stdout + proc.stderr
    counts = [line for line in out.splitlines() if line.startswith("[fuzz]")]
    print("\n".join(counts))
    assert "sanitized modules from" in out, out[-3000:]
    assert asan.reports(proc) == [], "\n".join(asan.reports(proc)) + out[-5000:]
    failures = out.find("= FAILURES =")                 # the falsifying examples first
    assert proc.returncode == 0, (out[failures:failures + 20000] if failures >= 0 else "") + \
        out[-3000:]
    assert len(counts) >= 3


def test_old_sanitized_builds_are_pruned(tmp_path):
    now = time.time()
    for i, age in enumerate((10, 500, 20, 9000, 30)):       # seconds since last use
        d = tmp_path / f"pyvhost-asan-{i}"
        d.mkdir()
        (d / "done").write_text("ok\n")
        os.utime(d / "done", (now - age, now - age))
    building = tmp_path / "pyvhost-asan-building"           # no mark yet, just started
    building.mkdir()
    dead = tmp_path / "pyvhost-asan-dead"                   # no mark, hours old
    dead.mkdir()
    os.utime(dead, (now - 4 * 3600, now - 4 * 3600))
    other = tmp_path / "something-else"
    other.mkdir()
    gone = asan.prune(tmp_path, keep=3)
    assert sorted(p.name for p in gone) == ["pyvhost-asan-1", "pyvhost-asan-3",
                                            "pyvhost-asan-dead"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pyvhost-asan-0", "pyvhost-asan-2", "pyvhost-asan-4", "pyvhost-asan-building",
        "something-else"]
