"""SIGKILL the deploying process at every step boundary and at random instants, then recover.

After each kill, whatever the instant, the contract's guarantees must hold once the next
command has run: the install path holds exactly the old or the new bytes with mode 0755, no
temporary file is beside it, every snapshot is intact and at most `keep` remain, and the
interrupted attempt's outcome is recorded (never left unknown).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sandbox import Sandbox, wait_for

from stagewatch import journal, lock
from stagewatch.cli import main
from stagewatch.engine import Engine
from stagewatch.history import History
from stagewatch.status import current_status

HARNESS = Path(__file__).with_name("crash_harness.py")
DECIDED = {"succeeded", "rolled_back", "failed", "rejected"}


def fast_sandbox(root: Path) -> Sandbox:
    return Sandbox(root, health__stable_seconds=0.3, health__timeout_seconds=2.5)


def random_kill_sandbox(root: Path) -> Sandbox:
    # Any outcome is fine here as long as the guarantees hold, so the health windows can be
    # short without making the test depend on the machine's speed.
    return Sandbox(root, health__stable_seconds=0.2, health__timeout_seconds=1.5)


def deploy_command(sandbox: Sandbox) -> list[str]:
    return [sys.executable, "-m", "stagewatch", "--config", str(sandbox.config_path), "deploy"]


def kill_at(step: str, arguments: list[str]) -> None:
    """Run `stagewatch ARGUMENTS`, SIGKILLed as the journal first names `step`."""
    killed = subprocess.run(
        [sys.executable, str(HARNESS), step, "1", "--", *arguments],
        capture_output=True,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()


def assert_shown_interrupted(sandbox: Sandbox, step: str) -> None:
    shown = current_status(sandbox.config, History(sandbox.state / "history.db"))
    assert shown["state"] == "interrupted"
    assert shown["interrupted"]["step"] == step


def assert_guarantees(sandbox: Sandbox, old: bytes, new: bytes, attempts_before: int = 0) -> str:
    """Recover as the next command would, then check every guarantee; return the outcome.

    A process killed before it wrote its first journal entry never started an attempt: then
    nothing may have changed, and the outcome is "not started".
    """
    Engine(sandbox.config).recover()

    installed = sandbox.binary.read_bytes()
    assert installed in (old, new), "the install path holds neither the old nor the new bytes"
    assert sandbox.binary.stat().st_mode & 0o777 == 0o755
    assert os.listdir(sandbox.binary.parent) == ["dealspace"], "a temporary survived"
    assert not (sandbox.state / "journal.json").exists()

    snapshots = sorted(sandbox.snapshots.glob("*")) if sandbox.snapshots.exists() else []
    assert all(path.suffix == ".db" for path in snapshots), f"partial left: {snapshots}"
    assert len(snapshots) <= 3
    for path in snapshots:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    records = History(sandbox.state / "history.db").recent(500)
    assert all(record.outcome in DECIDED for record in records), [
        (record.id, record.outcome, record.reason) for record in records
    ]
    if len(records) == attempts_before:
        assert installed == old, "no attempt was recorded, yet the binary changed"
        return "not started"
    assert len(records) == attempts_before + 1
    outcome = records[0].outcome
    assert outcome is not None
    assert os.listdir(sandbox.staging) == [], "a decided attempt left its files in staging"

    expected = new if outcome == "succeeded" else old
    assert installed == expected, f"outcome {outcome} but the other binary is installed"
    return outcome


@pytest.mark.parametrize(
    ("step", "behaviour"),
    [
        ("verifying", "good"),
        ("snapshotting", "good"),
        ("swapping", "good"),
        ("restarting", "good"),
        ("checking", "good"),
        ("finished", "good"),
        ("checking", "unhealthy"),
        ("rolling_back", "unhealthy"),
        ("finished", "unhealthy"),
    ],
)
def test_a_deploy_killed_at_a_step_boundary_is_finished_or_undone(
    tmp_path: Path, step: str, behaviour: str
) -> None:
    sandbox = fast_sandbox(tmp_path)
    try:
        old = sandbox.install_initial("1.0")
        new = sandbox.stage("2.0", behaviour)

        kill_at(step, deploy_command(sandbox)[3:])
        assert_shown_interrupted(sandbox, step)

        outcome = assert_guarantees(sandbox, old, new)

        assert outcome == ("succeeded" if behaviour == "good" else "rolled_back")
        version = "2.0" if outcome == "succeeded" else "1.0"
        assert wait_for(lambda: sandbox.served_version() == version, 5, f"version {version}")
    finally:
        sandbox.stop_everything()


def test_a_kill_between_the_two_staged_files_removals_is_finished_by_recovery(
    tmp_path: Path,
) -> None:
    sandbox = fast_sandbox(tmp_path)
    try:
        old = sandbox.install_initial("1.0")
        new = sandbox.stage("2.0")
        kill_at("finished", deploy_command(sandbox)[3:])
        # The artifact is removed first; the kill landed before the checksum file went.
        (sandbox.staging / "dealspace").unlink()

        assert assert_guarantees(sandbox, old, new) == "succeeded"
    finally:
        sandbox.stop_everything()


def test_the_next_deploy_command_settles_an_interrupted_one_first(tmp_path: Path) -> None:
    sandbox = fast_sandbox(tmp_path)
    try:
        old = sandbox.install_initial("1.0")
        new = sandbox.stage("2.0")
        kill_at("restarting", deploy_command(sandbox)[3:])

        # Nothing is staged any more once the settled deploy removed its files: exit 1.
        settled = subprocess.run(deploy_command(sandbox), capture_output=True, text=True)

        assert "Recovering the deploy interrupted at step restarting" in settled.stderr
        assert assert_guarantees(sandbox, old, new) == "succeeded"
    finally:
        sandbox.stop_everything()


def restore_command(sandbox: Sandbox, name: str) -> list[str]:
    return ["--config", str(sandbox.config_path), "snapshots", "restore", name, "--yes"]


def snapshot_then_mark(sandbox: Sandbox) -> str:
    """Take a snapshot, then commit a table it lacks: the live database can be told from it."""
    taken = Engine(sandbox.config).take_snapshot()
    assert taken is not None
    mark_in_the_wal(sandbox)
    return taken.name


def mark_in_the_wal(sandbox: Sandbox) -> None:
    """Commit the table from a process killed before it closes its connection, so that the
    commit stays in the `-wal`, as it would under a service that was killed."""
    marker = (
        "import os, signal, sqlite3, sys\n"
        "connection = sqlite3.connect(sys.argv[1])\n"
        "connection.execute('PRAGMA journal_mode=WAL')\n"
        "connection.execute('CREATE TABLE after_snapshot (x)')\n"
        "connection.commit()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", marker, str(sandbox.database)], check=False)
    assert sandbox.database.with_name(sandbox.database.name + "-wal").exists()


def tables(database: Path) -> set[str]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in rows}


def assert_restored(sandbox: Sandbox, outcome: str = "succeeded") -> None:
    """The restore was finished by the recovery; the database it replaced is kept aside."""
    recovered = Engine(sandbox.config).recover()

    assert recovered is not None and recovered.kind == "restore"
    assert recovered.outcome == outcome, recovered.reason
    assert "after_snapshot" not in tables(sandbox.database)
    kept = [
        path
        for path in sandbox.database.parent.glob("dealspace.db.before-restore-*")
        if not path.name.endswith(("-wal", "-journal", "-shm"))
    ]
    assert len(kept) == 1, kept
    assert "after_snapshot" in tables(kept[0])
    leftovers = [path.name for path in sandbox.database.parent.glob(".dealspace.db.*")]
    assert leftovers == []
    assert wait_for(lambda: sandbox.served_version() == "1.0", 5, "the service serving")
    assert not (sandbox.state / "journal.json").exists()


@pytest.mark.parametrize("step", ["stopping", "restoring", "starting", "checking"])
def test_a_restore_killed_at_a_step_boundary_is_shown_interrupted_and_finished_next(
    tmp_path: Path, step: str
) -> None:
    sandbox = fast_sandbox(tmp_path)
    try:
        sandbox.install_initial("1.0")
        name = snapshot_then_mark(sandbox)

        kill_at(step, restore_command(sandbox, name))
        assert_shown_interrupted(sandbox, step)
        assert_restored(sandbox)
    finally:
        sandbox.stop_everything()


def test_a_restore_killed_inside_the_replacement_is_put_back_then_done_again(
    tmp_path: Path,
) -> None:
    sandbox = fast_sandbox(tmp_path)
    try:
        sandbox.install_initial("1.0")
        taken = Engine(sandbox.config).take_snapshot()
        assert taken is not None
        kill_at("restoring", restore_command(sandbox, taken.name))
        mark_in_the_wal(sandbox)  # the service is stopped: its last commit is in the -wal

        # Where a kill inside the replacement leaves it: the database linked aside under the
        # journaled name and its `-wal` moved along, the live name not yet replaced.
        entry = journal.read(sandbox.state / "journal.json")
        assert entry is not None and entry.database_aside is not None
        live = sandbox.database
        aside = live.with_name(entry.database_aside)
        os.link(live, aside)
        os.rename(live.with_name(live.name + "-wal"), aside.with_name(aside.name + "-wal"))

        assert_restored(sandbox)
    finally:
        sandbox.stop_everything()


# Deploying processes come from a fork server that has stagewatch imported already, so that a
# kill instant measures the deploy itself rather than the interpreter's start.
FORK_SERVER = multiprocessing.get_context("forkserver")
FORK_SERVER.set_forkserver_preload(["stagewatch.cli"])


def start_deploy(sandbox: Sandbox) -> multiprocessing.process.BaseProcess:
    process = FORK_SERVER.Process(
        target=main, args=(["--config", str(sandbox.config_path), "deploy"],)
    )
    process.start()
    return process


def kill_at_random_instants(root: Path, seed: int, kills: int, duration: float) -> list[str]:
    """One sandbox, `kills` deploys each SIGKILLed at a uniform instant; return outcomes."""
    chooser = random.Random(seed)
    sandbox = random_kill_sandbox(root)
    outcomes: list[str] = []
    try:
        current = sandbox.install_initial("1.0")
        attempts = 0
        for attempt in range(kills):
            behaviour = chooser.choice(["good", "good", "good", "unhealthy"])
            new = sandbox.stage(f"{seed}.{attempt}", behaviour)
            process = start_deploy(sandbox)
            time.sleep(chooser.uniform(0, duration))
            process.kill()
            process.join()
            # The kernel closes a killed process's files one by one: wait until its lock is
            # gone too, as systemd would before starting the agent again.
            wait_for(lambda: not lock.is_held(sandbox.state / "lock"), 5, "the lock released")

            outcome = assert_guarantees(sandbox, current, new, attempts)
            outcomes.append(outcome)
            attempts += outcome != "not started"
            current = sandbox.binary.read_bytes()
            for name in ("dealspace", "dealspace.sha256"):
                (sandbox.staging / name).unlink(missing_ok=True)
            wait_for(lambda: sandbox.service_pid() is not None, 5, "the service running")
    finally:
        sandbox.stop_everything()
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_deploys_killed_at_random_instants_keep_every_guarantee(tmp_path: Path, seed: int) -> None:
    """50 kills per seed, 200 in all; the seeds run side by side under pytest-xdist."""
    # The deploy's duration, measured once here: kills fall uniformly over it (and a little
    # beyond, where the process has already finished and the kill is harmless).
    sandbox = random_kill_sandbox(tmp_path)
    try:
        sandbox.install_initial("1.0")
        for version in ("warm-up", "measured"):
            sandbox.stage(version)
            started = time.monotonic()
            start_deploy(sandbox).join()
        duration = (time.monotonic() - started) * 1.2
    finally:
        sandbox.stop_everything()

    outcomes = kill_at_random_instants(tmp_path / "host", seed, 50, duration)

    assert len(outcomes) == 50
    assert set(outcomes) <= DECIDED | {"not started"}
    # The instants spread over the whole deploy: most kills interrupt a started attempt.
    assert sum(outcome != "not started" for outcome in outcomes) > 25
