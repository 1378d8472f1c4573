"""Talking to systemd through its notify socket (sd_notify(3)), and the watchdog pinger.

Outside systemd (`$NOTIFY_SOCKET` unset) every message is silently dropped, so the daemon
runs the same way in a terminal. The pinger sends `WATCHDOG=1` every half of
`$WATCHDOG_USEC`, and only while every heartbeat is fresh: when a part hangs, the pings stop,
systemd kills the agent after `WatchdogSec=`, and the journal settles the deploy at the next
start (systemd.service(5), "WatchdogSec=").

The datagrams go through `sdnotify`, which connects to `$NOTIFY_SOCKET` (an "@" naming the
abstract namespace, unix(7)) and encodes Latin-1, while systemd reads UTF-8: so every message
is sent as ASCII, a character beyond it (a folder's name in a STATUS= line may hold any) written
as a backslash escape, which reads the same in both.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import sdnotify

from stagewatch.heartbeat import Heartbeats

log = logging.getLogger(__name__)

SEND_TIMEOUT_SECONDS = 1.0


class Notifier:
    """READY=1, STATUS=, RELOADING=1, STOPPING=1 and the WATCHDOG=1 pings."""

    def __init__(self, heartbeats: Heartbeats) -> None:
        self._notifier = _connect(os.environ.get("NOTIFY_SOCKET", ""))
        self._send_failed = False
        self._heartbeats = heartbeats
        self._stop = threading.Event()
        self._last_status = ""
        self._pinger: threading.Thread | None = None
        self.watchdog_interval_seconds = _watchdog_interval()

    def send(self, message: str) -> None:
        if self._notifier is None:
            return

        try:
            self._notifier.notify(message.encode("ascii", "backslashreplace").decode("ascii"))
        except OSError as error:
            # Once is enough: the pinger would repeat it every few seconds.
            if not self._send_failed:
                log.warning("Cannot notify systemd (%s): %s", message, error.strerror or error)
            self._send_failed = True
        else:
            self._send_failed = False

    def ready(self) -> None:
        self.send("READY=1")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd tell this reload from one it asked for earlier
        # (sd_notify(3), required with Type=notify-reload).
        self.send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")

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


def _connect(address: str) -> sdnotify.SystemdNotifier | None:
    """A notifier connected to `address`; None when there is none or it is unreachable."""
    if not address:
        return None

    try:
        # debug=True: sdnotify then raises what went wrong instead of swallowing it.
        notifier = sdnotify.SystemdNotifier(debug=True)
    except OSError as error:
        # systemd waits for READY=1 in vain now; say why before its start timeout does.
        log.error("Cannot reach systemd's notify socket %s: %s", address, error.strerror)
        return None

    # A datagram waits while systemd's queue is full; the agent must not wait on it for long.
    notifier.socket.settimeout(SEND_TIMEOUT_SECONDS)
    return notifier


def _watchdog_interval() -> float | None:
    """Half of `$WATCHDOG_USEC`, if it is meant for this process (sd_watchdog_enabled(3))."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000
