"""The service manager seam: restart, stop, start and query the service being deployed.

Two managers stand behind one protocol. SystemdManager drives a unit through systemctl(1);
CommandManager runs the operator's own argv lists from `[service]`. The engine and the health
probation see only ServiceManager and ServiceState, so tests put a real process behind either.

Every command runs with stdin from /dev/null, its output captured up to a bound, in a process
group of its own, and with a timeout: `service.restart_timeout_seconds` for restart, stop and
start, QUERY_TIMEOUT_SECONDS for a state query. A command that outlives its timeout is killed
with its whole group.

Retries (tenacity) cover only failures that may pass by themselves, within a deadline of
`service.restart_timeout_seconds`:

- a state query that ran out of time (each try has QUERY_TIMEOUT_SECONDS of the deadline);
- systemctl failing to reach systemd over D-Bus (the bus restarting, systemd re-executing).

A restart, stop or start that runs out of time is not tried again: each try is given all the
time left before the deadline, so its timeout is the deadline. A failure that asking again will
not change (an unknown unit, access refused by polkit, a non-zero exit of the operator's
command, a program that does not exist) is reported at once, so that a deploy rolls back
instead of waiting out the deadline. Running the operator's restart twice is also not assumed
to be harmless.

Logging: the command line at debug; the outcome of a restart, stop or start at info with its
duration. State queries log at debug only, since the health probation polls five times a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Protocol, TypeVar

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from stagewatch.config import ServiceConfig
from stagewatch.errors import ServiceError

logger = logging.getLogger(__name__)

QUERY_TIMEOUT_SECONDS = 5.0
"""Time for one state query (`systemctl show`, the operator's `is_active`)."""

OUTPUT_LIMIT_BYTES = 64 * 1024
"""How much of a command's stdout (its beginning) and stderr (its end) is kept."""

EXIT_CHECK_SECONDS = 0.1
"""How often a running command is checked for having exited while its pipes stay open."""

LINGER_SECONDS = 0.5
"""How long output is still read after the command exited, when a child of it holds the pipes."""

MINIMUM_TRY_SECONDS = 0.5
"""The least time a retry is given, even when it starts right at the deadline."""

SYSTEMD_PROPERTIES = ("LoadState", "ActiveState", "SubState", "MainPID", "NRestarts")

# ActiveState values (systemd.unit(5), "Unit states") in which the main process is up and
# serving. "reloading" is an active unit re-reading its configuration. "activating" is not
# active: the unit is starting, or waiting between two crashes under Restart= (SubState
# "auto-restart"), which is exactly what a restart loop looks like.
SYSTEMD_ACTIVE_STATES = frozenset({"active", "reloading"})

# Text of systemctl errors (printed under LC_ALL=C) that mean systemd could not be reached
# for a moment, not that the request was refused: worth one more try.
SYSTEMD_TRANSIENT_ERRORS = (
    "Failed to connect to bus",
    "Failed to get D-Bus connection",
    "Connection timed out",
    "Connection reset by peer",
    "Transport endpoint is not connected",
    "disconnected from message bus without replying",
)

# What an operator can do about the errors that will not pass by themselves.
SYSTEMD_ERROR_HINTS = (
    ("not found", "check service.unit (systemctl list-unit-files)"),
    ("not loaded", "check service.unit (systemctl list-unit-files)"),
    (
        "Access denied",
        "allow stagewatch's user org.freedesktop.systemd1.manage-units on this unit "
        "with a polkit rule",
    ),
    (
        "Interactive authentication required",
        "allow stagewatch's user org.freedesktop.systemd1.manage-units on this unit "
        "with a polkit rule",
    ),
    (
        "not been booted with systemd",
        'this host does not run systemd: use service.manager = "command"',
    ),
)

PAST_TENSE = {"restart": "Restarted", "stop": "Stopped", "start": "Started"}

Result = TypeVar("Result")


@dataclass(frozen=True)
class ServiceState:
    """What the service manager says about the service at one instant.

    `failed` is set when the manager reports a failure that will not clear by itself (systemd's
    ActiveState "failed": the unit stopped and Restart= will not bring it back), so that a
    health probation need not wait out its timeout.
    """

    active: bool
    main_pid: int | None
    restarts: int | None
    detail: str
    failed: bool = False


class ServiceManager(Protocol):
    """Restart, stop, start and query one service; every failure is a ServiceError."""

    unit: str

    def restart(self) -> None: ...

    def stop(self) -> None: ...

    def start(self) -> None: ...

    def state(self) -> ServiceState: ...


def manager_for(service: ServiceConfig) -> ServiceManager:
    """The manager that `service.manager` names: "systemd" or "command"."""
    if service.manager == "systemd":
        return SystemdManager(service)
    if service.manager == "command":
        return CommandManager(service)

    raise ServiceError(
        f'service.manager: unknown manager {service.manager!r} (use "systemd" or "command")'
    )


class SystemdManager:
    """The unit `service.unit`, driven through systemctl(1) on the system manager.

    systemctl runs with `--no-ask-password`: stagewatch has no terminal, so a missing polkit
    grant must fail at once rather than wait for a password prompt nobody sees. Killing
    systemctl at its timeout does not cancel the job it queued; the unit's own TimeoutStartSec=
    and TimeoutStopSec= bound that (systemd.service(5)).
    """

    def __init__(
        self, service: ServiceConfig, *, query_timeout_seconds: float = QUERY_TIMEOUT_SECONDS
    ) -> None:
        self.unit = service.unit
        self._deadline_seconds = service.restart_timeout_seconds
        self._query_timeout_seconds = query_timeout_seconds

    def restart(self) -> None:
        """`systemctl restart UNIT`: returns once systemd finished the start job."""
        self._reset_failed()
        self._act("restart")

    def stop(self) -> None:
        self._act("stop")

    def start(self) -> None:
        self._reset_failed()
        self._act("start")

    def _reset_failed(self) -> None:
        """Clear the unit's failed state and start-rate counter before starting it.

        A release that exits at once makes systemd refuse further starts of the unit for a
        while ("Start request repeated too quickly", StartLimitBurst= in systemd.unit(5)), and
        the rollback's restart of the previous binary would be refused with it. Nothing is lost
        when this fails: the restart then says what is wrong.
        """
        argv = self._argv("reset-failed", self.unit)
        try:
            self._systemctl(argv, self._query_timeout_seconds)
        except ServiceError as error:
            logger.debug("reset-failed of %s did not succeed: %s", self.unit, error)

    def state(self) -> ServiceState:
        """`systemctl show UNIT` of the load, active and sub state, MainPID and NRestarts."""
        argv = self._argv("show", self.unit, "--property=" + ",".join(SYSTEMD_PROPERTIES))

        def query(timeout_seconds: float) -> ServiceState:
            completed = self._systemctl(argv, min(timeout_seconds, self._query_timeout_seconds))
            logger.debug("%s: %s", self.unit, completed.stdout.strip().replace("\n", ", "))
            return _state_from_show(self.unit, completed.stdout)

        return _with_retries(query, self._deadline_seconds, f"Querying {self.unit}")

    def _act(self, action: str) -> None:
        argv = self._argv(action, self.unit)
        started = time.monotonic()
        try:
            _with_retries(
                lambda timeout_seconds: self._systemctl(argv, timeout_seconds),
                self._deadline_seconds,
                f"{action.capitalize()} of {self.unit}",
            )
        except ServiceError:
            logger.info(
                "%s of %s failed after %.2f s", action.capitalize(), self.unit, _since(started)
            )
            raise

        logger.debug("%s %s in %.2f s", PAST_TENSE[action], self.unit, _since(started))

    def _argv(self, *arguments: str) -> list[str]:
        return ["systemctl", "--no-ask-password", *arguments]

    def _systemctl(self, argv: Sequence[str], timeout_seconds: float) -> _Completed:
        # Under LC_ALL=C the error texts matched below are the same on every host.
        environment = {**os.environ, "LC_ALL": "C", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        try:
            completed = _run(argv, timeout_seconds, environment=environment)
        except _CannotRun as error:
            raise ServiceError(
                f"systemctl: cannot run it ({error.reason}); "
                'on a host without systemd use service.manager = "command"'
            ) from None

        if completed.status == 0:
            return completed

        message = f"{completed.command} {_describe_status(completed.status)}: {completed.tail}"
        if any(marker in completed.stderr for marker in SYSTEMD_TRANSIENT_ERRORS):
            raise _TransientError(message)

        hint = next(
            (hint for marker, hint in SYSTEMD_ERROR_HINTS if marker in completed.stderr), None
        )
        raise ServiceError(f"{message} ({hint})" if hint else message)


class CommandManager:
    """A service driven by the operator's argv lists from `[service]`.

    `restart` and `is_active` are required, `stop` and `start` only by what uses them
    (`snapshots restore`). `is_active` exiting 0 means running; any other exit means not
    running. When `is_active` prints a process id as the first word of its stdout, that is the
    main PID and it is watched like systemd's MainPID. There is no restart counter.

    A non-zero exit of `restart`, `stop` or `start` is not retried: whether the operator's
    command may run twice is theirs to know, and the message carries its exit status and the
    end of its stderr so that they can find out what went wrong.
    """

    def __init__(
        self, service: ServiceConfig, *, query_timeout_seconds: float = QUERY_TIMEOUT_SECONDS
    ) -> None:
        self.unit = service.unit
        self._service = service
        self._deadline_seconds = service.restart_timeout_seconds
        self._query_timeout_seconds = query_timeout_seconds

    def restart(self) -> None:
        self._act("restart")

    def stop(self) -> None:
        self._act("stop")

    def start(self) -> None:
        self._act("start")

    def state(self) -> ServiceState:
        argv = self._command("is_active")

        def query(timeout_seconds: float) -> ServiceState:
            completed = self._run(
                "is_active", argv, min(timeout_seconds, self._query_timeout_seconds)
            )
            return _state_from_is_active(completed)

        return _with_retries(query, self._deadline_seconds, f"Querying {self.unit}")

    def _act(self, action: str) -> None:
        argv = self._command(action)
        started = time.monotonic()
        try:
            completed = _with_retries(
                lambda timeout_seconds: self._run(action, argv, timeout_seconds),
                self._deadline_seconds,
                f"{action.capitalize()} of {self.unit}",
            )
        except ServiceError:
            logger.info(
                "%s of %s failed after %.2f s", action.capitalize(), self.unit, _since(started)
            )
            raise

        if completed.status != 0:
            logger.info(
                "%s of %s failed after %.2f s", action.capitalize(), self.unit, _since(started)
            )
            raise ServiceError(
                f"service.{action}: {completed.command} "
                f"{_describe_status(completed.status)}: {completed.tail}"
            )

        logger.debug("%s %s in %.2f s", PAST_TENSE[action], self.unit, _since(started))

    def _command(self, key: str) -> tuple[str, ...]:
        argv: tuple[str, ...] | None = getattr(self._service, key)
        if argv is None:
            raise ServiceError(
                f'service.{key}: not configured; with service.manager = "command" it must be '
                f'an argv list, like ["/usr/local/bin/{key.replace("_", "-")}-dealspace"]'
            )
        return argv

    def _run(self, key: str, argv: Sequence[str], timeout_seconds: float) -> _Completed:
        try:
            return _run(argv, timeout_seconds)
        except _CannotRun as error:
            raise ServiceError(f"service.{key}: cannot run {argv[0]}: {error.reason}") from None
        except _TransientError as error:
            raise _TransientError(f"service.{key}: {error}") from None


class _TransientError(ServiceError):
    """A failure that may pass by itself: worth another try before the deadline."""


class _CannotRun(Exception):
    """The program could not be started at all (missing, not executable)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Completed:
    command: str
    status: int
    stdout: str
    stderr: str

    @property
    def tail(self) -> str:
        """The last lines of stderr (else of stdout) on one line, for an error message."""
        text = self.stderr.strip() or self.stdout.strip()
        if not text:
            return "no output"

        lines = [line.strip() for line in text.splitlines() if line.strip()]
        tail = " | ".join(lines[-3:])
        return tail if len(tail) <= 400 else "..." + tail[-400:]


def _with_retries(
    operation: Callable[[float], Result], deadline_seconds: float, what: str
) -> Result:
    """Call `operation(seconds left)` until it stops raising _TransientError or time is up."""
    deadline = time.monotonic() + deadline_seconds

    def left() -> float:
        return deadline - time.monotonic()

    def attempt() -> Result:
        return operation(max(left(), MINIMUM_TRY_SECONDS))

    def backoff(retry_state: RetryCallState) -> float:
        # Never sleep past the deadline: the last try starts at it at the latest.
        return max(0.0, min(wait_exponential(multiplier=0.2, max=3.0)(retry_state), left()))

    def log_retry(retry_state: RetryCallState) -> None:
        outcome = retry_state.outcome
        logger.warning(
            "%s: %s; trying again in %.1f s",
            what,
            outcome.exception() if outcome is not None else "failed",
            retry_state.upcoming_sleep,
        )

    retrying = Retrying(
        retry=retry_if_exception_type(_TransientError),
        stop=stop_after_delay(deadline_seconds),
        wait=backoff,
        before_sleep=log_retry,
    )
    try:
        return retrying(attempt)
    except RetryError as error:
        attempts = error.last_attempt.attempt_number
        last = error.last_attempt.exception()
        gave_up = (
            f" (gave up after {attempts} tries in {deadline_seconds:g} s)" if attempts > 1 else ""
        )
        raise ServiceError(f"{last}{gave_up}") from last


def _run(
    argv: Sequence[str], timeout_seconds: float, *, environment: Mapping[str, str] | None = None
) -> _Completed:
    """Run `argv` to completion within `timeout_seconds`; its exit status is the caller's to judge.

    Raise _CannotRun if it cannot be started, _TransientError if it ran out of time (it and
    its process group are then killed).
    """
    command = shlex.join(argv)
    logger.debug("Running %s (timeout %g s)", command, timeout_seconds)
    deadline = time.monotonic() + timeout_seconds
    try:
        # A session of its own, so that a timeout kills the command together with its children.
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=environment,
        )
    except OSError as error:
        raise _CannotRun(error.strerror or str(error)) from None

    try:
        stdout, stderr = _collect_output(process, deadline, command)
        process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise _TransientError(
            f"{command} did not finish within {round(timeout_seconds, 1):g} s and was killed"
        ) from None
    finally:
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    completed = _Completed(command, process.returncode, stdout, stderr)
    logger.debug("%s %s", command, _describe_status(completed.status))
    return completed


def _collect_output(
    process: subprocess.Popen[bytes], deadline: float, command: str
) -> tuple[str, str]:
    """Read stdout (its beginning) and stderr (its end) until both close or the command exits.

    A command may leave a child behind that holds the pipes open (a daemon started without
    redirecting its output); reading stops LINGER_SECONDS after the command itself exited.
    Raise subprocess.TimeoutExpired at the deadline.
    """
    stdout = _BoundedBuffer(keep_end=False)
    stderr = _BoundedBuffer(keep_end=True)
    exited_at: float | None = None
    with selectors.DefaultSelector() as selector:
        _register(selector, process.stdout, stdout)
        _register(selector, process.stderr, stderr)

        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                raise subprocess.TimeoutExpired(command, 0)

            if exited_at is None and process.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at >= LINGER_SECONDS:
                logger.warning(
                    "%s exited but left a process holding its output; that process gets "
                    "SIGPIPE when it writes there: redirect its stdout and stderr",
                    command,
                )
                break

            for key, _events in selector.select(min(deadline - now, EXIT_CHECK_SECONDS)):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    key.data.add(chunk)
                else:
                    selector.unregister(key.fileobj)

    return stdout.text(), stderr.text()


def _register(
    selector: selectors.BaseSelector, stream: IO[bytes] | None, buffer: _BoundedBuffer
) -> None:
    if stream is not None:
        selector.register(stream, selectors.EVENT_READ, buffer)


class _BoundedBuffer:
    """At most OUTPUT_LIMIT_BYTES of a stream: its beginning, or its end."""

    def __init__(self, *, keep_end: bool) -> None:
        self._data = bytearray()
        self._keep_end = keep_end

    def add(self, chunk: bytes) -> None:
        self._data += chunk
        excess = len(self._data) - OUTPUT_LIMIT_BYTES
        if excess > 0 and self._keep_end:
            del self._data[:excess]
        elif excess > 0:
            del self._data[OUTPUT_LIMIT_BYTES:]

    def text(self) -> str:
        return self._data.decode("utf-8", errors="replace")


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # The group id is the command's pid (start_new_session); it is not reused while the
    # command is unreaped, and it is reaped only below.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5.0)


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"

    return f"exited with status {status}"


def _state_from_show(unit: str, output: str) -> ServiceState:
    """Parse `systemctl show -p ...` output: KEY=VALUE lines, in systemd's order."""
    properties: dict[str, str] = {}
    for line in output.splitlines():
        key, separator, value = line.partition("=")
        if separator:
            properties[key.strip()] = value.strip()

    active_state = properties.get("ActiveState")
    if not active_state:
        raise ServiceError(
            f"systemctl show {unit} printed no ActiveState: {output.strip()[:200]!r}"
        )

    sub_state = properties.get("SubState", "unknown")
    main_pid = _positive_integer(properties.get("MainPID"))
    restarts = _natural_number(properties.get("NRestarts"))
    detail = (
        f"{active_state} ({sub_state}), MainPID {main_pid or 'none'}, "
        f"NRestarts {'unknown' if restarts is None else restarts}"
    )
    load_state = properties.get("LoadState", "loaded")
    if load_state != "loaded":
        detail += f", unit {load_state}"

    return ServiceState(
        active=active_state in SYSTEMD_ACTIVE_STATES,
        main_pid=main_pid,
        restarts=restarts,
        detail=detail,
        failed=active_state == "failed" or load_state in ("not-found", "bad-setting", "error"),
    )


def _state_from_is_active(completed: _Completed) -> ServiceState:
    if completed.status != 0:
        return ServiceState(
            active=False,
            main_pid=None,
            restarts=None,
            detail=f"service.is_active {_describe_status(completed.status)}",
        )

    words = completed.stdout.split(maxsplit=1)
    main_pid = _positive_integer(words[0]) if words else None
    return ServiceState(
        active=True,
        main_pid=main_pid,
        restarts=None,
        detail=f"running, MainPID {main_pid or 'unknown'}",
    )


def _positive_integer(text: str | None) -> int | None:
    number = _natural_number(text)
    return number if number else None


def _natural_number(text: str | None) -> int | None:
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def _since(started: float) -> float:
    return time.monotonic() - started
