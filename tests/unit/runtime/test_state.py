import sqlite3
import stat

import pytest

from node.base.identity import Identity
from node.base.records import MAX_STORED_INT, Capabilities, decode_record, sign_record
from node.runtime.state import SCHEMA_VERSION, State, StateError


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


def test_raise_counter_jumps_forward_but_never_back(tmp_path):
    state = State(tmp_path / "state.db")
    assert state.next_counter("seq") == 1
    assert state.raise_counter("seq", 10) == 10
    assert state.raise_counter("seq", 3) == 11
    state.close()


def test_route_claims_snapshot_is_replaced_whole(tmp_path):
    state = State(tmp_path / "state.db")
    state.save_route_claims([b"a", b"b"])
    state.save_route_claims([b"c"])
    assert state.route_claims() == [b"c"]
    state.close()
    assert State(tmp_path / "state.db").route_claims() == [b"c"]


def test_version_one_database_is_migrated(tmp_path):
    import sqlite3

    from node.runtime.state import MIGRATIONS

    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("PRAGMA user_version=1")
    db.execute("INSERT INTO meta VALUES ('record_seq', 7)")
    db.commit()
    db.close()
    state = State(path)
    assert state.schema_version == SCHEMA_VERSION
    assert state.counter("record_seq") == 7
    assert state.route_claims() == []
    state.close()


def test_the_largest_seq_and_expiry_a_record_may_carry_fit_the_state_database(tmp_path):
    # decode_record refuses anything past MAX_STORED_INT: seq = 2**63 used to pass the
    # signature check and then end the agent here, in save_peer
    state = State(tmp_path / "state.db")
    record = decode_record(
        sign_record(
            Identity.generate(),
            endpoints=("198.51.100.10:7946",),
            overlay_address="",
            capabilities=Capabilities(),
            version="0.1.0",
            seq=MAX_STORED_INT,
            expires=MAX_STORED_INT,
        ).blob
    )
    state.save_peer(record.node_id.key, record.seq, record.expires, record.blob)
    assert state.peer_records() == [record.blob]
    with pytest.raises(OverflowError):
        state.save_peer(b"y" * 32, MAX_STORED_INT + 1, 0, b"r")
    state.close()
