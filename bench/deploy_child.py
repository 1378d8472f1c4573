"""The command line, run in a process forked from a server that has stagewatch imported already.

A deploy started this way begins at once, so that an instant chosen for a fault measures the
deploy itself rather than the interpreter's start. Its output goes to a log file.
"""

from __future__ import annotations

import os
import sys

from stagewatch.cli import main


def run(argv: list[str], log_path: str) -> None:
    """Run `stagewatch ARGV` with stdout and stderr appended to `log_path`; exit its status."""
    descriptor = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    sys.exit(main(argv))
