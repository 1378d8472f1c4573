"""Watching the staging folder: report each pair of files once it has settled.

The build machine pushes `<artifact>` and `<artifact>.sha256` into the staging folder (scp,
sftp, rsync, cp). The pair is settled when both names exist and two looks `settle_seconds`
apart see the same identity (inode, size, mtime_ns, by lstat(2)) for both, with no event
touching either name in between. Each settled identity pair is reported once; a new push is a
new identity and is reported again.

Events only schedule looks; the folder is the truth. Events can be lost (the kernel drops them
when its queue is full, see IN_Q_OVERFLOW in inotify(7)) and they do not say that a file is
complete: a killed scp closes its file too. A writer that pauses for longer than
`settle_seconds` looks finished; choosing `settle_seconds` above the longest pause of the
uploads is the operator's part.

The staging folder may be missing at start, removed, or renamed away and replaced. The nearest
existing folder above it is watched as well, so that its (re)appearance is noticed; the watch
then moves to the new folder, which is looked at again. A folder further up renamed away,
staging folder and all, is noticed only at the next `rescan()`, since inotify reports a rename
to the watches of the folder holding the name, and that one is not watched.

Threads: watchdog's observer hands events to `_EventRouter`, which only sets a flag. One thread
of ours does every look, every change of watch and every call to `on_settled`. It waits on a
condition, with a timeout only while a settle is pending: an idle watcher wakes nobody.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MOVED,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD

from stagewatch.config import StagingConfig
from stagewatch.errors import ConfigError
from stagewatch.heartbeat import Heartbeats

logger = logging.getLogger(__name__)

PROBE_NAME = "watcher"

# Whatever can change what a look sees in the staging folder. Opening a file and closing it
# unwritten are left out, so that the verify step reading the staged files wakes nobody.
_STAGING_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]

# In the folder above, only names appearing and disappearing matter.
_PARENT_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]

# Event types after which the folder at the event's source path is no longer the one watched.
_GONE_EVENT_TYPES = frozenset({EVENT_TYPE_DELETED, EVENT_TYPE_MOVED})

# Each join of stop() gets this long, so that stop() ends within about two seconds.
_JOIN_SECONDS = 0.9


@dataclass(frozen=True)
class FileIdentity:
    """What one look sees of a staged name, by lstat(2): a symlink is not followed."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        """The identity of `path` now; raise OSError (FileNotFoundError if it is absent)."""
        status = os.lstat(path)
        return cls(inode=status.st_ino, size=status.st_size, mtime_ns=status.st_mtime_ns)


@dataclass(frozen=True)
class StagedPair:
    """The artifact and its checksum file, as one look saw them."""

    artifact: FileIdentity
    checksum: FileIdentity

    def by_name(self, staging: StagingConfig) -> dict[str, list[int]]:
        """The pair as a journal entry records it: file name to [inode, size, mtime_ns]."""
        return {
            staging.artifact: [self.artifact.inode, self.artifact.size, self.artifact.mtime_ns],
            staging.checksum_name: [
                self.checksum.inode,
                self.checksum.size,
                self.checksum.mtime_ns,
            ],
        }


@dataclass(frozen=True)
class _Candidate:
    """A pair seen at `seen_at` (monotonic seconds) with no event touching it since."""

    pair: StagedPair
    seen_at: float


@dataclass(frozen=True)
class _Watched:
    """A folder being watched, and the (st_dev, st_ino) it had when the watch was placed."""

    path: Path
    identity: tuple[int, int]
    watch: ObservedWatch

    def matches(self, path: Path, identity: tuple[int, int] | None) -> bool:
        return (self.path, self.identity) == (path, identity)


class _InotifyDescriptor(InotifyFD):
    """watchdog's inotify reader thread, which also tells us when the kernel queue overflowed.

    watchdog 7.1 handles IN_Q_OVERFLOW inside `InotifyFD.handle_event`: it logs a warning and
    drops the move events it held back, but queues no event for handlers, so a handler cannot
    learn that events were lost. This adds that one signal, after watchdog's own handling.
    """

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__()
        self._on_overflow = on_overflow

    def handle_event(self, event: InotifyEvent) -> None:
        super().handle_event(event)
        if event.is_queue_overflow:
            self._on_overflow()


class _StoppedEmitterNoise(logging.Filter):
    """Drops the one error line watchdog 7.1 logs for an emitter that was stopped on purpose.

    watchdog holds each IN_MOVED_FROM back for 0.5 s to pair it with its IN_MOVED_TO. When a
    watch is stopped within that time (a file moved out of staging just before the agent
    stops, or the folder removed), the held event still comes out after the stop, and
    watchdog logs "queue_events() called when the thread is inactive" at error level before
    dropping it. The line is logged in no other case, and nothing is wrong then.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _STOPPED_EMITTER_MESSAGE


_STOPPED_EMITTER_MESSAGE = "InotifyEmitter.queue_events() called when the thread is inactive"
_STOPPED_EMITTER_NOISE = _StoppedEmitterNoise()


class _Observer(BaseObserver):
    """An inotify observer built on `_InotifyDescriptor`, as watchdog's InotifyObserver is on
    InotifyFD; it owns the descriptor and stops it with itself."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        # Adding the same filter again is a no-op (logging.Filterer.addFilter).
        logging.getLogger("watchdog.observers.inotify").addFilter(_STOPPED_EMITTER_NOISE)
        self.descriptor = _InotifyDescriptor(on_overflow)
        self.descriptor.start()
        super().__init__(InotifyEmitter, inotify_fd=self.descriptor)

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self.descriptor.stop()
        self.descriptor.join(timeout=_JOIN_SECONDS)


class _EventRouter(FileSystemEventHandler):
    """Sorts events into 'a staged name changed' and 'the folder may be gone, back or new'.

    `on_folder(gone=True)` means that the staging folder or a folder above it was removed or
    renamed away: its watch is dead even if a new folder in its place looks the same, since
    ext4 gives a freed inode number to the next folder created. Runs on the observer's
    thread, so it decides nothing: it only wakes the watcher's thread.
    """

    def __init__(
        self,
        pair_paths: frozenset[str],
        folder_chain: frozenset[str],
        on_files: Callable[[], None],
        on_folder: Callable[[bool], None],
    ) -> None:
        self._pair_paths = pair_paths
        self._folder_chain = folder_chain
        self._on_files = on_files
        self._on_folder = on_folder

    def on_any_event(self, event: FileSystemEvent) -> None:
        source = os.fsdecode(event.src_path)
        paths = {source, os.fsdecode(event.dest_path)}
        if paths & self._pair_paths:
            self._on_files()
        elif paths & self._folder_chain:
            gone = source in self._folder_chain and event.event_type in _GONE_EVENT_TYPES
            self._on_folder(gone)


class StagingWatcher:
    """Report each settled pair in the staging folder to `on_settled`, once.

    `on_settled(pair)` is called from the watcher's own thread and must return quickly.
    `heartbeats`, when given, gets a probe named "watcher" that is true while the watcher's
    threads are alive. Call `start()` once and `stop()` once.
    """

    def __init__(
        self,
        staging: StagingConfig,
        on_settled: Callable[[StagedPair], None],
        heartbeats: Heartbeats | None = None,
    ) -> None:
        self._settle_seconds = staging.settle_seconds
        self._on_settled = on_settled
        self._heartbeats = heartbeats

        self._folder = Path(os.path.abspath(staging.dir))
        self._artifact_path = self._folder / staging.artifact
        self._checksum_path = self._folder / staging.checksum_name
        self._router = _EventRouter(
            pair_paths=frozenset({str(self._artifact_path), str(self._checksum_path)}),
            folder_chain=frozenset(str(path) for path in (self._folder, *self._folder.parents)),
            on_files=self._notice_files,
            on_folder=self._notice_folder,
        )

        # Set by any thread, under the condition's lock.
        self._condition = threading.Condition()
        self._files_changed = False
        self._folder_changed = False
        self._folder_gone = False
        self._stopping = False

        # Owned by the watcher's thread (and by start() before that thread exists).
        self._observer: _Observer | None = None
        self._thread: threading.Thread | None = None
        self._staging_watch: _Watched | None = None
        self._parent_watch: _Watched | None = None
        self._missing_announced = False
        self._candidate: _Candidate | None = None
        self._deadline: float | None = None

        # Written by the watcher's thread only; waiting() reads it from others.
        self._reported: StagedPair | None = None

    def start(self) -> None:
        """Watch the staging folder (creating nothing) and look at it at once.

        Returns once the folder is watched, or once its absence is logged and the folder
        above it is watched. Raises ConfigError if inotify itself is unavailable.
        """
        try:
            observer = _Observer(self._notice_overflow)
        except OSError as error:
            hint = " (raise the sysctl fs.inotify.max_user_instances)"
            raise ConfigError(
                f"staging.dir: cannot watch {self._folder}: {error.strerror}"
                f"{hint if error.errno == errno.EMFILE else ''}"
            ) from None
        observer.start()
        self._observer = observer

        self._follow_folder(forget=False)
        with self._condition:
            self._files_changed = True
        self._thread = threading.Thread(target=self._run, name="stagewatch-watcher", daemon=True)
        self._thread.start()

        if self._heartbeats is not None:
            self._heartbeats.add_probe(PROBE_NAME, self.is_alive)

    def rescan(self) -> None:
        """Look at the folder now (and check that the watch still follows it); returns at once.

        A rescan does not restart a quiet period: a pair already quiet for `settle_seconds`
        and not yet reported is reported right away.
        """
        self._notice_folder(gone=False)

    def stop(self) -> None:
        """Stop watching and join every thread of the watcher, within about two seconds."""
        if self._heartbeats is not None:
            self._heartbeats.remove_probe(PROBE_NAME)

        with self._condition:
            self._stopping = True
            self._condition.notify()

        if self._thread is not None:
            self._thread.join(timeout=_JOIN_SECONDS)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=_JOIN_SECONDS)

    def waiting(self) -> StagedPair | None:
        """The settled pair last reported, if the staging folder still holds exactly it."""
        reported = self._reported
        if reported is None or self._read_pair() != reported:
            return None

        return reported

    def is_alive(self) -> bool:
        """Whether the watcher's thread and watchdog's threads under it are all running."""
        thread, observer = self._thread, self._observer
        return (
            thread is not None
            and thread.is_alive()
            and observer is not None
            and observer.is_alive()
            and observer.descriptor.is_alive()
        )

    # Called from other threads: they only set flags and wake the watcher's thread.

    def _notice_files(self) -> None:
        with self._condition:
            self._files_changed = True
            self._condition.notify()

    def _notice_folder(self, gone: bool) -> None:
        with self._condition:
            self._folder_changed = True
            self._folder_gone |= gone
            self._condition.notify()

    def _notice_overflow(self) -> None:
        logger.warning(
            "The inotify queue overflowed and events were lost; looking at %s again",
            self._folder,
        )
        with self._condition:
            self._files_changed = True
            self._folder_changed = True
            self._condition.notify()

    # The watcher's thread.

    def _run(self) -> None:
        try:
            while self._next_round():
                pass
        except Exception:
            # The heartbeat probe now reports the watcher dead, so the systemd watchdog
            # restarts the agent rather than leave staging unwatched.
            logger.exception("The staging watcher failed and stopped watching %s", self._folder)

    def _next_round(self) -> bool:
        """Wait for news or for the pending look; handle it; return False once stopping."""
        with self._condition:
            self._condition.wait_for(self._has_news, timeout=self._seconds_to_deadline())
            if self._stopping:
                return False

            files_changed, folder_changed = self._files_changed, self._folder_changed
            folder_gone = self._folder_gone
            self._files_changed = self._folder_changed = self._folder_gone = False

        if folder_changed and self._follow_folder(forget=folder_gone):
            files_changed = True
        self._look(changed=files_changed)
        return True

    def _has_news(self) -> bool:
        return self._stopping or self._files_changed or self._folder_changed

    def _seconds_to_deadline(self) -> float | None:
        if self._deadline is None:
            return None

        return max(0.0, self._deadline - time.monotonic())

    def _look(self, *, changed: bool) -> None:
        """One look: start, continue or complete the quiet period of what is staged now."""
        pair = self._read_pair()
        now = time.monotonic()
        if pair is None:
            self._candidate = None
            self._deadline = None
            return

        candidate = self._candidate
        if changed or candidate is None or candidate.pair != pair:
            self._candidate = _Candidate(pair, now)
            self._deadline = now + self._settle_seconds
            return

        settles_at = candidate.seen_at + self._settle_seconds
        if now < settles_at:
            self._deadline = settles_at
            return

        self._deadline = None
        if pair != self._reported:
            self._reported = pair
            self._report(pair)

    def _report(self, pair: StagedPair) -> None:
        logger.info(
            "Staged pair settled in %s: %s (%d bytes) and %s (%d bytes)",
            self._folder,
            self._artifact_path.name,
            pair.artifact.size,
            self._checksum_path.name,
            pair.checksum.size,
        )
        try:
            self._on_settled(pair)
        except Exception:
            logger.exception("The handler of a settled pair failed; waiting() still offers it")

    def _read_pair(self) -> StagedPair | None:
        try:
            return StagedPair(
                artifact=FileIdentity.of(self._artifact_path),
                checksum=FileIdentity.of(self._checksum_path),
            )
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            logger.warning("Cannot look at %s: %s", error.filename, error.strerror)
            return None

    # Following the folder: which inode the watches are on, and where they should be.

    def _follow_folder(self, *, forget: bool) -> bool:
        """Put the watches where the folders are now; return whether the staging watch moved.

        With `forget`, both watches are placed again even on folders that look unchanged.
        """
        self._follow_parent(forget=forget)
        return self._follow_staging(forget=forget)

    def _follow_parent(self, *, forget: bool) -> None:
        # Looking again after each move: a folder created below the new parent before its
        # watch was in place produced no event, so the next turn of the loop finds it instead.
        while True:
            path, identity = _nearest_folder(self._folder.parent)
            current = self._parent_watch
            if not forget and current is not None and current.matches(path, identity):
                return

            forget = False
            self._unwatch(current)
            self._parent_watch = self._watch(path, identity, _PARENT_EVENTS)
            if self._parent_watch is None:
                return

    def _follow_staging(self, *, forget: bool) -> bool:
        identity = _folder_identity(self._folder)
        current = self._staging_watch
        if not forget and current is not None and current.matches(self._folder, identity):
            return False

        self._unwatch(current)
        self._staging_watch = None
        if identity is None:
            self._announce_missing(was_watched=current is not None)
            return current is not None

        # The identity is taken before the watch is placed: if the folder is replaced in
        # between, the recorded identity is the old one and the next round moves the watch.
        self._staging_watch = self._watch(self._folder, identity, _STAGING_EVENTS)
        if self._staging_watch is not None:
            self._announce_watching(replaced=current is not None)
        return True

    def _announce_missing(self, *, was_watched: bool) -> None:
        if was_watched:
            logger.warning(
                "Staging folder %s was removed; watching for it to come back", self._folder
            )
        elif not self._missing_announced:
            logger.warning(
                "Staging folder %s does not exist (or is not a folder); watching for it to appear",
                self._folder,
            )
        self._missing_announced = True

    def _announce_watching(self, *, replaced: bool) -> None:
        if replaced:
            logger.warning("Staging folder %s was replaced; watching the new one", self._folder)
        elif self._missing_announced:
            logger.info("Staging folder %s is back; watching it again", self._folder)
        else:
            logger.debug("Watching staging folder %s", self._folder)
        self._missing_announced = False

    def _watch(
        self, path: Path, identity: tuple[int, int], events: list[type[FileSystemEvent]]
    ) -> _Watched | None:
        """Place a watch on the folder `path`; None (with the reason logged) if impossible."""
        observer = self._started_observer()

        # watchdog 7.1 reports EACCES from inotify_add_watch(2) as success, with a watch that
        # never fires, so the permission is checked here first.
        if not os.access(path, os.R_OK):
            logger.error(
                "Cannot watch %s: permission denied (the agent's user needs read access)", path
            )
            return None

        try:
            watch = observer.schedule(
                self._router, str(path), event_filter=events, follow_symlink=True
            )
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR):
                # Gone since it was looked at; the event about it starts another round.
                return None
            hint = " (raise the sysctl fs.inotify.max_user_watches)"
            logger.error(
                "Cannot watch %s: %s%s",
                path,
                error.strerror,
                hint if error.errno == errno.ENOSPC else "",
            )
            return None

        return _Watched(path, identity, watch)

    def _unwatch(self, watched: _Watched | None) -> None:
        # watchdog 7.1 stops the emitter of a folder that is deleted (IN_DELETE_SELF) but keeps
        # it scheduled, and scheduling the same path again would reuse that dead emitter: a
        # watch is therefore always unscheduled before its path is watched anew.
        if watched is not None:
            self._started_observer().unschedule(watched.watch)

    def _started_observer(self) -> _Observer:
        if self._observer is None:
            raise RuntimeError("StagingWatcher.start() must be called before watching")

        return self._observer


def _folder_identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the folder at `path`, following symlinks; None if it is none."""
    try:
        status = os.stat(path)
    except OSError:
        return None

    if not stat.S_ISDIR(status.st_mode):
        return None

    return status.st_dev, status.st_ino


def _nearest_folder(path: Path) -> tuple[Path, tuple[int, int]]:
    """The first of `path` and the folders above it that exists, with its identity.

    The search ends at the root folder, which always exists.
    """
    while path != path.parent:
        identity = _folder_identity(path)
        if identity is not None:
            return path, identity
        path = path.parent

    root = os.stat(path)
    return path, (root.st_dev, root.st_ino)
