"""What the store promises across crashes (pyvhost.switch.store): a change a BARRIER_REPLY
or a ``ctl`` answer confirmed is there after the switch is killed (SIGKILL right after the
reply, or in the middle of a stream of FLOW_MODs), the store a crash leaves always loads,
a ``ctl`` answer's change is in the database file itself (synced, not only in the
write-ahead log), an OpenFlow commit gets there within a few seconds, and the readability
check recovers a crashed write-ahead log or rollback journal without writing a file it
then refuses."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time

import pytest

from pyvhost.switch.control import ControlServer
from pyvhost.switch.store import Store, StoreError
from tests.harness import openflow as O
from tests.harness import processes

CONFIG = "add-br br0\nadd-port br0 a type=vhostuser\nadd-port br0 b type=vhostuser\n" \
    "set-fail-mode br0 secure\nset-controller br0 ptcp:0:127.0.0.1\n"


def listening_port(run_dir) -> int:
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", processes.ctl(run_dir, "show"))
    assert m
    return int(m.group(1))


def rule(i: int) -> tuple[bytes, str]:
    """FLOW_MOD ADD number ``i`` (in_port=1, ip, nw_dst=10.x.y.z -> output:2) and the
    dump-flows text it shows as."""
    dst = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
    m = O.match(O.oxm(0, struct.pack("!I", 1)), O.oxm(5, b"\x08\x00"),
                O.oxm(12, socket.inet_aton(dst)))
    return O.flow_mod(O.ADD, m, O.apply_actions(O.output(2)), priority=10, xid=i)[8:], dst


def fm(i: int) -> bytes:
    return O.msg(O.FLOW_MOD, rule(i)[0], xid=i)


def stored_dsts(run_dir) -> set[str]:
    """The nw_dst of every priority-10 rule the restarted switch dumps."""
    flows = processes.ctl(run_dir, "dump-flows", "br0")
    return set(re.findall(r"priority=10,ip,in_port=\w+,nw_dst=([\d.]+)", flows))


def restart_and_read(workdir, run_dir, name: str) -> set[str]:
    sw = processes.switch(workdir, run_dir, name=name)
    try:
        assert "skipped" not in sw.errors(), sw.errors()
        return stored_dsts(run_dir)
    finally:
        assert sw.stop() == 0


@pytest.mark.slow
def test_rules_a_barrier_reply_confirmed_survive_kill_9_right_after_it(workdir):
    """FLOW_MOD + BARRIER_REQUEST one at a time (as ovs-ofctl add-flows sends them); the
    switch is SIGKILLed as soon as a BARRIER_REPLY is read: every confirmed rule is there
    at the restart (three times, the store growing)."""
    run_dir = workdir / "run"
    rng = random.Random(13)
    confirmed: set[str] = set()
    n = 0
    for attempt in range(3):
        sw = processes.switch(workdir, run_dir, config=CONFIG if attempt == 0 else None,
                              name=f"switch{attempt}")
        try:
            with O.Client("127.0.0.1", listening_port(run_dir)) as c:
                for _ in range(rng.randrange(50, 400)):
                    n += 1
                    body, dst = rule(n)
                    c.send(O.msg(O.FLOW_MOD, body, xid=n) + O.msg(O.BARRIER_REQUEST, xid=n))
                    t, xid, _ = c.recv()
                    assert (t, xid) == (O.BARRIER_REPLY, n), (t, xid)
                    confirmed.add(dst)
                sw.signal(signal.SIGKILL)             # at once, after the last reply
                sw.proc.wait(10)
        finally:
            sw.stop()
        assert restart_and_read(workdir, run_dir, f"restart{attempt}") == confirmed


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_flow_mod_stream_leaves_a_store_that_loads(workdir):
    """Pipelined FLOW_MODs with a BARRIER_REQUEST every 25, read by another thread, and
    SIGKILL at a random moment: the store loads, holds every rule a BARRIER_REPLY
    confirmed, and nothing that was never sent."""
    run_dir = workdir / "run"
    rng = random.Random(29)
    confirmed: set[str] = set()
    sent: set[str] = set()
    n = 0
    for attempt in range(3):
        sw = processes.switch(workdir, run_dir, config=CONFIG if attempt == 0 else None,
                              name=f"switch{attempt}")
        pending: dict[int, set[str]] = {}
        lock = threading.Lock()
        try:
            c = O.Client("127.0.0.1", listening_port(run_dir))

            def reader(c=c, pending=pending, lock=lock):
                try:
                    while True:
                        t, xid, _ = c.recv()
                        if t == O.BARRIER_REPLY:
                            with lock:
                                confirmed.update(pending.pop(xid, ()))
                except (OSError, ConnectionError):
                    return

            t = threading.Thread(target=reader)
            t.start()
            killer = threading.Timer(0.3 + rng.random() * 1.5, sw.signal, (signal.SIGKILL,))
            killer.start()
            batch: set[str] = set()
            try:
                while sw.alive():
                    n += 1
                    body, dst = rule(n)
                    batch.add(dst)
                    sent.add(dst)
                    data = O.msg(O.FLOW_MOD, body, xid=n)
                    if n % 25 == 0:
                        with lock:
                            pending[0x80000000 | n] = batch
                        batch = set()
                        data += O.msg(O.BARRIER_REQUEST, xid=0x80000000 | n)
                    c.send(data)
            except OSError:
                pass                                  # the switch is gone
            finally:
                killer.join()
                sw.proc.wait(10)
                c.close()
                t.join(10)
        finally:
            sw.stop()
        assert confirmed, "no BARRIER_REPLY before the kill: the test proved nothing"
        stored = restart_and_read(workdir, run_dir, f"restart{attempt}")
        assert confirmed <= stored, sorted(confirmed - stored)[:5]
        assert stored <= sent, sorted(stored - sent)[:5]


def main_file_rules(run_dir, tmp) -> list[str]:
    """The rules in conf.db itself, without its write-ahead log (what a crash of the
    machine would leave if the log had not been synced)."""
    copy = tmp / "copy.db"
    shutil.copyfile(run_dir / "conf.db", copy)
    for suffix in ("-wal", "-shm"):
        with_suffix = tmp / f"copy.db{suffix}"
        if with_suffix.exists():
            with_suffix.unlink()
    db = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT text FROM flows")]
    finally:
        db.close()


def test_a_ctl_answer_is_synced_and_an_openflow_commit_within_seconds(workdir):
    run_dir = workdir / "run"
    sw = processes.switch(workdir, run_dir, config=CONFIG)
    try:
        assert (run_dir / "conf.db-wal").exists()          # the store runs a WAL
        processes.ctl(run_dir, "add-flow", "br0", "priority=7,in_port=1,actions=output:2")
        assert "priority=7,in_port=1,actions=output:2" in main_file_rules(run_dir, workdir)
        with O.Client("127.0.0.1", listening_port(run_dir)) as c:
            body, dst = rule(77)
            c.send(O.msg(O.FLOW_MOD, body, xid=1) + O.msg(O.BARRIER_REQUEST, xid=2))
            assert c.recv()[:2] == (O.BARRIER_REPLY, 2)
        deadline = time.monotonic() + 10
        while not any(dst in r for r in main_file_rules(run_dir, workdir)):
            assert time.monotonic() < deadline, "an OpenFlow commit never synced"
            time.sleep(0.2)
    finally:
        assert sw.stop() == 0
    assert not (run_dir / "conf.db-wal").exists()       # a clean stop folds the log in


# -- the store's readability check after a crash mid-write --------------------------------

WRITER = r"""
import os, signal, sqlite3, sys
path, mode = sys.argv[1], sys.argv[2]
db = sqlite3.connect(path, isolation_level=None)
db.execute(f"PRAGMA journal_mode={mode}")
db.execute("PRAGMA cache_size=2")                  # spill the open transaction to disk
for i in range(20):
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO flows (bridge, text) VALUES ('br0', ?)", (f"committed {i}",))
    db.execute("COMMIT")
db.execute("BEGIN IMMEDIATE")
for i in range(300):
    db.execute("INSERT INTO flows (bridge, text) VALUES ('br0', ?)", ("x" * 2000,))
os.kill(os.getpid(), signal.SIGKILL)
"""


def crashed_store(path, mode: str) -> None:
    """A store a writer was SIGKILLed in the middle of a transaction of (journal ``mode``)."""
    Store(path).close()
    r = subprocess.run([sys.executable, "-c", WRITER, str(path), mode], timeout=60)
    assert r.returncode == -signal.SIGKILL


@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_a_store_killed_mid_transaction_loads_with_what_was_committed(tmp_path, mode):
    path = tmp_path / "conf.db"
    crashed_store(path, mode)
    leftover = tmp_path / f"conf.db-{'wal' if mode == 'wal' else 'journal'}"
    assert leftover.exists() and leftover.stat().st_size   # a crash's leftovers, really
    store = Store(path)
    try:
        assert [t for _, t in store.flows("br0")] == [f"committed {i}" for i in range(20)]
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    finally:
        store.close()


def test_a_corrupt_store_with_a_crashed_wal_is_refused_and_not_written(tmp_path):
    """The check reads a -wal read-only: refusing the file leaves it and its log as they
    were (the log is not folded into a file that is then refused)."""
    path = tmp_path / "conf.db"
    crashed_store(path, "wal")
    with open(path, "r+b") as f:                     # a page of the database file garbled
        f.seek(4096)
        f.write(os.urandom(4096))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "conf.db-shm"}
    with pytest.raises(StoreError, match="corrupt|cannot be read"):
        Store(path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "conf.db-shm"}
    assert after == before


def test_sync_puts_commits_into_the_database_file(tmp_path):
    path = tmp_path / "conf.db"
    store = Store(path)
    try:
        store.add_bridge("br0")
        assert store.unsynced and store.wal
        store.change_flows("br0", ["priority=1,actions=drop"])
        copy_dir = tmp_path / "copy"
        copy_dir.mkdir()
        assert main_file_rules(tmp_path, copy_dir) == []      # only in the log so far
        assert store.sync() and not store.unsynced
        assert main_file_rules(tmp_path, copy_dir) == ["priority=1,actions=drop"]
        assert not store.sync()                               # nothing new: nothing done
    finally:
        store.close()


def test_sync_with_an_outside_reader_fsyncs_the_log_and_copies_later(tmp_path, monkeypatch):
    """A reader's snapshot (a sqlite3 shell, a backup) holds the log's frames back: the
    checkpoint copies none and fsyncs nothing, so sync() fsyncs the log itself and stays
    unsynced; once the reader is gone the next sync copies them into the file."""
    path = tmp_path / "conf.db"
    store = Store(path)
    reader = None
    try:
        store.add_bridge("br0")
        store.sync()
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM flows").fetchone()      # a snapshot, held
        store.change_flows("br0", ["priority=1,actions=drop"])
        synced = []
        real_fsync = os.fsync

        def fsync(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)
        assert store.sync() and store.unsynced
        assert synced == [f"{path}-wal"], synced
        copy_dir = tmp_path / "copy"
        copy_dir.mkdir()
        assert main_file_rules(tmp_path, copy_dir) == []        # not copied: the reader
        reader.execute("COMMIT")
        assert store.sync() and not store.unsynced
        assert main_file_rules(tmp_path, copy_dir) == ["priority=1,actions=drop"]
    finally:
        if reader is not None:
            reader.close()
        store.close()


def test_a_write_waits_briefly_for_an_outside_writer_then_fails(tmp_path):
    """Another process holding the write lock (a sqlite3 shell mid-transaction) makes a
    store write fail with an error after a short wait, not stall the switch 5 s a time."""
    store = Store(tmp_path / "conf.db")
    other = sqlite3.connect(tmp_path / "conf.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        t0 = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.add_bridge("br0")
        assert time.monotonic() - t0 < 4.0                   # (the default would be 5 s)
        other.execute("ROLLBACK")
        store.add_bridge("br0")
        assert store.bridges() == ["br0"]
    finally:
        other.close()
        store.close()


def test_a_ctl_answer_says_when_its_change_could_not_be_synced():
    """An answer whose change was committed but not synced (the disk refused) carries a
    warning saying so, whatever the command's own result."""
    class Unsyncable:
        def sync_store(self):
            return "committed changes could not be synced to disk (disk I/O error)"

    server = ControlServer(Unsyncable(), "/nonexistent/ctl.sock")
    answer = asyncio.run(server._answer(["no-such-command"]))
    assert answer["ok"] is False and "disk I/O error" in answer["warning"], answer
