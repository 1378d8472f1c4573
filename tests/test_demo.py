"""`stagewatch demo`, run as the README tells a newcomer to run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_demo_deploys_a_good_release_and_rolls_back_a_bad_one(tmp_path: Path) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "stagewatch", "demo", "--keep", str(tmp_path / "sandbox")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "outcome: succeeded" in shown.stdout
    assert "outcome: rolled_back" in shown.stdout
    assert "the service now answers version 2.0" in shown.stdout
    # The real daemon did the work: its log tells the rollback.
    log = (tmp_path / "sandbox" / "stagewatch.log").read_text()
    assert "Rolling back" in log
    assert "stagewatch stopped" in log
