"""A stand-in for the service's database traffic: insert rows at a steady rate until told to stop.

Run as its own process, so that its locks and commits are those of another connection in
another process, as in production:

    python db_writer.py DATABASE --journal-mode wal --rate 800 --stop-file STOP

Each insert is its own transaction. After every commit it prints `committed N` on stdout, N
being the id of the newest committed row (ids start at 1 and have no gaps), so a reader that
saw `committed N` knows rows 1..N are durable in the database. It stops when the stop file
appears, and exits 0 then, or when it is killed.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path

SCHEMA = "CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, written_at REAL, payload BLOB)"


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", type=Path)
    parser.add_argument("--journal-mode", choices=("wal", "delete"), default="wal")
    parser.add_argument("--rate", type=float, default=800.0, help="inserts per second")
    parser.add_argument("--payload-bytes", type=int, default=200)
    parser.add_argument("--stop-file", type=Path, required=True)
    return parser.parse_args(argv)


def open_database(path: Path, journal_mode: str) -> sqlite3.Connection:
    # isolation_level=None: every INSERT commits on its own, like a busy web service.
    connection = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    connection.execute(f"PRAGMA journal_mode={journal_mode}")
    connection.execute(SCHEMA)
    return connection


def write_until_stopped(connection: sqlite3.Connection, arguments: argparse.Namespace) -> None:
    interval = 1.0 / arguments.rate
    payload = b"x" * arguments.payload_bytes
    next_insert = time.monotonic()

    while not arguments.stop_file.exists():
        cursor = connection.execute(
            "INSERT INTO rows (written_at, payload) VALUES (?, ?)", (time.time(), payload)
        )
        print(f"committed {cursor.lastrowid}", flush=True)

        next_insert += interval
        delay = next_insert - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_insert = time.monotonic()


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    connection = open_database(arguments.database, arguments.journal_mode)
    try:
        write_until_stopped(connection, arguments)
    finally:
        connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
