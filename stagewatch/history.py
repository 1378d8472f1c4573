"""The history of every attempt, in a small SQLite file in the state folder.

A record is written when an attempt is armed or starts, and completed when it ends, so the
build machine can poll `GET /deploys/ID` from the moment its POST was answered. Timestamps are
RFC 3339 in UTC.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

OUTCOMES = ("succeeded", "rolled_back", "failed", "rejected", "expired", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attempts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    outcome TEXT,
    reason TEXT,
    sha256 TEXT,
    version TEXT,
    previous_sha256 TEXT,
    forced INTEGER NOT NULL DEFAULT 0,
    trigger TEXT NOT NULL,
    armed_until TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    snapshot TEXT,
    steps TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS attempts_by_start ON attempts (started_at DESC);
CREATE INDEX IF NOT EXISTS attempts_by_sha256 ON attempts (sha256, outcome);
"""


def utc_now() -> str:
    """The current time as RFC 3339 UTC with milliseconds: 2026-12-03T18:49:00.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Record:
    """One attempt, as `history --json` and `GET /deploys/ID` show it."""

    id: str
    kind: str
    state: str
    trigger: str
    started_at: str
    outcome: str | None = None
    reason: str | None = None
    sha256: str | None = None
    version: str | None = None
    previous_sha256: str | None = None
    forced: bool = False
    armed_until: str | None = None
    finished_at: str | None = None
    snapshot: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class History:
    """The attempts table; safe to use from several threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        with self._connect() as connection:
            connection.executescript(_SCHEMA)
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @contextlib.contextmanager
    def _connect(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """The one connection of this History, held under its lock for the block.

        Opened once: a connection per call pays for setting up WAL mode and, as the last
        connection to the file closes, for a checkpoint with its fsyncs (about 15 ms a call
        on an ext4 disk; "the last connection to a database" in
        https://www.sqlite.org/wal.html). In autocommit mode an idle connection holds no
        lock, so the command line and the daemon still share the file.
        """
        with self._lock:
            if self._connection is None:
                self._connection = self._open()
            # In WAL mode, NORMAL survives a crash of the agent but may lose the last commits
            # to a power cut (https://www.sqlite.org/pragma.html#pragma_synchronous); FULL
            # fsyncs every commit.
            self._connection.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            yield self._connection

    def _open(self) -> sqlite3.Connection:
        # Several threads of the daemon use the History; the lock keeps them one at a time.
        connection = sqlite3.connect(
            self.path, timeout=10, isolation_level=None, check_same_thread=False
        )
        try:
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
        except BaseException:
            connection.close()
            raise
        return connection

    def save(self, record: Record, durable: bool = True) -> None:
        """Insert or replace the record with this id.

        `durable=False` is for progress on the way (the step a deploy is at): the journal is
        the truth about an unfinished deploy, so such a save need not wait for the disk. The
        save of a finished record is also checkpointed into the database file itself, so that
        between attempts the file alone holds the whole history: a backup of it, or an agent
        that stops, finds nothing waiting in the write-ahead log.
        """
        row = asdict(record)
        row["steps"] = json.dumps(record.steps)
        row["forced"] = int(record.forced)
        columns = ", ".join(row)
        placeholders = ", ".join(f":{name}" for name in row)
        with self._connect(durable) as connection:
            connection.execute(
                f"INSERT OR REPLACE INTO attempts ({columns}) VALUES ({placeholders})",  # noqa: S608 - column names are ours
                row,
            )
            if durable and record.outcome is not None:
                # PASSIVE never waits for a reader (the command line's, say); what a reader
                # holds back is copied by the next durable save's checkpoint.
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def get(self, attempt_id: str) -> Record | None:
        with self._connect() as connection:
            row = connection.execute(
                "SELECT * FROM attempts WHERE id = ?", (attempt_id,)
            ).fetchone()
        return _record_from_row(row) if row is not None else None

    def recent(self, limit: int = 20) -> list[Record]:
        """The newest attempts first."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT * FROM attempts ORDER BY started_at DESC, rowid DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_record_from_row(row) for row in rows]

    def last_finished(self) -> Record | None:
        with self._connect() as connection:
            row = connection.execute(
                "SELECT * FROM attempts WHERE outcome IS NOT NULL "
                "ORDER BY finished_at DESC, rowid DESC LIMIT 1"
            ).fetchone()
        return _record_from_row(row) if row is not None else None

    def rolled_back_attempt(self, sha256: str) -> Record | None:
        """The latest deploy of this release that was rolled back, if any."""
        with self._connect() as connection:
            row = connection.execute(
                "SELECT * FROM attempts WHERE sha256 = ? AND kind = 'deploy' "
                "AND outcome = 'rolled_back' ORDER BY started_at DESC LIMIT 1",
                (sha256,),
            ).fetchone()
        return _record_from_row(row) if row is not None else None

    def unfinished(self) -> list[Record]:
        """Attempts without an outcome (armed, or running when the agent stopped)."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT * FROM attempts WHERE outcome IS NULL ORDER BY started_at"
            ).fetchall()
        return [_record_from_row(row) for row in rows]


def _record_from_row(row: sqlite3.Row) -> Record:
    values = dict(row)
    values["steps"] = json.loads(values["steps"])
    values["forced"] = bool(values["forced"])
    return Record(**values)
