"""A store whose settings were hand-edited or damaged (values the ctl commands would refuse,
a table where a number belongs or the reverse): the switch still starts, says in its log
what it ignored, and runs with the defaults; the commands work on it afterwards."""

from __future__ import annotations

import json

import pytest

from pyvhost.switch.store import Store
from tests.harness import processes


def pmd_json(run_dir) -> dict:
    [s] = json.loads(processes.ctl(run_dir, "pmd-stats-show", "--json"))
    return s


def restart_with(workdir, settings: dict, config: str = "add-br br0\n"):
    """A switch started once with ``config``, its store then given ``settings``, started
    again: (run dir, the running switch)."""
    run_dir = workdir / "run"
    processes.switch(workdir, run_dir, config=config).stop()
    store = Store(run_dir / "conf.db")
    for key, value in settings.items():
        store.set_setting(key, value)
    store.close()
    return run_dir, processes.switch(workdir, run_dir, name="switch-again")


BAD_STORED = [
    {"threads": "x", "assign": "fast", "auto_lb": "yes", "cpus": [-1], "flow_limit": 0,
     "sleep_max": -5, "emc_insert_inv_prob": "often"},
    {"threads": 0, "assign": None, "auto_lb": 1, "cpus": "some", "flow_limit": "x",
     "sleep_max": 10 ** 9, "emc_insert_inv_prob": -5},
]


@pytest.mark.parametrize("bad", BAD_STORED)
def test_bad_stored_pmd_settings_are_logged_and_the_defaults_kept(workdir, bad):
    """A hand-edited or damaged store (values set-pmd would refuse): the switch starts,
    logs each, and its PMD runs with the defaults."""
    run_dir, sw = restart_with(workdir, bad)
    try:
        s = pmd_json(run_dir)
        assert s["emc_insert_inv_prob"] == 16
        rxq = json.loads(processes.ctl(run_dir, "pmd-rxq-show", "--json"))
        assert len(rxq) == 1                              # threads: 1
        processes.ctl(run_dir, "set-pmd", "emc-insert-inv-prob=3")   # and set-pmd works
        assert pmd_json(run_dir)["emc_insert_inv_prob"] == 3
    finally:
        sw.stop()
    for key, value in bad.items():
        assert f"{key}={value!r} (" in sw.errors(), (key, sw.errors())
    assert sw.errors().count("stored PMD settings set-pmd would refuse") == 1


PORT_CONFIG = "add-br br0\nadd-port br0 p1 type=vhostuser\n"


@pytest.mark.parametrize("bad, logged", [
    ({"bridge:br0": "x"}, "setting bridge:br0 is 'x', not a table"),
    ({"bridge:br0": {"mac_table_size": "x"}}, "bridge br0: mac-table-size 'x'"),
    ({"bridge:br0": {"mac_aging": -3}}, "mac-aging-time -3 refused"),
    ({"bridge:br0": {"mac_table_size": 0}}, "mac-table-size 0, mac-aging-time 300 refused"),
    ({"port:p1": ["y"]}, "setting port:p1 is ['y'], not a table"),
    ({"port:p1": {"mac_limit": "z"}}, "port p1: mac-limit 'z' refused"),
    ({"port:p1": {"mac_limit": -1}}, "port p1: mac-limit -1 refused"),
])
def test_bad_stored_bridge_and_port_settings_are_logged_and_ignored(workdir, bad, logged):
    run_dir, sw = restart_with(workdir, bad, PORT_CONFIG)
    try:
        show = json.loads(processes.ctl(run_dir, "show", "--json"))
        assert list(show["bridges"]["br0"]["ports"]) == ["p1"] and not show["failed"], show
        # and the commands that write those settings work on them again
        processes.ctl(run_dir, "set-bridge", "br0", "mac-table-size=4096")
        processes.ctl(run_dir, "set-port", "p1", "mac-limit=10")
    finally:
        sw.stop()
    assert logged in sw.errors(), sw.errors()


def test_more_stored_pmd_threads_than_usable_cpus_are_kept(workdir):
    """Earlier versions let set-pmd store up to 64 threads; a store moved to a machine
    with fewer CPUs keeps them (they share CPUs, as pmd_cpus assigns them), with a
    warning, instead of falling back to one."""
    import os
    n = len(os.sched_getaffinity(0)) + 1
    run_dir, sw = restart_with(workdir, {"threads": n})
    try:
        rxq = json.loads(processes.ctl(run_dir, "pmd-rxq-show", "--json"))
        assert len(rxq) == n, rxq
    finally:
        sw.stop()
    assert f"{n} PMD threads stored, {n - 1} CPUs usable here" in sw.errors()
    assert "would refuse" not in sw.errors()
