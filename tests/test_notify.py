"""`stagewatch run` under a stand-in for systemd's notify socket (sd_notify(3)).

The daemon is started with `$NOTIFY_SOCKET` naming a real AF_UNIX datagram socket of the test
and `$WATCHDOG_USEC=400000`, so that it should ping every 0.2 s. Every datagram is kept with
its arrival time; counts of pings are taken over windows, never from single intervals.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import (  # noqa: F401 - fixtures
    Daemon,
    HealthStandIn,
    NotifySocket,
    daemon_sandbox_fixture,
    health_stand_in_fixture,
    interrupted_deploy,
    notify_socket_fixture,
)
from sandbox import Sandbox, wait_for

MakeSandbox = Callable[..., tuple[Sandbox, Daemon]]

WATCHDOG = {"WATCHDOG_USEC": "400000"}


def outcome_in_history(sandbox: Sandbox, attempt_id: str) -> str | None:
    """The recorded outcome, read as another process would, without taking any lock."""
    uri = f"file:{sandbox.state / 'history.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as connection:
        row = connection.execute("SELECT outcome FROM attempts WHERE id = ?", (attempt_id,))
        found = row.fetchone()
    return found[0] if found else None


def pings_between(notify: NotifySocket, start: float, end: float) -> int:
    return sum(1 for at in notify.times("WATCHDOG=1") if start < at <= end)


def wait_past(moment: float) -> None:
    """Let a window of the test's own making pass, to count what arrived within it."""
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def status_lines(notify: NotifySocket) -> list[str]:
    return [line.removeprefix("STATUS=") for line in notify.lines("STATUS=")]


def test_ready_follows_the_recovery_and_the_listener_then_status_pings_and_stopping(
    daemon_sandbox: MakeSandbox, notify_socket: NotifySocket
) -> None:
    sandbox, daemon = daemon_sandbox()
    new = sandbox.stage("2.0")
    journal = interrupted_deploy(sandbox, "restarting")
    seen_at_ready: dict[str, Any] = {}

    def look_at_the_world() -> None:
        if not seen_at_ready:
            seen_at_ready["serving"] = daemon.serving()
            seen_at_ready["outcome"] = outcome_in_history(sandbox, journal["id"])
            seen_at_ready["journal"] = (sandbox.state / "journal.json").exists()

    notify_socket.on_line("READY=1", look_at_the_world)
    started = time.monotonic()
    daemon.start({**notify_socket.environment, **WATCHDOG})
    ready = notify_socket.wait_for_line("READY=1", timeout=20)

    wait_for(lambda: seen_at_ready, 5, "the look at the world at READY=1")
    assert seen_at_ready == {"serving": True, "outcome": "succeeded", "journal": False}
    assert sandbox.binary.read_bytes() == new
    before_ready = [
        line
        for item in notify_socket.notifications()
        if item.at < ready
        for line in item.lines
        if line.startswith("STATUS=")
    ]
    assert any(journal["id"] in line and "restarting" in line for line in before_ready), (
        before_ready
    )
    # The pings start before READY=1: the recovery is watched as well.
    assert pings_between(notify_socket, started, ready) >= 1

    wait_past(ready + 2.0)
    assert 6 <= pings_between(notify_socket, ready, ready + 2.0) <= 14

    armed = daemon.arm({"version": "3.0"})
    sandbox.stage("3.0")
    daemon.wait_outcome(armed.document["id"])
    wait_for(lambda: status_lines(notify_socket)[-1].startswith("idle"), 5, "an idle STATUS")

    statuses = status_lines(notify_socket)
    after_ready = statuses[statuses.index(next(s for s in statuses if s.startswith("idle"))) :]
    assert after_ready[0].startswith("idle; watching")
    assert after_ready[1].startswith("armed until") and armed.document["id"] in after_ready[1]
    deploying = [line for line in after_ready if line.startswith("deploying")]
    steps = [line.rsplit(": ", 1)[1] for line in deploying]
    assert steps == ["verifying", "snapshotting", "swapping", "restarting", "checking"], statuses
    assert all(armed.document["id"] in line for line in deploying)
    assert all(first != second for first, second in itertools.pairwise(statuses))
    every_line = [line for item in notify_socket.notifications() for line in item.lines]
    assert all(re.fullmatch(r"[A-Z_]+=.*", line) for line in every_line), every_line
    assert notify_socket.times("READY=1") == [ready]

    sent = time.monotonic()
    seconds = daemon.stop(signal.SIGTERM)

    assert seconds < 5
    assert daemon.process is not None and daemon.process.returncode == 0
    stopping = notify_socket.wait_for_line("STOPPING=1", after=sent, timeout=1)
    assert stopping <= sent + seconds


def test_no_pings_unless_the_watchdog_is_meant_for_this_process(
    daemon_sandbox: MakeSandbox, notify_socket: NotifySocket
) -> None:
    _, daemon = daemon_sandbox(install=False)
    daemon.start({**notify_socket.environment, **WATCHDOG, "WATCHDOG_PID": "1"})
    ready = notify_socket.wait_for_line("READY=1")
    wait_past(ready + 1.0)
    daemon.stop()

    assert notify_socket.times("WATCHDOG=1") == []
    assert notify_socket.times("STOPPING=1")


def assert_pings_withheld(
    daemon: Daemon, notify_socket: NotifySocket, part: str, after: float
) -> None:
    """The agent logs that `part` stalled, no sooner than `after` s from now, and stops pinging."""
    stalled = time.monotonic()
    daemon.wait_for_log(f"No progress from {part}", timeout=after + 15)
    withheld = time.monotonic()

    assert withheld - stalled > after, f"the pings stopped before {part}'s allowance ran out"
    wait_past(withheld + 1.5)
    assert pings_between(notify_socket, withheld, withheld + 1.5) == 0


def hold_system_calls(tasks: list[int], calls: str, at: str) -> subprocess.Popen[bytes]:
    """strace, holding each of `calls` by `tasks` (threads) for 30 s at its "enter" or "exit"."""
    return subprocess.Popen(
        [
            "strace",
            "-qq",
            "-o",
            "/dev/null",
            *(f"-p{task}" for task in tasks),
            "-e",
            f"trace={calls}",
            "-e",
            f"inject={calls}:delay_{at}=30000000",
        ],
    )


def traced_by(pid: int) -> int:
    """The pid of the process tracing `pid`'s main thread; 0 for none (proc(5))."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["TracerPid"])


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_pings_stop_while_a_rollback_hangs_in_a_system_call_and_the_next_start_ends_it(
    daemon_sandbox: MakeSandbox, notify_socket: NotifySocket, health_stand_in: HealthStandIn
) -> None:
    # Every network wait of a probe is bounded, so the hang comes from below: strace holds the
    # agent's next connect(2) for 30 s, as a stuck kernel call would. The release exits at
    # once (the URL says 503 while the service is down), so it is rolled back; the rollback's
    # probe then hangs in connect, and its heartbeat stays silent past the step's allowance of
    # 2 x restart_timeout_seconds + 5 s = 9 s.
    sandbox, daemon = daemon_sandbox(
        health__url=health_stand_in.url,
        health__timeout_seconds=1.5,
        service__restart_timeout_seconds=2,
    )
    old = sandbox.binary.read_bytes()
    health_stand_in.gate = lambda: sandbox.served_version() is not None
    environment = {**notify_socket.environment, **WATCHDOG}
    daemon.start(environment)
    notify_socket.wait_for_line("READY=1")
    armed = daemon.arm()
    sandbox.stage("2.0", "exit")

    wait_for(lambda: daemon.state() == "rolling_back", 20, "the rollback to start")
    # Every thread of the agent, and no child: the commands it runs are not to be held up.
    threads = [int(task) for task in os.listdir(f"/proc/{daemon.pid}/task")]
    tracer = hold_system_calls(threads, "connect", "enter")
    try:
        assert_pings_withheld(daemon, notify_socket, "deploy step rolling_back", after=8)
        assert daemon.running(), "the agent itself is alive; the step is not"
        record = daemon.record(armed.document["id"])
        assert record is not None and (record["state"], record["outcome"]) == (
            "rolling_back",
            None,
        )

    finally:
        # The tracer first: a traced process that is killed waits for its tracer to see it.
        tracer.kill()
        tracer.wait()

    # What systemd does when the pings stop (WatchdogSec=): kill the agent, start it again.
    daemon.kill()

    health_stand_in.gate = None
    daemon.start(environment)
    daemon.wait_serving(timeout=20)

    record = daemon.record(armed.document["id"])
    assert record is not None and record["outcome"] == "rolled_back", record
    assert sandbox.binary.read_bytes() == old
    assert sandbox.served_version() == "1.0"
    second_ready = notify_socket.times("READY=1")[-1]
    wait_past(second_ready + 1.0)
    assert pings_between(notify_socket, second_ready, second_ready + 1.0) >= 3


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_pings_stop_while_an_event_waits_on_a_stuck_main_loop(
    daemon_sandbox: MakeSandbox, notify_socket: NotifySocket
) -> None:
    # strace holds the return of every poll(2) of the main thread (and of its first, the one
    # it sleeps in now, when it comes back) for 30 s, as a deadlock of the loop would hold it.
    # The idle main thread is not asked; an event it leaves untaken for 10 s is noticed.
    _, daemon = daemon_sandbox()
    daemon.start({**notify_socket.environment, **WATCHDOG})
    notify_socket.wait_for_line("READY=1")
    assert daemon.pid is not None
    tracer = hold_system_calls([daemon.pid], "poll,ppoll", "exit")
    try:
        wait_for(lambda: traced_by(daemon.pid) == tracer.pid, 5, "strace to attach")
        # The first arm wakes the main thread, which sticks in its next poll; the second waits.
        assert daemon.arm().status == 202
        assert daemon.arm().status == 202, "the webhook answers on its own thread"
        assert_pings_withheld(daemon, notify_socket, "the coordinator's loop", after=9)
    finally:
        tracer.kill()
        tracer.wait()

    daemon.wait_for_log("watchdog pings resumed", timeout=40)
    assert daemon.running()


def test_a_restart_command_that_hangs_is_killed_at_its_timeout_while_the_pings_go_on(
    daemon_sandbox: MakeSandbox, notify_socket: NotifySocket
) -> None:
    sandbox, daemon = daemon_sandbox(health__timeout_seconds=3)
    old = sandbox.binary.read_bytes()
    marker = sandbox.root / "restart-hung-once"
    # The first restart hangs (like a stop that never returns); later ones work.
    hangs_once = ["sh", "-c", 'if [ ! -e "$0" ]; then : > "$0"; exec sleep 30; fi; exec "$@"']
    sandbox.write_config(
        health__stable_seconds=0.3,
        health__timeout_seconds=3,
        service__restart=[*hangs_once, str(marker), *sandbox.control("restart")],
        service__restart_timeout_seconds=1.5,
    )
    daemon.start({**notify_socket.environment, **WATCHDOG})
    notify_socket.wait_for_line("READY=1")
    armed = daemon.arm()
    sandbox.stage("2.0")

    record = daemon.wait_outcome(armed.document["id"], timeout=30)

    assert record["outcome"] == "rolled_back", record
    assert "did not finish within 1.5 s and was killed" in record["reason"]
    assert sandbox.binary.read_bytes() == old
    assert sandbox.served_version() == "1.0"
    status_times = {line: item.at for item in notify_socket.notifications() for line in item.lines}
    restarting = status_times[f"STATUS=deploying {armed.document['id']}: restarting"]
    rolling_back = status_times[f"STATUS=deploying {armed.document['id']}: rolling_back"]
    assert rolling_back - restarting >= 1.5
    assert pings_between(notify_socket, restarting, rolling_back) >= 4
    assert "No progress from" not in daemon.log()


def test_status_lines_are_ascii_whatever_the_staging_folder_is_called(
    daemon_sandbox: MakeSandbox, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    staging = tmp_path / "Übergabe-部署"
    staging.mkdir()
    _, daemon = daemon_sandbox(install=False, staging__dir=str(staging))
    daemon.start(notify_socket.environment)
    notify_socket.wait_for_line("READY=1")

    escaped = str(staging).encode("ascii", "backslashreplace").decode("ascii")
    wait_for(lambda: f"STATUS=idle; watching {escaped}" in notify_socket.lines(), 5, "STATUS")
