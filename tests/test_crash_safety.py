"""SIGKILL the deploying process at every step boundary and at random instants, then recover.

After each kill, whatever the instant, the contract's guarantees must hold once the next
command has run: the install path holds exactly the old or the new bytes with mode 0755, no
temporary file is beside it, every snapshot is intact and at most `keep` remain, and the
interrupted attempt's outcome is recorded (never left unknown).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Sandbox, wait_for

from stagewatch.engine import Engine
from stagewatch.history import History
from stagewatch.status import current_status

HARNESS = Path(__file__).with_name("crash_harness.py")
DECIDED = {"succeeded", "rolled_back", "failed", "rejected"}


def fast_sandbox(root: Path) -> Sandbox:
    return Sandbox(root, health__stable_seconds=0.3, health__timeout_seconds=4)


def deploy_command(sandbox: Sandbox) -> list[str]:
    return [sys.executable, "-m", "stagewatch", "--config", str(sandbox.config_path), "deploy"]


def assert_guarantees(sandbox: Sandbox, old: bytes, new: bytes) -> str:
    """Recover as the next command would, then check every guarantee; return the outcome."""
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

    records = History(sandbox.state / "history.db").recent(50)
    assert records, "the attempt left no record"
    assert all(record.outcome in DECIDED for record in records), [
        (record.id, record.outcome, record.reason) for record in records
    ]
    outcome = records[0].outcome
    assert outcome is not None

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

        killed = subprocess.run(
            [sys.executable, str(HARNESS), step, "1", "--", *deploy_command(sandbox)[3:]],
            capture_output=True,
            check=False,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()

        shown = current_status(sandbox.config, History(sandbox.state / "history.db"))
        assert shown["state"] == "interrupted"
        assert shown["interrupted"]["step"] == step

        outcome = assert_guarantees(sandbox, old, new)

        assert outcome == ("succeeded" if behaviour == "good" else "rolled_back")
        version = "2.0" if outcome == "succeeded" else "1.0"
        assert wait_for(lambda: sandbox.served_version() == version, 5, f"version {version}")
    finally:
        sandbox.stop_everything()


def test_the_next_deploy_command_settles_an_interrupted_one_first(tmp_path: Path) -> None:
    sandbox = fast_sandbox(tmp_path)
    try:
        old = sandbox.install_initial("1.0")
        new = sandbox.stage("2.0")
        subprocess.run(
            [sys.executable, str(HARNESS), "restarting", "1", "--", *deploy_command(sandbox)[3:]],
            capture_output=True,
            check=False,
        )

        # Nothing is staged any more once the settled deploy removed its files: exit 1.
        settled = subprocess.run(deploy_command(sandbox), capture_output=True, text=True)

        assert "Recovering the deploy interrupted at step restarting" in settled.stderr
        assert assert_guarantees(sandbox, old, new) == "succeeded"
    finally:
        sandbox.stop_everything()


def kill_at_random_instants(root: Path, seed: int, kills: int, duration: float) -> list[str]:
    """One sandbox, `kills` deploys each SIGKILLed at a uniform instant; return outcomes."""
    chooser = random.Random(seed)
    sandbox = fast_sandbox(root)
    outcomes: list[str] = []
    try:
        current = sandbox.install_initial("1.0")
        for attempt in range(kills):
            behaviour = chooser.choice(["good", "good", "unhealthy"])
            new = sandbox.stage(f"{seed}.{attempt}", behaviour)
            process = subprocess.Popen(
                deploy_command(sandbox), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(chooser.uniform(0, duration))
            process.send_signal(signal.SIGKILL)
            process.wait()

            outcome = assert_guarantees(sandbox, current, new)
            outcomes.append(outcome)
            current = sandbox.binary.read_bytes()
            for name in ("dealspace", "dealspace.sha256"):
                (sandbox.staging / name).unlink(missing_ok=True)
            wait_for(lambda: sandbox.service_pid() is not None, 5, "the service running")
    finally:
        sandbox.stop_everything()
    return outcomes


def test_deploys_killed_at_200_random_instants_keep_every_guarantee(tmp_path: Path) -> None:
    # The deploy's duration, measured once here: kills fall uniformly over it (and a little
    # beyond, where the process has already finished and the kill is harmless).
    probe = fast_sandbox(tmp_path / "probe")
    try:
        probe.install_initial("1.0")
        probe.stage("2.0")
        started = time.monotonic()
        subprocess.run(deploy_command(probe), capture_output=True, check=True)
        duration = (time.monotonic() - started) * 1.1
    finally:
        probe.stop_everything()

    workers = 4
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(
            lambda seed: kill_at_random_instants(tmp_path / f"host{seed}", seed, 50, duration),
            range(workers),
        )
        outcomes = [outcome for result in results for outcome in result]

    assert len(outcomes) == 200
    assert set(outcomes) <= DECIDED
