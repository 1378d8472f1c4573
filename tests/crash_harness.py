"""Run the stagewatch command line, SIGKILLing itself right after the journal names a step.

    python crash_harness.py STEP OCCURRENCE -- stagewatch arguments...

The journal is written before every step, so this kills the agent exactly at a step
boundary: the new step is on disk and nothing of it has run. A real SIGKILL of a real
process, not a simulated one; only the instant is chosen.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from stagewatch import journal
from stagewatch.cli import main

target_step, occurrence = sys.argv[1], int(sys.argv[2])
arguments = sys.argv[sys.argv.index("--") + 1 :]
write_journal = journal.write
seen = 0


def write_then_die(path: Path, entry: Any, **options: Any) -> None:
    global seen
    write_journal(path, entry, **options)
    if entry.step == target_step:
        seen += 1
        if seen == occurrence:
            os.kill(os.getpid(), signal.SIGKILL)


journal.write = write_then_die
sys.exit(main(arguments))
