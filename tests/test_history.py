"""The history file: one connection per History, and the file itself complete between attempts."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from stagewatch.history import History, Record, utc_now


def record(attempt_id: str, state: str = "verifying", outcome: str | None = None) -> Record:
    return Record(
        id=attempt_id,
        kind="deploy",
        state=state,
        trigger="cli",
        started_at=utc_now(),
        outcome=outcome,
    )


def ids_in_the_file_alone(path: Path, tmp_path: Path) -> list[str]:
    """The ids a copy of the database file holds without its write-ahead log."""
    alone = tmp_path / "alone.db"
    shutil.copyfile(path, alone)
    with sqlite3.connect(alone) as connection:
        return [row[0] for row in connection.execute("SELECT id FROM attempts ORDER BY id")]


def test_the_save_of_a_finished_record_reaches_the_database_file_itself(tmp_path: Path) -> None:
    history = History(tmp_path / "history.db")
    history.save(record("a-progress"), durable=False)
    before = ids_in_the_file_alone(history.path, tmp_path)

    history.save(record("b-finished", "finished", "succeeded"))

    assert "b-finished" not in before
    assert ids_in_the_file_alone(history.path, tmp_path) == ["a-progress", "b-finished"]


def test_another_process_sees_the_saves_of_a_connection_kept_open(tmp_path: Path) -> None:
    history = History(tmp_path / "history.db")
    history.save(record("in-flight"), durable=False)
    script = (
        "import sys\n"
        "from stagewatch.history import History\n"
        "other = History(__import__('pathlib').Path(sys.argv[1]))\n"
        "print(other.get('in-flight').state)\n"
        "other.save(__import__('dataclasses').replace(other.get('in-flight'), state='checking'))\n"
    )

    shown = subprocess.run(
        [sys.executable, "-c", script, str(history.path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )

    assert shown.stdout == "verifying\n"
    seen = history.get("in-flight")
    assert seen is not None
    assert seen.state == "checking"
