"""Probe a health URL at a steady pace and record when it answered, in a process of its own.

    python health_probe.py PORT --interval 0.005 --stop-file STOP --output TIMES.json

Every `--interval` seconds it GETs http://127.0.0.1:PORT/healthz on a fresh connection with
a short timeout. When the stop file appears it writes the completion times (time.monotonic,
shared by every process of the host) of the answers that were 200, and exits 0. A process of
its own so that the probe neither waits for nor delays the threads of whoever measures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import time
from pathlib import Path

TIMEOUT_SECONDS = 0.5


def probe_once(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_SECONDS)
    try:
        connection.request("GET", "/healthz")
        answer = connection.getresponse()
        answer.read()
        return answer.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--interval", type=float, default=0.005)
    parser.add_argument("--stop-file", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    arguments = parser.parse_args()

    answered: list[float] = []
    attempts = 0
    next_probe = time.monotonic()
    while not arguments.stop_file.exists():
        attempts += 1
        if probe_once(arguments.port):
            answered.append(time.monotonic())
        next_probe += arguments.interval
        delay = next_probe - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_probe = time.monotonic()

    temporary = arguments.output.with_suffix(".partial")
    temporary.write_text(json.dumps({"attempts": attempts, "answered": answered}))
    os.replace(temporary, arguments.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
