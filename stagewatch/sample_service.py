"""A small stand-in for dealspace, for `stagewatch demo` and for the tests.

    python -m stagewatch.sample_service serve --port P --database DB [--version V] [--behaviour B]
    python -m stagewatch.sample_service release FILE --port P --database DB --version V
                                                [--behaviour B]
    python -m stagewatch.sample_service control ACTION --binary PATH --pidfile FILE --log FILE

`serve` is the service: GET /healthz on 127.0.0.1:P answers `{"ok": true, "version": V}`, and a
writer thread inserts a row into the SQLite database DB (WAL mode) every WRITE_INTERVAL_SECONDS,
so that snapshots are taken under a live writer. SIGTERM stops it cleanly (exit 0). The
behaviour B makes it misbehave on purpose:

    good               healthy until stopped
    exit               exits 1 at once
    unhealthy          runs, but /healthz answers 503
    crash-after=S      healthy, then exits 1 after S seconds

`release` writes an executable file (mode 0755, a `#!` line naming this Python) that runs
`serve` with fixed arguments: a "binary" to stage and deploy. Different versions or behaviours
give different bytes.

`control` is a minimal supervisor for `service.manager = "command"`:

    restart     stop, then start
    start       spawn the binary in a session of its own, output appended to the log, and
                record it in the pidfile; nothing to do when it already runs
    stop        SIGTERM, wait up to --stop-timeout, then SIGKILL

and `control_command("is-active", ...)` gives the fourth command: exit 0 printing the pid when
the recorded process is alive, else exit 3. It is a few lines of POSIX shell rather than
Python, since the health probation runs it five times a second and an interpreter's start
alone takes tens of milliseconds: a supervisor's status query (`systemctl show`) costs a few.

Like a `Type=simple` unit, `start` does not wait for the service to be ready or even to stay
up: judging that is the health probation's job. The pidfile holds "PID STARTTIME", the start
time from /proc/PID/stat, so that a stale pidfile whose PID now belongs to another process is
recognised and that process left alone. A process that exited but was not reaped (a zombie,
when PID 1 does not reap orphans) counts as stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stagewatch.fsutil import atomic_write_bytes, remove_if_present

if TYPE_CHECKING:
    import sqlite3
    from http.server import ThreadingHTTPServer

WRITE_INTERVAL_SECONDS = 0.05
STOP_TIMEOUT_SECONDS = 10.0
KILL_TIMEOUT_SECONDS = 5.0
BEHAVIOURS = "good, exit, unhealthy or crash-after=SECONDS"


@dataclass(frozen=True)
class Behaviour:
    """How `serve` behaves: `name` is good, exit, unhealthy or crash-after."""

    name: str
    crash_after_seconds: float | None = None

    def __str__(self) -> str:
        if self.crash_after_seconds is None:
            return self.name
        return f"{self.name}={self.crash_after_seconds:g}"


def parse_behaviour(text: str) -> Behaviour:
    """Parse "good", "exit", "unhealthy" or "crash-after=SECONDS"; raise ValueError otherwise."""
    name, separator, seconds = text.partition("=")
    if name in ("good", "exit", "unhealthy") and not separator:
        return Behaviour(name)
    if name == "crash-after" and separator:
        delay = float(seconds)
        if delay >= 0:
            return Behaviour(name, delay)

    raise ValueError(f"behaviour must be {BEHAVIOURS}, not {text!r}")


def release_bytes(*, port: int, database: Path, version: str, behaviour: str) -> bytes:
    """The content of a release: a Python script that runs `serve` with these arguments."""
    parse_behaviour(behaviour)
    arguments = [
        "serve",
        "--port",
        str(port),
        "--database",
        str(database),
        "--version",
        version,
        "--behaviour",
        behaviour,
    ]
    script = (
        f"#!{sys.executable}\n"
        f"# dealspace stand-in, version {version}: python -m stagewatch.sample_service --help\n"
        "import sys\n"
        "from stagewatch.sample_service import main\n"
        f"sys.exit(main({arguments!r}))\n"
    )
    return script.encode()


def write_release(path: Path, *, port: int, database: Path, version: str, behaviour: str) -> None:
    """Write a release to `path` atomically, mode 0755."""
    atomic_write_bytes(
        path,
        release_bytes(port=port, database=database, version=version, behaviour=behaviour),
        mode=0o755,
    )
    # The mode given at creation is narrowed by the umask; a release is always 0755.
    os.chmod(path, 0o755)  # noqa: S103 - a binary, executable by the service user


# The is-active check of `_recorded_process`, in sh: the pidfile's "PID STARTTIME" must name a
# live process (not a zombie) that started at STARTTIME. Fields of /proc/PID/stat after the
# command name's closing parenthesis: the state, then 18 more, then the start time.
_IS_ACTIVE_SCRIPT = """\
set -f
not_running() { echo "not running ($1 names no live process)" >&2; exit 3; }
read -r pid start_time 2>/dev/null < "$1" || not_running "$1"
case $pid in ''|*[!0-9]*) not_running "$1" ;; esac
read -r stat 2>/dev/null < "/proc/$pid/stat" || not_running "$1"
set -- "$1" ${stat##*) }
[ "$2" != Z ] && [ "$2" != X ] && [ "${21}" = "$start_time" ] || not_running "$1"
echo "$pid"
"""


def control_command(action: str, *, binary: Path, pidfile: Path, log: Path) -> list[str]:
    """The argv of `control ACTION` for `service.restart`, `start` and `stop`, and of the
    is-active check for `service.is_active`."""
    if action == "is-active":
        return ["sh", "-c", _IS_ACTIVE_SCRIPT, "is-active", str(pidfile)]

    return [
        sys.executable,
        "-m",
        "stagewatch.sample_service",
        "control",
        action,
        "--binary",
        str(binary),
        "--pidfile",
        str(pidfile),
        "--log",
        str(log),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return its exit status."""
    arguments = _parser().parse_args(argv)
    if arguments.command == "serve":
        return serve(arguments.port, arguments.database, arguments.version, arguments.behaviour)
    if arguments.command == "release":
        write_release(
            arguments.file,
            port=arguments.port,
            database=arguments.database,
            version=arguments.version,
            behaviour=str(arguments.behaviour),
        )
        return 0

    return control(
        arguments.action,
        binary=arguments.binary,
        pidfile=arguments.pidfile,
        log=arguments.log,
        stop_timeout_seconds=arguments.stop_timeout,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stagewatch.sample_service",
        description="A stand-in for dealspace: a health endpoint and a SQLite writer.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the service")
    release_parser = commands.add_parser("release", help="write an executable that runs serve")
    release_parser.add_argument("file", type=Path)
    for subparser in (serve_parser, release_parser):
        subparser.add_argument("--port", type=int, required=True)
        subparser.add_argument("--database", type=Path, required=True)
        subparser.add_argument("--version", required=subparser is release_parser, default="0")
        subparser.add_argument(
            "--behaviour", type=_behaviour_argument, default=Behaviour("good"), help=BEHAVIOURS
        )

    control_parser = commands.add_parser("control", help="supervise a release over a pidfile")
    control_parser.add_argument("action", choices=("restart", "start", "stop"))
    control_parser.add_argument("--binary", type=Path, required=True)
    control_parser.add_argument("--pidfile", type=Path, required=True)
    control_parser.add_argument("--log", type=Path, required=True)
    control_parser.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT_SECONDS)
    return parser


def _behaviour_argument(text: str) -> Behaviour:
    try:
        return parse_behaviour(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def serve(port: int, database: Path, version: str, behaviour: Behaviour) -> int:
    """Serve /healthz and write rows until SIGTERM (0), or misbehave as `behaviour` says."""
    if behaviour.name == "exit":
        print(f"dealspace stand-in {version}: exiting at once (behaviour exit)", flush=True)
        return 1

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.set())

    # SQLite and the HTTP server are imported only by `serve`: a `control` command starts
    # faster without them.
    import sqlite3

    try:
        connection = _open_database(database)
        server = _health_server(port, version, behaviour)
    except (OSError, sqlite3.Error) as error:
        print(f"dealspace stand-in {version}: cannot start: {error}", file=sys.stderr, flush=True)
        return 1

    writer = threading.Thread(target=_write_rows, args=(connection, version, stopping))
    # A short poll interval, so that SIGTERM stops the stand-in within a tenth of a second.
    listener = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    writer.start()
    listener.start()
    print(
        f"dealspace stand-in {version} serving http://127.0.0.1:{port}/healthz "
        f"(behaviour {behaviour}, pid {os.getpid()})",
        flush=True,
    )

    if behaviour.crash_after_seconds is not None and not stopping.wait(
        behaviour.crash_after_seconds
    ):
        print(f"dealspace stand-in {version}: crashing (behaviour {behaviour})", flush=True)
        os._exit(1)

    stopping.wait()
    server.shutdown()
    server.server_close()
    writer.join()
    print(f"dealspace stand-in {version}: stopped", flush=True)
    return 0


def _health_server(port: int, version: str, behaviour: Behaviour) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:`port` answering GET /healthz; bound, not yet serving."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    healthy = behaviour.name != "unhealthy"

    class HealthServer(ThreadingHTTPServer):
        # The default backlog of 5 drops connections under a burst of requests.
        request_queue_size = 128
        daemon_threads = True

    class HealthHandler(BaseHTTPRequestHandler):
        server_version = "dealspace-stand-in"

        def do_GET(self) -> None:
            if self.path != "/healthz":
                self._answer(404, {"error": "not found"})
            else:
                self._answer(200 if healthy else 503, {"ok": healthy, "version": version})

        def _answer(self, status: int, document: dict[str, object]) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the health probation asks five times a second."""

    return HealthServer(("127.0.0.1", port), HealthHandler)


def _open_database(database: Path) -> sqlite3.Connection:
    # Autocommit (isolation_level=None): every insert is its own transaction, like a service
    # answering one request at a time. The writer thread owns the connection from here on.
    import sqlite3

    connection = sqlite3.connect(
        database, timeout=5.0, isolation_level=None, check_same_thread=False
    )
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(
        "CREATE TABLE IF NOT EXISTS deals ("
        "id INTEGER PRIMARY KEY, version TEXT NOT NULL, written_at REAL NOT NULL)"
    )
    return connection


def _write_rows(connection: sqlite3.Connection, version: str, stopping: threading.Event) -> None:
    import sqlite3

    try:
        while not stopping.wait(WRITE_INTERVAL_SECONDS):
            try:
                connection.execute(
                    "INSERT INTO deals (version, written_at) VALUES (?, ?)", (version, time.time())
                )
            except sqlite3.OperationalError as error:
                # A writer that is locked out for a moment (a snapshot, a checkpoint) carries on.
                print(f"dealspace stand-in {version}: write failed: {error}", file=sys.stderr)
    finally:
        connection.close()


def control(
    action: str, *, binary: Path, pidfile: Path, log: Path, stop_timeout_seconds: float
) -> int:
    """Run one supervisor action (restart, start or stop); return its exit status."""
    try:
        with _locked(pidfile):
            if action in ("stop", "restart"):
                _stop(pidfile, stop_timeout_seconds)
            if action in ("start", "restart"):
                return _start(binary, pidfile, log)
    except OSError as error:
        print(f"control {action}: {error}", file=sys.stderr)
        return 1

    return 0


@contextlib.contextmanager
def _locked(pidfile: Path) -> Iterator[None]:
    """One mutating action at a time per pidfile (flock(2) on a file beside it)."""
    with open(pidfile.with_name(pidfile.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield


def _start(binary: Path, pidfile: Path, log: Path) -> int:
    running = _recorded_process(pidfile)
    if running is not None:
        print(f"{running} already running")
        return 0

    try:
        with open(log, "ab") as output:
            process = subprocess.Popen(
                [str(binary)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    except OSError as error:
        print(f"cannot start {binary}: {error}", file=sys.stderr)
        return 1

    # Unreaped, the child keeps its /proc entry even if it exited at once, so its start time
    # can always be read here.
    start_time = _start_time(process.pid)
    atomic_write_bytes(pidfile, f"{process.pid} {start_time}\n".encode(), mode=0o644)
    print(process.pid)
    return 0


def _stop(pidfile: Path, timeout_seconds: float) -> None:
    pid = _recorded_process(pidfile)
    if pid is None:
        remove_if_present(pidfile)
        return

    try:
        # A pidfd names this very process: no signal can reach a newcomer that reused the PID.
        descriptor = os.pidfd_open(pid)
    except ProcessLookupError:
        remove_if_present(pidfile)
        return

    try:
        if _recorded_process(pidfile) == pid:
            signal.pidfd_send_signal(descriptor, signal.SIGTERM)
            if not _wait_for_exit(descriptor, timeout_seconds):
                print(f"{pid} ignored SIGTERM for {timeout_seconds:g} s: SIGKILL", file=sys.stderr)
                signal.pidfd_send_signal(descriptor, signal.SIGKILL)
                _wait_for_exit(descriptor, KILL_TIMEOUT_SECONDS)
    except ProcessLookupError:
        pass
    finally:
        os.close(descriptor)

    remove_if_present(pidfile)


def _wait_for_exit(descriptor: int, timeout_seconds: float) -> bool:
    # A pidfd turns readable when the process exits, child of ours or not (pidfd_open(2)).
    readable, _, _ = select.select([descriptor], [], [], timeout_seconds)
    return bool(readable)


def _recorded_process(pidfile: Path) -> int | None:
    """The pid in `pidfile` if that very process is alive (not a zombie), else None."""
    try:
        words = pidfile.read_text().split()
        pid, start_time = int(words[0]), int(words[1])
    except (FileNotFoundError, IndexError, ValueError):
        return None

    status = _process_status(pid)
    if status is None:
        return None

    state, actual_start_time = status
    if state in ("Z", "X") or actual_start_time != start_time:
        return None

    return pid


def _start_time(pid: int) -> int:
    status = _process_status(pid)
    return status[1] if status is not None else 0


def _process_status(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from /proc/PID/stat, see proc(5)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None

    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


if __name__ == "__main__":
    sys.exit(main())
