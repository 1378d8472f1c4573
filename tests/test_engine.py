"""The deploy pipeline end to end, with a real sample service under the `command` manager."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sandbox import Sandbox, sha256_of, wait_for

from stagewatch.cli import main
from stagewatch.engine import DeployRequest, Engine
from stagewatch.errors import BusyError, SnapshotError
from stagewatch.snapshot import Snapshot


def deploy(sandbox: Sandbox, **request: object) -> tuple[str | None, str | None]:
    record = Engine(sandbox.config).deploy(DeployRequest(**request))  # type: ignore[arg-type]
    return record.outcome, record.reason


def beside_install_path(sandbox: Sandbox) -> list[str]:
    return sorted(name for name in os.listdir(sandbox.binary.parent) if name != "dealspace")


def test_a_healthy_release_goes_live_with_a_snapshot_and_the_old_binary_kept(
    sandbox: Sandbox,
) -> None:
    old = sandbox.install_initial("1.0")
    new = sandbox.stage("2.0")

    record = Engine(sandbox.config).deploy(DeployRequest(version="2.0"))

    assert record.outcome == "succeeded", record.reason
    assert sandbox.binary.read_bytes() == new
    assert sandbox.binary.stat().st_mode & 0o777 == 0o755
    assert beside_install_path(sandbox) == []
    assert sandbox.served_version() == "2.0"
    assert record.snapshot is not None and (sandbox.snapshots / record.snapshot).is_file()
    assert (sandbox.state / "releases" / hashlib.sha256(old).hexdigest()).read_bytes() == old
    assert not (sandbox.staging / "dealspace").exists()
    assert not (sandbox.staging / "dealspace.sha256").exists()
    assert [step["name"] for step in record.steps] == [
        "verifying",
        "snapshotting",
        "swapping",
        "restarting",
        "checking",
    ]
    assert all(step["ok"] for step in record.steps)
    assert not (sandbox.state / "journal.json").exists()


def test_a_file_pushed_during_a_deploy_stays_in_staging_for_the_next(sandbox: Sandbox) -> None:
    sandbox.install_initial("1.0")
    sandbox.stage("2.0")
    newer_checksum = b"c" * 64 + b"  dealspace\n"

    def push_during_the_restart(step: str, _attempt: str | None) -> None:
        if step == "restarting":
            (sandbox.staging / "dealspace.sha256").unlink()
            (sandbox.staging / "dealspace.sha256").write_bytes(newer_checksum)

    record = Engine(sandbox.config, on_state=push_during_the_restart).deploy(DeployRequest())

    assert record.outcome == "succeeded", record.reason
    assert os.listdir(sandbox.staging) == ["dealspace.sha256"]
    assert (sandbox.staging / "dealspace.sha256").read_bytes() == newer_checksum


def test_a_checksum_mismatch_is_rejected_and_moved_aside_with_nothing_changed(
    sandbox: Sandbox,
) -> None:
    old = sandbox.install_initial("1.0")
    pid_before = sandbox.service_pid()
    sandbox.stage("2.0", checksum="0" * 64 + "  dealspace\n")

    record = Engine(sandbox.config).deploy(DeployRequest())

    assert record.outcome == "rejected"
    assert record.reason is not None and "sha256" in record.reason
    assert sandbox.binary.read_bytes() == old
    assert sandbox.service_pid() == pid_before
    assert record.snapshot is None
    assert sorted(os.listdir(sandbox.state / "rejected" / record.id)) == [
        "dealspace",
        "dealspace.sha256",
    ]
    assert os.listdir(sandbox.staging) == []
    assert beside_install_path(sandbox) == []


@pytest.mark.parametrize(
    ("trigger", "named"), [("webhook", "the webhook asked for"), ("cli", "--sha256 asked for")]
)
def test_a_sha256_named_by_the_webhook_or_the_command_line_must_match_too(
    sandbox: Sandbox, trigger: str, named: str
) -> None:
    old = sandbox.install_initial("1.0")
    sandbox.stage("2.0")

    outcome, reason = deploy(sandbox, sha256="ab" * 32, trigger=trigger)

    assert outcome == "rejected"
    assert reason is not None and named in reason and "abab" in reason
    assert sandbox.binary.read_bytes() == old


@pytest.mark.parametrize(
    ("behaviour", "stable_seconds"),
    [("exit", 0.6), ("unhealthy", 0.6), ("crash-after=0.4", 1.5)],
    ids=["exits-at-once", "health-url-never-2xx", "crashes-inside-the-stable-window"],
)
def test_an_unhealthy_release_is_rolled_back_to_the_previous_binary(
    tmp_path: Path, behaviour: str, stable_seconds: float
) -> None:
    sandbox = Sandbox(tmp_path, health__stable_seconds=stable_seconds, health__timeout_seconds=4)
    try:
        old = sandbox.install_initial("1.0")
        sandbox.stage("2.0", behaviour)

        outcome, reason = deploy(sandbox)

        assert outcome == "rolled_back", reason
        assert sandbox.binary.read_bytes() == old
        assert sandbox.binary.stat().st_mode & 0o777 == 0o755
        assert wait_for(lambda: sandbox.served_version() == "1.0", 5, "version 1.0 again")
        assert beside_install_path(sandbox) == []
    finally:
        sandbox.stop_everything()


def test_a_rollback_that_fails_too_is_recorded_as_failed(sandbox: Sandbox) -> None:
    broken_old = sandbox.release_bytes("1.0", "exit")
    with sqlite3.connect(sandbox.database) as connection:
        connection.execute("CREATE TABLE kept (id INTEGER PRIMARY KEY)")
    sandbox.binary.write_bytes(broken_old)
    sandbox.binary.chmod(0o755)
    sandbox.stage("2.0", "exit")

    outcome, reason = deploy(sandbox)

    assert outcome == "failed"
    assert reason is not None and "rollback failed" in reason
    assert sandbox.binary.read_bytes() == broken_old


def test_a_rolled_back_release_is_refused_unless_forced(sandbox: Sandbox) -> None:
    sandbox.install_initial("1.0")
    sandbox.stage("2.0", "unhealthy")
    first = Engine(sandbox.config).deploy(DeployRequest())
    assert first.outcome == "rolled_back"

    sandbox.stage("2.0", "unhealthy")
    outcome, reason = deploy(sandbox)
    assert outcome == "rejected"
    assert reason is not None and first.id in reason

    sandbox.stage("2.0", "unhealthy")
    outcome, _ = deploy(sandbox, force=True)
    assert outcome == "rolled_back"


def test_snapshots_beyond_keep_are_pruned_oldest_first(sandbox: Sandbox) -> None:
    sandbox.install_initial("1.0")
    taken = []
    for version in ("2.0", "3.0", "4.0", "5.0"):
        sandbox.stage(version)
        record = Engine(sandbox.config).deploy(DeployRequest())
        assert record.outcome == "succeeded", record.reason
        taken.append(record.snapshot)

    assert sorted(path.name for path in sandbox.snapshots.glob("*.db")) == sorted(taken[-3:])
    assert not list(sandbox.snapshots.glob("*.partial"))
    assert len(list((sandbox.state / "releases").iterdir())) == 3


def test_a_missing_database_is_an_error_unless_missing_ok(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path)
    try:
        # Release 1.0 would create the database; install it without starting it.
        sandbox.binary.write_bytes(sandbox.release_bytes("1.0"))
        sandbox.binary.chmod(0o755)
        sandbox.stage("2.0")
        refused = Engine(sandbox.config).deploy(DeployRequest())
        assert refused.outcome == "rejected"
        assert refused.reason is not None and "dealspace.db" in refused.reason
        # A fault of the host, not of the release: its files are moved aside all the same.
        assert os.listdir(sandbox.staging) == []
        assert sorted(os.listdir(sandbox.state / "rejected" / refused.id)) == [
            "dealspace",
            "dealspace.sha256",
        ]

        sandbox.write_config(database__missing_ok=True)
        sandbox.stage("2.0")
        record = Engine(sandbox.config).deploy(DeployRequest())
        assert record.outcome == "succeeded", record.reason
        assert record.snapshot is None
    finally:
        sandbox.stop_everything()


def installed_with_a_snapshot(sandbox: Sandbox) -> tuple[Engine, Snapshot]:
    sandbox.install_initial("1.0")
    engine = Engine(sandbox.config)
    taken = engine.take_snapshot()
    assert taken is not None
    return engine, taken


def test_restore_puts_the_snapshot_back_and_keeps_the_current_database_aside(
    sandbox: Sandbox,
) -> None:
    engine, snapshot = installed_with_a_snapshot(sandbox)
    with sqlite3.connect(snapshot.path) as connection:
        rows_in_snapshot = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]

    record = engine.restore_snapshot(snapshot.name)

    assert (record.kind, record.outcome) == ("restore", "succeeded"), record.reason
    assert [step["name"] for step in record.steps] == [
        "stopping",
        "restoring",
        "starting",
        "checking",
    ]
    assert len(list(sandbox.database.parent.glob("dealspace.db.before-restore-*"))) == 1
    assert sandbox.served_version() == "1.0"
    assert sandbox.row_count() >= rows_in_snapshot
    assert engine.history.recent(1)[0].id == record.id
    assert not (sandbox.state / "journal.json").exists()


def test_restore_of_an_unknown_name_is_refused_before_the_service_is_touched(
    sandbox: Sandbox,
) -> None:
    engine, taken = installed_with_a_snapshot(sandbox)
    pid_before = sandbox.service_pid()

    with pytest.raises(SnapshotError, match=rf"no snapshot named 'nope.db' .*known: {taken.name}"):
        engine.restore_snapshot("nope.db")

    assert sandbox.service_pid() == pid_before
    assert engine.history.recent(5) == []


def test_rollback_reinstalls_the_previous_release_and_to_names_a_kept_one(
    sandbox: Sandbox,
) -> None:
    first = sandbox.install_initial("1.0")
    second = sandbox.stage("2.0")
    assert deploy(sandbox)[0] == "succeeded"
    sandbox.stage("3.0")
    assert deploy(sandbox)[0] == "succeeded"

    record = Engine(sandbox.config).rollback()
    assert record.outcome == "succeeded", record.reason
    assert sandbox.binary.read_bytes() == second
    assert sandbox.served_version() == "2.0"

    prefix = hashlib.sha256(first).hexdigest()[:10]
    record = Engine(sandbox.config).rollback(prefix)
    assert record.outcome == "succeeded", record.reason
    assert sandbox.binary.read_bytes() == first
    assert sandbox.served_version() == "1.0"


def test_a_second_operation_is_refused_while_one_holds_the_lock(sandbox: Sandbox) -> None:
    sandbox.install_initial("1.0")
    sandbox.stage("2.0")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(sandbox.state / 'lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        sandbox.state.mkdir(exist_ok=True)
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"

        with pytest.raises(BusyError):
            Engine(sandbox.config).deploy(DeployRequest())
        assert main(["--config", str(sandbox.config_path), "deploy"]) == 3
        assert main(["--config", str(sandbox.config_path), "rollback"]) == 3
    finally:
        holder.communicate("")
    assert (sandbox.staging / "dealspace").exists()


def test_deploy_with_nothing_staged_says_so_and_exits_1(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    sandbox.install_initial("1.0")

    assert main(["--config", str(sandbox.config_path), "deploy"]) == 1
    assert "nothing to deploy" in capsys.readouterr().err


def test_an_installed_binary_is_reported_by_its_sha256(sandbox: Sandbox) -> None:
    sandbox.install_initial("1.0")
    sandbox.stage("2.0")
    assert deploy(sandbox)[0] == "succeeded"

    from stagewatch.status import current_status

    document = current_status(sandbox.config, Engine(sandbox.config).history)
    assert document["installed_sha256"] == sha256_of(sandbox.binary)
    assert document["state"] == "idle"
    assert document["last"]["outcome"] == "succeeded"
