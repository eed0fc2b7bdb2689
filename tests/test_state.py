import sqlite3
import stat

import pytest

from node.state import SCHEMA_VERSION, State, StateError


def test_fresh_database_is_migrated_private_and_wal(tmp_path):
    state = State(tmp_path / "state.db")
    assert state.schema_version == SCHEMA_VERSION
    assert stat.S_IMODE((tmp_path / "state.db").stat().st_mode) == 0o600
    mode = sqlite3.connect(tmp_path / "state.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert state.integrity_check() == "ok"
    state.close()


def test_counters_are_durable_across_reopen(tmp_path):
    state = State(tmp_path / "state.db")
    assert [state.next_counter("record_seq") for _ in range(3)] == [1, 2, 3]
    state.close()
    again = State(tmp_path / "state.db")
    assert again.next_counter("record_seq") == 4
    assert again.counter("other") == 0
    again.close()


def test_peer_rows_keep_the_newest(tmp_path):
    state = State(tmp_path / "state.db")
    state.save_peer(b"a" * 32, 5, 100, b"five")
    state.save_peer(b"a" * 32, 4, 100, b"four")
    state.save_peer(b"b" * 32, 1, 10, b"one")
    assert state.peer_records() == [b"five", b"one"]
    assert state.forget_expired_peers(50) == 1
    assert state.peer_records() == [b"five"]
    state.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateError, match="newer"):
        State(path)
