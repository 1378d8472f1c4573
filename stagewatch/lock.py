"""One deploy, rollback or restore at a time, across processes.

An advisory `flock(2)` on a file in the state folder: the kernel releases it when its holder
dies, however it dies, so a SIGKILLed deploy never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from stagewatch.errors import BusyError


@contextlib.contextmanager
def exclusive(lock_path: Path, operation: str) -> Iterator[None]:
    """Hold the lock for `operation`; raise BusyError at once if another process holds it."""
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            raise BusyError(
                f"cannot {operation}: another deploy, rollback or restore is running{holder}"
            ) from None

        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} {operation}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)


def is_held(lock_path: Path) -> bool:
    """Whether some process holds the lock now (for `status`, which never takes it)."""
    try:
        descriptor = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False

    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)

    return False


def _read_holder(descriptor: int) -> str:
    text = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
    pid, _, operation = text.partition(" ")
    return f" (pid {pid}, {operation})" if pid.isdigit() else ""
