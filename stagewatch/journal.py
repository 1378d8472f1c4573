"""The deploy journal: where an unfinished deploy stands, written before every step.

One small JSON file in the state folder, replaced atomically (write beside, fsync, rename,
fsync the folder) before each step starts. If the agent dies, the next start reads it and runs
that step again; every step is written so that running it twice is harmless. The file is
removed once the outcome is in the history.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stagewatch.errors import RecoveryError
from stagewatch.fsutil import Sync, atomic_write_bytes, fsync_directory, remove_if_present

JOURNAL_FORMAT = 1


@dataclass
class Entry:
    """The state of one deploy, rollback or snapshot restore in flight."""

    id: str
    kind: str  # "deploy", "rollback" or "restore"
    step: str  # the contract's states (verifying, snapshotting, swapping, ...) or a restore's
    started_at: str
    expected_sha256: str | None = None
    version: str | None = None
    force: bool = False
    new_sha256: str | None = None
    previous_sha256: str | None = None
    snapshot: str | None = None
    staged_identity: dict[str, list[int]] | None = None
    rollback_reason: str | None = None
    outcome: str | None = None
    reason: str | None = None
    trigger: str = "cli"
    target_sha256: str | None = None
    database_aside: str | None = None  # a restore's name for the database it replaces
    steps: list[dict[str, Any]] = field(default_factory=list)


def read(path: Path) -> Entry | None:
    """The entry of the interrupted deploy, or None when nothing is in flight."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise RecoveryError(
            f"{path}: cannot read the deploy journal ({error.strerror}); give the agent's user "
            "access to its state folder"
        ) from None

    try:
        document = json.loads(content)
        if document.pop("format") != JOURNAL_FORMAT:
            raise ValueError("unknown journal format")
        return Entry(**document)
    except (ValueError, TypeError, KeyError) as error:
        raise RecoveryError(
            f"{path}: the deploy journal is unreadable ({error}); inspect it, then remove it "
            "to let stagewatch run again"
        ) from None


def write(path: Path, entry: Entry, *, previous_suffices: bool = False) -> None:
    """Replace the journal with `entry`.

    `previous_suffices` is for an entry whose loss would change nothing: the entry before
    it, or none, leads the recovery to the same place. A power cut may then undo the
    replacement, so the folder is not fsynced. The content is, so that the file is never
    torn.
    """
    document = {"format": JOURNAL_FORMAT, **asdict(entry)}
    sync: Sync = "content" if previous_suffices else "all"
    atomic_write_bytes(path, json.dumps(document, indent=1).encode(), sync=sync)


def clear(path: Path) -> None:
    if remove_if_present(path):
        fsync_directory(path.parent)
