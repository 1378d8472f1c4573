"""webhook_load and idle_connections_500: the real daemon's listener under abuse, on 127.0.0.1.

webhook_load: `wrk -t1 -c50 -d10s` sends POSTs with a wrong `X-Webhook-Secret` (50
connections, keep-alive) while a valid arm is POSTed every 100 ms on a fresh connection, its
latency measured. The server is pinned to CPU 0 with taskset, wrk and the valid arms to CPU 1.
Then the same load against adnanh/webhook (Debian's `webhook`, one hook with a header secret
rule) pinned the same way.

idle_connections_500: 500 connections opened to the agent and left without a byte: the RSS
they cost, whether /healthz still answers at once, and how long until the agent closed each
one (its deadline for a request to begin is 10 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import (
    Daemon,
    Figure,
    Sandbox,
    free_port,
    percentile,
    process_rss_bytes,
    request,
    wait_for,
)

SERVER_CPU = 0
CLIENT_CPU = 1
LOAD_SECONDS = 10
CONNECTIONS = 50
VALID_ARM_INTERVAL_SECONDS = 0.1
IDLE_CONNECTIONS = 500
REQUEST_DEADLINE_SECONDS = 10.0

# wrk's script: a POST with a small JSON body, and the summary printed as one JSON line.
_WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '{"version": "load"}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout))
end
"""


def start_wrk(url: str, script: Path, seconds: int) -> subprocess.Popen[str]:
    """wrk on CLIENT_CPU against `url` with a wrong secret, started."""
    return subprocess.Popen(
        [
            "taskset",
            "-c",
            str(CLIENT_CPU),
            "wrk",
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{seconds}s",
            "-H",
            "X-Webhook-Secret: wrong",
            "-s",
            str(script),
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wrk_summary(wrk: subprocess.Popen[str], seconds: int) -> dict[str, Any]:
    """What the script's done() printed, with the rate of answers per second added."""
    output, errors = wrk.communicate(timeout=seconds + 30)
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed: {errors}")
    summary: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    summary["per_second"] = summary["requests"] / (summary["duration_us"] / 1e6)
    return summary


@contextlib.contextmanager
def pinned_to(cpu: int) -> Iterator[None]:
    """Run the calling thread on one CPU for a while (sched_setaffinity(2))."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def valid_arms_during(wrk: subprocess.Popen[str], sandbox: Sandbox, seconds: float) -> list[float]:
    """POST a valid arm every 100 ms while `wrk` runs; the latency of each, in seconds."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    # Let the load build up before the first valid arm.
    time.sleep(1.0)
    with pinned_to(CLIENT_CPU):
        while time.monotonic() < deadline and wrk.poll() is None:
            started = time.perf_counter()
            status, document = request(
                sandbox.webhook_port, "POST", "/deploy", secret=sandbox.secret, body={}
            )
            latencies.append(time.perf_counter() - started)
            if status != 202:
                raise RuntimeError(f"a valid arm under load answered {status}: {document}")
            time.sleep(VALID_ARM_INTERVAL_SECONDS)
    return latencies


def load_stagewatch(work: Path, script: Path, seconds: int) -> tuple[dict[str, Any], list[float]]:
    sandbox = Sandbox(work / "webhook-load")
    daemon = Daemon(sandbox, sandbox.root / "daemon.log", cpu=SERVER_CPU)
    daemon.start()
    try:
        wrk = start_wrk(f"http://127.0.0.1:{sandbox.webhook_port}/deploy", script, seconds)
        latencies = valid_arms_during(wrk, sandbox, seconds)
        return wrk_summary(wrk, seconds), latencies
    finally:
        daemon.stop()


def load_adnanh_webhook(work: Path, script: Path, seconds: int) -> dict[str, Any]:
    folder = work / "adnanh-webhook"
    folder.mkdir(parents=True, exist_ok=True)
    hooks = folder / "hooks.json"
    rule = {
        "type": "value",
        "value": "the-right-secret",
        "parameter": {"source": "header", "name": "X-Webhook-Secret"},
    }
    hook = {"id": "deploy", "execute-command": "/bin/true", "trigger-rule": {"match": rule}}
    hooks.write_text(json.dumps([hook]))
    port = free_port()
    server = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(SERVER_CPU),
            "webhook",
            "-hooks",
            str(hooks),
            "-port",
            str(port),
            "-ip",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _accepts(port), 10, "adnanh/webhook listening")
        wrk = start_wrk(f"http://127.0.0.1:{port}/hooks/deploy", script, seconds)
        return wrk_summary(wrk, seconds)
    finally:
        server.terminate()
        server.wait(timeout=10)


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def measure_load(work: Path, quick: bool) -> list[Figure]:
    if shutil.which("wrk") is None or shutil.which("webhook") is None:
        raise RuntimeError("webhook_load needs wrk and webhook (Debian packages wrk, webhook)")
    seconds = 5 if quick else LOAD_SECONDS
    script = work / "post.lua"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(_WRK_SCRIPT)

    ours, valid = load_stagewatch(work, script, seconds)
    theirs = load_adnanh_webhook(work, script, seconds)

    errors = sum(ours[name] for name in ("connect_errors", "read_errors", "write_errors"))
    note = (
        f"webhook_load: wrk -t1 -c{CONNECTIONS} -d{seconds}s of wrong-secret POSTs, servers on "
        f"CPU {SERVER_CPU}, wrk and the valid arms on CPU {CLIENT_CPU}; stagewatch "
        f"{ours['requests']} requests ({errors} socket errors, {ours['timeouts']} timeouts), "
        f"adnanh/webhook {theirs['requests']}; {len(valid)} valid arms during the load, "
        f"median {sorted(valid)[len(valid) // 2] * 1000:.1f} ms, max {max(valid) * 1000:.1f} ms."
    )
    return [
        Figure.against(
            "webhook_load_throughput",
            ours["per_second"],
            "req/s",
            "adnanh/webhook",
            theirs["per_second"],
            min_ratio=1.0,
            note=note,
        ),
        Figure.against(
            "webhook_load_p99",
            ours["p99_us"] / 1000,
            "ms",
            "adnanh/webhook",
            theirs["p99_us"] / 1000,
        ),
        Figure.bounded(
            "webhook_valid_arm_p99_under_load", percentile(valid, 0.99) * 1000, "ms", maximum=100
        ),
    ]


def measure_idle_connections(work: Path) -> list[Figure]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_CONNECTIONS + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    sandbox = Sandbox(work / "idle-connections")
    daemon = Daemon(sandbox, sandbox.root / "daemon.log")
    daemon.start()
    sockets: list[socket.socket] = []
    try:
        rss_before = process_rss_bytes(daemon.pid)
        sockets_before = _open_sockets(daemon.pid)
        opened: dict[int, float] = {}
        for _ in range(IDLE_CONNECTIONS):
            connection = socket.create_connection(("127.0.0.1", sandbox.webhook_port))
            connection.setblocking(False)
            opened[connection.fileno()] = time.monotonic()
            sockets.append(connection)
        wait_for(
            lambda: _open_sockets(daemon.pid) >= sockets_before + IDLE_CONNECTIONS,
            30,
            "the agent to accept every connection",
        )
        accepted_after = time.monotonic() - min(opened.values())
        rss_after = process_rss_bytes(daemon.pid)

        started = time.perf_counter()
        status, _ = request(sandbox.webhook_port, "GET", "/healthz", timeout=5)
        healthz = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"/healthz answered {status} with 500 idle connections open")

        lifetimes = _wait_closed(sockets, opened, REQUEST_DEADLINE_SECONDS + 5)
    finally:
        for connection in sockets:
            connection.close()
        daemon.stop()

    closed = len(lifetimes)
    longest = max(lifetimes) if lifetimes else None
    note = (
        f"idle_connections_500: {closed} of {IDLE_CONNECTIONS} closed by the agent within "
        f"{REQUEST_DEADLINE_SECONDS + 5:g} s of being opened; each lived "
        f"{min(lifetimes):.2f} to {max(lifetimes):.2f} s; all were accepted "
        f"{accepted_after:.2f} s after the first was opened. "
        if lifetimes
        else f"idle_connections_500: none of {IDLE_CONNECTIONS} was closed by the agent. "
    ) + "The deadline is 10 s from accept; the target allows 1 s for the timer's rounds."
    return [
        Figure.bounded(
            "idle_connections_500_rss_growth",
            (rss_after - rss_before) / 1e6,
            "MB",
            maximum=20,
            note=note,
        ),
        Figure.bounded("idle_connections_500_healthz", healthz * 1000, "ms", maximum=1000),
        Figure.bounded(
            "idle_connections_500_all_closed_after",
            longest if closed == IDLE_CONNECTIONS else None,
            "s",
            maximum=REQUEST_DEADLINE_SECONDS + 1,
        ),
    ]


def _open_sockets(pid: int) -> int:
    """How many sockets process `pid` holds open, from the links in /proc/PID/fd."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
    return count


def _wait_closed(
    sockets: list[socket.socket], opened: dict[int, float], timeout: float
) -> list[float]:
    """Seconds each socket lived until the server closed it, for those closed in time."""
    sockets_by_descriptor = {connection.fileno(): connection for connection in sockets}
    selector = selectors.DefaultSelector()
    for connection in sockets:
        selector.register(connection, selectors.EVENT_READ)
    lifetimes: list[float] = []
    deadline = time.monotonic() + timeout
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.1):
            connection = sockets_by_descriptor[key.fd]
            try:
                data = connection.recv(4096)
            except ConnectionError:
                data = b""
            if not data:
                lifetimes.append(time.monotonic() - opened[connection.fileno()])
                selector.unregister(connection)
    selector.close()
    return lifetimes


def measure(work: Path, quick: bool) -> list[Figure]:
    return [*measure_load(work, quick), *measure_idle_connections(work)]
