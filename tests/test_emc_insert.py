"""set-pmd emc-insert-inv-prob=N (OVS's other_config:emc-insert-inv-prob): one wildcard-cache
hit (or upcall) in N is copied into the PMD's exact-match cache, so a flow's first N frames
miss it and the rest hit; 0 turns the EMC off (never asked, never filled: every frame
counted as skipped), frames still forwarded byte-exact through the megaflow cache. Through a
PMD thread and two in-process guests (pyvhost._switch), then through `pyvhost switch`: the
setting is checked, stored across a restart and shown by pmd-stats-show."""

from __future__ import annotations

import json

import pytest

from tests.harness import processes
from tests.test_onecopy import MAC, collect, frame, guests_a_to_b, wait_for

ROUNDS, PER_ROUND = 4, 40


@pytest.fixture
def loop():
    """Guests a -> b, one rule, a PMD not yet started (guests_a_to_b)."""
    with guests_a_to_b(["priority=10,in_port=a,actions=output:b"]) as loop:
        yield loop


def run_one_flow(loop) -> dict:
    """ROUNDS x PER_ROUND frames of one flow (the same key: its payload differs only),
    each round received whole and byte-exact; the PMD's counters."""
    for rnd in range(ROUNDS):
        frames = [frame("a", MAC["b"], 64 + j % 50) for j in range(PER_ROUND)]
        loop.b.post_rx(len(frames))
        for f in frames:
            loop.a.tx.post_tx(f, hdr=bytes(12))
        if rnd == 0:
            loop.thread.start()
            loop.pmd.set_rxqs([(0, 0), (1, 0)])
        loop.pmd.wake()
        assert [f for _, f in collect(loop.b, len(frames), loop.pmd)] == frames, rnd
        sent = PER_ROUND * (rnd + 1)
        assert wait_for(lambda n=sent: loop.dp.port_stats(0)["rx_packets"] == n, pmd=loop.pmd)
        loop.a.tx.used()
    return loop.pmd.stats()


@pytest.mark.parametrize("every", [1, 7, 16, 100])
def test_a_flow_enters_the_emc_on_its_nth_cache_hit(loop, every):
    """The first frame is an upcall, frames 2..N megaflow hits; the Nth is copied into the
    EMC, which answers every frame after it (N=100: from frame 101 of the 160)."""
    if every != 16:                                  # 16: the default, left unset
        loop.pmd.set_emc_insert_inv_prob(every)
    s = run_one_flow(loop)
    total = ROUNDS * PER_ROUND
    inserted_at = min(every, total)
    assert s["emc_insert_inv_prob"] == every
    assert s["upcalls"] == 1, s
    assert s["megaflow_hits"] == inserted_at - 1, s
    assert s["emc_hits"] == total - inserted_at, s
    assert s["emc_misses"] == inserted_at and s["emc_skipped"] == 0, s
    assert not s["emc_skipping"]


def test_zero_turns_the_emc_off(loop):
    loop.pmd.set_emc_insert_inv_prob(0)
    s = run_one_flow(loop)
    total = ROUNDS * PER_ROUND
    assert s["emc_hits"] == 0 and s["emc_misses"] == 0, s
    assert s["emc_skipped"] == total and s["emc_skipping"], s
    assert s["upcalls"] == 1 and s["megaflow_hits"] == total - 1, s


@pytest.mark.parametrize("bad", [-1, 2 ** 32, "3", 1.0, True, None])
def test_a_bad_value_is_refused_and_the_default_kept(loop, bad):
    with pytest.raises(ValueError, match="emc-insert-inv-prob"):
        loop.pmd.set_emc_insert_inv_prob(bad)
    assert loop.pmd.stats()["emc_insert_inv_prob"] == 16


def pmd_json(run_dir) -> dict:
    [s] = json.loads(processes.ctl(run_dir, "pmd-stats-show", "--json"))
    return s


def test_set_pmd_checks_stores_and_shows_it(workdir):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config="add-br br0\n")
    try:
        assert pmd_json(run_dir)["emc_insert_inv_prob"] == 16
        for bad, why in (("-1", "out of range"), ("4294967296", "out of range"),
                         ("x", "not a number"), ("", "not a number")):
            out = processes.ctl(run_dir, "set-pmd", f"emc-insert-inv-prob={bad}", check=False)
            assert why in out, (bad, out)
        assert pmd_json(run_dir)["emc_insert_inv_prob"] == 16
        processes.ctl(run_dir, "set-pmd", "emc-insert-inv-prob=0")
        assert pmd_json(run_dir)["emc_insert_inv_prob"] == 0
        assert "(EMC off: emc-insert-inv-prob=0)" in processes.ctl(run_dir, "pmd-stats-show")
    finally:
        sw.stop()
    sw = processes.switch(workdir, run_dir)                  # the store keeps it
    try:
        assert pmd_json(run_dir)["emc_insert_inv_prob"] == 0
        processes.ctl(run_dir, "set-pmd", "emc-insert-inv-prob=4294967295")
        assert "1 in 4294967295 inserted" in processes.ctl(run_dir, "pmd-stats-show")
    finally:
        sw.stop()


def send_round(loop, frames) -> None:
    loop.b.post_rx(len(frames))
    for f in frames:
        loop.a.tx.post_tx(f, hdr=bytes(12))
    loop.pmd.wake()
    assert len(collect(loop.b, len(frames), loop.pmd)) == len(frames)
    loop.a.tx.used()


def test_a_flow_copied_into_a_skipped_emc_is_found_where_it_is_asked(loop):
    """While the EMC is skipped, frames are not hashed for it (flow_extract leaves the hash
    out) but flows are still copied in (here every megaflow hit): into the slot the flow's
    hash names, so the rounds that still ask the EMC (1 poll round in 8) find them there.
    Thrash first (new flows over one megaflow, every hit copied in: the slots hold other
    flows) until it is skipped; then 40 flows, 256 frames (8 bursts) each. A flow misses
    only if its first burst is one that asks (~1 in 8, ~5 of 40); copied into the wrong
    slot, a flow would miss at its first asking burst (~2 in 3 of them)."""
    loop.pmd.set_emc_insert_inv_prob(1)
    loop.thread.start()
    loop.pmd.set_rxqs([(0, 0), (1, 0)])
    seed = 0
    while not loop.pmd.stats()["emc_skipping"]:
        assert seed < 40000, loop.pmd.stats()
        send_round(loop, [frame("a", MAC["b"], 64, s) for s in range(seed, seed + 64)])
        seed += 64
    before = loop.pmd.stats()
    for flow in range(40):
        for _ in range(4):
            send_round(loop, [frame("a", MAC["b"], 64, 50000 + flow)] * 64)
    s = loop.pmd.stats()
    assert s["emc_skipping"], s
    delta = {k: s[k] - before[k] for k in ("emc_hits", "emc_misses", "emc_skipped")}
    assert delta["emc_skipped"] > 40 * 256 // 2, delta           # mostly skipped
    assert delta["emc_hits"] > 0, delta                          # asked, and found
    assert delta["emc_misses"] < 15, delta
