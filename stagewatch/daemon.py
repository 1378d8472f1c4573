"""`stagewatch run`: the watcher, the webhook and the engine, under systemd.

    staging (inotify) --settled pair--\\
                                       > coordinator (one queue, one thread) --> engine
    webhook (HTTP) -------arm---------/

The coordinator owns the daemon's only mutable state (idle, armed until T, deploying ID) and
decides everything on the main thread from one queue, so no two threads ever decide at once.
The webhook only arms; a deploy starts when an arm and a settled pair meet. Deploys run on a
worker thread so that signals and the webhook stay responsive while one runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from tenacity import RetryCallState, Retrying, wait_exponential

from stagewatch import __version__, journal, lock
from stagewatch.config import Config, load_config, read_secret
from stagewatch.engine import DeployRequest, Engine, NothingStagedError, describe, new_attempt_id
from stagewatch.errors import BusyError, ConfigError, RecoveryError, StagewatchError
from stagewatch.heartbeat import Heartbeats
from stagewatch.history import Record, utc_now
from stagewatch.logs import deploy_context
from stagewatch.notify import Notifier
from stagewatch.status import Arm, current_status, read_arm, without_host_paths, write_arm
from stagewatch.watcher import StagedPair, StagingWatcher
from stagewatch.webhook import WebhookServer

log = logging.getLogger(__name__)

EXIT_OK = 0

# An attempt that stopped short of its outcome (its journal or history could not be written:
# a full state folder, most often) is settled again and again, these pauses apart, until it
# is: the first after a second, then doubling up to a minute.
_FIRST_SETTLE_PAUSE_SECONDS = 1.0
_LONGEST_SETTLE_PAUSE_SECONDS = 60.0
_PAUSE_SILENCE_MARGIN_SECONDS = 5.0

# The main thread takes every event within this long, or its loop is taken for stuck and the
# watchdog pings stop: what it does with an event takes milliseconds (deploys run elsewhere).
COORDINATOR_GRACE_SECONDS = 10.0

_Result = TypeVar("_Result")


@dataclass(frozen=True)
class _Event:
    # "recovered", "armed", "settled", "step", "deploy-finished", "reload" or "stop"
    kind: str
    payload: Any = None


class _Inbox:
    """The coordinator's queue, and a wake-up of the main thread that signals reach as well.

    The kernel delivers a signal to any one thread that does not block it (signal(7)), while
    Python runs its handler on the main thread only, once that thread runs Python code again:
    a main thread asleep on a lock sleeps on until some other event arrives, and a SIGTERM
    could wait for the end of a deploy. So the main thread waits in poll(2) on a socket that
    `put()` writes to and that Python's own C-level handler writes to as well
    (signal.set_wakeup_fd). SimpleQueue is used because its put() is reentrant: a handler
    may run while the main thread is inside the queue.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self._reader, select.POLLIN)
        self.taken = 0  # events handed to the main thread, counted by it alone

    @property
    def wakeup_fd(self) -> int:
        return self._writer.fileno()

    def put(self, event: _Event) -> None:
        self._queue.put(event)
        # A full socket already holds a wake-up that the main thread has yet to read.
        with contextlib.suppress(BlockingIOError):
            self._writer.send(b"\0")

    def pending(self) -> bool:
        return not self._queue.empty()

    def get(self, timeout: float | None) -> _Event | None:
        """The next event; None when `timeout` passed, or the main thread woke without one."""
        event = self._take()
        if event is not None:
            return event

        self._poll.poll(None if timeout is None else timeout * 1000)
        with contextlib.suppress(BlockingIOError):
            while self._reader.recv(4096):
                pass
        return self._take()

    def _take(self) -> _Event | None:
        try:
            event = self._queue.get_nowait()
        except queue.Empty:
            return None
        self.taken += 1
        return event


class _InboxProbe:
    """The watchdog's look at the main thread, which sleeps in poll(2) while there is no event.

    An idle main thread is not woken to prove itself (that would cost a wake-up per ping);
    the probe only asks whether an event has waited `grace_seconds` with none taken since.
    Called from the pinger's thread alone, which owns the two fields below.
    """

    def __init__(self, inbox: _Inbox, grace_seconds: float) -> None:
        self._inbox = inbox
        self._grace_seconds = grace_seconds
        self._taken = inbox.taken
        self._waiting_since = time.monotonic()

    def is_alive(self) -> bool:
        now = time.monotonic()
        taken = self._inbox.taken
        if taken != self._taken or not self._inbox.pending():
            self._taken, self._waiting_since = taken, now
            return True
        return now - self._waiting_since < self._grace_seconds


class Coordinator:
    """The daemon's state, changed only on the main thread from the events in its queue."""

    def __init__(self, config: Config, secret: bytes) -> None:
        self.config = config
        self.secret = secret
        self.heartbeats = Heartbeats()
        self.notifier = Notifier(self.heartbeats)
        self.engine = self._new_engine(config)
        self.events = _Inbox()
        self.heartbeats.add_probe(
            "the coordinator's loop", _InboxProbe(self.events, COORDINATOR_GRACE_SECONDS).is_alive
        )

        # Read by other threads, written under the lock: the arm and the deploy by the main
        # thread, the step and the attempt by the engine's callback.
        self._lock = threading.Lock()
        self._arm: Arm | None = None
        self._deploying: str | None = None
        self._step: str | None = None
        self._attempt: str | None = None

        self._worker: threading.Thread | None = None
        self._serving = False
        self._reload_pending = False
        self._last_deployed: StagedPair | None = None
        self._waiting_logged = False
        self.watcher = StagingWatcher(config.staging, self._on_settled, self.heartbeats)
        self.webhook = WebhookServer(config.webhook, secret, self, self.heartbeats)

    # The webhook's side (ArmTarget): quick, thread-safe, deciding nothing but the arm itself.

    def arm(self, sha256: str | None, version: str | None, force: bool) -> dict[str, Any]:
        with self._lock:
            self._refuse_while_busy()
            armed_until = datetime.now(UTC) + timedelta(
                seconds=self.config.staging.arm_timeout_seconds
            )
            until_text = armed_until.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            started_at = utc_now()
            earlier = self._arm
            if earlier is not None:
                # A second POST while armed (a retrying build machine) renews the same arm,
                # and keeps what the first one asked for unless it asks otherwise: a retry
                # without a body must not drop a sha256 the build machine pinned.
                sha256, version = sha256 or earlier.sha256, version or earlier.version
                force = force or earlier.force
                record = self.engine.history.get(earlier.id)
                started_at = record.started_at if record is not None else started_at
            arm = Arm(
                earlier.id if earlier else new_attempt_id(), until_text, sha256, version, force
            )
            self._arm = arm
            write_arm(self.config, arm)
            self.engine.history.save(
                Record(
                    id=arm.id,
                    kind="deploy",
                    state="armed",
                    trigger="webhook",
                    started_at=started_at,
                    sha256=sha256,
                    version=version,
                    forced=force,
                    armed_until=until_text,
                )
            )

        self.events.put(_Event("armed"))
        return {"id": arm.id, "state": "armed", "armed_until": until_text}

    def _refuse_while_busy(self) -> None:
        """BusyError while the daemon deploys, or a command-line operation holds the lock."""
        if self._deploying is not None:
            raise BusyError(f"deploy {self._deploying} is running", self._deploying)
        if lock.is_held(self.config.state.lock_path):
            # `stagewatch deploy`, `rollback` or `snapshots restore`, run by hand.
            running = self._journaled_attempt()
            what = f"deploy {running}" if running else "a deploy, rollback or restore"
            raise BusyError(f"{what} is running from the command line", running)

    def deploy_record(self, deploy_id: str) -> dict[str, Any] | None:
        record = self.engine.history.get(deploy_id)
        return without_host_paths(record.to_json()) if record is not None else None

    def status(self) -> dict[str, Any]:
        document = current_status(self.config, self.engine.history, self._state_name())
        return without_host_paths(document)

    # The main thread.

    def run(self) -> int:
        """Recover, then serve until SIGTERM. Recovery runs on the worker thread, so that a
        SIGTERM during it is still answered within seconds."""
        self.notifier.start_pinger()
        self.notifier.status("settling what the last run left, if anything")
        self._worker = threading.Thread(
            target=self._recover_in_worker, name="recovery", daemon=True
        )
        self._worker.start()

        try:
            self._loop()
        finally:
            self._shut_down()
        return EXIT_OK

    def handle_signals(self) -> None:
        """Turn SIGTERM and SIGINT into a stop, SIGHUP into a reload; call on the main thread."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        signal.set_wakeup_fd(self.events.wakeup_fd, warn_on_full_buffer=False)

    def _start_serving(self) -> None:
        self.watcher.start()
        self.webhook.start()
        host, port = self.webhook.address
        log.info(
            "stagewatch %s watching %s, webhook on %s:%d%s (arm %s)",
            __version__,
            self.config.staging.dir,
            host,
            port,
            self.config.webhook.path,
            "required" if self.config.staging.require_arm else "not required",
        )
        self._serving = True
        self.notifier.ready()
        self.watcher.rescan()

        if self._reload_pending:
            self._reload_pending = False
            self._reload()

    def _loop(self) -> None:
        while True:
            event = self.events.get(self._seconds_to_expiry())
            if event is not None and event.kind == "stop":
                return

            # Every turn, not only when the wait ran out: a busy queue must not postpone the
            # expiry, and an arm past its deadline must not start a deploy.
            self._expire_arm()
            if event is not None:
                self._handle(event)
            self._announce()

    def _handle(self, event: _Event) -> None:
        if event.kind == "recovered":
            self._start_serving()
        elif event.kind == "reload" and not self._serving:
            log.info("SIGHUP received during the recovery; reloading once it is done")
            self._reload_pending = True
        elif not self._serving or event.kind == "step":
            return  # the announcement after each event is all a step change needs
        elif event.kind == "reload":
            self._reload()
        elif event.kind == "deploy-finished":
            self._deploy_finished(event.payload)
        elif event.kind == "armed":
            self._waiting_logged = False
            self.watcher.rescan()
            self._maybe_start_deploy()
        elif event.kind == "settled":
            self._maybe_start_deploy()

    def worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _seconds_to_expiry(self) -> float | None:
        """How long the main thread may wait: until the arm's deadline; idle means blocked."""
        with self._lock:
            if self._arm is None or self._deploying is not None:
                return None
            deadline = datetime.fromisoformat(self._arm.armed_until.replace("Z", "+00:00"))
        return max(0.0, (deadline - datetime.now(UTC)).total_seconds())

    def _maybe_start_deploy(self) -> None:
        if self._deploying is not None:
            return

        pair = self.watcher.waiting()
        if pair is None:
            return

        if self._arm is None and self.config.staging.require_arm:
            # Once per wait, however many pushes come before the arm; the watcher logs each.
            if not self._waiting_logged:
                log.info("A complete release is staged; waiting for the webhook to arm a deploy")
                self._waiting_logged = True
            return

        # Without an arm, a pair left staged (by a deploy that could not start) must not start
        # a deploy again and again; an arm is the operator's word to retry it.
        if self._arm is None and pair == self._last_deployed:
            return

        arm = self._arm
        request = (
            DeployRequest(arm.id, arm.sha256, arm.version, arm.force, "webhook")
            if arm is not None
            else DeployRequest(trigger="files")
        )
        self._start_worker(request, pair)

    def _start_worker(self, request: DeployRequest, pair: StagedPair) -> None:
        deploy_id = request.id or new_attempt_id()
        request = replace(request, id=deploy_id)
        with self._lock:
            self._arm = None
            self._deploying, self._step = deploy_id, "verifying"
        # The arm's file stays until the journal holds the attempt (`_on_engine_state`): an
        # agent killed in between must find the one or the other when it starts again, or
        # the release would be left staged under an arm recorded as expired.
        self._last_deployed = pair
        self._waiting_logged = False

        self._worker = threading.Thread(
            target=self._deploy_in_worker,
            args=(request, pair),
            name=f"deploy {deploy_id}",
            daemon=True,
        )
        self._worker.start()

    def _deploy_in_worker(self, request: DeployRequest, pair: StagedPair) -> None:
        outcome: str | None = None
        try:
            outcome = self.engine.deploy(request).outcome
        except (BusyError, NothingStagedError) as error:
            with deploy_context(request.id or "-"):
                log.warning("Deploy did not start: %s", error)
            self._record_not_started(request, str(error))
        except Exception as error:
            # A fault of the host is one line; anything else is a bug, shown with its traceback.
            unexpected = not isinstance(error, (OSError, sqlite3.Error, StagewatchError))
            with deploy_context(request.id or "-"):
                unsettled = self._journaled_attempt()
                if unsettled is not None:
                    log.error(
                        "Deploy stopped before its outcome: %s; settling it as soon as the "
                        "state folder can be written again",
                        describe(error),
                        exc_info=unexpected,
                    )
                    outcome = self._settle_until_done(unsettled)
                else:
                    reason = describe(error)
                    log.error("Deploy stopped: %s", reason, exc_info=unexpected)
                    # The history may be as unwritable as the journal was (a full disk).
                    self._retry_until_done(lambda: self._record_not_started(request, reason, pair))
        finally:
            # A deploy that never ran a step leaves no journal: its arm is settled above.
            write_arm(self.config, None)
            self.events.put(_Event("deploy-finished", outcome))

    def _journaled_attempt(self) -> str | None:
        """The id of the attempt the journal holds; None when none, or it cannot be read."""
        try:
            entry = journal.read(self.config.state.journal_path)
        except RecoveryError:
            return None
        return entry.id if entry is not None else None

    def _settle_until_done(self, attempt_id: str) -> str | None:
        """Run the recovery until it gets through; return the attempt's outcome.

        Until then the new binary may run unchecked, with no rollback to come: what a restart
        of the agent would do, this does without one. The daemon stays busy meanwhile, so that
        arms are refused (409) rather than taken for a deploy that cannot start.
        """
        record = self._retry_until_done(self.engine.recover)
        if record is None:
            log.info("Attempt %s was settled by another run of stagewatch", attempt_id)
            return None
        log.info("Interrupted %s %s settled: %s", record.kind, record.id, record.outcome)
        return record.outcome

    def _retry_until_done(self, action: Callable[[], _Result]) -> _Result:
        """Call `action` until it returns, pausing longer after each failure, up to a minute."""
        retrying = Retrying(
            wait=wait_exponential(
                min=_FIRST_SETTLE_PAUSE_SECONDS, max=_LONGEST_SETTLE_PAUSE_SECONDS
            ),
            sleep=self._pause_before_settling,
            before_sleep=_log_settle_retry,
        )
        return retrying(action)

    def _pause_before_settling(self, seconds: float) -> None:
        # A heartbeat of its own: a pause is progress, and a recovery hung in a step is not.
        with self.heartbeats.open(
            "waiting to settle an interrupted deploy", seconds + _PAUSE_SILENCE_MARGIN_SECONDS
        ):
            time.sleep(seconds)

    def _deploy_finished(self, outcome: str | None) -> None:
        with self._lock:
            finished_id, self._deploying = self._deploying, None
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        log.info("Deploy %s ended: %s; back to watching", finished_id, outcome or "not run")

        if self.engine.config != self.config:
            # A reload during the deploy left the engine on the old configuration until now.
            self.engine = self._new_engine(self.config)

        # With require_arm = false, a pair that arrived during the deploy goes next.
        self._maybe_start_deploy()

    def _record_not_started(
        self, request: DeployRequest, reason: str, pair: StagedPair | None = None
    ) -> None:
        """An armed record whose deploy never ran a step: refused, nothing having changed.

        With `pair`, the deploy failed on its own (not for the lock or for missing files),
        and the pair it was started for goes to rejected/ID, as any rejection's files do.
        """
        record = self.engine.history.get(request.id) if request.id is not None else None
        if record is None or record.outcome is not None or record.state != "armed":
            return
        if pair is not None:
            self.engine.set_aside_unstarted(record.id, pair.by_name(self.config.staging))
        record.state, record.outcome, record.reason = "finished", "rejected", reason
        record.finished_at = utc_now()
        self.engine.history.save(record)

    def _expire_arm(self) -> None:
        with self._lock:
            arm = self._arm
            if arm is None or not arm.expired():
                return
            self._arm = None
        write_arm(self.config, None)
        self._finish_unstarted(arm.id, "expired", self._expiry_reason())

    def _expiry_reason(self) -> str:
        seconds = self.config.staging.arm_timeout_seconds
        return f"armed, but no complete release was staged within {seconds:g} s"

    def _finish_unstarted(self, attempt_id: str, outcome: str, reason: str) -> None:
        record = self.engine.history.get(attempt_id)
        if record is None or record.outcome is not None:
            return
        record.state, record.outcome, record.reason = "finished", outcome, reason
        record.finished_at = utc_now()
        self.engine.history.save(record)
        with deploy_context(attempt_id):
            log.warning("Arm %s: %s", outcome, reason)

    def _recover_in_worker(self) -> None:
        unsettled: str | None = None
        try:
            unsettled = self._recover()
        except StagewatchError as error:
            log.error("Could not settle the interrupted deploy: %s", error)
        except Exception:
            # Through the log, not the thread's last words on bare stderr: under journald the
            # lines need their priority. The agent serves on; each deploy tries again first.
            log.exception("Could not settle the interrupted deploy")
        finally:
            if unsettled is not None:
                with self._lock:
                    self._deploying = unsettled
            self.events.put(_Event("recovered"))

        # Serving (status, 409 to arms) while the attempt waits for the state folder.
        if unsettled is not None:
            outcome = self._settle_until_done(unsettled)
            self.events.put(_Event("deploy-finished", outcome))

    def _recover(self) -> str | None:
        """Settle what the last run left: an interrupted deploy, an arm, stale records.

        Return the id of an attempt that the journal still holds because settling it failed
        (the state folder full or failing), for the caller to retry; None otherwise.
        """
        recovered: Record | None = None
        unsettled: str | None = None
        try:
            recovered = self.engine.recover()
        except BusyError as error:
            log.warning("Recovery postponed: %s", error)
        except Exception as error:
            unsettled = self._journaled_attempt()
            if unsettled is None:
                raise
            with deploy_context(unsettled):
                log.error(
                    "Could not settle the interrupted attempt yet: %s; trying again while "
                    "serving, deploys are refused until it is settled",
                    describe(error),
                )
        if recovered is not None:
            log.info(
                "Interrupted %s %s settled: %s", recovered.kind, recovered.id, recovered.outcome
            )

        arm = read_arm(self.config)
        if arm is not None and self._arm_was_used(arm):
            # The agent stopped while the arm's deploy was under way; recovery settled it.
            write_arm(self.config, None)
            arm = None
        if arm is not None and arm.expired():
            write_arm(self.config, None)
            self._finish_unstarted(arm.id, "expired", self._expiry_reason())
            arm = None
        with self._lock:
            self._arm = arm

        for record in self.engine.history.unfinished():
            if record.id in (arm.id if arm is not None else None, unsettled):
                continue
            outcome = "expired" if record.state == "armed" else "interrupted"
            self._finish_unstarted(
                record.id, outcome, "the agent stopped before this attempt could finish"
            )
        return unsettled

    def _arm_was_used(self, arm: Arm) -> bool:
        record = self.engine.history.get(arm.id)
        return record is not None and (record.outcome is not None or record.state != "armed")

    def _reload(self) -> None:
        """SIGHUP: the new configuration and secret, or the old ones if the new are invalid.

        All or nothing: the webhook takes the new settings first (it raises ConfigError
        keeping its old ones, for an address that cannot be bound or a certificate that cannot
        be loaded), then the watcher moves if the staging settings changed. A running deploy
        finishes with the configuration it started with.
        """
        self.notifier.reloading()
        try:
            config = load_config(self.config.source or Path())
            secret = read_secret(config)
            self.webhook.reload(config.webhook, secret)
            try:
                self._follow_staging(config)
            except ConfigError:
                self.webhook.reload(self.config.webhook, self.secret)
                raise
        except ConfigError as error:
            log.error("Reload refused, keeping the running configuration: %s", error)
            self.notifier.ready()
            return

        if self._deploying is not None and config != self.config:
            log.warning("Configuration reloaded; the running deploy finishes with the old one")
        self.config, self.secret = config, secret
        if self._deploying is None:
            self.engine = self._new_engine(config)
        log.info("Configuration and secret reloaded from %s", config.source)
        self.notifier.ready()

    def _follow_staging(self, config: Config) -> None:
        """Watch the staging settings of `config`; raise ConfigError still watching the old."""
        if config.staging == self.config.staging:
            return

        self.watcher.stop()
        watcher = StagingWatcher(config.staging, self._on_settled, self.heartbeats)
        try:
            watcher.start()
        except ConfigError:
            watcher.stop()
            self.watcher = StagingWatcher(self.config.staging, self._on_settled, self.heartbeats)
            self.watcher.start()
            raise
        self.watcher = watcher

    def _new_engine(self, config: Config) -> Engine:
        return Engine(config, heartbeats=self.heartbeats, on_state=self._on_engine_state)

    def _shut_down(self) -> None:
        self.notifier.stopping()
        if self._serving:
            self.webhook.stop()
            self.watcher.stop()
        self.notifier.stop_pinger()
        if self.worker_alive():
            # The journal holds the deploy; the next start finishes or undoes it.
            with self._lock:
                deploying, attempt, step = self._deploying, self._attempt, self._step
            what = (
                f"deploy {deploying}"
                if deploying
                else f"the recovery of {attempt or 'the journal'}"
            )
            log.warning(
                "Stopping during %s (step %s); it resumes at the next start",
                what,
                step or "none yet",
            )
        log.info("stagewatch stopped")

    # Callbacks from other threads: they only queue events.

    def _on_settled(self, pair: StagedPair) -> None:
        self.events.put(_Event("settled", pair))

    def _on_engine_state(self, step: str, attempt_id: str | None) -> None:
        if step == "verifying" and attempt_id is not None and attempt_id == self._deploying:
            # The journal now holds the attempt the arm started; the arm has done its part.
            write_arm(self.config, None)
        # "idle" comes as the attempt ends; its last step stands until the main thread hears.
        if step != "idle":
            with self._lock:
                self._step, self._attempt = step, attempt_id
        self.events.put(_Event("step"))

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.events.put(_Event("stop"))

    def request_reload(self, signum: int, frame: FrameType | None) -> None:
        self.events.put(_Event("reload"))

    # The one-line state for systemd.

    def _state_name(self) -> str:
        with self._lock:
            if self._deploying is not None:
                return self._step or "verifying"
            return "armed" if self._arm is not None else "idle"

    def _announce(self) -> None:
        with self._lock:
            deploying, step, arm, attempt = self._deploying, self._step, self._arm, self._attempt
        if deploying is not None:
            line = f"deploying {deploying}: {step}"
        elif not self._serving:
            line = (
                f"recovering {attempt}: {step}"
                if attempt is not None
                else "settling what the last run left, if anything"
            )
        elif arm is not None:
            line = f"armed until {arm.armed_until} ({arm.id}); waiting for a complete release"
        else:
            line = f"idle; watching {self.config.staging.dir}"
        self.notifier.status(line)


def _log_settle_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    pause = state.next_action.sleep if state.next_action is not None else 0.0
    log.error(
        "Recording the deploy's outcome failed again: %s; next try in %.0f s",
        describe(error) if isinstance(error, Exception) else error,
        pause,
    )


def run_daemon(config_path: Path) -> int:
    """Load the configuration and secret, then run until SIGTERM; return the exit code."""
    config = load_config(config_path)
    secret = read_secret(config)
    coordinator = Coordinator(config, secret)

    coordinator.handle_signals()
    code = coordinator.run()
    if coordinator.worker_alive():
        # A deploy or recovery is mid-step: end now rather than wait for it. The journal
        # holds its place, exactly as after a crash, and the next start settles it.
        logging.shutdown()
        os._exit(code)
    return code
