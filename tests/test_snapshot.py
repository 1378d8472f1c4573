"""Snapshots of a real SQLite database, while a real writer process keeps inserting rows."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from stagewatch.config import DatabaseConfig
from stagewatch.errors import SnapshotError
from stagewatch.heartbeat import Heartbeat
from stagewatch.snapshot import (
    Snapshot,
    list_snapshots,
    prune_snapshots,
    remove_partials,
    restore_snapshot,
    snapshot_name,
    take_snapshot,
)

WRITER_SCRIPT = Path(__file__).with_name("db_writer.py")
SCHEMA = "CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, written_at REAL, payload BLOB)"
WRITER_RATE = 800
PAGE_SIZE = 4096
NAME_FORM = re.compile(r"^live-\d{8}T\d{6}\.\d{3}Z-(?P<label>[A-Za-z0-9_-]+)\.db$")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Writer:
    """tests/db_writer.py in its own process; `committed` is the newest row it saw committed."""

    def __init__(self, database: Path, journal_mode: str) -> None:
        self.stop_file = database.with_name(database.name + ".stop-writer")
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(WRITER_SCRIPT),
                str(database),
                "--journal-mode",
                journal_mode,
                "--rate",
                str(WRITER_RATE),
                "--stop-file",
                str(self.stop_file),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.committed = 0
        self._reader = threading.Thread(target=self._read_reports, daemon=True)
        self._reader.start()

    def _read_reports(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.committed = int(line.split()[1])

    def wait_for_rows(self, count: int) -> None:
        wait_for(lambda: self.committed >= count, 20, f"the writer to commit row {count}")

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.stop_file.touch()
        assert self.process.wait(timeout=20) == 0
        self._reader.join(timeout=5)

    def kill(self) -> None:
        """Die like a crashed service: the -wal and -shm stay behind."""
        self.process.kill()
        self.process.wait(timeout=20)
        self._reader.join(timeout=5)


@pytest.fixture
def start_writer() -> Iterator[Callable[[Path, str], Writer]]:
    writers: list[Writer] = []

    def start(database: Path, journal_mode: str = "wal") -> Writer:
        writer = Writer(database, journal_mode)
        writers.append(writer)
        writer.wait_for_rows(1)
        return writer

    yield start

    for writer in writers:
        if writer.is_running():
            writer.kill()


def create_database(path: Path, rows: int, journal_mode: str = "wal") -> None:
    """A database of `rows` rows of about 1 KB, closed cleanly (no -wal or -shm left)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute(f"PRAGMA journal_mode={journal_mode}")
        connection.execute(SCHEMA)
        connection.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO rows (written_at, payload) SELECT 0, randomblob(1000) FROM n",
            (rows,),
        )


def count_rows(path: Path, up_to_id: int = sys.maxsize) -> int:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        query = "SELECT count(*) FROM rows WHERE id <= ?"
        (count,) = connection.execute(query, (up_to_id,)).fetchone()
    return int(count)


def integrity(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return [row[0] for row in connection.execute("PRAGMA integrity_check")]


def format_versions(path: Path) -> bytes:
    """Header bytes 18-19: 01 01 for rollback-journal mode, 02 02 for WAL."""
    with path.open("rb") as stream:
        return stream.read(20)[18:20]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def damage_pages(path: Path, first_page: int, count: int) -> None:
    """Overwrite whole pages after the header page with noise, as a failing disk might."""
    with path.open("r+b") as stream:
        stream.seek(first_page * PAGE_SIZE)
        stream.write(os.urandom(count * PAGE_SIZE))


def partial_files(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".partial" in name)


def fingerprints(snapshots: list[Snapshot]) -> dict[str, str]:
    return {snapshot.name: sha256(snapshot.path) for snapshot in snapshots}


@pytest.fixture
def database(tmp_path: Path) -> DatabaseConfig:
    data = tmp_path / "data"
    data.mkdir()
    return DatabaseConfig(path=data / "live.db", snapshot_dir=tmp_path / "snapshots", keep=7)


@pytest.fixture
def heartbeat() -> Heartbeat:
    return Heartbeat("snapshot", 60.0, last_beat=0.0)


@pytest.mark.parametrize(("journal_mode", "rows"), [("wal", 32_000), ("delete", 6_000)])
def test_snapshot_under_a_live_writer_holds_every_row_committed_before_it_began(
    database: DatabaseConfig,
    heartbeat: Heartbeat,
    start_writer: Callable[[Path, str], Writer],
    journal_mode: str,
    rows: int,
) -> None:
    create_database(database.path, rows, journal_mode)
    writer = start_writer(database.path, journal_mode)
    writer.wait_for_rows(rows + 200)
    committed_before = writer.committed
    started_at = datetime.now(UTC) - timedelta(milliseconds=1)

    snapshot = take_snapshot(database, "3f2a9c1b", heartbeat)

    finished_at = datetime.now(UTC)
    assert snapshot is not None
    writer.wait_for_rows(writer.committed + 50)
    assert writer.is_running()

    assert list_snapshots(database.snapshot_dir) == [snapshot]
    assert NAME_FORM.match(snapshot.name)
    assert snapshot.path == database.snapshot_dir / snapshot.name
    assert snapshot.size == snapshot.path.stat().st_size
    assert started_at <= snapshot.created_at <= finished_at
    assert stat.S_IMODE(snapshot.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(database.snapshot_dir.stat().st_mode) == 0o700
    assert sorted(os.listdir(database.snapshot_dir)) == [snapshot.name]
    assert heartbeat.last_beat > 0

    assert format_versions(snapshot.path) == b"\x01\x01"
    assert integrity(snapshot.path) == ["ok"]
    assert count_rows(snapshot.path, committed_before) == committed_before
    assert sorted(os.listdir(database.snapshot_dir)) == [snapshot.name]

    live_format = b"\x02\x02" if journal_mode == "wal" else b"\x01\x01"
    assert format_versions(database.path) == live_format
    writer.stop()


def test_snapshot_of_a_closed_wal_database_creates_nothing_beside_it(
    database: DatabaseConfig, heartbeat: Heartbeat
) -> None:
    create_database(database.path, 500)
    before = sha256(database.path)

    snapshot = take_snapshot(database, "manual", heartbeat)

    assert snapshot is not None
    assert os.listdir(database.path.parent) == [database.path.name]
    assert sha256(database.path) == before
    assert count_rows(snapshot.path) == 500
    assert format_versions(snapshot.path) == b"\x01\x01"


def test_missing_database_is_an_error_that_names_missing_ok(
    database: DatabaseConfig, heartbeat: Heartbeat
) -> None:
    with pytest.raises(SnapshotError, match=r"live\.db does not exist.*missing_ok"):
        take_snapshot(database, "manual", heartbeat)


def test_missing_database_is_skipped_with_a_warning_when_missing_ok(
    database: DatabaseConfig, heartbeat: Heartbeat, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="stagewatch.snapshot"):
        result = take_snapshot(replace(database, missing_ok=True), "manual", heartbeat)

    assert result is None
    assert "does not exist" in caplog.text
    assert not database.snapshot_dir.exists()


def test_keep_removes_the_oldest_only_after_a_new_snapshot_succeeded(
    database: DatabaseConfig, heartbeat: Heartbeat
) -> None:
    database = replace(database, keep=3)
    create_database(database.path, 50)
    taken: list[Snapshot] = []

    for number in range(5):
        snapshot = take_snapshot(database, f"deploy{number}", heartbeat)
        assert snapshot is not None
        taken.append(snapshot)
        assert len(list_snapshots(database.snapshot_dir)) == min(number + 1, 3)

    newest_three = list(reversed(taken[2:]))
    assert list_snapshots(database.snapshot_dir) == newest_three
    assert not taken[0].path.exists() and not taken[1].path.exists()

    kept = fingerprints(newest_three)
    database.path.write_bytes(os.urandom(64 * 1024))
    with pytest.raises(SnapshotError):
        take_snapshot(database, "deploy5", heartbeat)

    assert list_snapshots(database.snapshot_dir) == newest_three
    assert fingerprints(newest_three) == kept


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("garbage", r"live\.db is not a SQLite database"),
        ("broken pages", r"failed PRAGMA integrity_check"),
    ],
)
def test_failed_snapshot_removes_its_partial_and_leaves_older_snapshots_alone(
    database: DatabaseConfig, heartbeat: Heartbeat, damage: str, message: str
) -> None:
    create_database(database.path, 200)
    older = [take_snapshot(database, label, heartbeat) for label in ("first", "second")]
    before = fingerprints(list_snapshots(database.snapshot_dir))
    assert len(before) == 2 and None not in older

    if damage == "garbage":
        database.path.write_bytes(os.urandom(200 * 1024))
    else:
        damage_pages(database.path, first_page=2, count=30)

    with pytest.raises(SnapshotError, match=message):
        take_snapshot(database, "third", heartbeat)

    assert partial_files(database.snapshot_dir) == []
    assert fingerprints(list_snapshots(database.snapshot_dir)) == before


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, to run out of space for real."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")

    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
        check=True,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_snapshot_larger_than_the_free_space_is_refused_before_copying(
    database: DatabaseConfig, heartbeat: Heartbeat, small_filesystem: Path
) -> None:
    database = replace(database, snapshot_dir=small_filesystem / "snapshots")
    create_database(database.path, 20)
    existing = take_snapshot(database, "small", heartbeat)
    assert existing is not None
    before = sha256(existing.path)
    create_database(database.path, 3_000)

    with pytest.raises(SnapshotError, match=r"no space left.*needs at least 3\.[0-9] MiB"):
        take_snapshot(database, "large", heartbeat)

    assert partial_files(database.snapshot_dir) == []
    assert list_snapshots(database.snapshot_dir) == [existing]
    assert sha256(existing.path) == before


def test_disk_filling_up_during_the_copy_fails_cleanly(
    database: DatabaseConfig, heartbeat: Heartbeat, small_filesystem: Path
) -> None:
    database = replace(database, snapshot_dir=small_filesystem / "snapshots")
    create_database(database.path, 20)
    existing = take_snapshot(database, "small", heartbeat)
    assert existing is not None
    before = sha256(existing.path)

    # The main file stays small while 3 MB of new rows wait in the -wal, so only the copy
    # itself can find out that they do not fit.
    with contextlib.closing(sqlite3.connect(database.path, isolation_level=None)) as holder:
        holder.execute("PRAGMA wal_autocheckpoint=0")
        holder.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) "
            "INSERT INTO rows (written_at, payload) SELECT 1, randomblob(1000) FROM n"
        )
        assert database.path.stat().st_size < 100 * 1024

        with pytest.raises(SnapshotError, match="no space left") as raised:
            take_snapshot(database, "large", heartbeat)

    assert "database or disk is full" in str(raised.value)
    assert partial_files(database.snapshot_dir) == []
    assert list_snapshots(database.snapshot_dir) == [existing]
    assert sha256(existing.path) == before


def test_remove_partials_removes_only_what_an_interrupted_snapshot_left(tmp_path: Path) -> None:
    folder = tmp_path / "snapshots"
    folder.mkdir()
    leftovers = ["live-x.db.partial", "live-x.db.partial-journal", "live-y.db.partial-wal"]
    kept = ["live-20261203T184900.123Z-manual.db", "notes.txt", "partial.txt"]
    for name in leftovers + kept:
        (folder / name).write_bytes(b"x")

    removed = remove_partials(folder)

    assert sorted(path.name for path in removed) == sorted(leftovers)
    assert sorted(os.listdir(folder)) == sorted(kept)
    assert remove_partials(folder) == []
    assert remove_partials(tmp_path / "missing") == []


def test_list_snapshots_is_newest_first_and_ignores_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "snapshots"
    folder.mkdir()
    moment = datetime(2026, 12, 3, 18, 49, 0, 123000, tzinfo=UTC)
    names = [
        snapshot_name(Path("live.db"), "manual", moment + timedelta(seconds=s)) for s in (0, 2, 1)
    ]
    for name in names:
        (folder / name).write_bytes(b"x" * 10)
    (folder / "other.db").write_bytes(b"x")
    (folder / (names[0] + ".partial")).write_bytes(b"x")
    (folder / snapshot_name(Path("live.db"), "folder", moment)).mkdir()
    (folder / snapshot_name(Path("live.db"), "link", moment)).symlink_to(folder / names[0])

    snapshots = list_snapshots(folder)

    assert [snapshot.name for snapshot in snapshots] == [names[1], names[2], names[0]]
    assert snapshots[-1].created_at == moment
    assert snapshots[-1].size == 10
    assert list_snapshots(tmp_path / "missing") == []


def test_snapshot_names_carry_a_sanitised_label_and_sort_by_time() -> None:
    moment = datetime(2026, 12, 3, 18, 49, 0, 123456, tzinfo=UTC)

    assert (
        snapshot_name(Path("/srv/deal space.v2.db"), "../to/ evil\n", moment)
        == "deal-space.v2-20261203T184900.123Z-to-evil.db"
    )
    assert snapshot_name(Path("live.db"), "///", moment).endswith("Z-snapshot.db")
    later = snapshot_name(Path("live.db"), "a", moment + timedelta(milliseconds=1))
    assert snapshot_name(Path("live.db"), "z", moment) < later


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    moment = datetime(2026, 12, 3, tzinfo=UTC)
    for seconds in range(4):
        name = snapshot_name(Path("live.db"), "manual", moment + timedelta(seconds=seconds))
        (tmp_path / name).write_bytes(b"x")
    newest = list_snapshots(tmp_path)[0]

    removed = prune_snapshots(tmp_path, keep=1)

    assert [snapshot.created_at.second for snapshot in removed] == [2, 1, 0]
    assert list_snapshots(tmp_path) == [newest]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_snapshots(tmp_path, keep=0)


def folder_state(folder: Path) -> dict[str, str]:
    return {name: sha256(folder / name) for name in sorted(os.listdir(folder))}


def test_restore_installs_the_snapshot_and_keeps_the_current_database_aside(
    database: DatabaseConfig, heartbeat: Heartbeat, start_writer: Callable[[Path, str], Writer]
) -> None:
    create_database(database.path, 100)
    snapshot = take_snapshot(database, "before-deploy", heartbeat)
    assert snapshot is not None
    writer = start_writer(database.path, "wal")
    writer.wait_for_rows(400)
    writer.kill()
    last_reported = writer.committed
    live_wal = database.path.with_name("live.db-wal")
    assert live_wal.exists() and database.path.with_name("live.db-shm").exists()

    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    for path in database.path.parent.iterdir():
        os.chown(path, nobody, nogroup)
    database.path.chmod(0o640)

    aside = restore_snapshot(database, snapshot.name)

    assert aside.parent == database.path.parent
    assert re.fullmatch(r"live\.db\.before-restore-\d{8}T\d{6}\.\d{3}Z", aside.name)
    assert sorted(os.listdir(database.path.parent)) == sorted(
        [database.path.name, aside.name, aside.name + "-wal"]
    )
    status = database.path.stat()
    assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == (
        nobody,
        nogroup,
        0o640,
    )
    assert sha256(database.path) == sha256(snapshot.path)
    assert count_rows(database.path) == 100
    assert integrity(database.path) == ["ok"]

    assert aside.stat().st_uid == nobody
    assert last_reported <= count_rows(aside) <= last_reported + 1
    assert list_snapshots(database.snapshot_dir) == [snapshot]


def test_restore_keeps_a_leftover_rollback_journal_aside_too(
    database: DatabaseConfig, heartbeat: Heartbeat
) -> None:
    create_database(database.path, 10, journal_mode="delete")
    snapshot = take_snapshot(database, "manual", heartbeat)
    assert snapshot is not None
    journal = database.path.with_name("live.db-journal")
    journal.write_bytes(b"a journal the restored file must never meet")

    aside = restore_snapshot(database, snapshot.name)

    assert not journal.exists()
    assert aside.with_name(aside.name + "-journal").read_bytes().startswith(b"a journal")


def test_restore_of_an_unknown_name_lists_the_known_ones(
    database: DatabaseConfig, heartbeat: Heartbeat
) -> None:
    create_database(database.path, 10)
    with pytest.raises(SnapshotError, match="there are none"):
        restore_snapshot(database, "live-nothing.db")

    snapshot = take_snapshot(database, "manual", heartbeat)
    assert snapshot is not None
    before = folder_state(database.path.parent)

    with pytest.raises(SnapshotError, match=f"known: {re.escape(snapshot.name)}"):
        restore_snapshot(database, "../data/live.db")

    assert folder_state(database.path.parent) == before


def test_restore_refuses_a_damaged_snapshot_and_changes_nothing(
    database: DatabaseConfig, heartbeat: Heartbeat
) -> None:
    create_database(database.path, 200)
    snapshot = take_snapshot(database, "manual", heartbeat)
    assert snapshot is not None
    damage_pages(snapshot.path, first_page=2, count=30)
    with contextlib.closing(sqlite3.connect(database.path, isolation_level=None)) as live:
        live.execute("PRAGMA wal_autocheckpoint=0")
        live.execute("INSERT INTO rows (written_at) VALUES (1)")
        before = folder_state(database.path.parent)

        with pytest.raises(SnapshotError, match="is damaged and was not restored"):
            restore_snapshot(database, snapshot.name)

        assert folder_state(database.path.parent) == before
        assert count_rows(database.path) == 201


def test_restore_refuses_while_the_database_is_still_open(
    database: DatabaseConfig, heartbeat: Heartbeat, start_writer: Callable[[Path, str], Writer]
) -> None:
    create_database(database.path, 10)
    snapshot = take_snapshot(database, "manual", heartbeat)
    assert snapshot is not None
    writer = start_writer(database.path, "wal")
    names_before = sorted(os.listdir(database.path.parent))

    with pytest.raises(SnapshotError, match="still open in another process; stop the service"):
        restore_snapshot(database, snapshot.name)

    assert sorted(os.listdir(database.path.parent)) == names_before
    writer.wait_for_rows(writer.committed + 20)
    writer.stop()
    assert count_rows(database.path) > 10


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder that an unprivileged user can reach (pytest's own tmp_path is root's only)."""
    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root")

    folder = Path(tempfile.mkdtemp(prefix="stagewatch-snapshot-"))
    try:
        folder.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.fixture
def readonly_database(shared_folder: Path) -> DatabaseConfig:
    """A database owned by root, mode 0644, that nobody may read but not write."""
    live = shared_folder / "data"
    live.mkdir(mode=0o755)
    snapshots = shared_folder / "snapshots"
    snapshots.mkdir(mode=0o700)
    os.chown(snapshots, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
    return DatabaseConfig(path=live / "live.db", snapshot_dir=snapshots, keep=3)


def take_snapshot_as_nobody(database: DatabaseConfig) -> dict[str, object]:
    """Run take_snapshot in a forked child that switched to the user nobody, and report."""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        report: dict[str, object] = {}
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
            os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
            report["may_write_folder"] = os.access(database.path.parent, os.W_OK)
            report["may_write_database"] = os.access(database.path, os.W_OK)
            snapshot = take_snapshot(database, "readonly", Heartbeat("snapshot", 60.0))
            report["name"] = snapshot.name if snapshot else None
        except SnapshotError as error:
            report["error"] = str(error)
        except BaseException as error:
            report["unexpected"] = repr(error)
        finally:
            os.write(write_end, json.dumps(report).encode())
            os._exit(0)

    os.close(write_end)
    wait_for(lambda: os.waitpid(child, os.WNOHANG) != (0, 0), 30, "the child to finish")
    with os.fdopen(read_end, "rb") as stream:
        report = json.loads(stream.read())

    assert "unexpected" not in report, report["unexpected"]
    assert report["may_write_folder"] is False
    assert report["may_write_database"] is False
    return report


def test_a_user_who_may_only_read_snapshots_the_live_wal_database(
    readonly_database: DatabaseConfig, start_writer: Callable[[Path, str], Writer]
) -> None:
    database = readonly_database
    create_database(database.path, 300)
    writer = start_writer(database.path, "wal")
    writer.wait_for_rows(500)
    names_before = sorted(os.listdir(database.path.parent))
    assert "live.db-shm" in names_before
    committed_before = writer.committed

    report = take_snapshot_as_nobody(database)

    assert "error" not in report, report["error"]
    copy = database.snapshot_dir / str(report["name"])
    assert copy.stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert integrity(copy) == ["ok"]
    assert count_rows(copy, committed_before) == committed_before
    assert sorted(os.listdir(database.path.parent)) == names_before
    writer.wait_for_rows(writer.committed + 20)
    writer.stop()


def test_a_user_who_may_only_read_snapshots_a_closed_wal_database_without_shm(
    readonly_database: DatabaseConfig,
) -> None:
    database = readonly_database
    create_database(database.path, 300)
    assert format_versions(database.path) == b"\x02\x02"
    assert os.listdir(database.path.parent) == ["live.db"]

    report = take_snapshot_as_nobody(database)

    assert "error" not in report, report["error"]
    assert count_rows(database.snapshot_dir / str(report["name"])) == 300
    assert os.listdir(database.path.parent) == ["live.db"]


def test_a_user_who_may_only_read_is_told_how_to_recover_a_wal_without_its_shm(
    readonly_database: DatabaseConfig, start_writer: Callable[[Path, str], Writer]
) -> None:
    database = readonly_database
    create_database(database.path, 10)
    writer = start_writer(database.path, "wal")
    writer.wait_for_rows(100)
    writer.kill()
    database.path.with_name("live.db-shm").unlink()

    report = take_snapshot_as_nobody(database)

    assert "its -wal holds transactions" in str(report.get("error"))
    assert "start the service once" in str(report.get("error"))
    assert os.listdir(database.snapshot_dir) == []
