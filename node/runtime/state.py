"""Durable node state: one SQLite database in WAL mode, versioned by migrations.

What must survive a crash is committed here before anything that depends on it
leaves the process (persist before you promise). The database runs with
``journal_mode=WAL`` and ``synchronous=FULL``: a commit that returned is on disk.

The schema version is SQLite's ``user_version``. ``MIGRATIONS[i]`` takes the
schema from version ``i`` to ``i + 1``; each runs in its own transaction, so a
crash mid-migration leaves the previous version intact. A database newer than
this code knows is refused rather than guessed at.

The class is synchronous; the agent calls it from a worker thread.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: counters, known peers.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    CREATE TABLE peers (
        node_id BLOB PRIMARY KEY,
        seq INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        record BLOB NOT NULL
    );
    """,
    # 1 -> 2: accepted route claims (the route table's snapshot), in order.
    """
    CREATE TABLE route_claims (position INTEGER PRIMARY KEY, claim BLOB NOT NULL);
    """,
    # 2 -> 3: the market: jobs this node owns (spec, last snapshot, outcome), their
    # segment history (for `gleaner watch`), and the ledgers' journals.
    """
    CREATE TABLE jobs (
        job_id BLOB PRIMARY KEY,
        spec BLOB NOT NULL,
        snapshot BLOB,
        submitted REAL NOT NULL,
        outcome TEXT
    );
    CREATE TABLE job_history (
        job_id BLOB NOT NULL REFERENCES jobs(job_id),
        position INTEGER NOT NULL,
        record BLOB NOT NULL,
        PRIMARY KEY (job_id, position)
    );
    CREATE TABLE ledger_journal (
        side TEXT NOT NULL,
        entry_id INTEGER NOT NULL,
        entry BLOB NOT NULL,
        PRIMARY KEY (side, entry_id)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class StateError(Exception):
    """The state database cannot be opened or used."""


class State:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.Error as exc:
            raise StateError(f"state database {path}: {exc}") from exc
        path.chmod(0o600)
        self._lock = threading.Lock()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise StateError(
                f"schema version {version} is newer than this gleaner knows ({SCHEMA_VERSION})"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            script = MIGRATIONS[target - 1]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, script.split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={target}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def next_counter(self, key: str) -> int:
        """Increment the durable counter `key` and return its new value, committed."""
        return self.raise_counter(key, 0)

    def raise_counter(self, key: str, at_least: int) -> int:
        """Set the durable counter `key` to at least `at_least`, plus one; return it, committed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
                value = max((row[0] if row else 0) + 1, at_least)
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return int(value)

    def save_route_claims(self, blobs: list[bytes]) -> None:
        """Replace the stored route table snapshot, atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM route_claims")
                self._db.executemany(
                    "INSERT INTO route_claims (position, claim) VALUES (?, ?)", enumerate(blobs)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def route_claims(self) -> list[bytes]:
        with self._lock:
            rows = self._db.execute("SELECT claim FROM route_claims ORDER BY position").fetchall()
        return [bytes(row[0]) for row in rows]

    def set_counter(self, key: str, value: int) -> None:
        """Set the durable value `key` (committed when this returns)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def counter(self, key: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def save_peer(self, node_id: bytes, seq: int, expires: int, record: bytes) -> None:
        """Remember a peer's record unless we hold a newer one."""
        with self._lock:
            self._db.execute(
                "INSERT INTO peers (node_id, seq, expires, record) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(node_id) DO UPDATE SET seq = excluded.seq, "
                "expires = excluded.expires, record = excluded.record "
                "WHERE excluded.seq > peers.seq",
                (node_id, seq, expires, record),
            )

    def peer_records(self) -> list[bytes]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM peers ORDER BY node_id").fetchall()
        return [bytes(row[0]) for row in rows]

    def forget_expired_peers(self, now: float) -> int:
        with self._lock:
            cursor = self._db.execute("DELETE FROM peers WHERE expires <= ?", (int(now),))
        return cursor.rowcount

    # -- the market ------------------------------------------------------------------

    def add_job(self, job_id: bytes, spec: bytes, submitted: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (job_id, spec, submitted) VALUES (?, ?, ?)",
                (job_id, spec, submitted),
            )

    def save_job_snapshot(self, job_id: bytes, snapshot: bytes) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET snapshot = ? WHERE job_id = ?", (snapshot, job_id))

    def end_job(self, job_id: bytes, outcome: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET outcome = ? WHERE job_id = ?", (outcome, job_id))

    def jobs(self) -> list[tuple[bytes, bytes, bytes | None, float, str | None]]:
        """(job id, spec, snapshot, submitted, outcome) of every job, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, spec, snapshot, submitted, outcome FROM jobs ORDER BY submitted"
            ).fetchall()
        return [
            (bytes(r[0]), bytes(r[1]), bytes(r[2]) if r[2] is not None else None, r[3], r[4])
            for r in rows
        ]

    def append_job_history(self, job_id: bytes, record: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO job_history (job_id, position, record) VALUES (?, "
                "(SELECT COALESCE(MAX(position), -1) + 1 FROM job_history WHERE job_id = ?), ?)",
                (job_id, job_id, record),
            )

    def job_history(self, job_id: bytes) -> list[bytes]:
        with self._lock:
            rows = self._db.execute(
                "SELECT record FROM job_history WHERE job_id = ? ORDER BY position", (job_id,)
            ).fetchall()
        return [bytes(row[0]) for row in rows]

    def append_journal(self, side: str, entry_id: int, entry: bytes) -> None:
        """Make one ledger journal entry durable (committed when this returns)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO ledger_journal (side, entry_id, entry) VALUES (?, ?, ?)",
                (side, entry_id, entry),
            )

    def journal(self, side: str) -> list[bytes]:
        with self._lock:
            rows = self._db.execute(
                "SELECT entry FROM ledger_journal WHERE side = ? ORDER BY entry_id", (side,)
            ).fetchall()
        return [bytes(row[0]) for row in rows]

    def integrity_check(self) -> str:
        with self._lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
