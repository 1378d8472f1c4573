"""snapshot_live_256mib: snapshot a 256 MiB WAL database while another process writes to it.

stagewatch's figure is `snapshot.take_snapshot`, exactly as the deploy's snapshot step calls
it: the online backup from a read-only connection holding one read transaction, the copy
switched to rollback-journal mode, `PRAGMA integrity_check`, fsync, rename, folder fsync,
pruning beyond `keep`. The writer is tests/db_writer.py, its own process inserting about 800
rows a second, each its own transaction.

The references, on the same database under the same writer: the bare pair
`Connection.backup(pages=-1)` plus `PRAGMA integrity_check` on the copy, and the `sqlite3`
command line's `.backup`, which steps 100 pages at a time and starts over at every commit of
another connection, so with a live writer it may never finish: it gets a bounded time.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from common import REPOSITORY, Figure, median, write_back

from stagewatch import snapshot
from stagewatch.config import DatabaseConfig
from stagewatch.heartbeat import detached

DATABASE_BYTES = 256 * 1024 * 1024
WRITER_ROWS_PER_SECOND = 800
ROW_PAYLOAD_BYTES = 1000
KEEP = 3
_SCHEMA = "CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, written_at REAL, payload BLOB)"


def build_database(path: Path, size: int = DATABASE_BYTES) -> None:
    """A WAL database of at least `size` bytes, in the writer's schema, checkpointed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = 16 * 1024 * 1024 // ROW_PAYLOAD_BYTES
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(_SCHEMA)
        while path.stat().st_size < size:
            connection.execute(
                "WITH RECURSIVE counter(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM counter "
                "WHERE n < ?) INSERT INTO rows (written_at, payload) "
                "SELECT unixepoch(), randomblob(?) FROM counter",
                (batch, ROW_PAYLOAD_BYTES),
            )
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class Writer:
    """tests/db_writer.py in its own process; counts the commits it reports."""

    def __init__(self, database: Path, stop_file: Path) -> None:
        self.stop_file = stop_file
        self.commits = 0
        self._process = subprocess.Popen(
            [
                sys.executable,
                str(REPOSITORY / "tests" / "db_writer.py"),
                str(database),
                "--rate",
                str(WRITER_ROWS_PER_SECOND),
                "--stop-file",
                str(stop_file),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._count, daemon=True)
        self._reader.start()

    def _count(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if line.startswith("committed"):
                self.commits += 1

    def rate_over(self, seconds: float) -> float:
        before = self.commits
        time.sleep(seconds)
        return (self.commits - before) / seconds

    def stop(self) -> None:
        self.stop_file.touch()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=5)


@contextlib.contextmanager
def writing(database: Path) -> Iterator[Writer]:
    writer = Writer(database, database.with_name("writer.stop"))
    try:
        deadline = time.monotonic() + 20
        while writer.commits == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield writer
    finally:
        writer.stop()


def ours(database: DatabaseConfig, label: str) -> float:
    started = time.perf_counter()
    snapshot.take_snapshot(database, label, detached("bench"))
    return time.perf_counter() - started


def bare_pair(source: Path, copy: Path) -> float:
    """`Connection.backup(pages=-1)` and `PRAGMA integrity_check` on the copy."""
    copy.unlink(missing_ok=True)
    started = time.perf_counter()
    with (
        contextlib.closing(sqlite3.connect(source)) as live,
        contextlib.closing(sqlite3.connect(copy)) as target,
    ):
        live.backup(target, pages=-1)
        (answer,) = target.execute("PRAGMA integrity_check").fetchone()
    elapsed = time.perf_counter() - started
    if answer != "ok":
        raise RuntimeError(f"the bare backup failed its integrity check: {answer}")
    copy.unlink()
    return elapsed


def command_line_backup(source: Path, copy: Path, timeout: float) -> float | None:
    """`sqlite3 SOURCE ".backup COPY"`; None when it did not finish within `timeout`."""
    copy.unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        subprocess.run(
            ["sqlite3", str(source), f".backup '{copy}'"],
            check=True,
            timeout=timeout,
            capture_output=True,
        )
    except subprocess.TimeoutExpired:
        return None
    finally:
        copy.unlink(missing_ok=True)
    return time.perf_counter() - started


def measure(work: Path, quick: bool) -> list[Figure]:
    folder = work / "snapshot-live"
    source = folder / "data" / "dealspace.db"
    build_database(source)
    database = DatabaseConfig(path=source, snapshot_dir=folder / "snapshots", keep=KEEP)
    repetitions = 3 if quick else 7
    cli_timeout = 20.0 if quick else 60.0

    mine: list[float] = []
    bare: list[float] = []
    with writing(source) as writer:
        rate = writer.rate_over(1.0)
        for repetition in range(repetitions):
            write_back()
            mine.append(ours(database, f"bench{repetition}"))
            write_back()
            bare.append(bare_pair(source, folder / "bare.db"))
        write_back()
        command_line = command_line_backup(source, folder / "cli.db", cli_timeout)
        rate_after = writer.rate_over(1.0)
    size = source.stat().st_size

    note = (
        f"snapshot_live_256mib: a {size / 2**20:.0f} MiB WAL database, the writer committing "
        f"{rate:.0f} rows/s before and {rate_after:.0f} rows/s after; median of {repetitions} "
        f"interleaved runs. The sqlite3 command line's .backup "
        + (
            f"finished in {command_line:.1f} s."
            if command_line is not None
            else f"did not finish within {cli_timeout:g} s (it starts over at every commit)."
        )
    )
    return [
        Figure.against(
            "snapshot_live_256mib",
            median(mine) * 1000,
            "ms",
            "backup(pages=-1) + integrity_check",
            median(bare) * 1000,
            max_ratio=1.2,
            note=note,
        ),
        Figure.against(
            "snapshot_live_256mib",
            median(mine) * 1000,
            "ms",
            f"sqlite3 .backup (timeout {cli_timeout:g} s)",
            command_line * 1000 if command_line is not None else None,
        ),
    ]
