"""Real stand-ins for the service under deploy, for any test that needs one.

`SampleService(tmp_path)` lays out a dealspace stand-in (stagewatch.sample_service) under the
`command` manager: install path, database, pidfile, log and a free loopback port. It writes
releases, renders the `[service]` and `[health]` TOML for a config file, and at teardown stops
the service and kills any process still running one of its binaries:

    from service_fixtures import sample_service_fixture  # noqa: F401 - the fixture

    def test_something(sample_service):  # or SampleService(tmp_path) as a context manager
        sample_service.install("1")
        config_text = sample_service.config_toml_fragment() + other_sections

`FakeSystemctl` is a real program named `systemctl`, put first on PATH, that answers from
recorded output and logs its argv: what SystemdManager talks to in tests without systemd.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sandbox import free_port

from stagewatch.config import HealthConfig, ServiceConfig
from stagewatch.sample_service import control_command, release_bytes, write_release

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def process_is_running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie that nobody reaped counts as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return text[text.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def wait_until_gone(pid: int, timeout: float = 5.0) -> None:
    """Wait for `pid` to exit (or to be a zombie); fail the test after `timeout`."""
    wait_for(lambda: not process_is_running(pid), timeout, f"pid {pid} to exit")


def get_json(url: str, timeout: float = 2.0) -> tuple[int, Any] | None:
    """(status, parsed body) of GET `url` without any proxy; None when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read() or b"null")
    except OSError:
        return None


class SampleService:
    """A dealspace stand-in under `service.manager = "command"`, laid out inside `root`."""

    def __init__(self, root: Path, *, unit: str = "dealspace.service") -> None:
        self.root = root / "sample-service"
        for folder in ("bin", "data", "run", "log", "releases"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

        self.unit = unit
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/healthz"
        self.binary = self.root / "bin" / "dealspace"
        self.database = self.root / "data" / "dealspace.db"
        self.pidfile = self.root / "run" / "dealspace.pid"
        self.log = self.root / "log" / "dealspace.log"
        self._binaries: set[Path] = {self.binary}

    def command(self, action: str) -> list[str]:
        """The argv of `control ACTION` for this service."""
        return control_command(action, binary=self.binary, pidfile=self.pidfile, log=self.log)

    def service_config(self, **overrides: Any) -> ServiceConfig:
        values: dict[str, Any] = {
            "unit": self.unit,
            "binary": self.binary,
            "manager": "command",
            "restart": tuple(self.command("restart")),
            "is_active": tuple(self.command("is-active")),
            "stop": tuple(self.command("stop")),
            "start": tuple(self.command("start")),
            "restart_timeout_seconds": 30.0,
        }
        return ServiceConfig(**{**values, **overrides})

    def health_config(self, **overrides: Any) -> HealthConfig:
        values: dict[str, Any] = {"timeout_seconds": 10.0, "stable_seconds": 1.0, "url": self.url}
        return HealthConfig(**{**values, **overrides})

    def config_toml_fragment(
        self,
        *,
        include_health: bool = True,
        health_timeout_seconds: float = 10.0,
        stable_seconds: float = 1.0,
        restart_timeout_seconds: float = 30.0,
    ) -> str:
        """`[service]` (and `[health]`) sections that run this service, for a config file."""
        lines = [
            "[service]",
            f"unit = {_toml(self.unit)}",
            f"binary = {_toml(str(self.binary))}",
            'manager = "command"',
            f"restart = {_toml(self.command('restart'))}",
            f"is_active = {_toml(self.command('is-active'))}",
            f"stop = {_toml(self.command('stop'))}",
            f"start = {_toml(self.command('start'))}",
            f"restart_timeout_seconds = {restart_timeout_seconds}",
            "",
        ]
        if include_health:
            lines += [
                "[health]",
                f"timeout_seconds = {health_timeout_seconds}",
                f"stable_seconds = {stable_seconds}",
                f"url = {_toml(self.url)}",
                "",
            ]
        return "\n".join(lines)

    def release_bytes(self, version: str, behaviour: str = "good") -> bytes:
        """The bytes `write_release` writes, to compute a checksum without a file."""
        return release_bytes(
            port=self.port, database=self.database, version=version, behaviour=behaviour
        )

    def write_release(self, path: Path, version: str, behaviour: str = "good") -> bytes:
        """Write an executable release of `version` at `path`; return its bytes."""
        self._binaries.add(path)
        write_release(
            path, port=self.port, database=self.database, version=version, behaviour=behaviour
        )
        return path.read_bytes()

    def install(self, version: str, behaviour: str = "good") -> bytes:
        """Put a release straight at the install path (what a deploy would do)."""
        return self.write_release(self.binary, version, behaviour)

    def control(self, action: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(action),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> int:
        """Start it (no-op when running); return the pid."""
        self.control("start").check_returncode()
        return self._wait_running()

    def restart(self) -> int:
        self.control("restart").check_returncode()
        return self._wait_running()

    def _wait_running(self) -> int:
        pid = wait_for(self.pid, what=f"{self.unit} to run")
        assert pid is not None
        return pid

    def stop(self) -> None:
        self.control("stop").check_returncode()

    def pid(self) -> int | None:
        """The main pid as `is-active` reports it, None when not running."""
        completed = self.control("is-active")
        return int(completed.stdout.split()[0]) if completed.returncode == 0 else None

    def health(self) -> tuple[int, Any] | None:
        return get_json(self.url)

    def wait_healthy(self, timeout: float = 10.0) -> Any:
        """Wait for /healthz to answer 200; return its JSON body."""

        def answered_200() -> tuple[int, Any] | None:
            reply = self.health()
            return reply if reply is not None and reply[0] == 200 else None

        answer = wait_for(answered_200, timeout, f"{self.url} to answer 200")
        assert answer is not None
        return answer[1]

    def rows(self) -> int:
        """Rows the service wrote so far (0 when there is no database yet)."""
        if not self.database.exists():
            return 0
        with contextlib.closing(sqlite3.connect(self.database, timeout=5.0)) as connection:
            try:
                return int(connection.execute("SELECT count(*) FROM deals").fetchone()[0])
            except sqlite3.OperationalError:
                return 0

    def stop_all(self) -> list[int]:
        """Stop the service and kill every process still running one of its files.

        Return the pids that had to be killed: a stop that left something behind.
        """
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.control("stop", timeout=15.0)

        leftovers = self._own_processes()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in leftovers:
            wait_until_gone(pid)
        return leftovers

    def _own_processes(self) -> list[int]:
        """Live processes with an argument naming one of this service's binaries or files."""
        names = {str(path) for path in (*self._binaries, self.database, self.pidfile)}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                arguments = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            named = names & {argument.decode(errors="replace") for argument in arguments}
            if named and process_is_running(int(entry.name)):
                found.append(int(entry.name))
        return found

    def __enter__(self) -> SampleService:
        return self

    def __exit__(self, *exception: object) -> None:
        self.stop_all()


@pytest.fixture(name="sample_service")
def sample_service_fixture(tmp_path: Path) -> Iterator[SampleService]:
    """A SampleService in tmp_path, stopped (and its processes killed) at teardown."""
    with SampleService(tmp_path) as service:
        yield service


@dataclass(frozen=True)
class Response:
    """One recorded answer of the fake systemctl."""

    stdout: str = ""
    stderr: str = ""
    status: int = 0
    sleep_seconds: float = 0.0


def show_output(
    active_state: str = "active",
    sub_state: str = "running",
    main_pid: int = 812,
    restarts: int | None = 0,
    load_state: str = "loaded",
) -> str:
    """`systemctl show -p ...` output in the order systemd prints it (Service before Unit)."""
    lines = [f"MainPID={main_pid}"]
    if restarts is not None:
        lines.append(f"NRestarts={restarts}")
    lines += [f"LoadState={load_state}", f"ActiveState={active_state}", f"SubState={sub_state}"]
    return "\n".join(lines) + "\n"


_FAKE_SYSTEMCTL = """\
#!{python}
# A stand-in for systemctl(1): logs its argv, answers from recorded responses per verb.
import fcntl, json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
arguments = sys.argv[1:]
verb = next((a for a in arguments if not a.startswith("-")), "")
with open(os.path.join(here, "calls.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with open(os.path.join(here, "calls.jsonl"), "a") as log:
        log.write(json.dumps(arguments) + "\\n")
    with open(os.path.join(here, "responses.json")) as stream:
        responses = json.load(stream).get(verb) or [{{"stdout": "", "stderr": "", "status": 0,
                                                       "sleep_seconds": 0}}]
    counts_path = os.path.join(here, "counts.json")
    counts = json.load(open(counts_path)) if os.path.exists(counts_path) else {{}}
    index = counts.get(verb, 0)
    counts[verb] = index + 1
    with open(counts_path, "w") as stream:
        json.dump(counts, stream)
response = responses[min(index, len(responses) - 1)]
time.sleep(response["sleep_seconds"])
sys.stdout.write(response["stdout"])
sys.stderr.write(response["stderr"])
sys.exit(response["status"])
"""


class FakeSystemctl:
    """An executable `systemctl` in `directory` that replays responses and logs its calls.

    For each verb (restart, show, ...) the responses are given in order; the last one repeats.
    A verb with none answers exit 0 and no output.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        program = directory / "systemctl"
        program.write_text(_FAKE_SYSTEMCTL.format(python=sys.executable))
        program.chmod(0o755)
        self._responses: dict[str, list[dict[str, Any]]] = {}
        self._save()

    def respond(self, verb: str, *responses: Response) -> None:
        self._responses[verb] = [asdict(response) for response in responses]
        self._save()

    def calls(self) -> list[list[str]]:
        log = self.directory / "calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def put_first_on_path(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PATH", f"{self.directory}{os.pathsep}{os.environ.get('PATH', '')}")

    def _save(self) -> None:
        (self.directory / "responses.json").write_text(json.dumps(self._responses))


@pytest.fixture(name="fake_systemctl")
def fake_systemctl_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSystemctl:
    """A FakeSystemctl first on PATH for the duration of the test."""
    fake = FakeSystemctl(tmp_path / "fake-systemctl")
    fake.put_first_on_path(monkeypatch)
    return fake


def _toml(value: str | list[str]) -> str:
    # A JSON string (ASCII, with \\uXXXX escapes) is also a TOML basic string.
    return json.dumps(value)
