"""A flood reaches every port of the bridge whatever its id (Datapath port ids go up to
MAX_PORTS - 1), and its loop stops after the highest id in use (Datapath.port_end, kept as
ports come and go), not at MAX_PORTS: in process, three guests, one PMD thread."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from pyvhost._switch import Datapath
from pyvhost.switch.bridge import Bridge
from pyvhost.switch.flows import parse_flow
from tests.test_onecopy import MAC, Guest, collect, frame, wait_for


def test_a_flood_reaches_ports_of_any_id_and_stops_after_the_highest():
    guests = {n: Guest("split", "split", mrg=False, hdr_len=12) for n in "abc"}
    ids = {"a": 0, "b": 7, "c": 200}
    bridge = Bridge("br0", 0)
    dp = Datapath()
    dp.set_bridge(0, bridge.cls, bridge.macs)
    assert dp.port_end == 0
    present = set()
    for name, g in guests.items():
        bridge.attach(SimpleNamespace(name=name, port_id=ids[name], ofport=ids[name] + 1))
        dp.add_port(ids[name], 0, g.dev)
        present.add(ids[name])
    assert dp.port_end == 201
    bridge.apply(add=[parse_flow("priority=0,in_port=a,actions=flood")])
    pmd = dp.new_pmd(0, pool_size=512)
    thread = threading.Thread(target=pmd.run, daemon=True)
    thread.start()
    pmd.set_rxqs([(0, 0)])
    sent = 0

    def flood(count: int, receivers: list[str]) -> None:
        nonlocal sent
        frames = [frame("a", MAC["b"], 64 + j, seed=sent + j) for j in range(count)]
        for r in receivers:
            guests[r].post_rx(count)
        for f in frames:
            guests["a"].tx.post_tx(f, hdr=bytes(12))
        pmd.wake()
        for r in receivers:
            assert [f for _, f in collect(guests[r], count, pmd)] == frames, r
        sent += count
        assert wait_for(lambda: dp.port_stats(0)["rx_packets"] == sent, pmd=pmd)
        guests["a"].tx.used()

    try:
        flood(10, ["b", "c"])
        dp.remove_port(ids["c"])               # the highest: the end comes down to b's
        present.discard(ids["c"])
        assert dp.port_end == 8
        flood(10, ["b"])
        ids["c"] = 120                         # back under another id, below the old end
        bridge.attach(SimpleNamespace(name="c2", port_id=120, ofport=121))
        dp.add_port(120, 0, guests["c"].dev)
        present.add(120)
        assert dp.port_end == 121
        flood(10, ["b", "c"])
        dp.remove_port(ids["b"])               # not the highest: the end stays
        present.discard(ids["b"])
        assert dp.port_end == 121
    finally:
        pmd.stop()
        thread.join(5)
        for i in sorted(present):
            dp.remove_port(i)
        for g in guests.values():
            g.close()
    assert not thread.is_alive()
    assert dp.port_end == 0
