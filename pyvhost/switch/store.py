"""The switch's persistent configuration: an SQLite file in the run directory holding
bridges, ports (with their OpenFlow port numbers), flows, QoS and PMD settings, applied
again when the switch starts. Only storage: the switch decides what to write and when.

The file carries a schema version (PRAGMA user_version); older layouts are migrated in one
transaction. A file that is not a readable store of a known version is never written:
``StoreError`` says why, and the caller stops. Every write commits before it returns,
unless it runs inside ``transaction()``, which commits once at the end (or not at all).

Durability, in two steps (SQLite's write-ahead log, synchronous=NORMAL):

- committed: the transaction is in the -wal file (written, not yet fsynced). It survives
  a crash of the switch (SIGKILL, abort, a bug) at any point after the commit returns; a
  crash before or during it leaves the store as it was before the transaction.
- synced (``sync()``: a checkpoint, which fsyncs the log and then the database): it also
  survives a crash of the machine. The caller decides when (the switch: before a ``ctl``
  answer, once a second while commits are unsynced, at close).

A commit costs a write() instead of three fsyncs, so OpenFlow can commit every FLOW_MOD
before its BARRIER_REPLY. A file system that cannot hold a write-ahead log (no shared
memory for its index) keeps the rollback journal with every commit fsynced (synced at once).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path

VERSION = 1
WAL_LIMIT = 4 << 20        # bytes the -wal file is cut back to after a checkpoint
BUSY_TIMEOUT = 0.5         # seconds a write waits for another process's write lock
SCHEMA = """
CREATE TABLE bridges (name TEXT PRIMARY KEY, seq INTEGER);
CREATE TABLE ports (name TEXT PRIMARY KEY, bridge TEXT, type TEXT, options TEXT, seq INTEGER,
                    ofport INTEGER);
CREATE TABLE flows (id INTEGER PRIMARY KEY AUTOINCREMENT, bridge TEXT, text TEXT);
CREATE TABLE qos (port TEXT PRIMARY KEY, police_kbps INTEGER, police_burst_kb INTEGER,
                  max_rate_kbps INTEGER);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT);
"""
V0_TABLES = {"bridges", "ports", "flows", "qos", "settings"}


class StoreError(Exception):
    """The store cannot be used as it is; the file has not been changed."""


def _migrate_v0(db: sqlite3.Connection, run_dir: Path) -> None:
    """Version 0 (no version, no port numbers): number each bridge's ports 1, 2, ... in the
    order they were stored, as version 0 did at every start, so stored rules that name
    ports by number keep meaning what they meant at the last start. A vhostuser port's
    path is no longer stored when it is the default one (any other is refused at load)."""
    db.execute("ALTER TABLE ports ADD COLUMN ofport INTEGER")
    counters: dict[str, int] = {}
    for name, bridge, type_, options in db.execute(
            "SELECT name, bridge, type, options FROM ports ORDER BY seq, rowid").fetchall():
        counters[bridge] = counters.get(bridge, 0) + 1
        db.execute("UPDATE ports SET ofport=? WHERE name=?", (counters[bridge], name))
        try:
            opts = json.loads(options)
        except (TypeError, ValueError):
            continue                        # reported when it is loaded
        if type_ == "vhostuser" and isinstance(opts, dict) and \
                opts.get("path") == str(run_dir / f"{name}.sock"):
            del opts["path"]
            db.execute("UPDATE ports SET options=? WHERE name=?", (json.dumps(opts), name))
    # v0 numbered rows with COUNT(*), which repeats after deletes: make them distinct
    for table in ("bridges", "ports"):
        for n, (rowid,) in enumerate(db.execute(
                f"SELECT rowid FROM {table} ORDER BY seq, rowid").fetchall()):
            db.execute(f"UPDATE {table} SET seq=? WHERE rowid=?", (n, rowid))


MIGRATIONS = {0: _migrate_v0}


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._depth = 0
        self.unsynced = False           # commits since the last sync()
        self.wal = False                # (until the schema is there: rollback journal)
        self._check_readable()
        try:
            # another process holding the write lock (a sqlite3 shell mid-transaction) makes
            # a write fail after BUSY_TIMEOUT instead of stalling the switch for 5 s a time
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT)
            self._open()
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self.wal = mode == "wal"
            self.db.execute(f"PRAGMA synchronous={'NORMAL' if self.wal else 'FULL'}")
            self.db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        except sqlite3.Error as e:
            raise StoreError(f"store {self.path}: {e}") from None

    def _check_readable(self) -> None:
        """Look at an existing file read-only first: a corrupt or foreign file, or one of a
        newer version, is refused before anything could write to it.

        After a crash mid-write: a write-ahead log (-wal) is read as it is (a read-only
        connection rebuilds its index in -shm and ignores a transaction that had not
        committed; nothing in the file or the log changes); a hot rollback journal (a file
        of the rollback era, or of a file system without WAL) is rolled back on the first
        read, which needs write access: that is recovery, not damage."""
        if not self.path.exists():
            return
        journal = Path(f"{self.path}-journal")
        try:
            with open(self.path, "rb"):
                pass
            if journal.exists() and journal.stat().st_size:
                db = sqlite3.connect(self.path)
            else:
                db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)
            try:
                ok = db.execute("PRAGMA quick_check").fetchone()[0]
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = {r[0] for r in db.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")}
            finally:
                db.close()
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"store {self.path} cannot be read: {e}") from None
        if ok != "ok":
            raise StoreError(f"store {self.path} is corrupt: {ok}")
        if version > VERSION:
            raise StoreError(f"store {self.path} has schema version {version}; this pyvhost "
                             f"knows {VERSION} and older")
        if tables and not V0_TABLES <= tables:
            raise StoreError(f"store {self.path} is not a pyvhost store (tables: "
                             f"{', '.join(sorted(tables))})")

    def _open(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}
        if version == VERSION:
            return
        with self.transaction():
            if not tables:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
            else:
                for v in range(version, VERSION):
                    MIGRATIONS[v](self.db, self.path.resolve().parent)
            self.db.execute(f"PRAGMA user_version={VERSION}")

    def close(self) -> None:
        """Sync and close (the last connection's close checkpoints and removes the -wal)."""
        with contextlib.suppress(sqlite3.Error):     # (closing checkpoints once more)
            self.sync()
        self.db.close()

    def sync(self) -> bool:
        """Make every committed transaction survive a crash of the machine too: checkpoint
        the write-ahead log (fsync the log, copy it into the database, fsync that). Does
        nothing when nothing was committed since the last sync; True if it synced.
        sqlite3.Error or OSError if the disk refuses (the commits stay committed).

        Another process reading the file (a ``sqlite3`` shell, a backup) holds back the
        frames its snapshot may still need, and SQLite then copies none and fsyncs nothing:
        the log is fsynced here instead (its committed frames are what a restart recovers),
        and the store stays unsynced so that the next sync copies them."""
        if not self.unsynced or self._depth:
            return False
        _, logged, copied = self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if logged > 0 and copied < logged:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        self.unsynced = False
        return True

    @contextlib.contextmanager
    def transaction(self):
        """Writes inside commit together at the outermost exit, or roll back together."""
        if self._depth == 0:
            self.db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0 and self.db.in_transaction:   # (SQLite may have already)
                self.db.execute("ROLLBACK")
            raise
        self._depth -= 1
        if self._depth == 0:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:                     # (disk full, I/O error): undo it all
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            self.unsynced = self.wal

    def is_empty(self) -> bool:
        return self.db.execute("SELECT COUNT(*) FROM bridges").fetchone()[0] == 0

    def _write(self, sql: str, *args) -> None:
        with self.transaction():
            self.db.execute(sql, args)

    # bridges
    def add_bridge(self, name: str) -> None:
        self._write("INSERT INTO bridges VALUES (?, (SELECT COALESCE(MAX(seq) + 1, 0) "
                    "FROM bridges))", name)

    def del_bridge(self, name: str) -> None:
        with self.transaction():
            for sql in ("DELETE FROM bridges WHERE name=?", "DELETE FROM flows WHERE bridge=?",
                        "DELETE FROM qos WHERE port IN (SELECT name FROM ports WHERE bridge=?)",
                        "DELETE FROM ports WHERE bridge=?"):
                self.db.execute(sql, (name,))
            self.db.execute("DELETE FROM settings WHERE key=?", (f"mirrors:{name}",))

    def bridges(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM bridges ORDER BY seq")]

    # ports
    def add_port(self, name: str, bridge: str, type_: str, options: dict, ofport: int) -> None:
        """Add (or, for a stored row that failed to load, replace) a port's row."""
        with self.transaction():
            self.db.execute("DELETE FROM ports WHERE name=?", (name,))
            self.db.execute("INSERT INTO ports VALUES (?, ?, ?, ?, (SELECT COALESCE(MAX(seq) "
                            "+ 1, 0) FROM ports), ?)",
                            (name, bridge, type_, json.dumps(options), ofport))

    def del_port(self, name: str) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM ports WHERE name=?", (name,))
            self.db.execute("DELETE FROM qos WHERE port=?", (name,))

    def ports(self) -> list[tuple[str, str, str, object, int | None]]:
        """(name, bridge, type, options, ofport) in the order they were added; options is
        the stored text itself when it is not a JSON object (the caller reports it)."""
        out = []
        for n, b, t, o, ofport in self.db.execute(
                "SELECT name, bridge, type, options, ofport FROM ports ORDER BY seq"):
            try:
                opts = json.loads(o)
            except (TypeError, ValueError):
                opts = o
            out.append((n, b, t, opts if isinstance(opts, dict) else o, ofport))
        return out

    # flows (one row per rule; row ids only grow, so their order is the order of adding)
    def change_flows(self, bridge: str, add: list[str], delete: list[int] = (),
                     update: list[tuple[int, str]] = ()) -> list[int]:
        """One transaction: delete rows, rewrite rows, add rules; the new rows' ids."""
        with self.transaction():
            if delete:
                self.db.executemany("DELETE FROM flows WHERE id=?", [(r,) for r in delete])
            if update:
                self.db.executemany("UPDATE flows SET text=? WHERE id=?",
                                    [(t, r) for r, t in update])
            rows = []
            for text in add:
                rows.append(self.db.execute("INSERT INTO flows (bridge, text) VALUES (?, ?)",
                                            (bridge, text)).lastrowid)
        return rows

    def flows(self, bridge: str) -> list[tuple[int, str]]:
        return list(self.db.execute("SELECT id, text FROM flows WHERE bridge=? ORDER BY id",
                                    (bridge,)))

    # qos
    def set_qos(self, port: str, police_kbps: int, police_burst_kb: int,
                max_rate_kbps: int) -> None:
        self._write("INSERT OR REPLACE INTO qos VALUES (?, ?, ?, ?)", port, police_kbps,
                    police_burst_kb, max_rate_kbps)

    def qos(self) -> dict[str, tuple[int, int, int]]:
        return {r[0]: tuple(r[1:]) for r in self.db.execute("SELECT * FROM qos")}

    # settings
    def set_setting(self, key: str, value) -> None:
        self._write("INSERT OR REPLACE INTO settings VALUES (?, ?)", key, json.dumps(value))

    def settings(self) -> dict:
        out = {}
        for k, v in self.db.execute("SELECT key, value FROM settings"):
            try:
                out[k] = json.loads(v)
            except (TypeError, ValueError):
                continue                         # reported by whoever needs it
        return out
