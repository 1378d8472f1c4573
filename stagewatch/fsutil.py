"""Durable file operations: write beside, fsync, rename, fsync the folder.

A rename is atomic on POSIX filesystems, but only durable once the folder that holds the name
is fsynced as well (see rename(2) and fsync(2)); a replacement does both unless its caller
says that less will do.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Literal

Sync = Literal["all", "content", "none"]
"""How durable a replacement must be once `atomic_write_bytes` returns:

- "all": the new content survives a crash or a power cut (the file and the folder fsynced).
- "content": the file is fsynced, the folder not: after a power cut the name may still hold
  the old content (or be absent, if it was new), but never a part of the new.
- "none": no fsync; after a power cut the file may be empty. For a file whose reader
  checks what it reads and can do without it.
"""


def fsync_directory(path: Path) -> None:
    """Make the names inside `path` durable (a rename or unlink in it survives a crash)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_name(target: Path, purpose: str) -> Path:
    """A fresh name beside `target`, so that a rename onto `target` stays on one filesystem."""
    return target.with_name(f".{target.name}.{purpose}-{secrets.token_hex(4)}")


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600, sync: Sync = "all") -> None:
    """Replace `path` with `data`: readers see the old content or the new, never a mix."""
    temporary = temporary_name(path, "tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            if sync != "none":
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise

    if sync == "all":
        fsync_directory(path.parent)


def remove_if_present(path: Path) -> bool:
    """Unlink `path`; return whether there was anything to remove."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
