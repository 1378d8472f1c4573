"""The deploy state machine: the one place that decides what happens next.

    armed -> verifying -> snapshotting -> swapping -> restarting -> checking -> succeeded
                                                                            -> rolling_back
                                                      rolling_back -> rolled_back | failed

Each stage lives in its own module (verify, snapshot, swap, service, health, rollback); this
module runs them in order from the journal. The journal is written before every step, and every
step is safe to run twice, so recovery after a crash is "run the step in the journal again"
(DESIGN-NOTES.md has the table). The engine knows nothing of inotify or HTTP: the command line
and the daemon both hand it a DeployRequest.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from stagewatch import journal, lock, rollback, snapshot, swap, verify
from stagewatch.config import Config
from stagewatch.errors import (
    ConfigError,
    RecoveryError,
    RejectedError,
    ServiceError,
    SnapshotError,
    StagewatchError,
    SwapError,
)
from stagewatch.health import check_health
from stagewatch.heartbeat import Heartbeat, Heartbeats, detached
from stagewatch.history import History, Record, utc_now
from stagewatch.journal import Entry
from stagewatch.logs import deploy_context
from stagewatch.service import ServiceManager, ServiceState, manager_for

log = logging.getLogger(__name__)

VERIFYING = "verifying"
SNAPSHOTTING = "snapshotting"
SWAPPING = "swapping"
RESTARTING = "restarting"
CHECKING = "checking"
ROLLING_BACK = "rolling_back"
FINISHED = "finished"
# A snapshot restore's own steps; it ends with CHECKING, as a deploy does.
STOPPING = "stopping"
RESTORING = "restoring"
STARTING = "starting"

# Steps whose journal entry a power cut may take back (its folder is not fsynced): the entry
# before leads the recovery to the same place. Nothing has changed before the swap, and an
# entry "swapping" with the new binary installed resumes at the restart as well (the record
# then lacks the swap's line in its steps: that is all a power cut can take from it).
_STEPS_THE_PREVIOUS_ENTRY_RECOVERS = frozenset({VERIFYING, SNAPSHOTTING, RESTARTING})

# How long a step may go without a heartbeat before the watchdog pings stop: the longest wait
# between two beats that is still progress, plus a margin. Copies and snapshots beat per
# chunk, so a fixed leash covers them (one fsync of a large file is the longest wait). Every
# call to the service manager may take up to restart_timeout_seconds (its retries included)
# without a beat: a restart may wait for the state asked for before it and then run, and a
# rollback does the same before its probation.
_MARGIN_SECONDS = 5.0
_CHUNKED_STEP_SILENCE_SECONDS = {
    VERIFYING: 30.0,
    SNAPSHOTTING: 60.0,
    SWAPPING: 30.0,
    RESTORING: 60.0,
}
_MANAGER_CALLS_WITHOUT_A_BEAT = {
    RESTARTING: 2,
    CHECKING: 1,
    ROLLING_BACK: 2,
    STOPPING: 1,
    STARTING: 1,
}


def new_attempt_id() -> str:
    """A sortable, unguessable id: 20261203T184900Z-3f2a9c."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class DeployRequest:
    """What arms a deploy: from the webhook's body, the command line, or complete files alone."""

    id: str | None = None
    sha256: str | None = None
    version: str | None = None
    force: bool = False
    trigger: str = "cli"


class Engine:
    """Runs deploys, rollbacks and restores one at a time, and recovers interrupted ones."""

    def __init__(
        self,
        config: Config,
        manager: ServiceManager | None = None,
        heartbeats: Heartbeats | None = None,
        on_state: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.config = config
        self.manager = manager if manager is not None else manager_for(config.service)
        self.heartbeats = heartbeats
        self.on_state = on_state
        prepare_state_folder(config)
        self.history = History(config.state.history_path)

        # Within one attempt: the verified copy waiting for the swap, and the service's state
        # before the restart (to tell a new main process from the old one). Neither survives a
        # crash, and recovery does without them: it verifies again, or checks health afresh.
        self._pending_copy: verify.VerifiedCopy | None = None
        self._service_state_before: Future[ServiceState] | None = None
        self._snapshot_pruning: Future[None] | None = None

    # The public operations: each takes the lock and first settles an interrupted attempt.

    def deploy(self, request: DeployRequest) -> Record:
        """Deploy what is staged now; return the finished record (any outcome)."""
        with lock.exclusive(self.config.state.lock_path, "deploy"):
            self._recover_locked()
            self._require_staged_pair()
            entry = Entry(
                id=request.id or new_attempt_id(),
                kind="deploy",
                step=VERIFYING,
                started_at=utc_now(),
                expected_sha256=request.sha256,
                version=request.version,
                force=request.force,
                trigger=request.trigger,
                staged_identity=staged_identity(self.config),
            )
            return self._drive(entry)

    def rollback(self, to_prefix: str | None = None) -> Record:
        """Reinstall the previous kept release (or the one named by sha256 prefix) and check it."""
        with lock.exclusive(self.config.state.lock_path, "roll back"):
            self._recover_locked()
            target = self._rollback_target(to_prefix)
            entry = Entry(
                id=new_attempt_id(),
                kind="rollback",
                step=VERIFYING,
                started_at=utc_now(),
                expected_sha256=target.sha256,
                target_sha256=target.sha256,
                trigger="cli",
            )
            return self._drive(entry)

    def recover(self) -> Record | None:
        """Finish or undo an interrupted attempt, if the journal holds one."""
        with lock.exclusive(self.config.state.lock_path, "recover"):
            return self._recover_locked()

    def take_snapshot(self) -> snapshot.Snapshot | None:
        """`snapshots create`: one snapshot now, under the same rules as a deploy's."""
        with lock.exclusive(self.config.state.lock_path, "take a snapshot"):
            self._recover_locked()
            return snapshot.take_snapshot(self.config.database, "manual", detached("snapshot"))

    def restore_snapshot(self, name: str) -> Record:
        """Stop the service, restore the named snapshot, start it again, check health.

        Journaled like a deploy: an agent that dies during it leaves the attempt for the next
        command to finish. The name and the manager's commands are checked before the
        service is touched.
        """
        with lock.exclusive(self.config.state.lock_path, "restore a snapshot"):
            self._recover_locked()
            snapshot.find_snapshot(self.config.database.snapshot_dir, name)
            self._require_stop_and_start()
            entry = Entry(
                id=new_attempt_id(),
                kind="restore",
                step=STOPPING,
                started_at=utc_now(),
                snapshot=name,
                trigger="cli",
            )
            return self._drive(entry)

    # Driving the state machine.

    def _drive(self, entry: Entry) -> Record:
        with deploy_context(entry.id):
            if not entry.steps:
                log.info(
                    "%s started (%s%s)",
                    entry.kind.capitalize(),
                    f"trigger {entry.trigger}",
                    f", version {entry.version}" if entry.version else "",
                )
            while entry.step != FINISHED:
                self._run_step(entry)
            return self._finish(entry)

    def _run_step(self, entry: Entry) -> None:
        # A step begins with its journal entry, so its time includes the writing of it.
        step = entry.step
        started_at = utc_now()
        started = time.monotonic()
        journal.write(
            self.config.state.journal_path,
            entry,
            previous_suffices=step in _STEPS_THE_PREVIOUS_ENTRY_RECOVERS,
        )
        self._save_record(entry, durable=False)
        if self.on_state is not None:
            self.on_state(step, entry.id)

        heartbeat = self._heartbeat(step)
        try:
            next_step, detail = self._step_handler(step)(entry, heartbeat)
            ok = True
        except (StagewatchError, OSError) as error:
            next_step, detail = self._after_failure(entry, describe(error))
            ok = False
        finally:
            heartbeat.close()

        seconds = round(time.monotonic() - started, 3)
        entry.steps.append(
            {"name": step, "started_at": started_at, "seconds": seconds, "ok": ok, "detail": detail}
        )
        level = logging.INFO if ok else logging.ERROR
        log.log(
            level, "Step %s %s in %.2f s: %s", step, "done" if ok else "FAILED", seconds, detail
        )
        entry.step = next_step

    def _step_handler(self, step: str) -> Callable[[Entry, Heartbeat], tuple[str, str]]:
        handlers: dict[str, Callable[[Entry, Heartbeat], tuple[str, str]]] = {
            VERIFYING: self._verify,
            SNAPSHOTTING: self._snapshot,
            SWAPPING: self._swap,
            RESTARTING: self._restart,
            CHECKING: self._check,
            ROLLING_BACK: self._roll_back,
            STOPPING: self._stop_for_restore,
            RESTORING: self._restore_database,
            STARTING: self._start_after_restore,
        }
        return handlers[step]

    def _after_failure(self, entry: Entry, reason: str) -> tuple[str, str]:
        """Decide where a failed step leads: nothing changed yet means rejected, else undo."""
        if entry.kind == "restore":
            return self._after_restore_failure(entry, reason)

        if entry.step == ROLLING_BACK:
            entry.outcome, entry.reason = (
                "failed",
                f"{entry.rollback_reason}; rollback failed: {reason}",
            )
            return FINISHED, reason

        if entry.step in (VERIFYING, SNAPSHOTTING) or not self._new_binary_may_be_installed(entry):
            entry.outcome, entry.reason = "rejected", reason
            self._discard_copy(entry)
            return FINISHED, reason

        entry.rollback_reason = reason
        return ROLLING_BACK, reason

    def _new_binary_may_be_installed(self, entry: Entry) -> bool:
        if entry.step != SWAPPING:
            return True
        return installed_sha256(self.config) != entry.previous_sha256

    # The steps. Each returns the next step and a one-line detail for the log and history.

    def _verify(self, entry: Entry, heartbeat: Heartbeat) -> tuple[str, str]:
        install_path = self.config.service.binary
        verify.remove_stale_copies(install_path)
        entry.previous_sha256 = installed_sha256(self.config)
        self._query_service_state_in_background()

        if entry.kind == "rollback":
            release = swap.find_release(self.config.state.releases_dir, entry.target_sha256 or "")
            entry.new_sha256 = release.sha256
            return SNAPSHOTTING, f"kept release {release.sha256[:12]} found"

        copy = verify.stage_verified_copy(
            self.config.staging,
            install_path,
            entry.expected_sha256,
            heartbeat,
            requested_by="the webhook" if entry.trigger == "webhook" else "--sha256",
        )
        entry.new_sha256 = copy.sha256
        self._pending_copy = copy

        earlier = self.history.rolled_back_attempt(copy.sha256)
        if earlier is not None and not entry.force:
            raise RejectedError(
                f"release {copy.sha256[:12]} was rolled back by attempt {earlier.id} "
                f"({earlier.reason}); push it with force to deploy it again"
            )

        return SNAPSHOTTING, f"sha256 {copy.sha256} matches ({copy.size} bytes)"

    def _snapshot(self, entry: Entry, heartbeat: Heartbeat) -> tuple[str, str]:
        if entry.snapshot and (self.config.database.snapshot_dir / entry.snapshot).exists():
            return SWAPPING, f"snapshot {entry.snapshot} already taken"

        snapshot.remove_partials(self.config.database.snapshot_dir)
        taken = snapshot.take_snapshot(self.config.database, entry.id, heartbeat, prune=False)
        if taken is None:
            return SWAPPING, f"no database at {self.config.database.path}; snapshot skipped"

        entry.snapshot = taken.name
        self._prune_snapshots_in_background()
        return SWAPPING, f"snapshot {taken.name} ({taken.size} bytes, integrity ok)"

    def _swap(self, entry: Entry, heartbeat: Heartbeat) -> tuple[str, str]:
        install_path = self.config.service.binary
        if entry.new_sha256 and installed_sha256(self.config) == entry.new_sha256:
            verify.remove_stale_copies(install_path)
            return RESTARTING, f"{install_path} already holds {entry.new_sha256[:12]}"

        if entry.kind == "rollback":
            releases_dir = self.config.state.releases_dir
            target = swap.find_release(releases_dir, entry.target_sha256 or "")
            kept = swap.keep_current(install_path, releases_dir, heartbeat)
            swap.hold_previous(install_path, releases_dir, kept)
            swap.install_release(target.path, install_path, heartbeat, target.sha256)
        else:
            copy = self._take_pending_copy(entry, heartbeat)
            swap.install(copy, install_path, self.config.state.releases_dir, heartbeat)

        previous = (entry.previous_sha256 or "none")[:12]
        return RESTARTING, f"{install_path} now holds {entry.new_sha256}; previous {previous} kept"

    def _restart(self, entry: Entry, heartbeat: Heartbeat) -> tuple[str, str]:
        if self._service_state_before is None:
            self._query_service_state_in_background()
        self._service_state_before_restart()
        self.manager.restart()
        return CHECKING, f"{self.manager.unit} restarted"

    def _check(self, entry: Entry, heartbeat: Heartbeat) -> tuple[str, str]:
        report = check_health(
            self.manager, self.config.health, heartbeat, self._service_state_before_restart()
        )
        self._service_state_before = None
        entry.outcome, entry.reason = "succeeded", None
        return FINISHED, (
            f"healthy after {report.became_healthy_after_seconds:.1f} s and stable for "
            f"{report.stable_seconds:.1f} s ({report.state.detail})"
        )

    def _roll_back(self, entry: Entry, heartbeat: Heartbeat) -> tuple[str, str]:
        log.warning("Rolling back: %s", entry.rollback_reason)
        detail = rollback.put_back(
            self.config, self.manager, entry.previous_sha256, entry.snapshot, heartbeat
        )
        entry.outcome, entry.reason = "rolled_back", entry.rollback_reason
        return FINISHED, detail

    # A snapshot restore's steps.

    def _stop_for_restore(self, entry: Entry, heartbeat: Heartbeat) -> tuple[str, str]:
        self.manager.stop()
        # Named before the next journal entry, so that a recovery knows what is whose.
        entry.database_aside = snapshot.aside_name(self.config.database.path).name
        return RESTORING, f"{self.manager.unit} stopped"

    def _restore_database(self, entry: Entry, heartbeat: Heartbeat) -> tuple[str, str]:
        live = self.config.database.path
        aside = snapshot.restore_snapshot(
            self.config.database,
            entry.snapshot or "",
            aside=live.with_name(entry.database_aside or ""),
            heartbeat=heartbeat,
        )
        return STARTING, f"{live} restored from {entry.snapshot}; the previous one kept as {aside}"

    def _start_after_restore(self, entry: Entry, heartbeat: Heartbeat) -> tuple[str, str]:
        self.manager.start()
        return CHECKING, f"{self.manager.unit} started"

    def _after_restore_failure(self, entry: Entry, reason: str) -> tuple[str, str]:
        """A restore that failed still leaves the service running, on whichever database."""
        if entry.step in (STOPPING, RESTORING):
            # A failed restore put back what it moved: the old database is live again.
            entry.outcome, entry.reason = "failed", f"{reason}; the database was not replaced"
            try:
                self.manager.start()
            except StagewatchError as error:
                entry.reason += f", and starting {self.manager.unit} again failed: {error}"
        else:
            entry.outcome, entry.reason = "failed", f"restored, but {reason}"
        return FINISHED, reason

    def _require_stop_and_start(self) -> None:
        service = self.config.service
        if service.manager == "command" and (service.stop is None or service.start is None):
            raise ConfigError(
                "service.stop: `snapshots restore` needs service.stop and service.start with "
                'service.manager = "command" (argv lists that stop and start dealspace)'
            )

    # Finishing and recovery.

    def _finish(self, entry: Entry) -> Record:
        self._pending_copy, self._service_state_before = None, None
        journal.write(self.config.state.journal_path, entry)
        # Before the record: whoever sees the outcome finds staging already cleared.
        self._clear_staging_after(entry)
        record = self._save_record(entry)
        swap.release_previous(self.config.service.binary)
        # Before the journal goes: an agent stopped in between prunes again when it recovers.
        if entry.kind != "restore":
            self._prune(entry)
        journal.clear(self.config.state.journal_path)
        if self.on_state is not None:
            self.on_state("idle", None)

        level = logging.INFO if entry.outcome == "succeeded" else logging.ERROR
        log.log(
            level,
            "%s %s%s",
            entry.kind.capitalize(),
            entry.outcome,
            f": {entry.reason}" if entry.reason else "",
        )
        return record

    def _recover_locked(self) -> Record | None:
        entry = journal.read(self.config.state.journal_path)
        if entry is None:
            return None

        with deploy_context(entry.id):
            log.warning(
                "Recovering the %s interrupted at step %s (the agent stopped during it)",
                entry.kind,
                entry.step,
            )
            entry.step = self._resume_step(entry)
            return self._drive(entry)

    def _resume_step(self, entry: Entry) -> str:
        """Where an interrupted attempt goes on: the table in DESIGN-NOTES.md."""
        verify.remove_stale_copies(self.config.service.binary)
        snapshot.remove_partials(self.config.database.snapshot_dir)
        # A restore (its own, or a rollback's with restore_on_rollback) cut short.
        snapshot.undo_interrupted_restore(self.config.database)
        remove_torn_state_files(self.config)

        if entry.step == FINISHED:
            return FINISHED

        if entry.kind == "restore":
            return self._resume_restore(entry)

        if entry.step in (VERIFYING, SNAPSHOTTING):
            return self._resume_before_swap(entry)

        if entry.step == SWAPPING:
            if installed_sha256(self.config) == entry.new_sha256:
                return RESTARTING
            return self._resume_before_swap(entry)

        if entry.step in (RESTARTING, CHECKING):
            if installed_sha256(self.config) != entry.new_sha256:
                entry.rollback_reason = "the agent stopped during the restart"
                return ROLLING_BACK
            return RESTARTING

        if entry.step == ROLLING_BACK:
            return ROLLING_BACK

        raise RecoveryError(f"the journal names an unknown step {entry.step!r}")

    def _resume_restore(self, entry: Entry) -> str:
        """A restore is finished, never undone: the operator asked for it and the service
        may be stopped. A half-done replacement was put back (`_resume_step`): do it again."""
        if entry.step == RESTORING:
            live = self.config.database.path
            aside = live.with_name(entry.database_aside or "")
            return STARTING if _distinct_files(aside, live) else RESTORING

        # A start cut short may have left the service down: start it again before checking.
        return STARTING if entry.step == CHECKING else entry.step

    def _resume_before_swap(self, entry: Entry) -> str:
        """Nothing was changed yet: verify again if the same files are still staged."""
        if entry.kind == "rollback" or staged_identity(self.config) == entry.staged_identity:
            return VERIFYING

        entry.outcome = "rejected"
        entry.reason = (
            "the agent stopped before the swap and the staged files changed or went away "
            "since; nothing was changed on the host"
        )
        entry.staged_identity = None
        return FINISHED

    # Small helpers.

    def _query_service_state_in_background(self) -> None:
        """Ask for the service's state while the release is verified and the database copied.

        The health probation compares the main process after the restart with the one before
        it; the question costs a whole command (an operator's `is_active`, or systemctl), so
        it runs beside the steps that come before the restart instead of delaying it.
        """
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="service-state")
        self._service_state_before = pool.submit(self.manager.state)
        pool.shutdown(wait=False)

    def _prune_snapshots_in_background(self) -> None:
        """Remove the snapshot beyond `keep` beside the swap and restart, not before them."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-pruning")
        self._snapshot_pruning = pool.submit(snapshot.prune_after_success, self.config.database)
        pool.shutdown(wait=False)

    def _service_state_before_restart(self) -> ServiceState | None:
        """The state asked for before the restart; None when it could not be had."""
        if self._service_state_before is None:
            return None
        try:
            return self._service_state_before.result()
        except StagewatchError as error:
            log.warning("The service's state before the restart is unknown: %s", error)
            return None

    def _heartbeat(self, step: str) -> Heartbeat:
        if self.heartbeats is None:
            return detached(step)

        silence = _CHUNKED_STEP_SILENCE_SECONDS.get(step)
        if silence is None:
            calls = _MANAGER_CALLS_WITHOUT_A_BEAT[step]
            silence = calls * self.config.service.restart_timeout_seconds + _MARGIN_SECONDS
        return self.heartbeats.open(f"deploy step {step}", silence)

    def _require_staged_pair(self) -> None:
        staging = self.config.staging
        missing = [
            path.name
            for path in (staging.artifact_path, staging.checksum_path)
            if not os.path.lexists(path)
        ]
        if missing:
            raise NothingStagedError(
                f"nothing to deploy: {' and '.join(missing)} not in {staging.dir}"
            )

    def _rollback_target(self, to_prefix: str | None) -> swap.KeptRelease:
        releases_dir = self.config.state.releases_dir
        if to_prefix:
            return swap.find_release(releases_dir, to_prefix)

        current = installed_sha256(self.config)
        for release in swap.kept_releases(releases_dir):
            if release.sha256 != current:
                return release
        raise SwapError(f"no earlier release is kept in {releases_dir} to roll back to")

    def _take_pending_copy(self, entry: Entry, heartbeat: Heartbeat) -> verify.VerifiedCopy:
        copy, self._pending_copy = self._pending_copy, None
        if copy is None or copy.sha256 != entry.new_sha256 or not copy.path.exists():
            raise SwapError("the verified copy is gone; the release will be verified again")
        return copy

    def _discard_copy(self, entry: Entry) -> None:
        copy, self._pending_copy = self._pending_copy, None
        if copy is not None:
            copy.path.unlink(missing_ok=True)

    def _prune(self, entry: Entry) -> None:
        """Old releases go once the attempt is decided, not before its restart; the snapshot
        beyond `keep` is gone by then (`_prune_snapshots_in_background`).

        Unlinking a large file takes long (a 256 MiB release, a 270 MiB snapshot: a quarter of
        a second each on ext4 with `discard`); the deploy needs neither gone.
        """
        pruning, self._snapshot_pruning = self._snapshot_pruning, None
        if pruning is not None:
            pruning.result()
        elif entry.snapshot is not None:
            # Recovered after a crash: the background pruning of this attempt may not have run.
            snapshot.prune_after_success(self.config.database)

        releases_dir = self.config.state.releases_dir
        try:
            swap.prune_releases(
                releases_dir, self.config.state.keep_releases, protect=entry.previous_sha256
            )
        except OSError as error:
            # An old release left over is retried at the next deploy.
            log.warning("Could not prune kept releases in %s: %s", releases_dir, error.strerror)

    def set_aside_unstarted(self, attempt_id: str, identity: dict[str, list[int]]) -> None:
        """Move the staged pair of an attempt refused before its first step to rejected/ID.

        For the daemon, whose armed attempt is recorded as rejected when it could not even
        journal its first step (a full state folder): its files go where a rejection's go.
        """
        with lock.exclusive(self.config.state.lock_path, "set the rejected files aside"):
            self._clear_staging(attempt_id, identity, rejected=True)

    def _clear_staging_after(self, entry: Entry) -> None:
        if entry.kind == "deploy" and entry.staged_identity is not None:
            self._clear_staging(entry.id, entry.staged_identity, entry.outcome == "rejected")

    def _clear_staging(
        self, attempt_id: str, identity: dict[str, list[int]], rejected: bool
    ) -> None:
        """Remove the pair an attempt used; move a rejected one aside for the operator.

        File by file, so that a recovery after a half-done clear finishes it, and a file
        of a newer push (another inode, size or mtime) stays for the next deploy.
        """
        staging = self.config.staging
        used, newer = [], []
        for path in (staging.artifact_path, staging.checksum_path):
            found = _identity(path)
            if found == identity.get(path.name):
                used.append(path)
            elif found is not None:
                newer.append(path.name)
        if newer:
            log.info("Staging holds a newer %s than this attempt used; left for the next", newer[0])

        if rejected and used:
            destination = self.config.state.rejected_dir / attempt_id
            destination.mkdir(parents=True, exist_ok=True, mode=0o700)
            for path in used:
                shutil.move(path, destination / path.name)
            # A host fault (a full disk, say) rejects a sound release too: say how to retry.
            log.warning(
                "Rejected files moved to %s; to try them again, move them back into %s",
                destination,
                staging.dir,
            )
        elif used:
            for path in used:
                os.unlink(path)
            log.info("Staged files removed from %s", staging.dir)

    def _save_record(self, entry: Entry, durable: bool = True) -> Record:
        existing = self.history.get(entry.id)
        record = Record(
            id=entry.id,
            kind=entry.kind,
            state=entry.step,
            trigger=entry.trigger,
            started_at=entry.started_at,
            outcome=entry.outcome if entry.step == FINISHED else None,
            reason=entry.reason if entry.step == FINISHED else None,
            sha256=entry.new_sha256 or entry.expected_sha256,
            version=entry.version,
            previous_sha256=entry.previous_sha256,
            forced=entry.force,
            armed_until=existing.armed_until if existing else None,
            finished_at=utc_now() if entry.step == FINISHED else None,
            snapshot=entry.snapshot,
            steps=list(entry.steps),
        )
        self.history.save(record, durable)
        return record


class NothingStagedError(StagewatchError):
    """`deploy` was asked for while no pair is staged."""


def describe(error: Exception) -> str:
    """One line for an error: ours carry their message, an OSError its call and path."""
    if isinstance(error, OSError) and not isinstance(error, StagewatchError):
        where = f" {error.filename}" if error.filename else ""
        return f"{error.strerror or error}{':' if where else ''}{where}"
    return str(error)


def remove_torn_state_files(config: Config) -> None:
    """Remove the temporaries of a journal or arm write that a crash cut short."""
    for name in (config.state.journal_path.name, config.state.arm_path.name):
        for torn in config.state.dir.glob(f".{name}.tmp-*"):
            torn.unlink(missing_ok=True)
            log.info("Removed %s, left by an interrupted write", torn.name)


def prepare_state_folder(config: Config) -> None:
    """Create the state folder and its parts, private to the agent."""
    for folder in (config.state.dir, config.state.releases_dir, config.state.rejected_dir):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)


def installed_sha256(config: Config) -> str | None:
    """The sha256 of the binary at the install path, None when there is none."""
    return swap.installed_sha256(config.service.binary, config.state.releases_dir)


def staged_identity(config: Config) -> dict[str, list[int]] | None:
    """(inode, size, mtime) of both staged files, to tell our pair from a newer push."""
    identity: dict[str, list[int]] = {}
    for path in (config.staging.artifact_path, config.staging.checksum_path):
        found = _identity(path)
        if found is None:
            return None
        identity[path.name] = found
    return identity


def _distinct_files(first: Path, second: Path) -> bool:
    """Whether both exist and are not the same file (two names of one inode are not)."""
    try:
        return not os.path.samefile(first, second)
    except FileNotFoundError:
        return False


def _identity(path: Path) -> list[int] | None:
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    return [status.st_ino, status.st_size, status.st_mtime_ns]


__all__ = [
    "CHECKING",
    "RESTARTING",
    "ROLLING_BACK",
    "SNAPSHOTTING",
    "SWAPPING",
    "VERIFYING",
    "DeployRequest",
    "Engine",
    "NothingStagedError",
    "ServiceError",
    "SnapshotError",
    "installed_sha256",
]
