"""idle_60s: what the real daemon costs while nothing happens, with systemd's watchdog set.

The agent runs as systemd would run it under the shipped unit (`WatchdogSec=30s`): a real
AF_UNIX datagram socket as $NOTIFY_SOCKET and WATCHDOG_USEC=30000000, so it pings every 15 s.
Nothing connects to it. After READY=1 and a short settling, one window of 60 s (10 s with
--quick) is measured from /proc: CPU time (the run time of every thread in
/proc/PID/task/*/schedstat, in ns), voluntary context switches summed over
/proc/PID/task/*/status (each is a thread that blocked after it woke), and VmRSS. Wake-ups
beyond the pings are the switches that the WATCHDOG=1 datagrams received do not account for.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common import Daemon, Figure, Sandbox, process_cpu_seconds, process_rss_bytes, wait_for

WATCHDOG_USEC = 30_000_000
SETTLING_SECONDS = 2.0


@dataclass
class NotifySocket:
    """A datagram socket standing in for systemd's, counting what arrives."""

    path: Path
    messages: list[tuple[float, str]] = field(default_factory=list)

    def count(self, line: str, since: float = 0.0) -> int:
        return sum(1 for at, text in list(self.messages) if at >= since and line in text.split())


@contextlib.contextmanager
def notify_socket() -> Iterator[NotifySocket]:
    # sockaddr_un holds 108 bytes (unix(7)): a short folder of its own.
    folder = Path(tempfile.mkdtemp(prefix="sw-notify-"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(folder / "notify"))
    listener.settimeout(0.2)
    received = NotifySocket(folder / "notify")
    stopping = threading.Event()

    def receive() -> None:
        while not stopping.is_set():
            try:
                data = listener.recv(4096)
            except TimeoutError:
                continue
            received.messages.append((time.monotonic(), data.decode(errors="replace")))

    thread = threading.Thread(target=receive, name="notify-socket")
    thread.start()
    try:
        yield received
    finally:
        stopping.set()
        thread.join()
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)


def voluntary_switches(pid: int) -> dict[int, int]:
    """Voluntary context switches of each thread of `pid`, by thread id."""
    switches: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    switches[int(task.name)] = int(line.split()[1])
    return switches


def cpu_nanoseconds(pid: int) -> int:
    """Time on a CPU of the live threads of `pid`, in ns (the first field of schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def measure(work: Path, quick: bool) -> list[Figure]:
    seconds = 10.0 if quick else 60.0
    sandbox = Sandbox(work / "idle")
    sandbox.install_initial("1.0")
    try:
        with notify_socket() as notifications:
            environment = {
                "NOTIFY_SOCKET": str(notifications.path),
                "WATCHDOG_USEC": str(WATCHDOG_USEC),
            }
            daemon = Daemon(sandbox, sandbox.root / "daemon.log", environment=environment)
            # READY=1 says it serves; asking /healthz would be traffic, and its after-effects
            # (the connection's deadline timer, the next ping's round trip) would be counted.
            daemon.start(wait=False)
            try:
                wait_for(lambda: notifications.count("READY=1"), 30, "READY=1")
                time.sleep(SETTLING_SECONDS)
                return _window(daemon.pid, notifications, seconds)
            finally:
                daemon.stop()
    finally:
        sandbox.stop_everything()


def _window(pid: int, notifications: NotifySocket, seconds: float) -> list[Figure]:
    started = time.monotonic()
    ticks_before = process_cpu_seconds(pid)
    cpu_before = cpu_nanoseconds(pid)
    switches_before = voluntary_switches(pid)
    time.sleep(seconds)
    cpu = (cpu_nanoseconds(pid) - cpu_before) / 1e9
    ticks = process_cpu_seconds(pid) - ticks_before
    switches_after = voluntary_switches(pid)
    rss = process_rss_bytes(pid)
    pings = notifications.count("WATCHDOG=1", since=started)
    others = [
        line
        for at, text in notifications.messages
        if at >= started
        for line in text.split("\n")
        if line and line != "WATCHDOG=1"
    ]

    by_thread = {
        thread: switches_after.get(thread, 0) - switches_before.get(thread, 0)
        for thread in sorted(set(switches_before) | set(switches_after))
    }
    woke = sum(by_thread.values())
    busy = ", ".join(f"{thread}: {count}" for thread, count in by_thread.items() if count)
    window = f"a {seconds:g} s window" + (" (--quick: 10 s, not 60 s)" if seconds < 60 else "")
    note = (
        f"idle_60s: {window}, watchdog pings every {WATCHDOG_USEC / 2e6:g} s; {pings} "
        f"WATCHDOG=1 received, {len(others)} other messages; {woke} voluntary context "
        f"switches in {len(by_thread)} threads (by thread id: {busy or 'none'}); "
        f"CPU {cpu * 1000:.2f} ms in all by schedstat ({ticks * 1000:.0f} ms by the 10 ms "
        f"clock ticks of /proc/PID/stat)."
    )
    return [
        Figure.bounded("idle_60s_cpu", cpu / seconds * 100, "%", maximum=0.05, note=note),
        Figure.bounded("idle_60s_other_wakeups", woke - pings, "wake-ups", maximum=0),
        Figure.bounded("idle_60s_rss", rss / 1e6, "MB", maximum=40),
    ]
