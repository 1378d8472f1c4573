"""Verifying a staged release: a private copy beside the install path, checked by its digest.

The staged pair lives in a folder the build machine writes to, so nothing there is trusted:
each file is opened once with O_NOFOLLOW (a symbolic link is refused, see open(2)) and
O_NONBLOCK (a FIFO is refused instead of blocking the open), and judged by fstat(2) on that
descriptor, never by looking its name up again. The artifact is copied with
copy_file_range(2) into a new file beside the install path that only stagewatch can write,
and the copy itself is hashed: the bytes installed are the bytes verified, even if the staged
file changes afterwards. Hashing the copy costs little, since the kernel has just put its
pages in the cache. The three long parts overlap (`_copy_hash_and_sync`): while one chunk is
copied, the one before it is hashed on another thread and written back to the disk by the
kernel, so a verify takes about as long as the slowest of copying, hashing and writing back,
not their sum.

Temporaries are named by `fsutil.temporary_name(target, "incoming")`, so that recovery finds
and removes them by their prefix (`remove_stale_copies`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import hmac
import logging
import os
import queue
import stat
import string
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from stagewatch.checksum import MAX_CHECKSUM_FILE_BYTES, SHA256_HEX_DIGITS, parse_checksum_file
from stagewatch.config import StagingConfig
from stagewatch.errors import ChecksumError, RejectedError, SwapError
from stagewatch.fsutil import fsync_directory, temporary_name
from stagewatch.heartbeat import Heartbeat

logger = logging.getLogger(__name__)

TEMPORARY_PURPOSE = "incoming"
PRIVATE_MODE = 0o700

# Every file stagewatch reads to copy or hash is opened once, read only, never through a
# symbolic link and without waiting for a writer should it be a FIFO (open(2): O_NOFOLLOW,
# O_NONBLOCK; for a regular file O_NONBLOCK changes nothing).
NO_FOLLOW_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

COPY_CHUNK_BYTES = 8 * 1024 * 1024
HASH_BUFFER_BYTES = 1024 * 1024

# copy_file_range(2) refuses some pairs of files (EXDEV across filesystems of different types,
# EINVAL or EOPNOTSUPP where a filesystem lacks support, ENOSYS or EPERM under a seccomp
# filter); sendfile(2), and then plain reads and writes, copy what it refuses.
_UNSUPPORTED_COPY_ERRORS = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EPERM}
)

_NO_SPACE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT})

_FILE_KINDS = (
    (stat.S_ISDIR, "is a directory"),
    (stat.S_ISFIFO, "is a named pipe (FIFO)"),
    (stat.S_ISSOCK, "is a socket"),
    (stat.S_ISCHR, "is a character device"),
    (stat.S_ISBLK, "is a block device"),
)


@dataclass(frozen=True)
class VerifiedCopy:
    """A private copy of the staged artifact beside the install path, its digest checked.

    `path` is in the install path's folder, mode 0o700 or stricter until installed. `sha256`
    was computed from the bytes in `path` and equals `checksum_sha256`, what the checksum file
    said (and the digest the deploy request named, if it named one).
    """

    path: Path
    sha256: str
    size: int
    checksum_sha256: str


@dataclass(frozen=True)
class PrivateCopy:
    """A file that `copy_beside` wrote, fsynced and hashed."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class _StagedFile:
    """A staged file held open: everything about it comes from this one descriptor."""

    descriptor: int
    path: Path
    label: str
    status: os.stat_result


def stage_verified_copy(
    staging: StagingConfig,
    install_path: Path,
    expected_sha256: str | None,
    heartbeat: Heartbeat,
    *,
    requested_by: str = "the webhook",
) -> VerifiedCopy:
    """Copy the staged artifact beside `install_path` and check its digest.

    Reads the checksum file and the artifact through one descriptor each (regular files with a
    single link, not empty, within the size limits), copies the artifact into a new private
    file beside `install_path`, fsyncs and hashes the copy, and compares its digest with the
    checksum file's and, when given, with `expected_sha256` (named in messages as
    `requested_by`). Beats `heartbeat` per chunk copied or hashed.

    Raise ChecksumError when a digest does not match or the checksum file is malformed,
    RejectedError when a staged file is unsafe or changed while being read, and SwapError
    when the copy cannot be written (no space left beside `install_path`, for one). Nothing
    is left beside `install_path` when anything is raised.
    """
    started = time.monotonic()
    wanted = _requested_digest(expected_sha256, requested_by)

    with contextlib.ExitStack() as stack:
        checksum = stack.enter_context(
            _open_staged(staging, staging.checksum_name, MAX_CHECKSUM_FILE_BYTES, "bytes")
        )
        checksum_sha256 = parse_checksum_file(
            _read_small_file(checksum), staging.artifact, source=checksum.label
        )

        artifact = stack.enter_context(
            _open_staged(
                staging,
                staging.artifact,
                staging.max_size_bytes,
                f"bytes allowed by staging.max_size_mb = {staging.max_size_mb}",
            )
        )
        copy = copy_beside(artifact.descriptor, artifact.status.st_size, install_path, heartbeat)

        try:
            _check_unchanged(artifact)
            _check_unchanged(checksum)
            _compare(artifact.label, copy.sha256, checksum_sha256, f"{staging.checksum_name} says")
            if wanted is not None:
                _compare(artifact.label, copy.sha256, wanted, f"{requested_by} asked for")
        except BaseException:
            _remove_quietly(copy.path)
            raise

    logger.debug(
        "Verified %s: %d bytes, sha256 %s (%.2f s)",
        artifact.label,
        copy.size,
        copy.sha256,
        time.monotonic() - started,
    )
    logger.debug("The verified copy of %s is %s", artifact.path, copy.path)

    return VerifiedCopy(copy.path, copy.sha256, copy.size, checksum_sha256)


def copy_beside(
    source: int,
    size: int,
    target: Path,
    heartbeat: Heartbeat,
    *,
    mode: int = PRIVATE_MODE,
) -> PrivateCopy:
    """Copy `size` bytes of the open file `source` into a new file beside `target`.

    The new file is created with O_EXCL under `temporary_name(target, "incoming")`, given
    `mode`, fsynced and then hashed; its size and digest describe what it holds, which is
    less than `size` bytes if `source` ended early. Raise SwapError naming `target` when the
    copy cannot be written; nothing is left behind then.
    """
    temporary = temporary_name(target, TEMPORARY_PURPOSE)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(temporary, flags, PRIVATE_MODE)
    except OSError as error:
        raise _destination_error(error, target, size) from None

    try:
        os.fchmod(descriptor, mode)
        sha256 = _copy_hash_and_sync(source, descriptor, size, heartbeat)
        copied = os.fstat(descriptor).st_size
    except BaseException as error:
        os.close(descriptor)
        _remove_quietly(temporary)
        if isinstance(error, OSError):
            raise _destination_error(error, target, size) from None
        raise

    os.close(descriptor)
    return PrivateCopy(temporary, sha256, copied)


def _copy_hash_and_sync(source: int, destination: int, size: int, heartbeat: Heartbeat) -> str:
    """Copy `source` into the new file `destination`, hash the copy, fsync it; return its sha256.

    Each chunk is handed to a hashing thread as soon as it is copied, and its writeback is
    started at once (sync_file_range(2) with SYNC_FILE_RANGE_WRITE, which waits for nothing),
    so the final fsync(2) finds little left to write. The hash is of the bytes read back from
    `destination`, in order; only this process can write that file, so what is hashed is what
    is made durable.
    """
    chunks: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
    with ThreadPoolExecutor(1, "stagewatch-hash") as pool:
        hashed = pool.submit(_hash_chunks, destination, chunks, heartbeat)

        def copied(offset: int, count: int) -> None:
            chunks.put((offset, count))
            _start_writeback(destination, offset, count)

        try:
            copy_descriptor(source, destination, size, heartbeat, on_chunk=copied)
        finally:
            chunks.put(None)
        os.fsync(destination)
        return hashed.result()


def _hash_chunks(
    descriptor: int, chunks: queue.SimpleQueue[tuple[int, int] | None], heartbeat: Heartbeat
) -> str:
    """Hash the ranges of `descriptor` named on `chunks`, in order, until None arrives."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BUFFER_BYTES)
    view = memoryview(buffer)
    while (chunk := chunks.get()) is not None:
        offset, end = chunk[0], chunk[0] + chunk[1]
        while offset < end:
            read = os.preadv(descriptor, [view[: min(HASH_BUFFER_BYTES, end - offset)]], offset)
            if read == 0:
                raise OSError(errno.EIO, f"the copy ended at byte {offset} while being hashed")
            digest.update(view[:read])
            offset += read
        heartbeat.beat()

    return digest.hexdigest()


def _start_writeback(descriptor: int, offset: int, count: int) -> None:
    """Ask the kernel to start writing a range back now; a hint, so failures are ignored."""
    if _sync_file_range is None:
        return
    _sync_file_range(descriptor, offset, count, _SYNC_FILE_RANGE_WRITE)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    # Python's os module has no sync_file_range; the C library does, on Linux.
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except AttributeError:
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>
_sync_file_range = _load_sync_file_range()


def copy_descriptor(
    source: int,
    destination: int,
    size: int,
    heartbeat: Heartbeat,
    *,
    on_chunk: Callable[[int, int], None] | None = None,
) -> int:
    """Copy up to `size` bytes from the start of `source` to the start of `destination`.

    Uses copy_file_range(2), falling back to sendfile(2) and then to reads and writes where
    the kernel refuses the pair. Beats `heartbeat` and calls `on_chunk(offset, count)` per
    chunk copied. Return the number of bytes copied, less than `size` only if `source` ended
    early.
    """
    methods = list(_COPY_METHODS)
    offset = 0
    while offset < size:
        name, method = methods[0]
        try:
            copied = method(source, destination, offset, min(COPY_CHUNK_BYTES, size - offset))
        except OSError as error:
            if error.errno not in _UNSUPPORTED_COPY_ERRORS or len(methods) == 1:
                raise
            methods.pop(0)
            logger.debug(
                "%s refused the copy (%s); copying with %s", name, error.strerror, methods[0][0]
            )
            continue

        if copied == 0:
            break
        if on_chunk is not None:
            on_chunk(offset, copied)
        offset += copied
        heartbeat.beat()

    return offset


def _copy_file_range(source: int, destination: int, offset: int, count: int) -> int:
    return os.copy_file_range(source, destination, count, offset, offset)


def _sendfile(source: int, destination: int, offset: int, count: int) -> int:
    # sendfile(2) writes at the destination's file position, which copy_file_range with
    # explicit offsets left untouched.
    os.lseek(destination, offset, os.SEEK_SET)
    return os.sendfile(destination, source, offset, count)


def _read_write(source: int, destination: int, offset: int, count: int) -> int:
    data = os.pread(source, min(count, HASH_BUFFER_BYTES), offset)
    written = 0
    while written < len(data):
        written += os.pwrite(destination, data[written:], offset + written)

    return written


_COPY_METHODS: tuple[tuple[str, Callable[[int, int, int, int], int]], ...] = (
    ("copy_file_range", _copy_file_range),
    ("sendfile", _sendfile),
    ("read and write", _read_write),
)


def sha256_of_descriptor(descriptor: int, heartbeat: Heartbeat | None = None) -> str:
    """The sha256 of everything in the open file `descriptor`, read from its start.

    Reads 1 MiB at a time into one reused buffer, beating `heartbeat` per read.
    """
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BUFFER_BYTES)
    view = memoryview(buffer)
    offset = 0
    while read := os.preadv(descriptor, [buffer], offset):
        digest.update(view[:read])
        offset += read
        if heartbeat is not None:
            heartbeat.beat()

    return digest.hexdigest()


def sha256_of_path(path: Path, heartbeat: Heartbeat | None = None) -> str:
    """The sha256 of the regular file at `path`, not following a symbolic link.

    Raise OSError when `path` cannot be opened (ELOOP for a symbolic link, FileNotFoundError
    when missing), and SwapError when it is not a regular file.
    """
    descriptor = os.open(path, NO_FOLLOW_OPEN_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise SwapError(f"{path}: is not a regular file, so it has no sha256 to compare")
        return sha256_of_descriptor(descriptor, heartbeat)
    finally:
        os.close(descriptor)


def _is_temporary_of(name: str, target_name: str) -> bool:
    """Whether `name` is one of our temporaries for a file named `target_name`."""
    prefix = f".{target_name}.{TEMPORARY_PURPOSE}-"
    token = name.removeprefix(prefix)

    return name.startswith(prefix) and bool(token) and all(c in string.hexdigits for c in token)


def remove_stale_copies(install_path: Path) -> list[Path]:
    """Remove the temporaries that an interrupted run left beside `install_path`.

    Only names made by `copy_beside` for `install_path` are touched. Return what was removed.
    """
    folder = install_path.parent
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []

    removed: list[Path] = []
    for entry in entries:
        if _is_temporary_of(entry.name, install_path.name) and not entry.is_dir(
            follow_symlinks=False
        ):
            _remove_quietly(Path(entry.path))
            removed.append(Path(entry.path))
            logger.info("Removed %s, left by an interrupted deploy", entry.path)

    if removed:
        fsync_directory(folder)

    return sorted(removed)


@contextlib.contextmanager
def _open_staged(
    staging: StagingConfig, name: str, max_bytes: int, limit_text: str
) -> Iterator[_StagedFile]:
    path = staging.dir / name
    # Messages name the file by its folder and name only: they end up in deploy records that
    # the webhook serves, and those never disclose a path of the host.
    label = f"{staging.dir.name or staging.dir}/{name}"
    try:
        descriptor = os.open(path, NO_FOLLOW_OPEN_FLAGS)
    except FileNotFoundError:
        raise RejectedError(f"{label}: is missing") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RejectedError(
                f"{label}: is a symbolic link (only regular files are deployed)"
            ) from None
        raise RejectedError(f"{label}: cannot be opened: {error.strerror}") from None

    try:
        status = os.fstat(descriptor)
        _check_status(status, label, max_bytes, limit_text)
        yield _StagedFile(descriptor, path, label, status)
    finally:
        os.close(descriptor)


def _check_status(status: os.stat_result, label: str, max_bytes: int, limit_text: str) -> None:
    for is_kind, kind in _FILE_KINDS:
        if is_kind(status.st_mode):
            raise RejectedError(f"{label}: {kind} (only regular files are deployed)")
    if not stat.S_ISREG(status.st_mode):
        raise RejectedError(f"{label}: is not a regular file (only regular files are deployed)")

    if status.st_size == 0:
        raise RejectedError(f"{label}: is empty")
    if status.st_size > max_bytes:
        raise RejectedError(
            f"{label}: is {status.st_size} bytes, more than the {max_bytes} {limit_text}"
        )

    # A second name could belong to a file outside staging that the uploader may not write
    # (a hard link to it would deploy its bytes); a file with no name left was removed.
    if status.st_nlink > 1:
        raise RejectedError(
            f"{label}: has {status.st_nlink} hard links; only a file with a single name is "
            f"deployed (upload a fresh copy instead of linking)"
        )
    if status.st_nlink == 0:
        raise RejectedError(f"{label}: was removed while it was being opened")


def _read_small_file(staged: _StagedFile) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total <= MAX_CHECKSUM_FILE_BYTES:
        chunk = os.read(staged.descriptor, MAX_CHECKSUM_FILE_BYTES + 1 - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)

    return b"".join(chunks)


def _check_unchanged(staged: _StagedFile) -> None:
    before = staged.status
    after = os.fstat(staged.descriptor)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise RejectedError(
            f"{staged.label}: changed while it was being read (was the upload still running?); "
            f"upload it again"
        )

    # The name is looked up again only to notice a replacement, never to read through it.
    try:
        named = os.stat(staged.path, follow_symlinks=False)
    except FileNotFoundError:
        raise RejectedError(
            f"{staged.label}: was removed or renamed while it was being read; upload it again"
        ) from None
    if (named.st_dev, named.st_ino) != (before.st_dev, before.st_ino):
        raise RejectedError(
            f"{staged.label}: was replaced while it was being read; upload it again"
        )


def _compare(label: str, actual: str, expected: str, expected_by: str) -> None:
    if not hmac.compare_digest(actual, expected):
        raise ChecksumError(f"{label}: sha256 is {actual}, {expected_by} {expected}")


def _requested_digest(expected_sha256: str | None, requested_by: str) -> str | None:
    if expected_sha256 is None:
        return None

    digest = expected_sha256.strip().lower()
    if len(digest) != SHA256_HEX_DIGITS or not all(c in string.hexdigits for c in digest):
        raise RejectedError(
            f"{requested_by} asked for sha256 {expected_sha256[:80]!r}, which is not "
            f"{SHA256_HEX_DIGITS} hex digits"
        )

    return digest


def _destination_error(error: OSError, target: Path, size: int) -> SwapError:
    if error.errno in _NO_SPACE_ERRORS:
        return SwapError(
            f"no space left beside {target}: {error.strerror} ({size} bytes are needed for the "
            f"copy; free some space in {target.parent})"
        )

    return SwapError(f"cannot copy {size} bytes beside {target}: {error.strerror}")


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
