"""`check-config`: does the host match what the configuration describes?

Parsing already refused unknown keys and impossible values; these checks look at the host:
the folders exist with the access the agent needs, the secret is private, the unit or the
commands exist. Each problem is one line naming the key and the fix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from stagewatch.config import Config, read_secret
from stagewatch.errors import ConfigError


def check_host(config: Config) -> tuple[list[str], list[str]]:
    """Return (problems, notes): problems make `check-config` exit 2, notes are reassurance."""
    problems: list[str] = []
    notes: list[str] = []

    _check_folder("service.binary", config.service.binary.parent, os.W_OK, problems, notes)
    _check_folder("staging.dir", config.staging.dir, os.R_OK | os.W_OK, problems, notes)
    _check_folder_or_parent("database.snapshot_dir", config.database.snapshot_dir, problems, notes)
    _check_folder_or_parent("state.dir", config.state.dir, problems, notes)
    _check_database(config, problems, notes)
    _check_secret(config, problems, notes)
    _check_service(config, problems, notes)

    for key, path in (
        ("webhook.tls_cert", config.webhook.tls_cert),
        ("webhook.tls_key", config.webhook.tls_key),
    ):
        if path is not None and not os.access(path, os.R_OK):
            problems.append(f"{key}: {path} is not readable")

    return problems, notes


def _check_folder(
    key: str, folder: Path, access: int, problems: list[str], notes: list[str]
) -> None:
    if not folder.is_dir():
        problems.append(f"{key}: folder {folder} does not exist")
    elif not os.access(folder, access | os.X_OK):
        wanted = "read and write" if access & os.R_OK else "write"
        problems.append(f"{key}: this user cannot {wanted} in {folder}")
    else:
        notes.append(f"{key}: {folder} is usable")


def _check_folder_or_parent(key: str, folder: Path, problems: list[str], notes: list[str]) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent

    if not existing.is_dir():
        problems.append(f"{key}: {existing} is not a folder")
    elif not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"{key}: this user cannot write in {existing}")
    else:
        verb = "is usable" if existing == folder else f"will be created in {existing}"
        notes.append(f"{key}: {folder} {verb}")


def _check_database(config: Config, problems: list[str], notes: list[str]) -> None:
    path = config.database.path
    if path.exists():
        if os.access(path, os.R_OK):
            notes.append(f"database.path: {path} is readable")
        else:
            problems.append(f"database.path: this user cannot read {path}")
    elif config.database.missing_ok:
        notes.append(f"database.path: {path} does not exist; snapshots are skipped (missing_ok)")
    else:
        problems.append(
            f"database.path: {path} does not exist (set database.missing_ok = true to deploy "
            "without snapshots)"
        )

    folder = path.parent
    if config.database.restore_on_rollback and not os.access(folder, os.W_OK | os.X_OK):
        problems.append(
            f"database.restore_on_rollback: this user cannot write in {folder}, so a rollback "
            "could not put the snapshot back; set it to false, or give the agent's user write "
            "access there (docs/operations.md says what the packaged unit allows)"
        )


def _check_secret(config: Config, problems: list[str], notes: list[str]) -> None:
    try:
        read_secret(config)
    except ConfigError as error:
        problems.append(str(error))
    else:
        notes.append("webhook secret: present and private")


def _check_service(config: Config, problems: list[str], notes: list[str]) -> None:
    service = config.service
    if service.manager == "command":
        for key in ("restart", "is_active", "stop", "start"):
            argv = getattr(service, key)
            if argv is not None and shutil.which(argv[0]) is None:
                problems.append(f"service.{key}: {argv[0]} is not an executable")
        notes.append("service.manager: command")
        return

    systemctl = shutil.which("systemctl")
    if systemctl is None:
        problems.append('service.manager: "systemd" but systemctl is not installed')
        return

    try:
        shown = subprocess.run(
            [systemctl, "show", "--property=LoadState", "--value", service.unit],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired:
        problems.append(f"service.unit: systemctl did not answer about {service.unit} in 10 s")
        return

    load_state = shown.stdout.strip()
    if shown.returncode != 0:
        problems.append(f"service.unit: systemctl failed: {shown.stderr.strip()[:200]}")
    elif load_state != "loaded":
        problems.append(f"service.unit: {service.unit} is {load_state or 'unknown'} to systemd")
    else:
        notes.append(f"service.unit: {service.unit} is loaded")
