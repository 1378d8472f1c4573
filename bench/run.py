"""Measure stagewatch's figures against their references and targets, on this machine.

    python bench/run.py [--quick] [--json FILE] [--only NAME[,NAME...]] [--work DIR]

Every figure calls the code a deploy runs (stagewatch's own functions, or the real daemon
`python -m stagewatch --config CFG run` on a sandbox host), never a copy of it. The table goes
to stdout; progress and the machine's state go to stderr. A figure that misses its target
says so in the table: the figures are not tuned to pass.

    verify_install     verify_install_256mib                       bench/verify_install.py
    snapshot_live      snapshot_live_256mib                        bench/snapshot_live.py
    deploy_timing      deploy_overhead, settle_to_start, downtime  bench/deploy_timing.py
    idle               idle_60s                                    bench/idle.py
    webhook_load       webhook_load, idle_connections_500          bench/webhook_load.py

--quick runs fewer repetitions, shortens the idle window to 10 s and the load to 5 s, and
says so in the notes. Needs wrk and webhook (Debian packages) for the load, root for nothing.
Exit status 0 when every figure holds, 1 when one misses its target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deploy_timing
import idle
import snapshot_live
import verify_install
import webhook_load
from common import Figure, render_table

MEASURES: dict[str, Callable[[Path, bool], list[Figure]]] = {
    "verify_install": verify_install.measure,
    "snapshot_live": snapshot_live.measure,
    "deploy_timing": deploy_timing.measure,
    "idle": idle.measure,
    "webhook_load": webhook_load.measure,
}


def machine() -> dict[str, str]:
    """What the figures were measured on, and how busy it was."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": f"{os.cpu_count()} x {model}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "load_average": " ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about 4 minutes)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    parser.add_argument(
        "--only", metavar="NAMES", help=f"comma-separated, of: {', '.join(MEASURES)}"
    )
    parser.add_argument(
        "--work", type=Path, metavar="DIR", help="scratch folder (default: a new temporary one)"
    )
    arguments = parser.parse_args(argv)
    if arguments.only:
        unknown = set(arguments.only.split(",")) - set(MEASURES)
        if unknown:
            parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    return arguments


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    names = arguments.only.split(",") if arguments.only else list(MEASURES)
    work = arguments.work or Path(tempfile.mkdtemp(prefix="stagewatch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    before = machine()
    print(f"bench: {before} in {work}", file=sys.stderr)

    figures: list[Figure] = []
    durations: dict[str, float] = {}
    try:
        for name in names:
            print(f"bench: measuring {name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            figures.extend(MEASURES[name](work / name, arguments.quick))
            durations[name] = round(time.monotonic() - started, 1)
            print(f"bench: {name} done in {durations[name]:g} s", file=sys.stderr, flush=True)
    finally:
        if arguments.work is None:
            shutil.rmtree(work, ignore_errors=True)

    after = machine()
    print(render_table(figures))
    print(
        f"Measured on {before['cpu']}, Linux {before['kernel']}, Python {before['python']}, "
        f"SQLite {before['sqlite']}; load average {before['load_average']} before, "
        f"{after['load_average']} after{' (--quick)' if arguments.quick else ''}."
    )
    if arguments.json is not None:
        document = {
            "figures": [figure.to_json() for figure in figures],
            "machine": {"before": before, "after": after},
            "quick": arguments.quick,
            "seconds": durations,
        }
        arguments.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(figure.holds is not False for figure in figures) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
