"""`packaging/install.sh --uninstall` under a real systemd: the program goes, the data stays.

A module of its own, with its own systemd: nothing else may run after the uninstall.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from sandbox import wait_for
from systemd_sandbox import (
    CHECKOUT,
    CONFIG,
    DEPLOY_KEYS,
    SECRET,
    SNAPSHOT_DIR,
    STATE_DIR,
    Production,
)

pytestmark = pytest.mark.e2e

REMOVED = (
    "/opt/stagewatch/venv",
    "/usr/local/bin/stagewatch",
    "/etc/systemd/system/stagewatch.service",
    "/etc/systemd/system/opt-stagewatch-chroot-opt-dealspace-staging.mount",
    "/etc/polkit-1/rules.d/50-stagewatch.rules",
    "/etc/ssh/sshd_config.d/stagewatch-deploy.conf",
    "/etc/tmpfiles.d/stagewatch.conf",
)


def test_uninstall_removes_the_program_and_keeps_the_data(production: Production) -> None:
    sandbox = production.sandbox
    production.push(production.release("2.0.0"))
    armed = production.arm({"version": "2.0.0"})
    wait_for(lambda: production.finished(armed["id"]), 40, "a deploy to have some history")
    kept = _digests(production)
    snapshots = sorted(path.name for path in sandbox.path(SNAPSHOT_DIR).iterdir())
    assert snapshots

    sandbox.run("sh", f"{CHECKOUT}/packaging/install.sh", "--uninstall", timeout=120)

    assert sandbox.show("stagewatch.service", "LoadState") == {"LoadState": "not-found"}
    for removed in REMOVED:
        assert not os.path.lexists(sandbox.path(removed)), removed
    assert _digests(production) == kept
    assert sorted(path.name for path in sandbox.path(SNAPSHOT_DIR).iterdir()) == snapshots
    assert production.serving_version() == "2.0.0", "dealspace itself is left alone"


def test_install_after_uninstall_carries_on_with_the_kept_data(production: Production) -> None:
    sandbox = production.sandbox
    kept = _digests(production)

    sandbox.run("sh", f"{CHECKOUT}/packaging/install.sh", timeout=300)

    assert _digests(production) == kept
    assert sandbox.show("stagewatch.service", "ActiveState") == {"ActiveState": "active"}
    versions = [record["version"] for record in production.history()]
    assert versions[:1] == ["2.0.0"], versions


def _digests(production: Production) -> dict[str, str]:
    """The sha256 of what an uninstall must keep: configuration, secret, key, history."""
    paths = (CONFIG, SECRET, DEPLOY_KEYS, f"{STATE_DIR}/history.db")
    return {
        path: hashlib.sha256(production.sandbox.path(path).read_bytes()).hexdigest()
        for path in paths
    }
