"""`stagewatch run` as a real process, and the parts of the world it talks to.

    daemon = Daemon(sandbox)                  # conftest.Sandbox: a host in a folder
    daemon.start()                            # python -m stagewatch --config CFG run
    daemon.wait_serving()                     # GET /healthz answers
    armed = daemon.arm({"version": "2.0"})    # POST <webhook.path> with the secret
    record = daemon.wait_outcome(armed.document["id"])
    seconds = daemon.stop()                   # SIGTERM by PID; the time it took to exit

Its stderr goes to a file per start (`daemon.log()`), its environment is the test's without
any systemd variable unless one is given. `NotifySocket` stands in for systemd's notify
socket: a real AF_UNIX datagram socket collecting every message with its arrival time.
`HealthStandIn` is a health URL whose answers the test chooses, up to one that never ends.
The fixtures `daemon_sandbox`, `notify_socket` and `health_stand_in` clean up after the test;
a test module imports them as `daemon_sandbox_fixture` and so on.
Releases can be padded (`write_padded_release`) so that hashing and copying them takes long
enough to send a signal in the middle.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sandbox import Sandbox, wait_for

# Variables through which systemd talks to the agent; a test sets only those it means.
SYSTEMD_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "CREDENTIALS_DIRECTORY",
    "INVOCATION_ID",
    "STAGEWATCH_CONFIG",
)

# What the sandbox's secret file holds, unless a test changes it.
_DEFAULT = object()


@dataclass(frozen=True)
class Answer:
    """One HTTP answer of the webhook: the status and the parsed JSON body."""

    status: int
    document: Any


class Daemon:
    """`stagewatch run` for one sandbox; it may be stopped and started again."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_path = sandbox.root / "daemon-0.log"

    @property
    def pid(self) -> int:
        assert self.process is not None, "the daemon was never started"
        return self.process.pid

    def start(self, environment: Mapping[str, str] | None = None) -> None:
        """Start the daemon; stderr goes to `daemon-N.log` in the sandbox, N counting starts."""
        assert not self.running(), "the daemon is already running"
        self.starts += 1
        self.log_path = self.sandbox.root / f"daemon-{self.starts}.log"
        variables = {
            name: value for name, value in os.environ.items() if name not in SYSTEMD_VARIABLES
        }
        variables.update(environment or {})
        argv = [sys.executable, "-m", "stagewatch"]
        argv += ["--config", str(self.sandbox.config_path), "run"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=variables,
                cwd=self.sandbox.root,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """What the current (or last) run wrote to stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        wait_for(lambda: text in self.log(), timeout, f"{text!r} in the daemon's log")

    # HTTP, as the build machine speaks it.

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        secret: bytes | object | None = _DEFAULT,
        timeout: float = 5.0,
    ) -> Answer:
        """One request to the webhook listener, with the sandbox's secret unless told."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        secret = self.sandbox.secret if secret is _DEFAULT else secret
        if isinstance(secret, bytes):
            headers["X-Webhook-Secret"] = secret.decode()
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.sandbox.webhook_port, timeout=timeout
        )
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            content = response.read()
        finally:
            connection.close()
        return Answer(response.status, json.loads(content) if content else None)

    def serving(self) -> bool:
        try:
            return self.request("GET", "/healthz", secret=None, timeout=1.0).status == 200
        except OSError:
            return False

    def wait_serving(self, timeout: float = 15.0) -> None:
        """Wait until /healthz answers; fail at once, with the log, if the daemon exits."""

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"the daemon exited with {self.process.returncode}:\n{self.log()}"
                )
            return self.serving()

        wait_for(up, timeout, "the daemon's webhook to answer")

    def arm(self, fields: dict[str, Any] | None = None, secret: Any = _DEFAULT) -> Answer:
        body = json.dumps(fields).encode() if fields is not None else b""
        return self.request("POST", "/deploy", body, secret)

    def record(self, deploy_id: str) -> dict[str, Any] | None:
        answer = self.request("GET", f"/deploys/{deploy_id}")
        if answer.status == 404:
            return None
        assert answer.status == 200, answer
        document: dict[str, Any] = answer.document
        return document

    def status(self) -> dict[str, Any]:
        answer = self.request("GET", "/status")
        assert answer.status == 200, answer
        document: dict[str, Any] = answer.document
        return document

    def state(self) -> str | None:
        """The state GET /status reports; None while the daemon does not answer."""
        try:
            return str(self.status()["state"])
        except OSError:
            return None

    def wait_outcome(self, deploy_id: str, timeout: float = 20.0) -> dict[str, Any]:
        """Poll GET /deploys/ID until the record has an outcome; return the record."""

        def finished() -> dict[str, Any] | None:
            record = self.record(deploy_id)
            return record if record is not None and record["outcome"] is not None else None

        record: dict[str, Any] = wait_for(finished, timeout, f"deploy {deploy_id} to finish")
        return record

    # Signals, by PID.

    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def send_to_another_thread(self, signum: int) -> None:
        """Send `signum` to one of the daemon's threads other than the main one.

        The kernel may deliver a signal sent to the process to any thread that does not
        block it (signal(7)); tgkill(2) picks the thread on purpose.
        """
        others = sorted(int(name) for name in os.listdir(f"/proc/{self.pid}/task"))[1:]
        assert others, "the daemon runs no thread besides the main one"
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.tgkill(self.pid, others[-1], signum) != 0:
            raise OSError(ctypes.get_errno(), "tgkill failed")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 5.0) -> float:
        """Send `signum` and wait for the exit; return the seconds it took (at most `timeout`)."""
        assert self.process is not None
        started = time.monotonic()
        self.send(signum)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the daemon did not exit within {timeout:g} s of signal {signum}:\n{self.log()}"
            ) from None
        return time.monotonic() - started

    def kill(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)

    def close(self) -> None:
        self.kill()


@dataclass(frozen=True)
class Notification:
    """One datagram on the notify socket: when it arrived (time.monotonic) and its lines."""

    at: float
    lines: tuple[str, ...]


class NotifySocket:
    """A datagram socket in place of systemd's, collecting what the daemon sends to it.

    `environment` is what to start the daemon with. `on_line(line, callback)` runs the
    callback on the receiving thread as soon as a datagram carrying `line` arrives, to look
    at the world at that instant.
    """

    def __init__(self, folder: Path) -> None:
        self._scratch: Path | None = None
        path = folder / "notify.sock"
        if len(os.fsencode(path)) > 100:
            # sockaddr_un holds 108 bytes (unix(7)); a deep tmp_path needs a shorter home.
            self._scratch = Path(tempfile.mkdtemp(prefix="stagewatch-notify-"))
            path = self._scratch / "notify.sock"
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.05)
        self._lock = threading.Lock()
        self._notifications: list[Notification] = []
        self._callbacks: list[tuple[str, Callable[[], None]]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-socket")
        self._thread.start()

    @property
    def environment(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def on_line(self, line: str, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append((line, callback))

    def notifications(self) -> list[Notification]:
        with self._lock:
            return list(self._notifications)

    def times(self, line: str) -> list[float]:
        """Arrival times of the datagrams that carry exactly `line`."""
        return [item.at for item in self.notifications() if line in item.lines]

    def lines(self, prefix: str = "") -> list[str]:
        return [
            line for item in self.notifications() for line in item.lines if line.startswith(prefix)
        ]

    def wait_for_line(self, line: str, after: float = 0.0, timeout: float = 15.0) -> float:
        """Wait for a datagram carrying `line` that arrived after `after`; return its time."""

        def arrived() -> float | None:
            return next((at for at in self.times(line) if at > after), None)

        found: float = wait_for(arrived, timeout, f"{line} on the notify socket")
        return found

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._socket.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def _receive(self) -> None:
        while not self._stopping.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            notification = Notification(time.monotonic(), tuple(data.decode().split("\n")))
            with self._lock:
                self._notifications.append(notification)
                callbacks = [call for line, call in self._callbacks if line in notification.lines]
            for callback in callbacks:
                callback()


class HealthStandIn:
    """A health URL on 127.0.0.1 that answers 200, 503, or trickles an answer forever.

    `mode` is "healthy", "unhealthy" or "trickle"; "trickle" sends a status line and then one
    byte of a header every 0.3 s: each byte arrives well within any socket timeout, yet the
    answer never completes, as with a URL that names a streaming endpoint. While `gate` (when
    set) returns false, every answer is 503, as from a proxy whose service is down. One
    thread serves every connection.
    """

    TRICKLE_SECONDS = 0.3

    def __init__(self, mode: str = "healthy") -> None:
        self.mode = mode
        self.gate: Callable[[], bool] | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/healthz"
        self.trickling = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="health-stand-in")
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        trickles: list[socket.socket] = []
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select(self.TRICKLE_SECONDS):
                    if key.fileobj is self._listener:
                        connection, _ = self._listener.accept()
                        connection.setblocking(False)
                        selector.register(connection, selectors.EVENT_READ)
                    else:
                        connection = key.fileobj  # type: ignore[assignment]
                        selector.unregister(connection)
                        self._answer(connection, trickles)
                for connection in list(trickles):
                    try:
                        connection.send(b"a")
                    except OSError:
                        trickles.remove(connection)
                        connection.close()
                self.trickling = len(trickles)
            for key in list(selector.get_map().values()):
                if key.fileobj is not self._listener:
                    key.fileobj.close()  # type: ignore[union-attr]
        for connection in trickles:
            connection.close()

    def _answer(self, connection: socket.socket, trickles: list[socket.socket]) -> None:
        mode = self.mode if self.gate is None or self.gate() else "unhealthy"
        with contextlib.suppress(OSError):
            connection.recv(65536)
            if mode == "trickle":
                connection.send(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                trickles.append(connection)
                return
            status = b"200 OK" if mode == "healthy" else b"503 Service Unavailable"
            body = b'{"ok": true}' if mode == "healthy" else b'{"ok": false}'
            connection.sendall(
                b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (status, len(body), body)
            )
        connection.close()


# Sandboxes and releases.


@pytest.fixture(name="daemon_sandbox")
def daemon_sandbox_fixture(tmp_path: Path) -> Iterator[Callable[..., tuple[Sandbox, Daemon]]]:
    """Make a sandbox (config overrides as keyword arguments) with release 1.0 running, and
    its daemon, not started; both are cleaned up at the end of the test."""
    made: list[tuple[Sandbox, Daemon]] = []

    def make(install: bool = True, **overrides: Any) -> tuple[Sandbox, Daemon]:
        overrides.setdefault("health__stable_seconds", 0.3)
        sandbox = Sandbox(tmp_path, **overrides)
        daemon = Daemon(sandbox)
        made.append((sandbox, daemon))
        if install:
            sandbox.install_initial("1.0")
        return sandbox, daemon

    try:
        yield make
    finally:
        for sandbox, daemon in made:
            daemon.close()
            sandbox.stop_everything()


@pytest.fixture(name="notify_socket")
def notify_socket_fixture(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path)
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture(name="health_stand_in")
def health_stand_in_fixture() -> Iterator[HealthStandIn]:
    stand_in = HealthStandIn()
    try:
        yield stand_in
    finally:
        stand_in.close()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_padded_release(
    sandbox: Sandbox, path: Path, version: str, behaviour: str = "good", size: int = 0
) -> str:
    """Write a release of `size` bytes at `path` (mode 0755); return its sha256.

    The file is a shell script that execs the sandbox's release of `version`, followed by
    zeros up to `size` (a sparse file: instant to write, yet hashed and copied in full). The
    shell execs before it reads past the first line, so the padding is never run.
    """
    sandbox.release_bytes(version, behaviour)
    target = sandbox.root / "build" / f"dealspace-{version}-{behaviour}"
    head = f'#!/bin/sh\nexec {shlex.quote(str(target))} "$@"\n'.encode()
    with path.open("wb") as stream:
        stream.write(head)
        stream.truncate(max(size, len(head)))
    path.chmod(0o755)
    return file_sha256(path)


def stage_padded(sandbox: Sandbox, version: str, behaviour: str = "good", size: int = 0) -> str:
    """Stage a padded release and its checksum file; return its sha256."""
    digest = write_padded_release(sandbox, sandbox.staging / "dealspace", version, behaviour, size)
    (sandbox.staging / "dealspace.sha256").write_text(f"{digest}  dealspace\n")
    return digest


def install_padded(sandbox: Sandbox, version: str = "1.0", size: int = 0) -> str:
    """Install a padded release of `version` at the install path and start it."""
    digest = write_padded_release(sandbox, sandbox.binary, version, "good", size)
    sandbox.start_service()
    return digest


def grow_database(sandbox: Sandbox, megabytes: int) -> None:
    """Add `megabytes` of rows to the service's database, so that a snapshot takes a while."""
    with sqlite3.connect(sandbox.database) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE IF NOT EXISTS ballast (id INTEGER PRIMARY KEY, data)")
        row = os.urandom(4096)
        connection.executemany(
            "INSERT INTO ballast (data) VALUES (?)", ((row,) for _ in range(megabytes * 256))
        )


def interrupted_deploy(sandbox: Sandbox, step: str) -> dict[str, Any]:
    """Run `stagewatch deploy` and SIGKILL it as the journal names `step`; return the journal."""
    harness = Path(__file__).with_name("crash_harness.py")
    argv = [sys.executable, str(harness), step, "1", "--"]
    argv += ["--config", str(sandbox.config_path), "deploy"]
    completed = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert completed.returncode == -signal.SIGKILL, completed.stderr.decode()
    journal: dict[str, Any] = json.loads((sandbox.state / "journal.json").read_bytes())
    assert journal["step"] == step
    return journal
