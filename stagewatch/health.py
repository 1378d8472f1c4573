"""The health probation that follows a restart.

Healthy means, as the contract has it: the unit is active, its main process did not change or
restart during `health.stable_seconds`, and `health.url` (when set) answers 2xx. Probation has
two phases:

1. Becoming healthy: poll every POLL_INTERVAL_SECONDS until the unit is active, runs a new
   main process, and the URL answers 2xx; give up after `health.timeout_seconds`, or at once
   when the manager reports a failure that will not clear by itself (systemd's "failed").
2. Staying healthy: for `health.stable_seconds` every poll must find the unit active, the same
   main PID, the same restart counter and a 2xx answer. The first poll that does not ends the
   probation. This is what catches a unit under Restart=always that looks active between
   crashes: its MainPID and NRestarts move.

Every poll beats the heartbeat, so a probation that hangs stops the watchdog pings. Deadlines
use time.monotonic, never the wall clock.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import cast

from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from stagewatch import __version__
from stagewatch.config import HealthConfig
from stagewatch.errors import HealthError, ServiceError
from stagewatch.heartbeat import Heartbeat
from stagewatch.service import ServiceManager, ServiceState

logger = logging.getLogger(__name__)

POLL_INTERVAL_SECONDS = 0.2
"""The pause between two polls."""

REQUEST_TIMEOUT_SECONDS = 2.0
"""How long one GET of `health.url` may take, connecting included."""

BODY_LIMIT_BYTES = 64 * 1024
"""How much of an answer's body is read (and dropped) before the connection is closed."""


@dataclass(frozen=True)
class HealthReport:
    """A passed probation: the last state seen and how long each phase took."""

    state: ServiceState
    became_healthy_after_seconds: float
    stable_seconds: float


def check_health(
    manager: ServiceManager,
    health: HealthConfig,
    heartbeat: Heartbeat,
    previous: ServiceState | None = None,
) -> HealthReport:
    """Run the probation after a restart; return the report, or raise HealthError.

    `previous` is the state from before the restart. When both it and the new state name a
    main PID, the new one must differ: the same process still running means the restart did
    not take effect. That is treated as not healthy yet rather than at once, since a restart
    command may return before the old process is gone; the probation fails with "still the old
    process" if it stays so until `health.timeout_seconds`. A service that replaces itself in
    place keeping its PID cannot pass this check. Without PIDs (an `is_active` that prints none)
    it is skipped.

    The HealthError message names the unit and what was wrong, for example
    "dealspace.service is not active after 60 s (failed (failed), MainPID none, NRestarts 0)"
    or "dealspace.service restarted during the stable window (MainPID 812 -> 845)".
    """
    probe = _Probe(manager, health.url, heartbeat)
    started = time.monotonic()
    logger.info(
        "Checking %s: healthy within %g s, then stable for %g s%s",
        manager.unit,
        health.timeout_seconds,
        health.stable_seconds,
        f", {health.url} answering 2xx" if health.url else "",
    )

    baseline = _become_healthy(probe, health.timeout_seconds, previous)
    became_healthy_after = time.monotonic() - started
    logger.debug(
        "%s is healthy after %.1f s (%s)", manager.unit, became_healthy_after, baseline.detail
    )

    state, stable = _stay_healthy(probe, baseline, health.stable_seconds)
    logger.debug("%s stayed healthy for %.1f s", manager.unit, stable)

    return HealthReport(
        state=state, became_healthy_after_seconds=became_healthy_after, stable_seconds=stable
    )


class _NotHealthyYet(Exception):
    """One poll found the service not (yet) healthy; `inactive` tells which wording fits."""

    def __init__(self, reason: str, *, inactive: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.inactive = inactive

    def final_error(self, unit: str, timeout_seconds: float) -> HealthError:
        """The error to raise when this is still the finding at the timeout."""
        after = _seconds(timeout_seconds)
        if self.inactive:
            return HealthError(f"{unit} is not active after {after} ({self.reason})")
        return HealthError(f"{unit} is not healthy after {after}: {self.reason}")


def _become_healthy(
    probe: _Probe, timeout_seconds: float, previous: ServiceState | None
) -> ServiceState:
    started = time.monotonic()
    unit = probe.unit

    def poll() -> ServiceState:
        state = probe.state()
        if state.failed:
            after = _seconds(time.monotonic() - started)
            raise HealthError(f"{unit} is not active after {after} ({state.detail})")
        if not state.active:
            raise _NotHealthyYet(state.detail, inactive=True)
        if _is_old_process(state, previous):
            raise _NotHealthyYet(
                f"still the old process (MainPID {state.main_pid}): the restart did not take "
                "effect",
                inactive=False,
            )

        problem = probe.url_problem()
        if problem is not None:
            raise _NotHealthyYet(problem, inactive=False)

        return state

    retrying = Retrying(
        retry=retry_if_exception_type(_NotHealthyYet),
        stop=stop_after_delay(timeout_seconds),
        wait=wait_fixed(POLL_INTERVAL_SECONDS),
        before_sleep=lambda retry_state: logger.debug(
            "%s not healthy yet: %s",
            unit,
            retry_state.outcome.exception() if retry_state.outcome is not None else "",
        ),
    )
    try:
        return retrying(poll)
    except RetryError as error:
        # Only _NotHealthyYet is retried, so that is what the last poll raised.
        finding = cast(_NotHealthyYet, error.last_attempt.exception())
        raise finding.final_error(unit, timeout_seconds) from None


def _stay_healthy(
    probe: _Probe, baseline: ServiceState, stable_seconds: float
) -> tuple[ServiceState, float]:
    """Poll until `stable_seconds` have passed since `baseline`; return the last state."""
    unit = probe.unit
    started = time.monotonic()
    end = started + stable_seconds
    state = baseline

    while (now := time.monotonic()) < end:
        time.sleep(min(POLL_INTERVAL_SECONDS, end - now))
        state = probe.state()
        into = _seconds(time.monotonic() - started)

        if not state.active:
            raise HealthError(
                f"{unit} stopped being active {into} into the stable window ({state.detail})"
            )
        if state.main_pid != baseline.main_pid and baseline.main_pid is not None:
            raise HealthError(
                f"{unit} restarted during the stable window "
                f"(MainPID {baseline.main_pid} -> {state.main_pid or 'none'})"
            )
        if state.restarts != baseline.restarts and baseline.restarts is not None:
            raise HealthError(
                f"{unit} restarted during the stable window "
                f"(NRestarts {baseline.restarts} -> {state.restarts})"
            )

        problem = probe.url_problem()
        if problem is not None:
            raise HealthError(f"{unit} is not healthy {into} into the stable window: {problem}")

    return state, time.monotonic() - started


def _is_old_process(state: ServiceState, previous: ServiceState | None) -> bool:
    if previous is None or previous.main_pid is None:
        return False
    return state.main_pid == previous.main_pid


class _Probe:
    """One poll's two questions: what the manager says, and what the URL answers."""

    def __init__(self, manager: ServiceManager, url: str | None, heartbeat: Heartbeat) -> None:
        self.unit = manager.unit
        self._manager = manager
        self._url = url
        self._heartbeat = heartbeat

    def state(self) -> ServiceState:
        self._heartbeat.beat()
        try:
            state = self._manager.state()
        except ServiceError as error:
            raise HealthError(f"{self.unit}: cannot tell whether it is healthy: {error}") from error
        finally:
            self._heartbeat.beat()

        return state

    def url_problem(self) -> str | None:
        """None when the URL is unset or answered 2xx, else what went wrong, in a few words."""
        if self._url is None:
            return None

        try:
            status = _get(self._url)
        except _Overdue:
            return f"{self._url}: no complete answer within {REQUEST_TIMEOUT_SECONDS:g} s"
        except (OSError, http.client.HTTPException) as error:
            return f"{self._url}: {_describe_failure(error)}"
        finally:
            self._heartbeat.beat()

        if 200 <= status < 300:
            return None
        if 300 <= status < 400:
            return f"{self._url} answered {status} (a redirect, which does not count)"
        return f"{self._url} answered {status}"


class _Overdue(Exception):
    """The whole GET took longer than REQUEST_TIMEOUT_SECONDS."""


def _get(url: str) -> int:
    """GET `url` once and return the status; the whole exchange within the request timeout.

    http.client rather than urllib: it follows no redirect (only the URL's own 2xx counts) and
    uses no proxy from the environment (an http_proxy meant for the outside world must not
    answer for this host). The socket timeout bounds each read only, so a server that trickles
    a byte at a time could hold one GET forever: a timer shuts the socket at the deadline.
    """
    parts = urllib.parse.urlsplit(url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(
        parts.hostname or "localhost", parts.port, timeout=REQUEST_TIMEOUT_SECONDS
    )
    overdue = threading.Event()

    def cut_off() -> None:
        overdue.set()
        if connection.sock is not None:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(REQUEST_TIMEOUT_SECONDS, cut_off)
    timer.daemon = True
    timer.start()
    try:
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        connection.request(
            "GET", target, headers={"User-Agent": f"stagewatch/{__version__} health check"}
        )
        response = connection.getresponse()
        response.read(BODY_LIMIT_BYTES)
        # A socket shut at the deadline reads as the end of the answer, which may then parse.
        if overdue.is_set():
            raise _Overdue
        return int(response.status)
    except (OSError, http.client.HTTPException):
        if overdue.is_set():
            raise _Overdue from None
        raise
    finally:
        timer.cancel()
        connection.close()


def _describe_failure(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return f"no answer within {REQUEST_TIMEOUT_SECONDS:g} s"
    if isinstance(reason, http.client.RemoteDisconnected):
        return "closed the connection without answering"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host ({reason.strerror})"
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed ({reason.reason or reason})"
    if isinstance(reason, http.client.HTTPException):
        return f"not a valid HTTP answer ({type(reason).__name__})"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[0].lower() + reason.strerror[1:]
    return str(reason)


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"
