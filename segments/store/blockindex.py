"""The block store's index: which blocks are present, who references them, the manifests.

One SQLite database (``ROOT/index.sqlite``) in WAL mode with
``synchronous=FULL``: a commit that returned is on disk. The schema version is
SQLite's ``user_version``; ``MIGRATIONS[i]`` takes it from ``i`` to ``i + 1`` in
one transaction, and a database newer than this code is refused.

``blocks`` holds every block that is present or referenced: its size (NULL while
absent) and its reference count, the number of stored manifests that list it.
A row with neither size nor references is deleted. ``manifests`` holds each
signed manifest under its digest. The class is synchronous and thread-safe.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: blocks with size and refcount; signed manifests.
    """
    CREATE TABLE blocks (
        digest BLOB PRIMARY KEY,
        size INTEGER,
        refcount INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE manifests (
        digest BLOB PRIMARY KEY,
        producer BLOB NOT NULL,
        created INTEGER NOT NULL,
        total_size INTEGER NOT NULL,
        encoded BLOB NOT NULL
    ) WITHOUT ROWID;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
QUERY_CHUNK = 500


class IndexDatabaseError(Exception):
    """The index database cannot be opened or is newer than this code."""


class BlockIndex:
    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.Error as exc:
            raise IndexDatabaseError(f"block index {path}: {exc}") from exc

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise IndexDatabaseError(f"index schema {version} is newer than {SCHEMA_VERSION}")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction():
                for statement in filter(str.strip, MIGRATIONS[target - 1].split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={target}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def present(self, digests: Iterable[bytes]) -> set[bytes]:
        """The digests among `digests` whose blocks are present."""
        wanted = list(dict.fromkeys(digests))
        found: set[bytes] = set()
        with self._lock:
            for start in range(0, len(wanted), QUERY_CHUNK):
                chunk = wanted[start : start + QUERY_CHUNK]
                rows = self._db.execute(
                    "SELECT digest FROM blocks WHERE size IS NOT NULL "
                    f"AND digest IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                found.update(bytes(row[0]) for row in rows)
        return found

    def mark_present(self, sizes: dict[bytes, int]) -> None:
        with self._transaction():
            self._db.executemany(
                "INSERT INTO blocks (digest, size) VALUES (?, ?) "
                "ON CONFLICT(digest) DO UPDATE SET size = excluded.size",
                sizes.items(),
            )

    def mark_absent(self, digests: Iterable[bytes]) -> int:
        """Record blocks as gone; return how many the index had as present."""
        rows = [(digest,) for digest in digests]
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "UPDATE blocks SET size = NULL WHERE digest = ? AND size IS NOT NULL", rows
            )
            changed = self._db.total_changes - before
            self._db.executemany("DELETE FROM blocks WHERE digest = ? AND refcount <= 0", rows)
        return changed

    def add_manifest(
        self, digest: bytes, producer: bytes, created: int, size: int, encoded: bytes,
        blocks: Iterable[bytes],
    ) -> bool:  # fmt: skip
        """Store a manifest and count its distinct blocks up; False if already held."""
        with self._transaction():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO manifests VALUES (?, ?, ?, ?, ?)",
                (digest, producer, created, size, encoded),
            )
            if cursor.rowcount == 0:
                return False
            self._db.executemany(
                "INSERT INTO blocks (digest, refcount) VALUES (?, 1) "
                "ON CONFLICT(digest) DO UPDATE SET refcount = refcount + 1",
                [(block,) for block in blocks],
            )
        return True

    def remove_manifest(self, digest: bytes, blocks: Iterable[bytes]) -> None:
        """Forget a manifest and count its distinct blocks down."""
        with self._transaction():
            self._db.execute("DELETE FROM manifests WHERE digest = ?", (digest,))
            self._db.executemany(
                "UPDATE blocks SET refcount = refcount - 1 WHERE digest = ?",
                [(block,) for block in blocks],
            )
            self._db.execute("DELETE FROM blocks WHERE refcount <= 0 AND size IS NULL")

    def manifest(self, digest: bytes) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT encoded FROM manifests WHERE digest = ?", (digest,)
            ).fetchone()
        return bytes(row[0]) if row else None

    def manifest_digests(self) -> list[bytes]:
        with self._lock:
            rows = self._db.execute("SELECT digest FROM manifests ORDER BY created").fetchall()
        return [bytes(row[0]) for row in rows]

    def refcount(self, digest: bytes) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT refcount FROM blocks WHERE digest = ?", (digest,)
            ).fetchone()
        return int(row[0]) if row else 0

    def unreferenced(self) -> dict[bytes, int]:
        """Present blocks that no manifest lists, with their sizes."""
        with self._lock:
            rows = self._db.execute(
                "SELECT digest, size FROM blocks WHERE refcount <= 0 AND size IS NOT NULL"
            ).fetchall()
        return {bytes(digest): int(size) for digest, size in rows}

    def forget_unreferenced(self, digests: Iterable[bytes]) -> None:
        with self._transaction():
            self._db.executemany(
                "DELETE FROM blocks WHERE digest = ? AND refcount <= 0",
                [(digest,) for digest in digests],
            )

    def totals(self) -> tuple[int, int, int]:
        """(present blocks, their bytes, manifests)."""
        with self._lock:
            blocks, size = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM blocks WHERE size IS NOT NULL"
            ).fetchone()
            (manifests,) = self._db.execute("SELECT count(*) FROM manifests").fetchone()
        return int(blocks), int(size), int(manifests)

    def close(self) -> None:
        with self._lock:
            self._db.close()
