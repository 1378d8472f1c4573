"""Signals to `stagewatch run`: SIGTERM in the middle of every step, and SIGHUP reloads.

SIGTERM must end the agent within 5 s, wherever the deploy stands; the next start finishes or
undoes the interrupted deploy and records its outcome, and the install path holds the old or
the new bytes, mode 0755, at every moment in between. SIGHUP re-reads the configuration and
the secret, and keeps the running ones when the new ones cannot be used.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from daemon_fixtures import (  # noqa: F401 - fixtures
    Daemon,
    NotifySocket,
    daemon_sandbox_fixture,
    file_sha256,
    grow_database,
    install_padded,
    interrupted_deploy,
    notify_socket_fixture,
    stage_padded,
)
from sandbox import Sandbox, wait_for

MakeSandbox = Callable[..., tuple[Sandbox, Daemon]]

STEPS = ["verifying", "snapshotting", "swapping", "restarting", "checking", "rolling_back"]
PADDED_BYTES = 256 << 20


def seconds_until(stamp: str) -> float:
    return (datetime.fromisoformat(stamp) - datetime.now(UTC)).total_seconds()


def slow_restart(sandbox: Sandbox, seconds: float) -> list[str]:
    """The sandbox's restart command, one that first waits `seconds`."""
    return ["sh", "-c", f'sleep {seconds}; exec "$@"', "slow-restart", *sandbox.control("restart")]


def journal_step(sandbox: Sandbox) -> str | None:
    try:
        return str(json.loads((sandbox.state / "journal.json").read_bytes())["step"])
    except FileNotFoundError:
        return None


def wait_for_journal_step(sandbox: Sandbox, step: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while journal_step(sandbox) != step:
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {step}"
        time.sleep(0.002)


def prepare_deploy_for(make: MakeSandbox, step: str) -> tuple[Sandbox, Daemon, str, str]:
    """A sandbox whose next deploy spends long enough in `step`; return the old and new sha256.

    Each step is made slow by real work: a large release to copy and hash (verifying), a large
    database to back up and check (snapshotting), a large installed binary to hash before it
    is kept (swapping), a restart command that takes a second (restarting), a long stable
    window (checking), and a release that exits at once followed by a long stable window for
    the previous one (rolling back).
    """
    overrides: dict[str, Any] = {}
    if step == "checking":
        overrides["health__stable_seconds"] = 3
    if step == "rolling_back":
        overrides.update(health__stable_seconds=3, health__timeout_seconds=1)
    sandbox, daemon = make(install=False, **overrides)

    old = install_padded(sandbox, "1.0", PADDED_BYTES if step == "swapping" else 0)
    if step == "snapshotting":
        grow_database(sandbox, 96)
    if step == "restarting":
        sandbox.write_config(
            health__stable_seconds=0.3, service__restart=slow_restart(sandbox, 1.5)
        )

    daemon.start()
    daemon.wait_serving()
    behaviour = "exit" if step == "rolling_back" else "good"
    size = PADDED_BYTES if step == "verifying" else 0
    new = stage_padded(sandbox, "2.0", behaviour, size)
    return sandbox, daemon, old, new


@pytest.mark.parametrize("step", STEPS)
def test_sigterm_during_a_step_exits_within_5_s_and_the_next_start_settles_the_deploy(
    daemon_sandbox: MakeSandbox, step: str
) -> None:
    sandbox, daemon, old, new = prepare_deploy_for(daemon_sandbox, step)
    armed = daemon.arm({"version": "2.0"})
    deploy_id = armed.document["id"]

    # The journal names a step as the step begins, and the daemon reports it from then on:
    # the signal lands inside the step. The swap's window is the shortest (the hashing of the
    # installed binary, some 200 ms), so the journal is read every few milliseconds.
    wait_for_journal_step(sandbox, step, timeout=30)
    seconds = daemon.stop(signal.SIGTERM, timeout=5)

    assert daemon.process is not None and daemon.process.returncode == 0, daemon.log()
    assert seconds < 5
    assert f"Stopping during deploy {deploy_id}" in daemon.log(), daemon.log()
    interrupted_at = journal_step(sandbox)
    assert interrupted_at in STEPS[STEPS.index(step) :], daemon.log()
    assert file_sha256(sandbox.binary) in (old, new)
    assert sandbox.binary.stat().st_mode & 0o777 == 0o755

    daemon.start()
    daemon.wait_serving(timeout=30)
    record = daemon.record(deploy_id)

    assert record is not None
    expected = "rolled_back" if step == "rolling_back" else "succeeded"
    assert record["outcome"] == expected, record
    assert file_sha256(sandbox.binary) == (new if expected == "succeeded" else old)
    assert sandbox.binary.stat().st_mode & 0o777 == 0o755
    assert os.listdir(sandbox.binary.parent) == ["dealspace"]
    assert journal_step(sandbox) is None
    assert sandbox.served_version() == ("2.0" if expected == "succeeded" else "1.0")
    assert "Recovering the deploy interrupted at step" in daemon.log()
    assert daemon.state() == "idle"


def test_sigterm_during_the_recovery_before_ready_exits_and_the_next_start_finishes_it(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox()
    new = sandbox.stage("2.0")
    journal = interrupted_deploy(sandbox, "restarting")
    sandbox.write_config(health__stable_seconds=3)
    daemon.start()
    wait_for(lambda: journal_step(sandbox) == "checking", 20, "the recovery to be checking")

    seconds = daemon.stop(signal.SIGTERM, timeout=5)

    assert seconds < 5
    assert f"Stopping during the recovery of {journal['id']} (step " in daemon.log()
    assert not daemon.serving()
    sandbox.write_config(health__stable_seconds=0.3)
    daemon.start()
    daemon.wait_serving(timeout=30)
    record = daemon.record(journal["id"])
    assert record is not None and record["outcome"] == "succeeded", record
    assert sandbox.binary.read_bytes() == new


def test_sigterm_delivered_to_any_thread_stops_an_idle_agent_within_5_s(
    daemon_sandbox: MakeSandbox, notify_socket: NotifySocket
) -> None:
    _, daemon = daemon_sandbox(install=False)
    daemon.start(notify_socket.environment)
    notify_socket.wait_for_line("READY=1")

    started = time.monotonic()
    daemon.send_to_another_thread(signal.SIGTERM)
    assert daemon.process is not None
    code = daemon.process.wait(5)

    assert code == 0
    assert notify_socket.wait_for_line("STOPPING=1", after=started, timeout=1)


def test_sighup_delivered_to_any_thread_reloads_an_idle_agent(
    daemon_sandbox: MakeSandbox, notify_socket: NotifySocket
) -> None:
    _, daemon = daemon_sandbox(install=False)
    daemon.start(notify_socket.environment)
    ready = notify_socket.wait_for_line("READY=1")

    daemon.send_to_another_thread(signal.SIGHUP)

    reloading = notify_socket.wait_for_line("RELOADING=1", after=ready, timeout=2)
    notify_socket.wait_for_line("READY=1", after=reloading, timeout=2)


def test_sighup_reloads_the_secret_and_the_configuration(
    daemon_sandbox: MakeSandbox, notify_socket: NotifySocket
) -> None:
    sandbox, daemon = daemon_sandbox()
    daemon.start(notify_socket.environment)
    ready = notify_socket.wait_for_line("READY=1")
    old_secret = sandbox.secret

    new_secret = b"a-new-secret-for-the-build-machine"
    (sandbox.root / "webhook-secret").write_bytes(new_secret + b"\n")
    sandbox.write_config(health__stable_seconds=0.3, staging__arm_timeout_seconds=1)
    daemon.send(signal.SIGHUP)
    reloading = notify_socket.wait_for_line("RELOADING=1", after=ready)
    reloaded = notify_socket.wait_for_line("READY=1", after=reloading)

    assert reloading < reloaded
    assert daemon.arm(secret=old_secret).status == 401
    armed = daemon.arm(secret=new_secret)
    assert armed.status == 202, armed
    assert seconds_until(armed.document["armed_until"]) < 2
    sandbox.secret = new_secret
    assert daemon.wait_outcome(armed.document["id"], timeout=5)["outcome"] == "expired"
    assert "Configuration and secret reloaded" in daemon.log()


@pytest.mark.parametrize("broken", ["configuration", "secret", "listen"])
def test_sighup_with_invalid_new_settings_keeps_the_running_ones(
    daemon_sandbox: MakeSandbox, notify_socket: NotifySocket, broken: str
) -> None:
    sandbox, daemon = daemon_sandbox(staging__arm_timeout_seconds=2)
    daemon.start(notify_socket.environment)
    ready = notify_socket.wait_for_line("READY=1")
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        if broken == "configuration":
            sandbox.write_config(database__keep=0, staging__arm_timeout_seconds=600)
            expected = "database.keep"
        elif broken == "secret":
            secret_file = sandbox.root / "webhook-secret"
            secret_file.write_bytes(b"a-secret-anyone-can-read\n")
            secret_file.chmod(0o644)
            expected = "webhook.secret_file"
        else:
            port = taken.getsockname()[1]
            sandbox.write_config(
                webhook__listen=f"127.0.0.1:{port}", staging__arm_timeout_seconds=600
            )
            expected = "webhook.listen"
        daemon.send(signal.SIGHUP)
        reloading = notify_socket.wait_for_line("RELOADING=1", after=ready)
        notify_socket.wait_for_line("READY=1", after=reloading)
        daemon.wait_for_log("Reload refused")
    finally:
        taken.close()

    assert expected in daemon.log()
    assert daemon.running()
    # The old secret, the old address and the old arm timeout are still in force.
    armed = daemon.arm()
    assert armed.status == 202, armed
    assert seconds_until(armed.document["armed_until"]) < 3
    assert daemon.wait_outcome(armed.document["id"], timeout=6)["outcome"] == "expired"


def test_a_reload_during_a_deploy_applies_to_the_next_deploy(
    daemon_sandbox: MakeSandbox, notify_socket: NotifySocket
) -> None:
    sandbox, daemon = daemon_sandbox(health__stable_seconds=2)
    daemon.start(notify_socket.environment)
    ready = notify_socket.wait_for_line("READY=1")
    first = daemon.arm()
    sandbox.stage("2.0")
    wait_for(lambda: daemon.state() == "checking", 10, "the first deploy to be checking")

    sandbox.write_config(health__stable_seconds=0.4)
    daemon.send(signal.SIGHUP)
    notify_socket.wait_for_line("READY=1", after=notify_socket.wait_for_line("RELOADING=1", ready))
    record = daemon.wait_outcome(first.document["id"])
    assert record["outcome"] == "succeeded", record
    assert record["steps"][-1]["seconds"] >= 2
    # The outcome is in the history a moment before the daemon is back to idle.
    wait_for(lambda: daemon.state() == "idle", 10, "the daemon back to idle")

    second = daemon.arm()
    sandbox.stage("3.0")
    record = daemon.wait_outcome(second.document["id"])

    assert record["outcome"] == "succeeded", record
    assert "then stable for 0.4 s" in daemon.log()
    assert record["steps"][-1]["seconds"] < 2


def test_sighup_during_the_recovery_is_applied_once_the_agent_serves(
    daemon_sandbox: MakeSandbox, notify_socket: NotifySocket
) -> None:
    sandbox, daemon = daemon_sandbox()
    sandbox.stage("2.0")
    journal = interrupted_deploy(sandbox, "restarting")
    sandbox.write_config(health__stable_seconds=1.5)
    daemon.start(notify_socket.environment)
    wait_for(lambda: journal_step(sandbox) == "checking", 20, "the recovery to be checking")

    new_secret = b"the-secret-after-the-recovery"
    (sandbox.root / "webhook-secret").write_bytes(new_secret + b"\n")
    daemon.send(signal.SIGHUP)
    ready = notify_socket.wait_for_line("READY=1", timeout=20)
    reloading = notify_socket.wait_for_line("RELOADING=1", after=ready)
    notify_socket.wait_for_line("READY=1", after=reloading)

    assert daemon.arm(secret=new_secret).status == 202
    sandbox.secret = new_secret
    record = daemon.record(journal["id"])
    assert record is not None and record["outcome"] == "succeeded", record
