"""What `status` reports: the state now, the installed binary, the arm, the last outcome.

Reading the status never acts: an interrupted deploy is shown as such and left for the next
`run`, `deploy`, `rollback` or `snapshots restore` to settle.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from stagewatch import journal, lock, swap
from stagewatch.config import Config
from stagewatch.errors import RecoveryError
from stagewatch.fsutil import atomic_write_bytes, remove_if_present
from stagewatch.history import History


@dataclass(frozen=True)
class Arm:
    """The build machine's go-ahead: deploy the next complete pair before `armed_until`."""

    id: str
    armed_until: str  # RFC 3339 UTC
    sha256: str | None = None
    version: str | None = None
    force: bool = False

    def expired(self, now: datetime | None = None) -> bool:
        deadline = datetime.fromisoformat(self.armed_until.replace("Z", "+00:00"))
        return (now or datetime.now(UTC)) >= deadline


def read_arm(config: Config) -> Arm | None:
    """The arm the daemon persisted, so that it survives a restart of the agent."""
    try:
        document = json.loads(config.state.arm_path.read_bytes())
        return Arm(**document)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        # A torn or foreign file cannot arm anything; the next POST writes a good one.
        return None


def write_arm(config: Config, arm: Arm | None) -> None:
    """Persist the arm (None: remove it) for a restart of the agent.

    The agent's crash cannot lose it; a power cut may, since the folder is not fsynced: the
    arm's history record, saved durably beside it, then ends as expired, and the build
    machine that polls it arms again.
    """
    if arm is None:
        remove_if_present(config.state.arm_path)
        return
    atomic_write_bytes(config.state.arm_path, json.dumps(asdict(arm)).encode(), sync="content")


def current_status(
    config: Config, history: History | None, daemon_state: str | None = None
) -> dict[str, Any]:
    """The `status --json` document: state, installed_sha256, armed_until, last, and more."""
    state = daemon_state or "idle"
    interrupted: dict[str, Any] | None = None
    try:
        entry = journal.read(config.state.journal_path)
    except RecoveryError as error:
        entry, state = None, "interrupted"
        interrupted = {"error": str(error)}

    if entry is not None:
        if lock.is_held(config.state.lock_path):
            state = entry.step
        else:
            state = "interrupted"
            interrupted = {"id": entry.id, "kind": entry.kind, "step": entry.step}

    arm = read_arm(config)
    armed_until = arm.armed_until if arm is not None and not arm.expired() else None
    if state == "idle" and armed_until is not None:
        state = "armed"

    last = history.last_finished() if history is not None else None
    return {
        "state": state,
        "installed_sha256": swap.installed_sha256(config.service.binary, config.state.releases_dir),
        "armed_until": armed_until,
        "armed_id": arm.id if armed_until is not None and arm is not None else None,
        "interrupted": interrupted,
        "last": last.to_json() if last is not None else None,
    }


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"(),:;]+/)*([^\s/'\"(),:;]+)")


def without_host_paths(document: dict[str, Any]) -> dict[str, Any]:
    """The document with every absolute path cut to its last part, for answers over HTTP.

    Reasons written for the operator's log name paths ("/opt/dealspace/staging/dealspace: is
    a symbolic link"); the webhook's answers must not disclose the host's layout.
    """
    return {key: _scrub(value) for key, value in document.items()}


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(r"\1", value)
    if isinstance(value, dict):
        return without_host_paths(value)
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    return value
