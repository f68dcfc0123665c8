"""The switch's persistent configuration: an SQLite file in the run directory holding
bridges, ports, flows, QoS and PMD settings, applied again when the switch starts. Only
storage: the switch decides what to write and when."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS bridges (name TEXT PRIMARY KEY, seq INTEGER);
CREATE TABLE IF NOT EXISTS ports (name TEXT PRIMARY KEY, bridge TEXT, type TEXT,
                                  options TEXT, seq INTEGER);
CREATE TABLE IF NOT EXISTS flows (id INTEGER PRIMARY KEY AUTOINCREMENT, bridge TEXT, text TEXT);
CREATE TABLE IF NOT EXISTS qos (port TEXT PRIMARY KEY, police_kbps INTEGER, police_burst_kb
                                INTEGER, max_rate_kbps INTEGER);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT);
"""


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path)
        self.db.executescript(SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def is_empty(self) -> bool:
        return self.db.execute("SELECT COUNT(*) FROM bridges").fetchone()[0] == 0

    def _write(self, sql: str, *args) -> None:
        self.db.execute(sql, args)
        self.db.commit()

    # bridges
    def add_bridge(self, name: str) -> None:
        self._write("INSERT INTO bridges VALUES (?, (SELECT COUNT(*) FROM bridges))", name)

    def del_bridge(self, name: str) -> None:
        for sql in ("DELETE FROM bridges WHERE name=?", "DELETE FROM flows WHERE bridge=?",
                    "DELETE FROM qos WHERE port IN (SELECT name FROM ports WHERE bridge=?)",
                    "DELETE FROM ports WHERE bridge=?"):
            self.db.execute(sql, (name,))
        self.db.commit()

    def bridges(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM bridges ORDER BY seq")]

    # ports
    def add_port(self, name: str, bridge: str, type_: str, options: dict) -> None:
        self._write("INSERT INTO ports VALUES (?, ?, ?, ?, (SELECT COUNT(*) FROM ports))",
                    name, bridge, type_, json.dumps(options))

    def del_port(self, name: str) -> None:
        self.db.execute("DELETE FROM ports WHERE name=?", (name,))
        self.db.execute("DELETE FROM qos WHERE port=?", (name,))
        self.db.commit()

    def ports(self) -> list[tuple[str, str, str, dict]]:
        return [(n, b, t, json.loads(o)) for n, b, t, o in
                self.db.execute("SELECT name, bridge, type, options FROM ports ORDER BY seq")]

    # flows (one row per rule; row ids only grow, so their order is the order of adding)
    def change_flows(self, bridge: str, add: list[str], delete: list[int] = (),
                     update: list[tuple[int, str]] = ()) -> list[int]:
        """One transaction: delete rows, rewrite rows, add rules; the new rows' ids."""
        with self.db:
            self.db.executemany("DELETE FROM flows WHERE id=?", [(r,) for r in delete])
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
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM settings")}
