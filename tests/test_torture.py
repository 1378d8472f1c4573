"""bench/torture.py as a test: random SIGKILLs through the real daemon and command line.

Fifty deploys, each killed at an instant drawn over its whole duration, on three hosts side by
side; after each, the agent runs again and every guarantee of the contract is checked (the
torture run's own docstring lists them). With root, a few deploys also run with a folder on a
small tmpfs that is filled up mid-deploy. The seed is random and named in every failure, so
that a failing run can be repeated with `python bench/torture.py --seed S ...`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TORTURE = Path(__file__).resolve().parent.parent / "bench" / "torture.py"
KILLS = 50


def torture(tmp_path: Path, *arguments: str, timeout: float) -> tuple[dict[str, Any], str]:
    """Run the torture run; its JSON report and what it printed, with the seed first."""
    seed = random.randrange(1_000_000)
    report = tmp_path / "report.json"
    argv = [sys.executable, str(TORTURE), "--seed", str(seed), "--json", str(report)]
    completed = subprocess.run(
        [*argv, *arguments, "--work", str(tmp_path / "hosts")],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    shown = f"seed {seed}, exit status {completed.returncode}\n{completed.stdout}"
    assert report.exists(), f"{shown}\n{completed.stderr[-3000:]}"
    document: dict[str, Any] = json.loads(report.read_text())
    return document, shown


@pytest.mark.slow
def test_deploys_killed_at_random_instants_keep_every_guarantee(tmp_path: Path) -> None:
    document, shown = torture(tmp_path, "--kills", str(KILLS), "--jobs", "3", timeout=240)
    faults = document["faults"]

    failed = [fault for fault in faults if fault["problems"]]
    assert not failed, shown
    assert not document["broken"], shown
    assert len(faults) == KILLS, shown
    # Both ways in were killed, and the instants spread over the deploy: most kills hit a
    # started attempt, at several different steps.
    assert {fault["fault"] for fault in faults} == {"kill (daemon)", "kill (command line)"}, shown
    started = [fault for fault in faults if fault["step"] not in ("not started", "armed")]
    assert len(started) > KILLS // 2, shown
    assert len({fault["step"] for fault in started}) >= 3, shown


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="mounting a tmpfs needs root and unshare(1)",
)
def test_deploy_commands_with_a_folder_filled_up_keep_every_guarantee(tmp_path: Path) -> None:
    arguments = ["--kills", "0", "--disk-full", "1", "--modes", "command line"]
    document, shown = torture(tmp_path, *arguments, timeout=240)
    faults = document["faults"]

    assert not [fault for fault in faults if fault["problems"]], shown
    assert not document["broken"], shown
    assert sorted({fault["fault"] for fault in faults}) == [
        "disk full: install (command line)",
        "disk full: snapshots (command line)",
        "disk full: state (command line)",
    ], shown


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="mounting a tmpfs needs root and unshare(1)",
)
def test_the_daemon_settles_its_deploy_by_itself_once_the_state_folder_has_room(
    tmp_path: Path,
) -> None:
    arguments = ["--kills", "0", "--disk-full", "2", "--modes", "daemon", "--folders", "state"]
    document, shown = torture(tmp_path, *arguments, timeout=240)
    faults = document["faults"]

    assert not [fault for fault in faults if fault["problems"]], shown
    assert not document["broken"], shown
    assert [fault["fault"] for fault in faults] == ["disk full: state (daemon)"] * 2, shown
