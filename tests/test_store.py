"""The SQLite store: schema migrations, WAL, history, persistence, and atomic slot claims."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from hubdeploy.hub_integration.store import MIGRATIONS, SlotUnavailable, Store


def test_schema_version_and_wal(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    assert s.schema_version == len(MIGRATIONS)
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"endpoints", "status_history", "events", "slots", "meta"} <= tables
    Store(tmp_path / "db.sqlite")  # opening again migrates nothing and keeps data
    assert s.schema_version == len(MIGRATIONS)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "db.sqlite")
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 5}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this hubdeploy"):
        Store(tmp_path / "db.sqlite")


def test_endpoint_rows_history_and_persistence(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    s.create_endpoint("a", {"name": "a", "model": "org/m"}, api_key_hash="scrypt$x")
    with pytest.raises(KeyError):
        s.create_endpoint("a", {"name": "a"}, None)
    s.update_endpoint("a", status="initializing", phase="downloading", bytes_done=5, bytes_total=10)
    s.update_endpoint("a", bytes_done=10)  # progress only: no history row
    s.update_endpoint("a", phase="loading")
    s.update_endpoint("a", status="failed", reason="boom")
    with pytest.raises(ValueError):
        s.update_endpoint("a", nonsense=1)
    s.add_event("a", "note", "hello")

    again = Store(tmp_path / "db.sqlite")  # a new process would see the same
    rec = again.get_endpoint("a", with_history=True)
    assert rec is not None
    assert (rec.status, rec.phase, rec.bytes_done, rec.bytes_total, rec.reason) == ("failed", "loading", 10, 10, "boom")
    assert [(h["status"], h["phase"]) for h in rec.history] == [
        ("pending", None), ("initializing", "downloading"), ("initializing", "loading"), ("failed", "loading")]
    assert again.events("a")[-1]["message"] == "hello"
    assert rec.spec == {"name": "a", "model": "org/m"}

    s.update_endpoint("a", status="deleted")
    assert again.list_endpoints() == [] and not again.exists("a")
    again.create_endpoint("a", {"name": "a", "model": "org/other"}, None)  # a deleted name is free again
    assert again.get_endpoint("a").spec["model"] == "org/other"


def test_racing_claims_for_the_last_slot(tmp_path: Path) -> None:
    """Many threads, each with its own connection, race for 2 slots: exactly 2 win."""
    path = tmp_path / "db.sqlite"
    Store(path)
    barrier = threading.Barrier(8)
    won: list[str] = []
    lost: list[str] = []

    def claim(i: int) -> None:
        s = Store(path)
        barrier.wait()
        try:
            won.append(s.claim_slot(f"ep{i}", ["cuda:0", "cuda:1"]))
        except SlotUnavailable as e:
            assert "pause or delete" in str(e)
            lost.append(f"ep{i}")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(won) == ["cuda:0", "cuda:1"] and len(lost) == 6
    s = Store(path)
    assert sorted(s.claimed_slots()) == ["cuda:0", "cuda:1"]
    owner = s.claimed_slots()["cuda:0"]
    assert s.claim_slot(owner, ["cuda:0", "cuda:1"]) == "cuda:0"  # idempotent for the owner
    s.release_slot(owner)
    assert s.claim_slot("late", ["cuda:0", "cuda:1"]) == "cuda:0"
