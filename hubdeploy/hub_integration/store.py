"""SQLite state of the deploy service: endpoints, their status history, events, device slots.

Everything the service knows lives here (WAL mode, versioned migrations through
`PRAGMA user_version`), so a restarted service picks up where the last one stopped.
Secrets never enter this file except as salted hashes.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("pending", "initializing", "running", "paused", "scaled_to_zero", "failed", "deleted")
PHASES = ("downloading", "quantizing", "loading", "warming_up", "ready")

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE endpoints (
        name TEXT PRIMARY KEY,
        spec_json TEXT NOT NULL,
        status TEXT NOT NULL,
        desired TEXT NOT NULL DEFAULT 'running',
        phase TEXT,
        bytes_done INTEGER NOT NULL DEFAULT 0,
        bytes_total INTEGER NOT NULL DEFAULT 0,
        url TEXT,
        port INTEGER,
        pid INTEGER,
        device TEXT,
        api_key_hash TEXT,
        reason TEXT,
        restarts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE status_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL, status TEXT NOT NULL, phase TEXT, reason TEXT, at REAL NOT NULL
    );
    CREATE INDEX status_history_name ON status_history(name, id);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT, kind TEXT NOT NULL, message TEXT NOT NULL, at REAL NOT NULL
    );
    CREATE TABLE slots (device TEXT PRIMARY KEY, endpoint TEXT NOT NULL UNIQUE, claimed_at REAL NOT NULL);
    """,
    # 2: quantize on deploy: decoder layers done of total in the `quantizing` phase
    """
    ALTER TABLE endpoints ADD COLUMN layers_done INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE endpoints ADD COLUMN layers_total INTEGER NOT NULL DEFAULT 0;
    """,
]


class SlotUnavailable(RuntimeError):
    """Every device slot of the wanted kind is claimed."""


@dataclass
class EndpointRecord:
    """One row of `endpoints`, typed."""

    name: str
    spec: dict[str, Any]
    status: str
    desired: str
    phase: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    layers_done: int = 0
    layers_total: int = 0
    url: str | None = None
    port: int | None = None
    pid: int | None = None
    device: str | None = None
    api_key_hash: str | None = None
    reason: str | None = None
    restarts: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> EndpointRecord:
        d = dict(row)
        d["spec"] = json.loads(d.pop("spec_json"))
        return cls(**d)


_UPDATABLE = {"spec_json", "status", "desired", "phase", "bytes_done", "bytes_total", "layers_done", "layers_total",
              "url", "port",
              "pid", "device", "api_key_hash", "reason", "restarts"}


class Store:
    """Thread-safe access to the service database (one short-lived connection per call)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # owner-only: the database holds key hashes, specs and reasons (SQLite gives -wal/-shm the same mode)
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            self._migrate(conn)
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextmanager
    def tx(self, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; `BEGIN IMMEDIATE` takes the write lock up front so checks and writes can't interleave."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database {self.path} has schema version {version}, newer than this hubdeploy "
                f"({len(MIGRATIONS)}); upgrade hubdeploy or use another --data-dir")
        for i in range(version, len(MIGRATIONS)):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version={i + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        conn = self._connect()
        try:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()

    # --- meta -------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        conn = self._connect()
        try:
            row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            return row[0] if row else None
        finally:
            conn.close()

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as conn:
            conn.execute("INSERT INTO meta(key, value) VALUES(?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # --- endpoints --------------------------------------------------------------------
    def create_endpoint(self, name: str, spec: dict[str, Any], api_key_hash: str | None) -> EndpointRecord:
        """Insert a new endpoint (status `pending`); a `deleted` row of the same name is replaced."""
        now = time.time()
        with self.tx() as conn:
            row = conn.execute("SELECT status FROM endpoints WHERE name=?", (name,)).fetchone()
            if row is not None and row["status"] != "deleted":
                raise KeyError(f"endpoint {name!r} already exists")
            conn.execute("DELETE FROM endpoints WHERE name=?", (name,))
            conn.execute(
                "INSERT INTO endpoints(name, spec_json, status, desired, api_key_hash, created_at, updated_at) "
                "VALUES(?, ?, 'pending', 'running', ?, ?, ?)",
                (name, json.dumps(spec, sort_keys=True), api_key_hash, now, now))
            conn.execute("INSERT INTO status_history(name, status, at) VALUES(?, 'pending', ?)", (name, now))
        rec = self.get_endpoint(name)
        assert rec is not None
        return rec

    def exists(self, name: str) -> bool:
        rec = self.get_endpoint(name)
        return rec is not None and rec.status != "deleted"

    def get_endpoint(self, name: str, with_history: bool = False) -> EndpointRecord | None:
        conn = self._connect()
        try:
            row = conn.execute("SELECT * FROM endpoints WHERE name=?", (name,)).fetchone()
            if row is None:
                return None
            rec = EndpointRecord.from_row(row)
            if with_history:
                rec.history = [dict(r) for r in conn.execute(
                    "SELECT status, phase, reason, at FROM status_history WHERE name=? ORDER BY id", (name,))]
            return rec
        finally:
            conn.close()

    def list_endpoints(self, include_deleted: bool = False) -> list[EndpointRecord]:
        conn = self._connect()
        try:
            q = "SELECT * FROM endpoints" + ("" if include_deleted else " WHERE status != 'deleted'")
            return [EndpointRecord.from_row(r) for r in conn.execute(q + " ORDER BY created_at, name")]
        finally:
            conn.close()

    def update_endpoint(self, name: str, **fields: Any) -> None:
        """Set columns; a change of status or phase is appended to the status history."""
        if "spec" in fields:
            fields["spec_json"] = json.dumps(fields.pop("spec"), sort_keys=True)
        bad = set(fields) - _UPDATABLE
        if bad:
            raise ValueError(f"not endpoint columns: {sorted(bad)}")
        now = time.time()
        with self.tx() as conn:
            old = conn.execute("SELECT status, phase, reason FROM endpoints WHERE name=?", (name,)).fetchone()
            if old is None:
                raise KeyError(name)
            cols = ", ".join(f"{k}=?" for k in fields)
            conn.execute(f"UPDATE endpoints SET {cols}, updated_at=? WHERE name=?",
                         (*fields.values(), now, name))
            new_status = fields.get("status", old["status"])
            new_phase = fields.get("phase", old["phase"])
            if new_status != old["status"] or new_phase != old["phase"]:
                conn.execute("INSERT INTO status_history(name, status, phase, reason, at) VALUES(?, ?, ?, ?, ?)",
                             (name, new_status, new_phase, fields.get("reason", old["reason"]), now))

    def remove_endpoint(self, name: str) -> None:
        """Forget an endpoint that never started (e.g. no free device at create)."""
        with self.tx() as conn:
            conn.execute("DELETE FROM endpoints WHERE name=?", (name,))
            conn.execute("DELETE FROM status_history WHERE name=?", (name,))
            conn.execute("DELETE FROM slots WHERE endpoint=?", (name,))

    def add_event(self, name: str | None, kind: str, message: str) -> None:
        with self.tx() as conn:
            conn.execute("INSERT INTO events(name, kind, message, at) VALUES(?, ?, ?, ?)",
                         (name, kind, message, time.time()))

    def events(self, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        conn = self._connect()
        try:
            if name is None:
                rows = conn.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
            else:
                rows = conn.execute("SELECT * FROM events WHERE name=? ORDER BY id DESC LIMIT ?", (name, limit))
            return [dict(r) for r in rows][::-1]
        finally:
            conn.close()

    # --- device slots -----------------------------------------------------------------
    def claim_slot(self, endpoint: str, candidates: list[str]) -> str:
        """Claim the first free device of `candidates` for `endpoint`, atomically.

        One `BEGIN IMMEDIATE` transaction: two creates racing for the last device
        serialise on the write lock, so only one of them sees it free.
        """
        with self.tx() as conn:
            row = conn.execute("SELECT device FROM slots WHERE endpoint=?", (endpoint,)).fetchone()
            if row is not None:
                return str(row["device"])
            taken = {r["device"] for r in conn.execute("SELECT device FROM slots")}
            for dev in candidates:
                if dev not in taken:
                    conn.execute("INSERT INTO slots(device, endpoint, claimed_at) VALUES(?, ?, ?)",
                                 (dev, endpoint, time.time()))
                    return dev
        raise SlotUnavailable(
            f"all {len(candidates)} device slot(s) of this kind are in use "
            f"({', '.join(candidates) or 'none on this host'}); pause or delete an endpoint first")

    def release_slot(self, endpoint: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM slots WHERE endpoint=?", (endpoint,))

    def claimed_slots(self) -> dict[str, str]:
        conn = self._connect()
        try:
            return {r["device"]: r["endpoint"] for r in conn.execute("SELECT device, endpoint FROM slots")}
        finally:
            conn.close()
