"""The command line as an operator meets it: a real `stagewatch` process per command."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sandbox import Sandbox, sha256_of

from stagewatch import __version__


def stagewatch(sandbox: Sandbox, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stagewatch", "--config", str(sandbox.config_path), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_deploy_then_json_documents_for_status_history_and_snapshots(sandbox: Sandbox) -> None:
    sandbox.install_initial("1.0")
    sandbox.stage("2.0")

    deployed = stagewatch(sandbox, "deploy", "--version", "2.0")
    assert deployed.returncode == 0, deployed.stderr
    assert "succeeded" in deployed.stdout

    status = json.loads(stagewatch(sandbox, "status", "--json").stdout)
    assert status["state"] == "idle"
    assert status["installed_sha256"] == sha256_of(sandbox.binary)
    assert status["armed_until"] is None
    assert status["last"]["outcome"] == "succeeded"

    history = json.loads(stagewatch(sandbox, "history", "--json").stdout)
    assert len(history) == 1
    record = history[0]
    for key in ("id", "outcome", "reason", "sha256", "version", "started_at", "finished_at"):
        assert key in record
    assert record["version"] == "2.0"
    assert record["started_at"].endswith("Z") and record["finished_at"].endswith("Z")
    assert record["steps"][0]["name"] == "verifying"
    assert set(record["steps"][0]) >= {"name", "started_at", "seconds", "ok"}

    snapshots = json.loads(stagewatch(sandbox, "snapshots", "list", "--json").stdout)
    assert [item["name"] for item in snapshots] == [record["snapshot"]]


def test_a_rejected_deploy_exits_1_and_says_why(sandbox: Sandbox) -> None:
    sandbox.install_initial("1.0")
    sandbox.stage("2.0", checksum="not a checksum\n")

    deployed = stagewatch(sandbox, "deploy")

    assert deployed.returncode == 1
    assert "rejected" in deployed.stdout
    assert "dealspace.sha256" in deployed.stdout


def test_a_bad_sha256_option_is_a_usage_error(sandbox: Sandbox) -> None:
    deployed = stagewatch(sandbox, "deploy", "--sha256", "xyz")

    assert deployed.returncode == 2
    assert "--sha256" in deployed.stderr


def test_status_and_history_on_a_fresh_host_act_on_nothing(sandbox: Sandbox) -> None:
    status = stagewatch(sandbox, "status", "--json")
    history = stagewatch(sandbox, "history", "--json")

    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["last"] is None
    assert json.loads(history.stdout) == []
    assert not sandbox.state.exists()


def test_snapshots_create_and_restore_with_yes(sandbox: Sandbox) -> None:
    sandbox.install_initial("1.0")

    created = stagewatch(sandbox, "snapshots", "create")
    assert created.returncode == 0, created.stderr
    name = created.stdout.split()[0]

    refused = stagewatch(sandbox, "snapshots", "restore", "no-such.db", "--yes")
    assert refused.returncode == 1
    assert name in refused.stderr

    restored = stagewatch(sandbox, "snapshots", "restore", name, "--yes")
    assert restored.returncode == 0, restored.stderr
    assert "the previous one kept as" in restored.stdout
    assert "restore  succeeded" in restored.stdout
    assert sandbox.served_version() == "1.0"


def test_restore_without_stop_and_start_commands_exits_2_with_the_service_untouched(
    sandbox: Sandbox,
) -> None:
    sandbox.install_initial("1.0")
    created = stagewatch(sandbox, "snapshots", "create")
    assert created.returncode == 0, created.stderr
    sandbox.write_config(service__stop=None, service__start=None)
    pid_before = sandbox.service_pid()

    refused = stagewatch(sandbox, "snapshots", "restore", created.stdout.split()[0], "--yes")

    assert refused.returncode == 2, refused.stderr
    assert "service.stop: `snapshots restore` needs service.stop and service.start" in (
        refused.stderr
    )
    assert sandbox.service_pid() == pid_before


def test_version_and_help_are_everywhere() -> None:
    for command in (
        [],
        ["run"],
        ["check-config"],
        ["deploy"],
        ["status"],
        ["history"],
        ["rollback"],
        ["snapshots"],
        ["snapshots", "list"],
        ["snapshots", "create"],
        ["snapshots", "restore"],
        ["demo"],
    ):
        # No configuration is needed for either: the file below does not exist.
        stagewatch = [sys.executable, "-m", "stagewatch", "--config", "/nonexistent.toml"]
        helped = subprocess.run([*stagewatch, *command, "--help"], capture_output=True, text=True)
        shown = subprocess.run([*stagewatch, *command, "--version"], capture_output=True, text=True)

        assert helped.returncode == 0, (command, helped.stderr)
        assert "Usage:" in helped.stdout
        assert shown.returncode == 0, (command, shown.stderr)
        assert shown.stdout == f"stagewatch, version {__version__}\n"


def test_deploy_version_with_a_value_names_the_release(sandbox: Sandbox) -> None:
    sandbox.install_initial("1.0")
    sandbox.stage("2.0")

    deployed = stagewatch(sandbox, "deploy", "--version", "2.0", "--force")

    assert deployed.returncode == 0, deployed.stderr
    assert "version 2.0" in deployed.stdout


def test_check_config_refuses_a_restore_on_rollback_that_could_not_write_the_database(
    sandbox: Sandbox, mount_tmpfs: Callable[[str, str], Path]
) -> None:
    data = mount_tmpfs("read-only-data", "1m")
    database = data / "dealspace.db"
    sqlite3.connect(database).close()
    subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
    sandbox.write_config(database__path=str(database), database__restore_on_rollback=True)

    checked = stagewatch(sandbox, "check-config")

    assert checked.returncode == 2
    assert f"database.restore_on_rollback: this user cannot write in {data}" in checked.stderr


def test_check_config_names_each_problem_and_exits_2(sandbox: Sandbox) -> None:
    (sandbox.root / "webhook-secret").chmod(0o644)
    sandbox.write_config(database__path=str(sandbox.root / "nowhere" / "x.db"))

    checked = stagewatch(sandbox, "check-config")

    assert checked.returncode == 2
    assert "database.path" in checked.stderr
    assert "chmod 0600" in checked.stderr


@pytest.mark.parametrize("prefix", ["zz", "", "a" * 65])
def test_rollback_to_a_prefix_that_is_not_hex_is_a_usage_error(
    sandbox: Sandbox, prefix: str
) -> None:
    refused = stagewatch(sandbox, "rollback", "--to", prefix)

    assert refused.returncode == 2, refused.stderr
    assert "--to" in refused.stderr and "hexadecimal" in refused.stderr
