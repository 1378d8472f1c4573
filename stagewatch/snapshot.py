"""Snapshots of the service's SQLite database: taken online, checked, published, pruned, restored.

A snapshot is one self-contained SQLite file (rollback-journal mode, no `-wal` beside it) lying
directly in `database.snapshot_dir`, named `<database stem>-<UTC time>-<label>.db`, for example
`dealspace-20261203T184900.123Z-3f2a9c1b.db`: the time has milliseconds, so the names of one
database sort by time. A snapshot is written as `<name>.partial` and renamed only once it is
complete, checked and durable, so a `.db` name always means a good copy.

Taking one, while the service keeps writing:

1. copy with SQLite's online backup API from a read-only connection that holds one read
   transaction for the whole copy, so the copy is one consistent moment of the database;
2. switch the copy to journal_mode DELETE (the backup copies the WAL flag of the header, and a
   WAL file needs its `-wal` and `-shm` to be read) and run `PRAGMA integrity_check` on it;
3. fsync the copy, rename it to its `.db` name, fsync the folder;
4. remove the oldest snapshots beyond `database.keep`, only now that a new one exists.

The live database is only ever read. stagewatch may run as its own user that can read the
database but not write it or its folder; see `_copy_live_database` for how that is handled.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import re
import sqlite3
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from stagewatch.config import DatabaseConfig
from stagewatch.errors import SnapshotError
from stagewatch.fsutil import fsync_directory, remove_if_present, temporary_name
from stagewatch.heartbeat import Heartbeat, detached

logger = logging.getLogger(__name__)

SNAPSHOT_SUFFIX = ".db"
PARTIAL_SUFFIX = ".partial"

# How long to wait for a lock the service holds on the live database (sqlite3_busy_timeout).
BUSY_TIMEOUT_SECONDS = 10.0

# Pages copied per backup step (4 MiB at the default page size); the heartbeat beats per step.
BACKUP_STEP_PAGES = 1024

# Beat the heartbeat every this many SQLite virtual machine instructions of integrity_check.
CHECK_PROGRESS_INSTRUCTIONS = 100_000

# Files SQLite keeps beside a database named X: X-journal, X-wal and X-shm.
SIDE_FILE_SUFFIXES = ("-journal", "-wal", "-shm")

# A copy of a WAL database without a lock is retried this often when the service opens the
# database meanwhile (see `_copy_live_database`).
QUIET_COPY_ATTEMPTS = 3

_TIME_FORMAT = "%Y%m%dT%H%M%S"
_NAME_PATTERN = re.compile(
    r"^(?P<stem>[A-Za-z0-9._-]+)-(?P<time>\d{8}T\d{6}\.\d{3}Z)-(?P<label>[A-Za-z0-9_-]+)\.db$"
)
_UNSAFE_STEM_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
_UNSAFE_LABEL_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_PART_LENGTH = 64

# The header of every SQLite database file, and the offsets of its read and write format
# versions: 1 for rollback-journal mode, 2 for WAL mode (https://www.sqlite.org/fileformat.html).
_HEADER_MAGIC = b"SQLite format 3\x00"
_FORMAT_VERSION_OFFSET = 18
_WAL_FORMAT = b"\x02\x02"
_ROLLBACK_FORMAT = b"\x01\x01"

# The byte range on which every connection of a WAL-mode database holds a shared lock for as
# long as it is open ("SHARED_FIRST" and "SHARED_SIZE" in SQLite's os_unix.c).
_SHARED_LOCK_START = 0x40000000 + 2
_SHARED_LOCK_LENGTH = 510

_COPY_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Snapshot:
    """One published snapshot file."""

    name: str
    path: Path
    size: int
    created_at: datetime


def take_snapshot(
    database: DatabaseConfig, label: str, heartbeat: Heartbeat, *, prune: bool = True
) -> Snapshot | None:
    """Copy the live database into `database.snapshot_dir`, check it, publish it, then prune.

    `label` (a deploy id, or "manual") is carried in the name, reduced to letters, digits,
    `_` and `-`. With `prune=False` the snapshots beyond `database.keep` stay until the caller
    calls `prune_after_success`: a deploy prunes in the background, so that unlinking a large
    old snapshot does not hold up its swap and restart. Returns the new snapshot, or None with a
    warning logged when the database does not exist and `database.missing_ok` is set.
    Raises SnapshotError when the database is missing (otherwise), unreadable, not a
    database, when the copy fails or fails its integrity check, or when the disk is full;
    then no `.partial` file is left behind and the snapshots already there are untouched.
    """
    source = database.path
    if not source.exists():
        if database.missing_ok:
            logger.warning("Skipping the snapshot: database %s does not exist", source)
            return None
        raise SnapshotError(
            f"database {source} does not exist; fix database.path, or set "
            f"database.missing_ok = true to deploy without a snapshot"
        )

    started = time.monotonic()
    snapshot_dir = _ensure_snapshot_dir(database.snapshot_dir)
    _require_free_space(source, snapshot_dir)
    name, created_at, partial = _reserve_partial(snapshot_dir, source, label)
    logger.debug("Copying %s into %s", source, partial)

    try:
        _copy_live_database(source, partial, heartbeat)
        _make_self_contained(partial)
        _check_integrity(partial, heartbeat)
        _publish(partial, snapshot_dir / name)
    except (sqlite3.Error, OSError) as error:
        _discard_partial(partial)
        raise SnapshotError(_describe_failure(error, source, snapshot_dir)) from error
    except BaseException:
        _discard_partial(partial)
        raise

    path = snapshot_dir / name
    snapshot = Snapshot(name, path, path.stat().st_size, created_at)
    logger.debug(
        "Snapshot %s taken in %.2f s (%s, integrity ok)",
        name,
        time.monotonic() - started,
        _format_size(snapshot.size),
    )

    if prune:
        prune_after_success(database)
    return snapshot


def list_snapshots(snapshot_dir: Path) -> list[Snapshot]:
    """The snapshots in `snapshot_dir`, newest first.

    Only regular files whose names have the snapshot form count; partial copies, other files
    and a missing folder (an empty list) are not errors.
    """
    snapshots = [
        snapshot
        for entry in _entries(snapshot_dir)
        if entry.is_file(follow_symlinks=False)
        and (snapshot := _snapshot_from_path(Path(entry.path))) is not None
    ]
    snapshots.sort(key=lambda snapshot: (snapshot.created_at, snapshot.name), reverse=True)
    return snapshots


def prune_snapshots(snapshot_dir: Path, keep: int) -> list[Snapshot]:
    """Remove all but the `keep` newest snapshots; return the removed ones, oldest last.

    Raises ValueError when `keep` is below 1 (the newest snapshot is never removed) and
    SnapshotError naming the file when one cannot be removed.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, not {keep}")

    removed = list_snapshots(snapshot_dir)[keep:]
    for snapshot in removed:
        try:
            remove_if_present(snapshot.path)
        except OSError as error:
            raise SnapshotError(
                f"cannot remove old snapshot {snapshot.path}: {error.strerror}; "
                f"check the permissions of {snapshot_dir}"
            ) from error
        logger.info("Removed old snapshot %s (keeping %d)", snapshot.name, keep)

    if removed:
        fsync_directory(snapshot_dir)

    return removed


def remove_partials(snapshot_dir: Path) -> list[Path]:
    """Remove what an interrupted snapshot left: `*.partial` files and SQLite's files beside them.

    Returns the removed paths; a missing folder has nothing to remove.
    """
    removed = [Path(entry.path) for entry in _entries(snapshot_dir) if _is_partial_name(entry.name)]
    for path in removed:
        remove_if_present(path)
        logger.info("Removed partial snapshot file %s", path.name)
        logger.debug("Removed %s", path)

    if removed:
        fsync_directory(snapshot_dir)

    return removed


def restore_snapshot(
    database: DatabaseConfig,
    name: str,
    *,
    aside: Path | None = None,
    heartbeat: Heartbeat | None = None,
) -> Path:
    """Install the snapshot `name` as the live database; return where the old one was kept.

    The caller stops the service first; a database still held open by a WAL-mode connection
    is refused. The current database keeps its inode, owner and mode under the name
    `<database>.before-restore-<UTC time>` beside it, and its `-wal` (or `-journal`) follows
    it as `<that name>-wal`, so opening the kept copy with sqlite3 shows its last committed
    state. The `-shm` is deleted: it is only an index of the `-wal`, which SQLite rebuilds
    from the `-wal` when the kept copy is opened (https://www.sqlite.org/walformat.html), and
    a stale one must not be left beside the restored file. The restored file gets the
    snapshot's bytes and the owner, group and mode of the database it replaces. `aside`
    names the kept database when the caller chose the name first (`aside_name`), to journal
    it; `heartbeat` beats per chunk copied and checked.

    Raises SnapshotError, with nothing changed, for an unknown name (the message lists the
    known ones), a snapshot that fails `PRAGMA integrity_check`, a missing database (its
    owner and mode are unknown, and a wrong database.path should not be papered over), or a
    database still in use.
    """
    snapshot = find_snapshot(database.snapshot_dir, name)
    live = database.path
    heartbeat = heartbeat or detached("restore")
    started = time.monotonic()
    logger.info("Restoring %s from snapshot %s", live.name, name)
    logger.debug("Restoring %s from %s", live, snapshot.path)

    original = _stat_live_database(live)
    staged = temporary_name(live, "restore")
    try:
        _refuse_if_in_use(live)
        _stage_copy(snapshot.path, staged, original, heartbeat)
        _check_staged_copy(staged, snapshot, heartbeat)
        aside = _install(staged, live, aside or aside_name(live))
    except OSError as error:
        raise SnapshotError(f"cannot restore {live} from {snapshot.path}: {error}") from error
    finally:
        remove_if_present(staged)

    logger.info(
        "Restored %s from %s in %.2f s; the previous database is kept as %s",
        live.name,
        name,
        time.monotonic() - started,
        aside.name,
    )
    return aside


def undo_interrupted_restore(database: DatabaseConfig) -> None:
    """Put back what a restore that died half-way moved; a completed one stays as it is.

    For recovery after an agent died inside `restore_snapshot`. The database is linked
    aside before anything else moves, and replaced last: a name kept aside that is still the
    live database's inode belongs to a restore that never replaced it. Its `-wal` and
    `-journal` go back beside the live database (unless new ones are there), then the second
    name goes; the copy staged beside the database goes too. Running this twice is harmless.
    """
    live = database.path
    changed = False
    for stale in live.parent.glob(f".{glob.escape(live.name)}.restore-*"):
        changed |= remove_if_present(stale)
    try:
        live_inode = live.stat().st_ino
    except FileNotFoundError:
        return

    for aside in live.parent.glob(f"{glob.escape(live.name)}.before-restore-*"):
        if aside.name.endswith(SIDE_FILE_SUFFIXES) or aside.stat().st_ino != live_inode:
            continue
        for suffix in ("-wal", "-journal"):
            kept, current = _side_file(aside, suffix), _side_file(live, suffix)
            if kept.exists() and not current.exists():
                os.rename(kept, current)
        aside.unlink()
        changed = True
        logger.warning("Undid the interrupted restore of %s: its journal files are back", live)
    # Every recovery looks; only one that changed something waits for the disk.
    if changed:
        fsync_directory(live.parent)


def snapshot_name(database_path: Path, label: str, moment: datetime) -> str:
    """The file name of a snapshot of `database_path` taken at `moment` (an aware datetime)."""
    stem = _sanitise(database_path.stem, _UNSAFE_STEM_CHARACTERS) or "database"
    safe_label = _sanitise(label, _UNSAFE_LABEL_CHARACTERS) or "snapshot"
    return f"{stem}-{_format_time(moment)}-{safe_label}{SNAPSHOT_SUFFIX}"


def _sanitise(text: str, unsafe: re.Pattern[str]) -> str:
    # Only characters that need no quoting in a shell or a URI, and no path separators.
    return unsafe.sub("-", text).strip("-.")[:_MAX_PART_LENGTH]


def _format_time(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    return f"{utc.strftime(_TIME_FORMAT)}.{utc.microsecond // 1000:03d}Z"


def _snapshot_from_path(path: Path) -> Snapshot | None:
    match = _NAME_PATTERN.match(path.name)
    if match is None:
        return None

    created_at = datetime.strptime(match["time"], f"{_TIME_FORMAT}.%fZ").replace(tzinfo=UTC)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None

    return Snapshot(name=path.name, path=path, size=size, created_at=created_at)


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as iterator:
            return list(iterator)
    except FileNotFoundError:
        return []


def _is_partial_name(name: str) -> bool:
    return name.endswith(PARTIAL_SUFFIX) or any(
        name.endswith(PARTIAL_SUFFIX + suffix) for suffix in SIDE_FILE_SUFFIXES
    )


def _ensure_snapshot_dir(snapshot_dir: Path) -> Path:
    try:
        snapshot_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise SnapshotError(
            f"cannot create database.snapshot_dir {snapshot_dir}: {error.strerror}"
        ) from error

    return snapshot_dir


def _require_free_space(source: Path, snapshot_dir: Path) -> None:
    # The copy needs at least the size of the main file; refusing early keeps a full disk,
    # which the service may share, from being filled to the last block.
    try:
        needed = source.stat().st_size
        filesystem = os.statvfs(snapshot_dir)
    except OSError as error:
        raise SnapshotError(f"cannot snapshot {source} into {snapshot_dir}: {error}") from error

    free = filesystem.f_bavail * filesystem.f_frsize
    if needed > free:
        raise SnapshotError(
            f"no space left in {snapshot_dir} for a snapshot of {source}: it needs at least "
            f"{_format_size(needed)} and {_format_size(free)} is free; free some space or "
            f"point database.snapshot_dir at a larger filesystem"
        )


def _reserve_partial(snapshot_dir: Path, source: Path, label: str) -> tuple[str, datetime, Path]:
    """Pick a name not yet used and create its empty `.partial` file, mode 0600.

    Returns the name, the time it carries (whole milliseconds) and the partial path.
    """
    now = datetime.now(UTC)
    moment = now.replace(microsecond=now.microsecond // 1000 * 1000)
    while True:
        name = snapshot_name(source, label, moment)
        partial = snapshot_dir / (name + PARTIAL_SUFFIX)
        if not (snapshot_dir / name).exists():
            with contextlib.suppress(FileExistsError):
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                os.close(os.open(partial, flags, 0o600))
                return name, moment, partial
        moment += timedelta(milliseconds=1)


def _copy_live_database(source: Path, partial: Path, heartbeat: Heartbeat) -> None:
    """Back the live database up into `partial`, never writing beside the live database.

    SQLite can read a WAL database without write access when its `-shm` exists ("Read-Only
    Databases" in https://www.sqlite.org/wal.html), and that is the usual case: the running
    service keeps the `-shm`. When neither `-wal` nor `-shm` exists, no connection has the
    database open and all of it is in the main file; a read-only connection would then have
    to create both (impossible without write access to the folder, and with it the files
    would belong to stagewatch's user, which could lock the service out of them). So that
    case is copied through an `immutable=1` connection, which creates and locks nothing, and
    the copy is kept only if the database was still closed and unchanged afterwards;
    otherwise the service opened it meanwhile, and the next attempt uses its locks.
    """
    for _attempt in range(QUIET_COPY_ATTEMPTS):
        if not _is_closed_wal_database(source):
            _backup(source, _open_live(source, immutable=False), partial, heartbeat)
            return

        before = _file_identity(source)
        _backup(source, _open_live(source, immutable=True), partial, heartbeat)
        if _is_closed_wal_database(source) and _file_identity(source) == before:
            return
        logger.info("Database %s was opened while copied; copying it again", source.name)

    raise SnapshotError(
        f"database {source} kept being opened and closed while it was copied; "
        f"retry the snapshot once the service runs steadily"
    )


def _is_closed_wal_database(source: Path) -> bool:
    with source.open("rb") as stream:
        header = stream.read(_FORMAT_VERSION_OFFSET + 2)

    if header and not header.startswith(_HEADER_MAGIC):
        raise SnapshotError(
            f"{source} is not a SQLite database (its header is wrong); check database.path"
        )

    is_wal = header[_FORMAT_VERSION_OFFSET:] == _WAL_FORMAT
    return is_wal and not any(_side_file(source, suffix).exists() for suffix in ("-wal", "-shm"))


def _file_identity(path: Path) -> tuple[int, ...]:
    status = path.stat()
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def _open_live(source: Path, *, immutable: bool) -> sqlite3.Connection:
    """A read-only connection to the live database, inside a read transaction already.

    mode=ro: a read-only connection never checkpoints, so the live file is never written.
    """
    query = "?mode=ro&immutable=1" if immutable else "?mode=ro"
    uri = source.absolute().as_uri() + query
    connection = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
    try:
        connection.execute("BEGIN")
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except BaseException:
        connection.close()
        raise

    return connection


def _backup(
    source: Path, connection: sqlite3.Connection, partial: Path, heartbeat: Heartbeat
) -> None:
    """Copy everything `connection` (to `source`) sees in its read transaction into `partial`.

    A stepwise backup restarts whenever another connection commits, so under a busy writer
    it never ends (sqlite3_backup_step in https://www.sqlite.org/c3ref/backup_finish.html).
    Holding one read transaction across the steps pins the snapshot the backup reads, so it
    finishes in one pass while the heartbeat beats per step. In WAL mode the writer goes on
    meanwhile; in rollback-journal mode it waits for the copy, as it would for any reader.
    """
    started = time.monotonic()
    previous_remaining = sys.maxsize

    def beat_on_progress(status: int, remaining: int, total: int) -> None:
        # More pages left than after the last step means the backup started over; it would
        # go on doing so and never end, so stop it (raising here aborts the backup).
        nonlocal previous_remaining
        if remaining > previous_remaining:
            raise SnapshotError(
                f"the copy into {partial.name} started over because the database changed "
                f"under it; retry the snapshot"
            )
        previous_remaining = remaining
        heartbeat.beat()

    with contextlib.closing(connection), _connect_partial(partial) as target:
        connection.backup(target, pages=BACKUP_STEP_PAGES, progress=beat_on_progress)

    heartbeat.beat()
    logger.debug(
        "Copied %s into %s in %.2f s", source.name, partial.name, time.monotonic() - started
    )


@contextlib.contextmanager
def _connect_partial(partial: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(partial, isolation_level=None)
    try:
        # The copy is fsynced once when complete; syncing each backup step would only slow it.
        connection.execute("PRAGMA synchronous=OFF")
        yield connection
    finally:
        connection.close()


def _make_self_contained(partial: Path) -> None:
    """Put the copy in rollback-journal mode, so it is one file that opens without a `-wal`."""
    with contextlib.closing(sqlite3.connect(partial, isolation_level=None)) as connection:
        # No fsyncs of its own: the copy is fsynced once, whole, before it is published.
        connection.execute("PRAGMA synchronous=OFF")
        (mode,) = connection.execute("PRAGMA journal_mode=DELETE").fetchone()

    with partial.open("rb") as stream:
        header = stream.read(_FORMAT_VERSION_OFFSET + 2)
    leftovers = [suffix for suffix in SIDE_FILE_SUFFIXES if _side_file(partial, suffix).exists()]
    if mode != "delete" or (header and header[_FORMAT_VERSION_OFFSET:] != _ROLLBACK_FORMAT):
        raise SnapshotError(f"the copy {partial} stayed in journal mode {mode}")
    if leftovers:
        raise SnapshotError(f"the copy {partial} left {', '.join(leftovers)} files beside it")


def _check_integrity(path: Path, heartbeat: Heartbeat) -> None:
    """Raise SnapshotError unless `PRAGMA integrity_check` on `path` answers exactly "ok"."""
    started = time.monotonic()

    def beat() -> int:
        heartbeat.beat()
        return 0

    # immutable=1: the file is private to stagewatch, so nothing is locked or created beside it.
    uri = path.absolute().as_uri() + "?mode=ro&immutable=1"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
            connection.set_progress_handler(beat, CHECK_PROGRESS_INSTRUCTIONS)
            answer = [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]
    except sqlite3.Error as error:
        answer = [str(error)]

    if answer != ["ok"]:
        raise SnapshotError(
            f"the copy {path.name} failed PRAGMA integrity_check: {'; '.join(answer[:3])}"
        )

    heartbeat.beat()
    logger.debug("Checked %s in %.2f s: integrity ok", path.name, time.monotonic() - started)


def _publish(partial: Path, final: Path) -> None:
    started = time.monotonic()
    _fsync_file(partial)
    os.rename(partial, final)
    fsync_directory(final.parent)
    logger.debug("Published %s in %.2f s", final.name, time.monotonic() - started)
    logger.debug("Renamed %s to %s", partial, final)


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _discard_partial(partial: Path) -> None:
    for path in (partial, *(_side_file(partial, suffix) for suffix in SIDE_FILE_SUFFIXES)):
        with contextlib.suppress(OSError):
            if remove_if_present(path):
                logger.debug("Removed %s", path)


def prune_after_success(database: DatabaseConfig) -> None:
    """Prune beyond `database.keep` after a snapshot succeeded, logging instead of raising."""
    # The new snapshot is good; a failure to remove an old one must not fail the deploy.
    try:
        prune_snapshots(database.snapshot_dir, database.keep)
    except (SnapshotError, OSError) as error:
        logger.warning("Old snapshots were not pruned, the next snapshot retries: %s", error)


def _describe_failure(error: sqlite3.Error | OSError, source: Path, snapshot_dir: Path) -> str:
    error_name = getattr(error, "sqlite_errorname", "")
    if error_name == "SQLITE_FULL" or getattr(error, "errno", None) == errno.ENOSPC:
        return (
            f"no space left in {snapshot_dir} while copying {source} ({error}); free some "
            f"space or point database.snapshot_dir at a larger filesystem"
        )
    if error_name == "SQLITE_NOTADB":
        return f"{source} is not a SQLite database ({error}); check database.path"
    if error_name.startswith("SQLITE_BUSY"):
        return (
            f"database {source} stayed locked for more than {BUSY_TIMEOUT_SECONDS:g} s "
            f"({error}); retry when the service is less busy"
        )
    if error_name.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY")):
        return _describe_open_failure(error, source)

    return f"cannot copy {source} into {snapshot_dir}: {error}"


def _describe_open_failure(error: sqlite3.Error | OSError, source: Path) -> str:
    if _side_file(source, "-wal").exists() and not _side_file(source, "-shm").exists():
        # A -wal without its -shm: the service died and the index went missing. Reading the
        # -wal needs a new -shm, which only a process that may write the folder can create.
        return (
            f"cannot read {source}: its -wal holds transactions, and reading them needs a "
            f"-shm file that stagewatch cannot create in {source.parent} ({error}); start "
            f"the service once so that it recovers the -wal, or let stagewatch write to "
            f"{source.parent}"
        )

    return (
        f"cannot open {source} read-only ({error}); give stagewatch read access to it, to "
        f"its -wal and -shm files and to their folder"
    )


def _side_file(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _format_size(size: int) -> str:
    mebibytes = size / (1024 * 1024)
    if mebibytes >= 10:
        return f"{mebibytes:.0f} MiB"
    if mebibytes >= 0.1:
        return f"{mebibytes:.1f} MiB"
    return f"{size / 1024:.0f} KiB"


def find_snapshot(snapshot_dir: Path, name: str) -> Snapshot:
    """The snapshot called `name`; SnapshotError listing the known ones when there is none."""
    snapshots = list_snapshots(snapshot_dir)
    for snapshot in snapshots:
        if snapshot.name == name:
            return snapshot

    if not snapshots:
        raise SnapshotError(f"no snapshot named {name!r}: there are none in {snapshot_dir}")
    known = ", ".join(snapshot.name for snapshot in snapshots)
    raise SnapshotError(f"no snapshot named {name!r} in {snapshot_dir}; known: {known}")


def _stat_live_database(live: Path) -> os.stat_result:
    try:
        status = live.stat()
    except FileNotFoundError:
        raise SnapshotError(
            f"database {live} does not exist, so its owner and mode are unknown; check "
            f"database.path, or copy the snapshot into place by hand and chown it"
        ) from None
    except OSError as error:
        raise SnapshotError(f"cannot read the status of database {live}: {error}") from error

    if not stat.S_ISREG(status.st_mode):
        raise SnapshotError(f"database {live} is not a regular file; check database.path")

    return status


def _refuse_if_in_use(live: Path) -> None:
    """Raise SnapshotError if another process holds the database open in WAL mode.

    Every WAL-mode connection keeps a shared lock on the database file while it is open, so
    a write lock on the same bytes is refused while the service still runs. A connection in
    rollback-journal mode holds no lock between transactions and cannot be seen this way.
    """
    descriptor = os.open(live, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.lockf(
            descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB, _SHARED_LOCK_LENGTH, _SHARED_LOCK_START
        )
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise SnapshotError(
            f"database {live} is still open in another process; stop the service "
            f"before restoring a snapshot"
        ) from None
    finally:
        # Closing the descriptor releases the lock (fcntl(2), "Advisory record locking").
        os.close(descriptor)


def _stage_copy(
    snapshot: Path, staged: Path, original: os.stat_result, heartbeat: Heartbeat
) -> None:
    """Copy the snapshot beside the database, durable, with the database's owner and mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    descriptor = os.open(staged, flags, 0o600)
    with snapshot.open("rb") as source, os.fdopen(descriptor, "wb") as target:
        while chunk := source.read(_COPY_CHUNK_BYTES):
            target.write(chunk)
            heartbeat.beat()
        target.flush()
        os.fchown(target.fileno(), original.st_uid, original.st_gid)
        os.fchmod(target.fileno(), stat.S_IMODE(original.st_mode))
        os.fsync(target.fileno())


def _check_staged_copy(staged: Path, snapshot: Snapshot, heartbeat: Heartbeat) -> None:
    try:
        _check_integrity(staged, heartbeat)
    except SnapshotError as error:
        raise SnapshotError(
            f"snapshot {snapshot.path} is damaged and was not restored ({error}); "
            f"restore another one"
        ) from error


def _install(staged: Path, live: Path, aside: Path) -> Path:
    """Keep the live database and its `-wal`/`-journal` aside, then rename `staged` over it.

    The side files go first: SQLite replays a `-wal` or a hot `-journal` into whatever
    database file it finds beside them, so a stale one must never meet the restored file.
    The database itself is kept aside as a second name (a hard link) of its inode, so the
    database path holds a complete file at every moment. Each completed move records its
    undo; a failure undoes them in reverse.
    """
    undo: list[Callable[[], object]] = []
    try:
        os.link(live, aside)
        undo.append(lambda: remove_if_present(aside))
        for suffix in ("-wal", "-journal"):
            _move_side_file(live, aside, suffix, undo)
        remove_if_present(_side_file(live, "-shm"))
        os.replace(staged, live)
    except BaseException:
        for action in reversed(undo):
            with contextlib.suppress(OSError):
                action()
        raise

    fsync_directory(live.parent)
    logger.debug("Kept %s aside as %s", live, aside)
    return aside


def _move_side_file(live: Path, aside: Path, suffix: str, undo: list[Callable[[], object]]) -> None:
    current, kept = _side_file(live, suffix), _side_file(aside, suffix)
    if not current.exists():
        return

    os.rename(current, kept)
    undo.append(lambda: os.rename(kept, current))
    logger.debug("Kept %s aside as %s", current, kept)


def aside_name(live: Path) -> Path:
    """A free name beside the live database to keep it under during a restore."""
    moment = datetime.now(UTC)
    while True:
        aside = live.with_name(f"{live.name}.before-restore-{_format_time(moment)}")
        if not any(_side_file(aside, suffix).exists() for suffix in ("", *SIDE_FILE_SUFFIXES)):
            return aside
        moment += timedelta(milliseconds=1)
