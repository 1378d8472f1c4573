"""The packaged agent under a real systemd: install, deploy, roll back, survive a freeze.

One systemd and one install serve every test here, as on a real host: each test takes the
host as it finds it (whichever release is live) and leaves it serving.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import urllib.request
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sandbox import wait_for
from standardwebhooks.webhooks import Webhook
from systemd_sandbox import (
    BINARY,
    CHECKOUT,
    CONFIG,
    DATABASE,
    DEPLOY_KEYS,
    SECRET,
    SNAPSHOT_DIR,
    STAGEWATCH,
    STAGING,
    STATE_DIR,
    VENV,
    Production,
    e2e_configuration,
)

pytestmark = pytest.mark.e2e

EXPOSURE_LIMIT = 1.1
"""`systemd-analyze security stagewatch.service` reached by packaging/systemd (lower is safer)."""

DEPLOY_SECONDS = 40.0
STEPS = ["verifying", "snapshotting", "swapping", "restarting", "checking"]
INFO, WARNING = 6, 4  # syslog priorities, as journald records them in PRIORITY


def test_installer_makes_the_users_folders_and_a_private_secret(production: Production) -> None:
    sandbox = production.sandbox
    for step in ("made the system user stagewatch", "made the venv", "generated the webhook"):
        assert step in production.install_output, production.install_output

    for user in ("stagewatch", "deploy"):
        entry = sandbox.run("getent", "passwd", user).stdout.strip()
        assert entry.endswith(":/usr/sbin/nologin"), entry
    assert set(sandbox.run("id", "-nG", "stagewatch").stdout.split()) == {
        "stagewatch",
        "dealspace",
    }
    assert sandbox.run("id", "-nG", "deploy").stdout.split() == ["deploy"]

    assert _stat(production, SECRET) == "600 root root"
    secret = production.secret
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32

    assert _stat(production, STAGING) == "2770 deploy stagewatch"
    assert _stat(production, "/opt/dealspace/bin") == "775 root stagewatch"
    assert _stat(production, STATE_DIR) == "750 stagewatch stagewatch"
    assert _stat(production, "/opt/stagewatch/chroot") == "755 root root"
    assert os.readlink(sandbox.path("/usr/local/bin/stagewatch")) == STAGEWATCH


def test_agent_runs_as_stagewatch_with_the_secret_as_a_credential(production: Production) -> None:
    sandbox = production.sandbox
    shown = sandbox.show(
        "stagewatch.service", "ActiveState", "Type", "NotifyAccess", "WatchdogUSec", "User"
    )
    assert shown == {
        "ActiveState": "active",
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogUSec": "30s",
        "User": "stagewatch",
    }

    agent = sandbox.main_pid("stagewatch.service")
    status = sandbox.path(f"/proc/{agent}/status").read_text()
    uid = sandbox.run("id", "-u", "stagewatch").stdout.strip()
    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", status, re.MULTILINE), status
    assert re.search(r"^CapEff:\s+0+$", status, re.MULTILINE), status
    environment = sandbox.path(f"/proc/{agent}/environ").read_bytes().split(b"\0")
    assert b"CREDENTIALS_DIRECTORY=/run/credentials/stagewatch.service" in environment


def test_installer_run_again_from_a_wheel_keeps_configuration_secret_and_keys(
    production: Production,
) -> None:
    sandbox = production.sandbox
    kept = {path: _digest(production, path) for path in (CONFIG, SECRET, DEPLOY_KEYS)}
    agent_before = sandbox.main_pid("stagewatch.service")
    wheel = _build_wheel(production)

    again = sandbox.run("sh", f"{CHECKOUT}/packaging/install.sh", wheel, timeout=300)

    assert "kept the configuration" in again.stdout
    assert "configuration is valid" in again.stdout, again.stdout + again.stderr
    assert "generated the webhook secret" not in again.stdout
    assert {path: _digest(production, path) for path in kept} == kept
    assert sandbox.show("stagewatch.service", "ActiveState") == {"ActiveState": "active"}
    assert sandbox.main_pid("stagewatch.service") != agent_before, "upgrade must restart it"


def test_unit_verifies_and_keeps_its_security_exposure(production: Production) -> None:
    sandbox = production.sandbox

    verified = sandbox.run(
        "systemd-analyze", "verify", "/etc/systemd/system/stagewatch.service", check=False
    )
    assert verified.returncode == 0, sandbox.describe_failure(verified)
    assert "stagewatch" not in verified.stderr, verified.stderr

    report = sandbox.run("systemd-analyze", "security", "--no-pager", "stagewatch.service").stdout
    found = re.search(r"Overall exposure level for stagewatch\.service: (\d+\.\d+)", report)
    assert found, report
    assert float(found.group(1)) <= EXPOSURE_LIMIT, report

    hardening = sandbox.show(
        "stagewatch.service",
        "ProtectSystem",
        "ProtectHome",
        "NoNewPrivileges",
        "MemoryDenyWriteExecute",
        "CapabilityBoundingSet",
        "UMask",
        "RestrictAddressFamilies",
    )
    assert hardening == {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }


def test_release_pushed_with_scp_and_armed_goes_live(production: Production) -> None:
    sandbox = production.sandbox
    before = sandbox.main_pid("dealspace.service")
    artifact = production.release("2.0.0")

    production.push(artifact)
    armed = production.arm({"sha256": production.sha256("2.0.0"), "version": "2.0.0"})
    record = wait_for(lambda: production.finished(armed["id"]), DEPLOY_SECONDS, "the deploy")

    assert record["outcome"] == "succeeded", record
    assert [step["name"] for step in record["steps"]] == STEPS
    assert all(step["ok"] for step in record["steps"]), record["steps"]

    after = sandbox.main_pid("dealspace.service")
    assert after not in (0, before)
    command_line = sandbox.path(f"/proc/{after}/cmdline").read_bytes().split(b"\0")
    assert BINARY.encode() in command_line, command_line
    assert production.installed_sha256() == production.sha256("2.0.0")
    assert production.serving_version() == "2.0.0"
    assert _install_folder(production) == ["dealspace"]
    assert sorted(sandbox.path(STAGING).iterdir()) == [], "staged files must be removed"

    snapshot = f"{SNAPSHOT_DIR}/{record['snapshot']}"
    assert sandbox.run("sqlite3", snapshot, "PRAGMA integrity_check;").stdout.strip() == "ok"
    assert int(sandbox.run("sqlite3", snapshot, "SELECT count(*) FROM deals;").stdout) > 0

    newest = production.history()[0]
    assert (newest["id"], newest["outcome"], newest["version"]) == (
        armed["id"],
        "succeeded",
        "2.0.0",
    )

    story = _story(production, armed["id"])
    for step in STEPS:
        assert any(step in message for _, message in story), f"no {step} in {story}"
    assert all(priority == INFO for priority, _ in story), story
    assert "succeeded" in story[-1][1], story


def test_crash_looping_release_is_rolled_back(production: Production) -> None:
    live, serving = production.installed_sha256(), _serving(production)
    artifact = production.release("3.0.0", "crash-after=1")

    # The webhook first this time: the arm waits for the files.
    armed = production.arm({"version": "3.0.0"})
    production.push(artifact)
    record = wait_for(lambda: production.finished(armed["id"]), DEPLOY_SECONDS, "the rollback")

    assert record["outcome"] == "rolled_back", record
    assert production.installed_sha256() == live
    assert _install_folder(production) == ["dealspace"]
    wait_for(lambda: production.serving_version() == serving, 15, f"{serving} to serve again")
    state = production.sandbox.show("dealspace.service", "ActiveState")
    assert state == {"ActiveState": "active"}

    story = _story(production, armed["id"])
    assert any(priority <= WARNING for priority, _ in story), story


def test_release_that_exits_at_once_is_rolled_back(production: Production) -> None:
    # Under systemd's default restart rate the unit hits its start limit and fails before
    # the health check is over; the rollback must still bring the previous binary back.
    sandbox = production.sandbox
    live, serving = production.installed_sha256(), _serving(production)
    production.push(production.release("3.1.0", "exit"))
    try:
        armed = production.arm({"version": "3.1.0"})
        record = wait_for(lambda: production.finished(armed["id"]), DEPLOY_SECONDS, "the rollback")
    finally:
        # Whatever happened, the tests after this one need dealspace up.
        if sandbox.show("dealspace.service", "ActiveState") != {"ActiveState": "active"}:
            sandbox.run("systemctl", "reset-failed", "dealspace.service")
            sandbox.run("systemctl", "start", "dealspace.service")
            _serving(production)

    assert record["outcome"] == "rolled_back", record
    assert production.installed_sha256() == live
    wait_for(lambda: production.serving_version() == serving, 15, f"{serving} to serve again")


def test_release_that_never_becomes_healthy_is_rolled_back_then_refused(
    production: Production,
) -> None:
    sandbox = production.sandbox
    live, serving = production.installed_sha256(), _serving(production)
    artifact = production.release("4.0.0", "unhealthy")

    production.push(artifact)
    armed = _arm_with_signature(production, {"version": "4.0.0"})
    record = wait_for(lambda: production.finished(armed["id"]), DEPLOY_SECONDS, "the rollback")

    assert record["outcome"] == "rolled_back", record
    assert production.installed_sha256() == live
    assert _install_folder(production) == ["dealspace"]
    wait_for(lambda: production.serving_version() == serving, 15, f"{serving} to serve again")

    # Pushed again, the same bytes are refused before anything changes, naming the attempt
    # that rolled them back, and moved out of staging.
    production.push(artifact)
    again = production.arm()
    refusal = wait_for(lambda: production.finished(again["id"]), DEPLOY_SECONDS, "the refusal")

    assert refusal["outcome"] == "rejected", refusal
    assert armed["id"] in refusal["reason"], refusal
    assert sorted(sandbox.path(STAGING).iterdir()) == []
    rejected = sandbox.path(f"{STATE_DIR}/rejected/{again['id']}")
    assert sorted(path.name for path in rejected.iterdir()) == ["dealspace", "dealspace.sha256"]
    assert production.serving_version() == serving


def test_frozen_agent_is_killed_by_the_watchdog_and_the_deploy_finished(
    production: Production,
) -> None:
    sandbox = production.sandbox
    drop_in = "/etc/systemd/system/stagewatch.service.d/e2e-watchdog.conf"
    # A short watchdog for the test's sake, and a long stable window to freeze the agent in.
    sandbox.write(drop_in, "[Service]\nWatchdogSec=3s\n")
    sandbox.run("systemctl", "daemon-reload")
    sandbox.run("systemctl", "restart", "stagewatch.service")
    _reconfigure(production, stable_seconds=8)
    try:
        agent = sandbox.main_pid("stagewatch.service")
        restarts = int(sandbox.show("stagewatch.service", "NRestarts")["NRestarts"])
        production.push(production.release("5.0.0"))
        armed = production.arm({"version": "5.0.0"})
        wait_for(lambda: _state(production) == "checking", 20, "the agent to be checking")

        sandbox.run("kill", "-STOP", str(agent))

        wait_for(
            lambda: _restarted(production, agent, restarts), 30, "systemd to restart the agent"
        )
        record = wait_for(lambda: production.finished(armed["id"]), 60, "the recovered deploy")
    finally:
        sandbox.run("rm", "-f", drop_in)
        sandbox.run("systemctl", "daemon-reload")
        _reconfigure(production, stable_seconds=2)

    assert record["outcome"] == "succeeded", record
    assert production.history()[0]["id"] == armed["id"]
    assert production.installed_sha256() == production.sha256("5.0.0")
    assert production.serving_version() == "5.0.0"
    manager = [
        entry["MESSAGE"]
        for entry in sandbox.journal("stagewatch.service")
        if entry.get("_PID") == "1" or entry.get("SYSLOG_IDENTIFIER") == "systemd"
    ]
    assert any("Watchdog timeout" in message for message in manager), manager
    recovered = [message for _, message in _story(production, armed["id"])]
    assert any("interrupted" in message.lower() for message in recovered), recovered


def test_snapshot_restored_by_root_leaves_the_agent_able_to_deploy(
    production: Production,
) -> None:
    sandbox = production.sandbox
    serving = _serving(production)
    # Everything but a restore runs as the agent's user, so that what it writes stays the
    # agent's to read and replace.
    sandbox.run(STAGEWATCH, "snapshots", "create", user="stagewatch")
    newest = json.loads(sandbox.run(STAGEWATCH, "snapshots", "list", "--json").stdout)[0]

    # A restore runs as root: it stops and starts the unit and gives the restored file back
    # to the database's owner.
    sandbox.run(STAGEWATCH, "snapshots", "restore", newest["name"], "--yes", timeout=120)

    assert _stat(production, DATABASE) == "640 dealspace dealspace"
    wait_for(lambda: production.serving_version() == serving, 15, "dealspace to serve again")
    restore = production.history()[0]
    assert (restore["kind"], restore["outcome"]) == ("restore", "succeeded"), restore
    foreign = sandbox.run("find", STATE_DIR, "!", "-user", "stagewatch").stdout
    assert foreign == "", f"files the agent may not be able to use: {foreign}"

    production.push(production.release("6.0.0"))
    armed = production.arm({"version": "6.0.0"})
    record = wait_for(lambda: production.finished(armed["id"]), DEPLOY_SECONDS, "the deploy")
    assert record["outcome"] == "succeeded", record


def _build_wheel(production: Production) -> str:
    """A wheel of this checkout, built inside the sandbox, with constraints.txt beside it."""
    sandbox = production.sandbox
    source, wheels = "/srv/wheel-source", "/srv/wheels"
    shutil.copytree(
        CHECKOUT,
        sandbox.path(source),
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "*.egg-info", "build", "__pycache__", ".*_cache", ".hypothesis"
        ),
    )
    sandbox.run(
        f"{VENV}/bin/pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--wheel-dir",
        wheels,
        source,
        timeout=300,
    )
    shutil.copy(CHECKOUT / "constraints.txt", sandbox.path(wheels))
    (built,) = sandbox.path(wheels).glob("stagewatch-*.whl")
    return f"{wheels}/{built.name}"


def _serving(production: Production) -> str:
    """The version dealspace serves, once it answers (it may still be starting)."""
    return wait_for(production.serving_version, 15, "dealspace to answer on /healthz")


def _install_folder(production: Production) -> list[str]:
    """What the folder of the live binary holds: the binary alone, no temporary file."""
    return sorted(path.name for path in production.sandbox.path(BINARY).parent.iterdir())


def _stat(production: Production, path: str) -> str:
    return production.sandbox.run("stat", "-c", "%a %U %G", path).stdout.strip()


def _digest(production: Production, path: str) -> str:
    return hashlib.sha256(production.sandbox.path(path).read_bytes()).hexdigest()


def _story(production: Production, deploy_id: str) -> list[tuple[int, str]]:
    """(priority, message) of the agent's journal lines that name `deploy_id`, oldest first."""
    return [
        (int(entry["PRIORITY"]), entry["MESSAGE"])
        for entry in production.sandbox.journal("stagewatch.service")
        if entry.get("SYSLOG_IDENTIFIER") == "stagewatch"
        and isinstance(entry.get("MESSAGE"), str)
        and deploy_id in entry["MESSAGE"]
    ]


def _arm_with_signature(production: Production, body: dict[str, Any]) -> dict[str, Any]:
    """POST /deploy signed the Standard Webhooks way, as a build machine's library does it."""
    payload = json.dumps(body).encode()
    message_id = f"msg_{uuid.uuid4().hex}"
    now = datetime.now(tz=UTC)
    signature = Webhook(production.secret).sign(message_id, now, payload)
    request = urllib.request.Request(
        f"http://127.0.0.1:{production.webhook_port}/deploy",
        data=payload,
        headers={
            "Content-Type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        },
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def _state(production: Production) -> str | None:
    status, document = production.get("/status")
    return str(document["state"]) if status == 200 else None


def _restarted(production: Production, agent: int, restarts: int) -> bool:
    shown = production.sandbox.show("stagewatch.service", "MainPID", "NRestarts", "ActiveState")
    return (
        shown["ActiveState"] == "active"
        and int(shown["NRestarts"]) > restarts
        and int(shown["MainPID"]) not in (0, agent)
    )


def _reconfigure(production: Production, stable_seconds: float) -> None:
    """Rewrite the configuration and apply it with `systemctl reload` (SIGHUP)."""
    sandbox = production.sandbox
    configuration = e2e_configuration(
        production.webhook_port, production.service_port, stable_seconds
    )
    sandbox.write(CONFIG, configuration, mode=0o644)
    cursor = _journal_cursor(production)
    sandbox.run("systemctl", "reload", "stagewatch.service")
    wait_for(
        lambda: any(
            "reload" in str(entry.get("MESSAGE", "")).lower()
            for entry in sandbox.journal("stagewatch.service", since_cursor=cursor)
            if entry.get("SYSLOG_IDENTIFIER") == "stagewatch"
        ),
        10,
        "the agent to log the reload",
    )


def _journal_cursor(production: Production) -> str:
    entries = production.sandbox.journal("stagewatch.service")
    cursor: str = entries[-1]["__CURSOR"]
    return cursor
