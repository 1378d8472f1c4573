"""deploy_overhead, settle_to_start and downtime: whole deploys through the real daemon.

The host is a Sandbox whose sample service runs under the `command` manager, and the agent is
`stagewatch run`, armed over HTTP. The restart command is wrapped in a bash that writes
$EPOCHREALTIME (a builtin: no process is started for it) to a file before it execs the real
one, so the instant the deploy reaches the service is known to the microsecond.

- deploy_overhead: with the pair staged and settled, the time from the arm's POST until the
  restart command starts, minus what the work itself costs when done bare on the same files
  (hashing the release, copying it with copy_file_range and fsyncing the copy, a backup of the
  database with `PRAGMA integrity_check` and an fsync).
- settle_to_start: armed first, then the pair written; from the files' last mtime plus
  `settle_seconds` until the deploy's first step starts (`steps[0].started_at`: when the
  engine begins the step, its journal entry the first thing it writes; recorded with
  milliseconds, truncated).
- downtime: a probe in its own process GETs the service's /healthz every 5 ms; the longest
  time between two answers during a deploy, against the same during the service's restart
  command run alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import Daemon, Figure, Sandbox, median, percentile, timestamp, wait_for

SETTLE_SECONDS = 0.2
PROBE_INTERVAL_SECONDS = 0.005
STAGED_LINE = "A complete release is staged; waiting for the webhook to arm a deploy"
_PROBE = Path(__file__).with_name("health_probe.py")


class DeployHost:
    """A sandbox host with release 1.0 running, its restart command stamped, and its agent."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.stamps = root / "restart-started"
        overrides: dict[str, Any] = {
            "staging__settle_seconds": SETTLE_SECONDS,
            "health__stable_seconds": 0.3,
            "health__timeout_seconds": 10,
        }
        self.sandbox = Sandbox(root, **overrides)
        stamped = 'printf "%s\\n" "$EPOCHREALTIME" >> "$0"; exec "$@"'
        overrides["service__restart"] = [
            "bash",
            "-c",
            stamped,
            str(self.stamps),
            *self.sandbox.control("restart"),
        ]
        self.sandbox.write_config(**overrides)
        self.sandbox.install_initial("1.0")
        self.daemon = Daemon(self.sandbox, root / "daemon.log")
        self._pushes = 0
        # Deploys that did not succeed, left out of the figures and named in their notes.
        self.failed: list[dict[str, Any]] = []

    def close(self) -> None:
        self.daemon.stop()
        self.sandbox.stop_everything()

    def next_version(self) -> str:
        self._pushes += 1
        return f"2.{self._pushes}"

    def restart_started(self, after: float) -> float:
        """When the first restart command after `after` started (a rollback runs another)."""
        return min(stamp for stamp in map(float, self.stamps.read_text().split()) if stamp > after)

    def push_files_then_arm(self) -> tuple[dict[str, Any], float]:
        """Stage a release, wait until the agent saw it settle, then arm; (record, arm time)."""
        seen = self.daemon.log_text().count(STAGED_LINE)
        self.sandbox.stage(self.next_version())
        wait_for(lambda: self.daemon.log_text().count(STAGED_LINE) > seen, 10, "a settled pair")
        armed_at = time.time()
        deploy_id = self.daemon.arm()["id"]
        return self.daemon.wait_outcome(deploy_id), armed_at

    def push_arm_then_files(self) -> tuple[dict[str, Any], float]:
        """Arm, then stage a release; (record, the files' last mtime)."""
        deploy_id = self.daemon.arm()["id"]
        self.sandbox.stage(self.next_version())
        staging = self.sandbox.staging
        written = max(os.stat(staging / name).st_mtime_ns for name in _PAIR) / 1e9
        return self.daemon.wait_outcome(deploy_id), written

    def bare_work_seconds(self) -> float:
        """Hash, copy and snapshot done bare on the files a deploy just handled."""
        binary = self.sandbox.binary
        started = time.perf_counter()
        with binary.open("rb") as stream:
            hashlib.file_digest(stream, "sha256")

        copy = binary.with_name(".bench-copy")
        source = os.open(binary, os.O_RDONLY)
        target = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        try:
            size = os.fstat(source).st_size
            offset = 0
            while offset < size:
                offset += os.copy_file_range(source, target, size - offset, offset, offset)
            os.fsync(target)
        finally:
            os.close(source)
            os.close(target)

        backup = self.sandbox.snapshots / ".bench-backup.db"
        with (
            contextlib.closing(sqlite3.connect(self.sandbox.database)) as live,
            contextlib.closing(sqlite3.connect(backup)) as copied,
        ):
            live.backup(copied, pages=-1)
            copied.execute("PRAGMA integrity_check").fetchone()
        descriptor = os.open(backup, os.O_RDONLY)
        os.fsync(descriptor)
        os.close(descriptor)
        elapsed = time.perf_counter() - started

        copy.unlink()
        backup.unlink()
        return elapsed


_PAIR = ("dealspace", "dealspace.sha256")


@dataclass
class Overhead:
    total: float
    bare: float
    to_first_step: float
    steps: dict[str, float]
    between_steps: float
    restart_step_to_command: float

    @property
    def overhead(self) -> float:
        return self.total - self.bare


def _overhead(host: DeployHost) -> Overhead | None:
    """One deploy's overhead; None when it did not succeed (it is not a typical deploy)."""
    record, armed_at = host.push_files_then_arm()
    if record["outcome"] != "succeeded":
        host.failed.append(record)
        return None
    restart_at = host.restart_started(armed_at)
    steps = record["steps"]
    starts = [timestamp(step["started_at"]) for step in steps]
    restarting = next(index for index, step in enumerate(steps) if step["name"] == "restarting")
    between = sum(
        starts[index + 1] - starts[index] - steps[index]["seconds"] for index in range(restarting)
    )
    return Overhead(
        total=restart_at - armed_at,
        bare=host.bare_work_seconds(),
        to_first_step=starts[0] - armed_at,
        steps={step["name"]: step["seconds"] for step in steps[:restarting]},
        between_steps=between,
        restart_step_to_command=restart_at - starts[restarting],
    )


def measure_overhead(host: DeployHost, quick: bool) -> Figure:
    measured = [_overhead(host) for _ in range(5 if quick else 20)]
    pushes = [push for push in measured if push is not None]
    value = median([push.overhead for push in pushes]) * 1000

    def typical(seconds: list[float]) -> str:
        return f"{median(seconds) * 1000:.1f} ms"

    names = list(pushes[0].steps)
    parts = ", ".join(
        f"step {name} {typical([push.steps[name] for push in pushes])}" for name in names
    )
    note = (
        f"deploy_overhead: median of {len(pushes)} deploys; arm to restart command "
        f"{typical([push.total for push in pushes])}, of which bare hash + copy + snapshot "
        f"{typical([push.bare for push in pushes])}. Where the time goes (medians): arm to "
        f"the first step {typical([push.to_first_step for push in pushes])}; {parts}; "
        f"between steps (the log line and bookkeeping after each) "
        f"{typical([push.between_steps for push in pushes])}; restarting step to its command "
        f"{typical([push.restart_step_to_command for push in pushes])}. Worst overhead "
        f"{max(push.overhead for push in pushes) * 1000:.1f} ms."
    )
    return Figure.bounded("deploy_overhead", value, "ms", maximum=20, note=note)


def measure_settle_to_start(host: DeployHost, quick: bool) -> Figure:
    delays: list[float] = []
    for _ in range(20 if quick else 100):
        record, written = host.push_arm_then_files()
        started = timestamp(record["steps"][0]["started_at"])
        delays.append(started - (written + SETTLE_SECONDS))
    milliseconds = [delay * 1000 for delay in delays]
    note = (
        f"settle_to_start: {len(delays)} pushes, armed first; median "
        f"{median(milliseconds):.1f} ms, max {max(milliseconds):.1f} ms. steps[0].started_at "
        f"has millisecond resolution (truncated), so each reading may be up to 1 ms low."
    )
    return Figure.bounded(
        "settle_to_start_p99", percentile(milliseconds, 0.99), "ms", maximum=5, note=note
    )


@contextlib.contextmanager
def probing(port: int, folder: Path) -> Iterator[list[float]]:
    """Probe 127.0.0.1:`port`/healthz in another process; the list fills in at the end."""
    stop = folder / "probe.stop"
    output = folder / "probe.json"
    stop.unlink(missing_ok=True)
    output.unlink(missing_ok=True)
    answered: list[float] = []
    process = subprocess.Popen(
        [
            sys.executable,
            str(_PROBE),
            str(port),
            "--interval",
            str(PROBE_INTERVAL_SECONDS),
            "--stop-file",
            str(stop),
            "--output",
            str(output),
        ]
    )
    try:
        # A probe needs its interpreter started before the window opens: wait for answers.
        time.sleep(0.5)
        yield answered
    finally:
        stop.touch()
        process.wait(timeout=10)
        answered.extend(json.loads(output.read_text())["answered"])


def longest_gap(answered: list[float]) -> float:
    return max(later - earlier for earlier, later in itertools.pairwise(answered))


def _restart_alone(host: DeployHost) -> float:
    sandbox = host.sandbox
    with probing(sandbox.port, sandbox.root) as answered:
        subprocess.run(sandbox.control("restart"), check=True, stdout=subprocess.DEVNULL)
        wait_for(lambda: sandbox.served_version() is not None, 10, "the service back")
        time.sleep(0.3)
    return longest_gap(answered)


def _deploy_gap(host: DeployHost) -> float | None:
    """The longest gap through one deploy; None when it did not succeed."""
    sandbox = host.sandbox
    with probing(sandbox.port, sandbox.root) as answered:
        record, _ = host.push_files_then_arm()
        time.sleep(0.3)
    if record["outcome"] != "succeeded":
        host.failed.append(record)
        return None
    return longest_gap(answered)


def measure_downtime(host: DeployHost, quick: bool) -> Figure:
    alone: list[float] = []
    deploying: list[float] = []
    for _ in range(2 if quick else 5):
        alone.append(_restart_alone(host))
        gap = _deploy_gap(host)
        if gap is not None:
            deploying.append(gap)
    value = median(deploying) * 1000
    reference = median(alone) * 1000
    note = (
        f"downtime: a probe every {PROBE_INTERVAL_SECONDS * 1000:g} ms; medians of "
        f"{len(deploying)} deploys and {len(alone)} restarts alone, interleaved. Longest gaps: "
        f"deploys {', '.join(f'{gap * 1000:.0f}' for gap in deploying)} ms; restarts alone "
        f"{', '.join(f'{gap * 1000:.0f}' for gap in alone)} ms."
    )
    figure = Figure.against(
        "downtime", value, "ms", "the restart command alone", reference, note=note
    )
    figure.target = "<= reference + 50 ms"
    figure.holds = value <= reference + 50
    return figure


def measure(work: Path, quick: bool) -> list[Figure]:
    host = DeployHost(work / "deploys")
    try:
        host.daemon.start()
        # One deploy first, so that every measured one starts from a host that deployed.
        host.push_files_then_arm()
        figures = [
            measure_overhead(host, quick),
            measure_settle_to_start(host, quick),
            measure_downtime(host, quick),
        ]
        for record in host.failed:
            reason = str(record["reason"])[:160]
            figures[
                0
            ].note += f" Left out: deploy {record['id']} ended {record['outcome']} ({reason})."
        return figures
    finally:
        host.close()
