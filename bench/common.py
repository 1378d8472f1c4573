"""What the benchmarks and the torture run share: the sandbox host, the real daemon, figures.

The host is the test suite's `Sandbox` (tests/sandbox.py): a staging folder, an install path,
a SQLite database written by a real sample service under the `command` manager, a snapshot
folder and a state folder, all in one folder. The daemon is the real one, started as
`python -m stagewatch --config CFG run`, and reached over HTTP on 127.0.0.1 like a build
machine reaches it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "tests"))

from sandbox import Sandbox, free_port, wait_for  # noqa: E402

__all__ = [
    "REPOSITORY",
    "Daemon",
    "Figure",
    "Sandbox",
    "free_port",
    "median",
    "percentile",
    "render_table",
    "request",
    "wait_for",
]

HTTP_TIMEOUT_SECONDS = 10.0
DAEMON_START_SECONDS = 60.0


@dataclass
class Figure:
    """One measured figure and its target; `ratio` is always value / reference_value."""

    name: str
    value: float | None
    unit: str
    target: str
    holds: bool | None
    reference: str | None = None
    reference_value: float | None = None
    ratio: float | None = None
    note: str = ""

    @classmethod
    def against(
        cls,
        name: str,
        value: float | None,
        unit: str,
        reference: str,
        reference_value: float | None,
        *,
        max_ratio: float | None = None,
        min_ratio: float | None = None,
        faster_by: float | None = None,
        note: str = "",
    ) -> Figure:
        """A figure judged by its ratio to a reference measured on the same machine.

        `faster_by` = 2.5 means the value must be at most the reference / 2.5.
        """
        ratio = None
        if value is not None and reference_value:
            ratio = value / reference_value
        if faster_by is not None:
            target = f"{faster_by:g}x faster (ratio <= {1 / faster_by:.2g})"
            holds = None if ratio is None else ratio <= 1 / faster_by
        elif max_ratio is not None:
            target = f"ratio <= {max_ratio:g}"
            holds = None if ratio is None else ratio <= max_ratio
        elif min_ratio is not None:
            target = f"ratio >= {min_ratio:g}"
            holds = None if ratio is None else ratio >= min_ratio
        else:
            target, holds = "none (for comparison)", None
        return cls(name, value, unit, target, holds, reference, reference_value, ratio, note)

    @classmethod
    def bounded(
        cls,
        name: str,
        value: float | None,
        unit: str,
        *,
        maximum: float | None = None,
        minimum: float | None = None,
        note: str = "",
    ) -> Figure:
        """A figure judged by its own value."""
        if maximum is not None:
            target = f"<= {maximum:g} {unit}"
            holds = None if value is None else value <= maximum
        elif minimum is not None:
            target = f">= {minimum:g} {unit}"
            holds = None if value is None else value >= minimum
        else:
            target, holds = "none (for comparison)", None
        return cls(name, value, unit, target, holds, note=note)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def render_table(figures: Sequence[Figure]) -> str:
    """The figures as a Markdown table, then their notes as a numbered list."""
    lines = [
        "| figure | stagewatch | reference | ratio | target | holds? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    notes: list[str] = []
    for figure in figures:
        name = figure.name
        if figure.note:
            notes.append(figure.note)
            name = f"{name} [{len(notes)}]"
        reference = "-"
        if figure.reference is not None:
            reference = f"{figure.reference}: {_amount(figure.reference_value, figure.unit)}"
        ratio = "-" if figure.ratio is None else f"{figure.ratio:.2f}"
        holds = {True: "yes", False: "**no**", None: "n/a"}[figure.holds]
        lines.append(
            f"| {name} | {_amount(figure.value, figure.unit)} | {reference} | {ratio} "
            f"| {figure.target} | {holds} |"
        )

    lines.extend(["", *(f"{number}. {note}" for number, note in enumerate(notes, 1))])
    return "\n".join(lines).rstrip() + "\n"


def _amount(value: float | None, unit: str) -> str:
    if value is None:
        return "none"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with `fraction` of them at or below."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def request(
    port: int,
    method: str,
    path: str,
    *,
    secret: bytes | None = None,
    body: dict[str, Any] | None = None,
    timeout: float = HTTP_TIMEOUT_SECONDS,
) -> tuple[int, dict[str, Any]]:
    """One HTTP request to 127.0.0.1:`port` on a fresh connection; (status, JSON body)."""
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Webhook-Secret"] = secret.decode()
    payload = json.dumps(body).encode() if body is not None else None
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=payload, headers=headers)
        answer = connection.getresponse()
        content = answer.read()
    finally:
        connection.close()
    try:
        document = json.loads(content) if content else {}
    except ValueError:
        document = {"text": content.decode(errors="replace")}
    return answer.status, document


def answers(port: int, path: str = "/healthz", timeout: float = 1.0) -> bool:
    """Whether 127.0.0.1:`port` answers `path` with 200 now."""
    try:
        return request(port, "GET", path, timeout=timeout)[0] == 200
    except OSError:
        return False


class Daemon:
    """The real agent, `python -m stagewatch --config CFG run`, as a child process."""

    def __init__(
        self,
        sandbox: Sandbox,
        log_path: Path,
        *,
        environment: dict[str, str] | None = None,
        cpu: int | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.log_path = log_path
        self.environment = environment or {}
        self.cpu = cpu
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the daemon is not running")
        return self.process.pid

    def start(self, wait: bool = True) -> None:
        """Start the daemon; with `wait`, return once its webhook answers /healthz."""
        argv = [sys.executable, "-m", "stagewatch", "--config", str(self.sandbox.config_path)]
        argv.append("run")
        if self.cpu is not None:
            argv = ["taskset", "-c", str(self.cpu), *argv]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **self.environment}
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
            if name not in self.environment:
                environment.pop(name, None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environment
            )
        if wait:
            self.wait_serving()

    def wait_serving(self, timeout: float = DAEMON_START_SECONDS) -> None:
        def serving() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited with status {self.process.returncode}; see {self.log_path}"
                )
            return answers(self.sandbox.webhook_port)

        wait_for(serving, timeout, "the daemon's webhook")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would end it."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    def stop(self) -> None:
        """SIGTERM, as systemd stops it; SIGKILL after 10 s."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def arm(self, body: dict[str, Any] | None = None, busy_seconds: float = 30) -> dict[str, Any]:
        """POST the arm with the right secret; return the 202 answer.

        A deploy's record has its outcome a moment before the agent takes a new arm (409
        until then): 409 is retried for up to `busy_seconds`.
        """
        answer: dict[str, Any] = {}

        def armed() -> bool:
            status, document = request(
                self.sandbox.webhook_port, "POST", "/deploy", secret=self.sandbox.secret, body=body
            )
            if status not in (202, 409):
                raise RuntimeError(f"POST /deploy answered {status}: {document}")
            answer.update(document)
            return status == 202

        wait_for(armed, busy_seconds, "the agent to take an arm")
        return answer

    def record(self, deploy_id: str) -> dict[str, Any] | None:
        status, document = request(
            self.sandbox.webhook_port, "GET", f"/deploys/{deploy_id}", secret=self.sandbox.secret
        )
        return document if status == 200 else None

    def wait_outcome(self, deploy_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """The record of `deploy_id` once it has an outcome."""
        found: dict[str, Any] = {}

        def finished() -> bool:
            found.clear()
            found.update(self.record(deploy_id) or {})
            return bool(found.get("outcome"))

        wait_for(finished, timeout, f"the outcome of {deploy_id}")
        return found


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid`, all its threads, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


def last_mtime(paths: Sequence[Path]) -> float:
    return max(os.stat(path).st_mtime_ns for path in paths) / 1e9


def timestamp(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 UTC time as stagewatch writes them."""
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def write_back() -> None:
    """Write back every dirty page, so that one measurement does not pay for the last."""
    os.sync()
