"""The cross-core round trip the benchmarks read before each round (pyvhost._corelat):
a number in the range a cache line's trip between two cores can take, bad CPUs and
durations refused with a clear error, the caller's CPU affinity given back and no thread
left behind; bench/_rounds.alternate reads the probe before every measure and keeps each
reading with its system and round; bench tables keep them through JSON and print them."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest

from pyvhost._corelat import round_trip_ns
from pyvhost.cli import benchtable
from pyvhost.cli.benchtable import Table, TableError
from tests.harness import processes

sys.path.insert(0, str(Path(processes.REPO) / "bench"))
from _rounds import alternate, cross_core  # noqa: E402

CPUS = sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")
def test_round_trip_between_two_cpus_and_affinity_given_back():
    before = os.sched_getaffinity(0)
    got = [round_trip_ns(CPUS[0], CPUS[1], 0.1), round_trip_ns(CPUS[1], CPUS[0], 0.1)]
    # a line between two cores: tens to a few thousand ns (a vCPU descheduled mid-way
    # spoils only the batches it lasted, not the median)
    assert all(10 < ns < 20_000 and type(ns) is float for ns in got), got
    assert os.sched_getaffinity(0) == before
    assert not [t for t in threading.enumerate() if t.name == "corelat"]
    assert 10 < cross_core(CPUS[0], CPUS[1], 0.05)() < 20_000


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")
def test_bad_cpus_and_durations_refused():
    with pytest.raises(ValueError, match="two different CPUs"):
        round_trip_ns(CPUS[0], CPUS[0])
    with pytest.raises(ValueError, match="not one this thread may run on"):
        round_trip_ns(CPUS[0], 4096)
    with pytest.raises(ValueError, match="not one this thread may run on"):
        round_trip_ns(-1, CPUS[0])
    with pytest.raises(ValueError, match="not one this thread may run on"):
        round_trip_ns(CPUS[0], 2**70)
    for cpu in (float(CPUS[1]), True, str(CPUS[1])):     # (0.0 == 0, True == 1: in the set)
        with pytest.raises(ValueError, match="a CPU is an int"):
            round_trip_ns(CPUS[0], cpu)
    for bad in (0, -1, 11, float("nan")):
        with pytest.raises(ValueError, match="seconds"):
            round_trip_ns(CPUS[0], CPUS[1], bad)


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")
def test_a_partner_that_never_answers_or_cannot_pin_is_an_error_with_nothing_left(monkeypatch):
    import time

    from pyvhost import _corelat

    def silent(lines, cpu, give_up_s, ready, failed):
        ready.set()                               # started, but never answers

    def unpinned(lines, cpu, give_up_s, ready, failed):
        failed.append(OSError(22, "Invalid argument"))
        ready.set()

    before = os.sched_getaffinity(0)
    for partner, why in ((silent, "stopped answering"), (unpinned, "Invalid argument")):
        monkeypatch.setattr(_corelat, "_partner", partner)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=why):
            round_trip_ns(CPUS[0], CPUS[1], 0.1)
        assert time.monotonic() - t0 < 3
        assert os.sched_getaffinity(0) == before
        assert not [t for t in threading.enumerate() if t.name == "corelat"]
    probe = cross_core(CPUS[0], CPUS[1], 0.1)     # the bench's probe: None, the bench goes on
    assert probe() is None


def test_alternate_reads_the_probe_before_each_measure(capsys):
    events: list[str] = []
    readings = iter([100.0, 200.0, 300.0, 400.0])

    def probe():
        events.append("probe")
        return next(readings)

    def measure(name, value):
        def run():
            events.append(name)
            return value
        return run

    trips: dict[str, list[float]] = {}
    got = alternate("loop", 2, {"peer": measure("peer", 1.0), "py": measure("py", 2.0)},
                    probe=probe, probed=trips)
    assert events == ["probe", "peer", "probe", "py"] * 2
    assert got == {"peer": [1.0, 1.0], "py": [2.0, 2.0]}
    assert trips == {"peer": [100.0, 300.0], "py": [200.0, 400.0]}
    out = capsys.readouterr().out
    assert "round 2/2  loop: peer 1.000 [rt 300 ns]  py 2.000 [rt 400 ns] Mpps" in out, out
    assert alternate("loop", 1, {"py": measure("py", 2.0)}) == {"py": [2.0]}
    assert "[rt" not in capsys.readouterr().out
    trips = {}
    alternate("loop", 1, {"py": measure("py", 2.0)}, probe=lambda: None, probed=trips)
    assert trips == {"py": [None]} and "py 2.000 [rt n/a] Mpps" in capsys.readouterr().out


def test_tables_keep_the_round_trips(tmp_path):
    t = Table("switch", "loop", ["pyvhost", "OVS"], [("pyvhost", "OVS")])
    t.add("64 B", "Mpps", rounds={"pyvhost": [10.0, 4.0], "OVS": [9.0, 9.5]},
          round_trips={"pyvhost": [87.0, 451.0], "OVS": [88.0, 90.0]})
    t.add("1500 B", "Mpps", rounds={"pyvhost": [5.0]})
    md = t.markdown()
    assert "- 64 B: pyvhost 87 451; OVS 88 90" in md, md
    assert "1500 B:" not in md.split("cross-core round trip")[1]
    benchtable.save([t], tmp_path / "rows.json")
    [back] = benchtable.load(tmp_path / "rows.json")
    assert back.rows[0].round_trips == {"pyvhost": [87.0, 451.0], "OVS": [88.0, 90.0]}
    assert back.rows[1].round_trips == {} and back.markdown() == md
    with pytest.raises(TableError, match="1 round trips for 2 rounds"):
        t.add("x", "Mpps", rounds={"pyvhost": [1.0, 2.0]}, round_trips={"pyvhost": [80.0]})
    with pytest.raises(TableError, match="not a number"):
        t.add("x", "Mpps", rounds={"pyvhost": [1.0]}, round_trips={"pyvhost": ["slow"]})
    with pytest.raises(TableError, match="unknown columns"):
        t.add("x", "Mpps", rounds={"pyvhost": [1.0]}, round_trips={"nobody": []})
    t.add("2 rounds", "Mpps", rounds={"pyvhost": [1.0, 2.0]},
          round_trips={"pyvhost": [None, 90.0]})           # a probe that failed once
    assert "- 2 rounds: pyvhost n/a 90" in t.markdown()


def test_tables_saved_before_round_trips_still_load(tmp_path):
    t = Table("switch", "loop", ["pyvhost", "OVS"], [("pyvhost", "OVS")])
    t.add("64 B", "Mpps", rounds={"pyvhost": [10.0, 4.0], "OVS": [9.0, 9.5]})
    old = t.to_json()
    for row in old["rows"]:
        del row["round_trips"]
    (tmp_path / "old.json").write_text(json.dumps([old]))
    [back] = benchtable.load(tmp_path / "old.json")
    assert back.rows[0].rounds == t.rows[0].rounds and back.rows[0].round_trips == {}
