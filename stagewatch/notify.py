"""Talking to systemd through its notify socket (sd_notify(3)), and the watchdog pinger.

Outside systemd (`$NOTIFY_SOCKET` unset) every message is silently dropped, so the daemon
runs the same way in a terminal. The pinger sends `WATCHDOG=1` every half of
`$WATCHDOG_USEC`, and only while every heartbeat is fresh: when a part hangs, the pings stop,
systemd kills the agent after `WatchdogSec=`, and the journal settles the deploy at the next
start (systemd.service(5), "WatchdogSec=").
"""

from __future__ import annotations

import logging
import os
import threading

import sdnotify

from stagewatch.heartbeat import Heartbeats

log = logging.getLogger(__name__)


class Notifier:
    """READY=1, STATUS=, RELOADING=1, STOPPING=1 and the WATCHDOG=1 pings."""

    def __init__(self, heartbeats: Heartbeats) -> None:
        self._notifier = sdnotify.SystemdNotifier()
        self._heartbeats = heartbeats
        self._stop = threading.Event()
        self._last_status = ""
        self._pinger: threading.Thread | None = None
        self.watchdog_interval_seconds = _watchdog_interval()

    def send(self, message: str) -> None:
        self._notifier.notify(message)

    def ready(self) -> None:
        self.send("READY=1")

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, line: str) -> None:
        """Send `STATUS=` when it changed; one line, as `systemctl status` shows it."""
        line = " ".join(line.split())
        if line != self._last_status:
            self._last_status = line
            self.send(f"STATUS={line}")

    def start_pinger(self) -> None:
        """Start the watchdog pings, when systemd asked for them."""
        if self.watchdog_interval_seconds is None:
            return

        self._pinger = threading.Thread(target=self._ping_forever, name="watchdog", daemon=True)
        self._pinger.start()
        log.info(
            "Watchdog pings every %.1f s while every part makes progress",
            self.watchdog_interval_seconds,
        )

    def stop_pinger(self) -> None:
        self._stop.set()
        if self._pinger is not None:
            self._pinger.join(timeout=2)

    def _ping_forever(self) -> None:
        interval = self.watchdog_interval_seconds or 0.0
        reported: list[str] = []
        while not self._stop.wait(interval):
            stalled = self._heartbeats.stalled()
            if not stalled:
                self.send("WATCHDOG=1")
                if reported:
                    log.info("All parts make progress again; watchdog pings resumed")
                reported = []
            elif stalled != reported:
                log.error(
                    "No progress from %s; watchdog pings withheld so that systemd restarts "
                    "the agent and the journal settles the deploy",
                    ", ".join(stalled),
                )
                reported = stalled


def _watchdog_interval() -> float | None:
    """Half of `$WATCHDOG_USEC`, if it is meant for this process (sd_watchdog_enabled(3))."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000
