"""Liveness of the agent's long-running parts, for the systemd watchdog.

Each part (the watcher, the webhook listener, a running deploy step) holds a Heartbeat and
beats it while it makes progress. The notifier sends WATCHDOG=1 only while every open
heartbeat beat within its allowed silence: a step that hangs stops the pings, systemd kills
the agent, and the journal finishes or undoes the deploy at the next start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Heartbeat:
    """One part's pulse. `beat()` is cheap enough to call per copied chunk."""

    name: str
    max_silence_seconds: float
    _registry: Heartbeats | None = field(default=None, repr=False)
    last_beat: float = field(default_factory=time.monotonic)

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def silent_for(self, now: float) -> float:
        return now - self.last_beat

    def close(self) -> None:
        """The part finished; it no longer holds the pings back."""
        if self._registry is not None:
            self._registry.remove(self)

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()


class Heartbeats:
    """The set of parts whose liveness the watchdog pings depend on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[Heartbeat] = []
        self._probes: dict[str, Callable[[], bool]] = {}

    def open(self, name: str, max_silence_seconds: float) -> Heartbeat:
        heartbeat = Heartbeat(name, max_silence_seconds, self)
        with self._lock:
            self._open.append(heartbeat)
        return heartbeat

    def remove(self, heartbeat: Heartbeat) -> None:
        with self._lock:
            if heartbeat in self._open:
                self._open.remove(heartbeat)

    def add_probe(self, name: str, is_alive: Callable[[], bool]) -> None:
        """Watch a part that blocks while idle (an observer thread, an event loop).

        Such a part cannot beat while it waits for work, so the notifier asks it instead:
        `is_alive` must answer quickly and say whether the part can still make progress.
        """
        with self._lock:
            self._probes[name] = is_alive

    def remove_probe(self, name: str) -> None:
        with self._lock:
            self._probes.pop(name, None)

    def stalled(self) -> list[str]:
        """Names of the parts that stopped making progress; empty when all is well."""
        now = time.monotonic()
        with self._lock:
            silent = [
                heartbeat.name
                for heartbeat in self._open
                if heartbeat.silent_for(now) > heartbeat.max_silence_seconds
            ]
            probes = list(self._probes.items())

        return silent + [name for name, is_alive in probes if not is_alive()]


def detached(name: str = "foreground") -> Heartbeat:
    """A heartbeat that nobody watches, for code run outside the daemon (the CLI's deploy)."""
    return Heartbeat(name, float("inf"))
