"""The health probation, against the sample service, operator commands and a stand-in systemctl."""

from __future__ import annotations

import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from daemon_fixtures import HealthStandIn
from service_fixtures import (  # the two *_fixture names provide fake_systemctl and sample_service
    FakeSystemctl,
    Response,
    SampleService,
    fake_systemctl_fixture,  # noqa: F401
    free_port,
    sample_service_fixture,  # noqa: F401
    show_output,
)

from stagewatch.config import HealthConfig, ServiceConfig
from stagewatch.errors import HealthError
from stagewatch.health import check_health
from stagewatch.heartbeat import Heartbeat
from stagewatch.service import CommandManager, ServiceState, SystemdManager


@dataclass
class CountingHeartbeat(Heartbeat):
    beats: int = field(default=0)

    def beat(self) -> None:
        self.beats += 1
        super().beat()


def heartbeat() -> CountingHeartbeat:
    return CountingHeartbeat("health", 60.0)


def deploy(service: SampleService, version: str, behaviour: str = "good") -> CommandManager:
    """Install a release and restart the service, as the engine does before the probation."""
    manager = CommandManager(service.service_config())
    service.install(version, behaviour)
    manager.restart()
    return manager


def is_active_printing(tmp_path: Path, *pids: int) -> tuple[str, ...]:
    """An is_active that prints pids[0], then pids[1] on its next call, ...; the last repeats."""
    counter = tmp_path / "is-active-calls"
    code = (
        "import os\n"
        f"path = {str(counter)!r}\n"
        "calls = int(open(path).read()) if os.path.exists(path) else 0\n"
        "open(path, 'w').write(str(calls + 1))\n"
        f"pids = {list(pids)!r}\n"
        "print(pids[min(calls, len(pids) - 1)])\n"
    )
    return (sys.executable, "-c", code)


def command_manager(is_active: tuple[str, ...]) -> CommandManager:
    return CommandManager(ServiceConfig(manager="command", restart=("true",), is_active=is_active))


# Passing


def test_healthy_service_passes_the_probation(sample_service: SampleService) -> None:
    before = CommandManager(sample_service.service_config()).state()
    manager = deploy(sample_service, "1")
    pulse = heartbeat()

    report = check_health(
        manager, sample_service.health_config(stable_seconds=1.0), pulse, previous=before
    )

    assert report.state.active
    assert report.state.main_pid == sample_service.pid()
    assert 0 < report.became_healthy_after_seconds < 10
    assert 1.0 <= report.stable_seconds < 4.0
    assert pulse.beats >= 5


def test_service_without_url_passes_on_state_alone(tmp_path: Path) -> None:
    manager = command_manager(is_active_printing(tmp_path, 1000))

    report = check_health(manager, HealthConfig(timeout_seconds=5, stable_seconds=0.5), heartbeat())

    assert report.state.main_pid == 1000
    assert report.stable_seconds >= 0.5


# Failing to become healthy


def test_service_that_exits_at_once_fails(sample_service: SampleService) -> None:
    manager = deploy(sample_service, "2", "exit")

    with pytest.raises(HealthError) as raised:
        check_health(manager, sample_service.health_config(timeout_seconds=1.5), heartbeat())

    assert str(raised.value) == (
        "dealspace.service is not active after 1.5 s (service.is_active exited with status 3)"
    )


def test_service_whose_url_never_answers_2xx_fails(sample_service: SampleService) -> None:
    manager = deploy(sample_service, "3", "unhealthy")

    with pytest.raises(HealthError) as raised:
        check_health(manager, sample_service.health_config(timeout_seconds=1.5), heartbeat())

    assert str(raised.value) == (
        f"dealspace.service is not healthy after 1.5 s: {sample_service.url} answered 503"
    )


def test_url_with_nothing_listening_is_connection_refused(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz"
    manager = command_manager(is_active_printing(tmp_path, 1000))

    with pytest.raises(
        HealthError, match=r": http://127\.0\.0\.1:\d+/healthz: connection refused$"
    ):
        check_health(manager, HealthConfig(timeout_seconds=1.0, url=url), heartbeat())


def test_url_that_trickles_its_answer_fails_within_the_request_deadline(tmp_path: Path) -> None:
    # One byte every 0.3 s: each read is quick, the whole answer never comes. The deadline is
    # on the whole GET, so the probation still ends at its timeout.
    stand_in = HealthStandIn("trickle")
    try:
        manager = command_manager(is_active_printing(tmp_path, 1000))
        started = time.monotonic()

        with pytest.raises(HealthError, match=r"no complete answer within 2 s$"):
            check_health(manager, HealthConfig(timeout_seconds=1.0, url=stand_in.url), heartbeat())

        assert time.monotonic() - started < 6
    finally:
        stand_in.close()


def test_redirect_does_not_count_as_healthy(tmp_path: Path) -> None:
    with http_server({"/healthz": (302, {"Location": "/ok"}), "/ok": (200, {})}) as server:
        manager = command_manager(is_active_printing(tmp_path, 1000))

        with pytest.raises(
            HealthError, match=r"answered 302 \(a redirect, which does not count\)$"
        ):
            check_health(
                manager, HealthConfig(timeout_seconds=1.0, url=server.url("/healthz")), heartbeat()
            )

        assert server.paths and "/ok" not in server.paths


def test_old_process_still_running_after_the_restart_fails(tmp_path: Path) -> None:
    manager = command_manager(is_active_printing(tmp_path, 1000))
    previous = ServiceState(active=True, main_pid=1000, restarts=None, detail="running")

    with pytest.raises(HealthError, match=r"still the old process \(MainPID 1000\)"):
        check_health(manager, HealthConfig(timeout_seconds=1.0), heartbeat(), previous=previous)


def test_old_process_replaced_a_little_late_passes(tmp_path: Path) -> None:
    manager = command_manager(is_active_printing(tmp_path, 1000, 1000, 1001))
    previous = ServiceState(active=True, main_pid=1000, restarts=None, detail="running")

    report = check_health(
        manager, HealthConfig(timeout_seconds=5.0, stable_seconds=0.4), heartbeat(), previous
    )

    assert report.state.main_pid == 1001


def test_unreadable_state_fails_the_probation() -> None:
    manager = command_manager(("/nonexistent/dealspace-is-up",))

    with pytest.raises(
        HealthError, match=r"^dealspace\.service: cannot tell whether it is healthy"
    ):
        check_health(manager, HealthConfig(timeout_seconds=5.0), heartbeat())


def test_systemd_failed_unit_fails_without_waiting_out_the_timeout(
    fake_systemctl: FakeSystemctl,
) -> None:
    fake_systemctl.respond("show", Response(show_output("failed", "failed", main_pid=0)))

    started = time.monotonic()
    with pytest.raises(
        HealthError, match=r"is not active after .* \(failed \(failed\), MainPID none"
    ):
        check_health(SystemdManager(ServiceConfig()), HealthConfig(timeout_seconds=30), heartbeat())

    assert time.monotonic() - started < 5


# Failing to stay healthy


def test_service_that_crashes_inside_the_stable_window_fails(sample_service: SampleService) -> None:
    manager = deploy(sample_service, "4", "crash-after=1")

    with pytest.raises(HealthError) as raised:
        check_health(manager, sample_service.health_config(stable_seconds=3.0), heartbeat())

    assert re.fullmatch(
        r"dealspace\.service stopped being active \d\.\d s into the stable window "
        r"\(service\.is_active exited with status 3\)",
        str(raised.value),
    )


def test_main_pid_change_inside_the_stable_window_fails(tmp_path: Path) -> None:
    manager = command_manager(is_active_printing(tmp_path, 1000, 1000, 1000, 1001))

    with pytest.raises(HealthError) as raised:
        check_health(manager, HealthConfig(timeout_seconds=5.0, stable_seconds=5.0), heartbeat())

    assert str(raised.value) == (
        "dealspace.service restarted during the stable window (MainPID 1000 -> 1001)"
    )


def test_systemd_restart_counter_moving_inside_the_stable_window_fails(
    fake_systemctl: FakeSystemctl,
) -> None:
    steady = Response(show_output(main_pid=812, restarts=0))
    fake_systemctl.respond("show", steady, steady, Response(show_output(main_pid=812, restarts=1)))

    with pytest.raises(HealthError) as raised:
        check_health(
            SystemdManager(ServiceConfig()),
            HealthConfig(timeout_seconds=5.0, stable_seconds=5.0),
            heartbeat(),
        )

    assert str(raised.value) == (
        "dealspace.service restarted during the stable window (NRestarts 0 -> 1)"
    )


# Proxies


def test_proxies_in_the_environment_are_ignored(
    sample_service: SampleService, monkeypatch: pytest.MonkeyPatch
) -> None:
    with http_server({}, default=(503, {})) as proxy:
        for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.url(""))
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        manager = deploy(sample_service, "5")
        sample_service.wait_healthy()

        # The proxy settings are live: urllib's defaults would send the check through them.
        with pytest.raises(urllib.error.HTTPError, match="503"):
            urllib.request.urlopen(sample_service.url, timeout=2)
        proxied = len(proxy.paths)

        check_health(manager, sample_service.health_config(stable_seconds=0.5), heartbeat())

        assert proxied == 1
        assert len(proxy.paths) == proxied


# A tiny HTTP server with canned answers


@dataclass
class CannedServer:
    port: int
    paths: list[str]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextmanager
def http_server(
    answers: dict[str, tuple[int, dict[str, str]]], default: tuple[int, dict[str, str]] = (404, {})
) -> Iterator[CannedServer]:
    """Serve `answers` (path -> status, headers) on a free loopback port; record the paths."""
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            status, headers = answers.get(self.path, default)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield CannedServer(server.server_address[1], paths)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
