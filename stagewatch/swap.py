"""Swapping the binary: keep the current one as a release, rename the verified copy over it.

The install path only ever changes by rename(2) of a complete, fsynced file from the same
folder, followed by an fsync of the folder, so it holds the old bytes or the new ones, mode
0755, at every instant and after a crash.

Earlier binaries are kept as `releases_dir/<sha256>`, mode 0755, for rollback: a hard link to
the binary being replaced where both are on one filesystem (free and instant), else a copy
whose digest is checked. A release's mtime is when it was last kept; pruning removes the
oldest beyond `keep_releases`.

Putting a release back needs no free space in the install folder, which a deploy may just
have filled: where `releases_dir` is on the install path's filesystem, the release is linked
beside the install path and renamed over it. Where it is not (the release is a copy), the
binary being replaced keeps a second name beside the install path during the deploy,
`.<name>.previous`, also a hard link, which a rollback renames back; the engine removes it
once the attempt is settled.

Which release is installed is remembered in `installed.json` beside `releases_dir` (in the
state folder, so that `releases_dir` holds nothing but releases): its sha256 and
the installed file's identity (device, inode, size, mtime and ctime, all from stat(2)). While
that identity holds, nothing has written to the file or replaced it (any write or chmod moves
the ctime, which utime(2) cannot set back; only moving the system clock back could), so
keeping it needs no second hashing pass; when it does not hold, the file is hashed.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from stagewatch.errors import SwapError
from stagewatch.fsutil import (
    atomic_write_bytes,
    fsync_directory,
    remove_if_present,
    temporary_name,
)
from stagewatch.heartbeat import Heartbeat
from stagewatch.verify import (
    NO_FOLLOW_OPEN_FLAGS,
    TEMPORARY_PURPOSE,
    PrivateCopy,
    VerifiedCopy,
    copy_beside,
    sha256_of_descriptor,
)

logger = logging.getLogger(__name__)

EXECUTABLE_MODE = 0o755
RELEASES_DIR_MODE = 0o700
INSTALLED_RECORD_NAME = "installed.json"

_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]+")

# What an interrupted keep leaves in releases_dir, and an interrupted record beside it: names
# from fsutil.temporary_name.
_STALE_KEEP_TEMPORARY = re.compile(rf"\.[0-9a-f]{{64}}\.(?:{TEMPORARY_PURPOSE}|link)-[0-9a-f]+")
_STALE_RECORD_TEMPORARY = re.compile(r"\.installed\.json\.tmp-[0-9a-f]+")

# link(2) cannot join the two names: different filesystems, or one without hard links.
_NO_HARD_LINK_ERRORS = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP})


@dataclass(frozen=True)
class KeptRelease:
    """An earlier binary kept for rollback, named by its sha256."""

    sha256: str
    path: Path
    kept_at: datetime


def install(
    copy: VerifiedCopy,
    install_path: Path,
    releases_dir: Path,
    heartbeat: Heartbeat,
) -> str | None:
    """Install the verified copy at `install_path`; return what was installed before.

    Keeps the current binary as a release (`keep_current`), and under a second name beside
    `install_path` where the release is a copy (`hold_previous`), makes the copy mode 0755,
    renames it over `install_path` and fsyncs the folder. Pruning releases beyond
    `keep_releases` is left to the caller, once the deploy is decided (`prune_releases`): it
    is not needed before the restart, and unlinking a large file takes long. Return the
    sha256 of the binary that was at `install_path` when called, None if there was none.

    Running it again after it succeeded, when the copy is gone and `install_path` already
    holds `copy.sha256`, changes nothing and returns `copy.sha256`. Raise SwapError when
    anything fails: `install_path` then still holds the old binary, and the copy and the
    second name are removed.
    """
    if copy.path.parent != install_path.parent:
        raise SwapError(
            f"{copy.path}: the verified copy must be in the folder of {install_path}, so that "
            f"the rename stays on one filesystem"
        )

    if not os.path.lexists(copy.path):
        return _confirm_installed(copy, install_path, releases_dir, heartbeat)

    started = time.monotonic()
    try:
        previous = keep_current(install_path, releases_dir, heartbeat)
        hold_previous(install_path, releases_dir, previous)
        _make_executable(copy)
        os.replace(copy.path, install_path)
    except BaseException as error:
        remove_if_present(copy.path)
        remove_if_present(previous_path(install_path))
        if isinstance(error, OSError):
            raise SwapError(
                f"cannot install {copy.sha256} at {install_path}: {error.strerror}"
            ) from None
        raise

    _finish_install(install_path, releases_dir, copy.sha256)
    logger.debug(
        "Installed %s at %s, replacing %s (%.2f s)",
        copy.sha256,
        install_path,
        previous or "nothing",
        time.monotonic() - started,
    )

    return previous


def install_release(
    release_path: Path,
    install_path: Path,
    heartbeat: Heartbeat,
    expected_sha256: str,
    *,
    releases_dir: Path | None = None,
) -> None:
    """Put a kept release back at `install_path` (a rollback).

    Links `release_path` beside `install_path` (no space needed) or, across filesystems,
    copies it there and fsyncs the copy; checks that its sha256 is `expected_sha256`, makes
    it mode 0755, renames it over `install_path` and fsyncs the folder. `releases_dir`
    (default: the release's folder) tells where the installed release is remembered. The
    current binary is not kept: call `keep_current` first for that. Raise SwapError when
    `expected_sha256` is not a digest or the release cannot be read or is damaged;
    `install_path` is then untouched and nothing is left beside it.
    """
    started = time.monotonic()
    wanted = expected_sha256.strip().lower()
    if not _SHA256_NAME.fullmatch(wanted):
        raise SwapError(f"{expected_sha256[:80]!r} is not a sha256 (64 hex digits)")

    try:
        with _open_regular(release_path, "the kept release") as (descriptor, status):
            copy = _link_beside(release_path, descriptor, status, install_path, heartbeat)
            if copy is None:
                copy = copy_beside(
                    descriptor, status.st_size, install_path, heartbeat, mode=EXECUTABLE_MODE
                )
    except FileNotFoundError:
        raise SwapError(
            f"{release_path}: the kept release is missing; see `stagewatch history`"
        ) from None

    try:
        if not hmac.compare_digest(copy.sha256, wanted):
            raise SwapError(
                f"{release_path}: the kept release is damaged: its sha256 is {copy.sha256}, "
                f"expected {wanted}; choose another with `stagewatch rollback --to`"
            )
        os.replace(copy.path, install_path)
    except BaseException as error:
        remove_if_present(copy.path)
        if isinstance(error, OSError):
            raise SwapError(
                f"cannot put {wanted} back at {install_path}: {error.strerror}"
            ) from None
        raise

    _finish_install(install_path, releases_dir or release_path.parent, wanted)
    logger.debug(
        "Put release %s back at %s (%.2f s)", wanted, install_path, time.monotonic() - started
    )


def _link_beside(
    release_path: Path,
    descriptor: int,
    status: os.stat_result,
    install_path: Path,
    heartbeat: Heartbeat,
) -> PrivateCopy | None:
    """Link the open release beside `install_path` and hash it; None across filesystems."""
    link = temporary_name(install_path, TEMPORARY_PURPOSE)
    try:
        os.link(release_path, link, follow_symlinks=False)
    except OSError as error:
        if error.errno not in _NO_HARD_LINK_ERRORS:
            raise SwapError(
                f"cannot link a kept release beside {install_path}: {error.strerror}"
            ) from None
        return None

    try:
        # The name was looked up again to link it; it must still be the file held open.
        if not _is_same_file(link, status):
            raise SwapError(f"{release_path}: was replaced while it was being put back")
        os.chmod(link, EXECUTABLE_MODE, follow_symlinks=False)
        sha256 = sha256_of_descriptor(descriptor, heartbeat)
        _fsync_path(link)
    except BaseException:
        remove_if_present(link)
        raise

    return PrivateCopy(link, sha256, status.st_size)


def _fsync_path(path: Path) -> None:
    # Its bytes were made durable when the release was kept; this covers its new mode.
    descriptor = os.open(path, NO_FOLLOW_OPEN_FLAGS)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def keep_current(install_path: Path, releases_dir: Path, heartbeat: Heartbeat) -> str | None:
    """Keep the binary at `install_path` as `releases_dir/<its sha256>`; return that sha256.

    A hard link where the filesystem allows, else a copy whose digest is checked; mode 0755,
    its mtime set to now, the folder fsynced. A release already kept under that name is
    reused when it is the installed file itself, and replaced otherwise (by a link, that is
    free; by a copy, that is checked). Return None when nothing is installed. Raise
    SwapError when the binary cannot be read or kept.
    """
    try:
        with _open_regular(install_path, "the installed binary") as (descriptor, status):
            sha256 = _recorded_sha256(releases_dir, status)
            if sha256 is None:
                sha256 = sha256_of_descriptor(descriptor, heartbeat)
            _keep_as_release(descriptor, status, install_path, releases_dir / sha256, heartbeat)
    except FileNotFoundError:
        return None

    return sha256


def previous_path(install_path: Path) -> Path:
    """The second name of the binary being replaced, while a deploy may still roll back."""
    return install_path.with_name(f".{install_path.name}.previous")


def hold_previous(install_path: Path, releases_dir: Path, kept_sha256: str | None) -> bool:
    """Give the binary at `install_path` a second name beside it, unless it needs none.

    None is needed when its kept release `releases_dir/<kept_sha256>` is the installed file
    itself (a hard link), since a rollback links that back. A name left by an earlier attempt
    is replaced. Nothing is fsynced here: the rename of the swap that follows fsyncs the same
    folder, and a name lost to a power cut only sends the rollback to the copy in
    `releases_dir`. Return whether the name was made: False also when nothing is installed or
    the filesystem has no hard links. Raise SwapError when the name cannot be made otherwise.
    """
    held = previous_path(install_path)
    try:
        remove_if_present(held)
        if kept_sha256 is None or _is_same_file(
            releases_dir / kept_sha256, os.stat(install_path, follow_symlinks=False)
        ):
            return False
        os.link(install_path, held, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError as error:
        if error.errno in _NO_HARD_LINK_ERRORS:
            logger.debug("No second name for %s: %s", install_path, error.strerror)
            return False
        raise SwapError(
            f"cannot link {install_path} to {held.name} beside it: {error.strerror}"
        ) from None

    return True


def restore_previous(
    install_path: Path, releases_dir: Path, expected_sha256: str, heartbeat: Heartbeat
) -> bool:
    """Rename the second name (`hold_previous`) back over `install_path`, if it is intact.

    The file is hashed first: only `expected_sha256` goes back. Return False, changing
    nothing, when the name is missing or holds other bytes (it is then removed); raise
    SwapError when the rename fails.
    """
    held = previous_path(install_path)
    try:
        with _open_regular(held, "the previous binary") as (descriptor, _):
            sha256 = sha256_of_descriptor(descriptor, heartbeat)
            if sha256 == expected_sha256:
                os.fchmod(descriptor, EXECUTABLE_MODE)
    except FileNotFoundError:
        return False
    except SwapError as error:
        logger.warning("%s; putting back the kept release instead", error)
        return False

    if sha256 != expected_sha256:
        logger.warning(
            "%s holds %s, not the previous binary %s; putting back the kept release instead",
            held,
            sha256,
            expected_sha256,
        )
        remove_if_present(held)
        return False

    try:
        os.replace(held, install_path)
    except OSError as error:
        raise SwapError(
            f"cannot rename {held.name} back over {install_path}: {error.strerror}"
        ) from None
    _finish_install(install_path, releases_dir, expected_sha256)
    return True


def release_previous(install_path: Path) -> None:
    """Remove the second name once the attempt is settled; nothing to do when there is none."""
    if remove_if_present(previous_path(install_path)):
        fsync_directory(install_path.parent)


def installed_sha256(
    install_path: Path, releases_dir: Path, heartbeat: Heartbeat | None = None
) -> str | None:
    """The sha256 of the binary at `install_path`, None if there is none.

    Taken from `installed.json` beside `releases_dir` while the file at `install_path` is the
    one it describes, else computed. Raise SwapError when `install_path` is not a readable
    regular file.
    """
    try:
        with _open_regular(install_path, "the installed binary") as (descriptor, status):
            recorded = _recorded_sha256(releases_dir, status)
            return recorded or sha256_of_descriptor(descriptor, heartbeat)
    except FileNotFoundError:
        return None


def kept_releases(releases_dir: Path) -> list[KeptRelease]:
    """The releases kept in `releases_dir`, most recently kept first."""
    try:
        entries = list(os.scandir(releases_dir))
    except FileNotFoundError:
        return []

    found: list[tuple[int, KeptRelease]] = []
    for entry in entries:
        if not _SHA256_NAME.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        mtime_ns = entry.stat(follow_symlinks=False).st_mtime_ns
        kept_at = datetime.fromtimestamp(mtime_ns / 1e9, tz=UTC)
        found.append((mtime_ns, KeptRelease(entry.name, Path(entry.path), kept_at)))

    found.sort(key=lambda item: (item[0], item[1].sha256), reverse=True)
    return [release for _, release in found]


def find_release(releases_dir: Path, sha256_prefix: str) -> KeptRelease:
    """The one kept release whose sha256 starts with `sha256_prefix` (any case).

    Raise SwapError when the prefix is not hex, or matches no kept release, or several.
    """
    prefix = sha256_prefix.strip().lower()
    if not _HEX.fullmatch(prefix):
        raise SwapError(
            f"{sha256_prefix[:80]!r} is not the start of a sha256; give hex digits as "
            f"`stagewatch history` shows them"
        )

    releases = kept_releases(releases_dir)
    matches = [release for release in releases if release.sha256.startswith(prefix)]
    if not matches:
        kept = ", ".join(release.sha256[:12] for release in releases) or "none"
        raise SwapError(f"no kept release starts with {prefix} (kept: {kept})")
    if len(matches) > 1:
        candidates = ", ".join(release.sha256[:12] for release in matches)
        raise SwapError(
            f"{prefix} matches {len(matches)} kept releases ({candidates}); give more digits"
        )

    return matches[0]


def prune_releases(
    releases_dir: Path, keep_releases: int, *, protect: str | None = None
) -> list[Path]:
    """Remove the releases beyond the `keep_releases` most recently kept, never `protect`.

    Also removes temporaries an interrupted keep left in `releases_dir` (or an interrupted
    record beside it). Return what was removed; raise OSError when something cannot be
    removed.
    """
    removed: list[Path] = []
    for release in kept_releases(releases_dir)[keep_releases:]:
        if release.sha256 == protect:
            continue
        remove_if_present(release.path)
        removed.append(release.path)
        logger.info(
            "Removed kept release %s (state.keep_releases = %d)", release.sha256, keep_releases
        )

    for temporary in _stale_temporaries(releases_dir):
        remove_if_present(temporary)
        removed.append(temporary)
        logger.info("Removed %s, left by an interrupted keep", temporary)

    for folder in sorted({path.parent for path in removed}):
        fsync_directory(folder)

    return removed


@contextlib.contextmanager
def _open_regular(path: Path, what: str) -> Iterator[tuple[int, os.stat_result]]:
    """Hold `path` open, refusing a symbolic link or anything but a regular file.

    FileNotFoundError propagates, for the caller to decide what a missing file means; any
    other failure is a SwapError calling the file `what`.
    """
    try:
        descriptor = os.open(path, NO_FOLLOW_OPEN_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as error:
        reason = "it is a symbolic link" if error.errno == errno.ELOOP else error.strerror
        raise SwapError(f"{path}: {what} cannot be read: {reason}") from None

    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise SwapError(f"{path}: {what} is not a regular file")
        yield descriptor, status
    finally:
        os.close(descriptor)


def _confirm_installed(
    copy: VerifiedCopy, install_path: Path, releases_dir: Path, heartbeat: Heartbeat
) -> str:
    installed = installed_sha256(install_path, releases_dir, heartbeat)
    if installed != copy.sha256:
        raise SwapError(
            f"{copy.path}: the verified copy is gone and {install_path} holds "
            f"{installed or 'nothing'}, not {copy.sha256}; verify the release again"
        )

    # The earlier run got past the rename; what it may not have done is made durable here.
    # Pruning is left to the next install, since which release this run kept is not known.
    os.chmod(install_path, EXECUTABLE_MODE)
    _finish_install(install_path, releases_dir, copy.sha256)
    logger.info("%s already holds %s", install_path, copy.sha256)

    return copy.sha256


def _make_executable(copy: VerifiedCopy) -> None:
    with _open_regular(copy.path, "the verified copy") as (descriptor, status):
        if status.st_size != copy.size or status.st_nlink != 1:
            raise SwapError(
                f"{copy.path}: the verified copy was changed after it was verified; "
                f"verify the release again"
            )
        os.fchmod(descriptor, EXECUTABLE_MODE)
        # The data was fsynced when the copy was made; this makes the new mode durable too.
        os.fsync(descriptor)


def _finish_install(install_path: Path, releases_dir: Path, sha256: str) -> None:
    """Make the rename durable and remember what is installed."""
    try:
        fsync_directory(install_path.parent)
        status = os.stat(install_path, follow_symlinks=False)
        record = {"sha256": sha256, "identity": _identity(status)}
        releases_dir.parent.mkdir(mode=RELEASES_DIR_MODE, parents=True, exist_ok=True)
        # Not fsynced: the record is checked against the file it describes before it is
        # believed, and an empty or stale one only costs a hashing pass.
        atomic_write_bytes(_record_path(releases_dir), json.dumps(record).encode(), sync="none")
    except OSError as error:
        raise SwapError(
            f"{install_path} now holds {sha256}, but making that durable failed: {error.strerror}"
        ) from None


def _identity(status: os.stat_result) -> list[int]:
    return [
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    ]


def _record_path(releases_dir: Path) -> Path:
    return releases_dir.parent / INSTALLED_RECORD_NAME


def _recorded_sha256(releases_dir: Path, status: os.stat_result) -> str | None:
    try:
        record = json.loads(_record_path(releases_dir).read_bytes())
        sha256 = record["sha256"]
        identity = record["identity"]
    except (OSError, ValueError, TypeError, KeyError):
        return None

    if not isinstance(sha256, str) or not _SHA256_NAME.fullmatch(sha256):
        return None
    if identity != _identity(status):
        return None

    return sha256


def _keep_as_release(
    descriptor: int,
    status: os.stat_result,
    install_path: Path,
    release: Path,
    heartbeat: Heartbeat,
) -> None:
    try:
        release.parent.mkdir(mode=RELEASES_DIR_MODE, parents=True, exist_ok=True)
        if not _is_same_file(release, status):
            _keep(descriptor, status, install_path, release, heartbeat)
        os.chmod(release, EXECUTABLE_MODE)
        # Pruning goes by this mtime. time.time_ns() rather than "now" from utimensat(2):
        # the kernel's clock for file times is coarse, and two keeps must not tie.
        now = time.time_ns()
        os.utime(release, ns=(now, now), follow_symlinks=False)
        fsync_directory(release.parent)
    except OSError as error:
        raise SwapError(
            f"cannot keep {install_path} as release {release.name} in {release.parent}: "
            f"{error.strerror}"
        ) from None


def _is_same_file(path: Path, status: os.stat_result) -> bool:
    try:
        existing = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False

    return (existing.st_dev, existing.st_ino) == (status.st_dev, status.st_ino)


def _keep(
    descriptor: int,
    status: os.stat_result,
    install_path: Path,
    release: Path,
    heartbeat: Heartbeat,
) -> None:
    """Put the open installed binary at `release`: a hard link if possible, else a copy."""
    link = temporary_name(release, "link")
    try:
        os.link(install_path, link, follow_symlinks=False)
    except OSError as error:
        if error.errno not in _NO_HARD_LINK_ERRORS:
            raise
        _keep_copy(descriptor, status, release, heartbeat)
        return

    # The name was looked up again to link it; make sure it is still the file that was hashed.
    if not _is_same_file(link, status):
        remove_if_present(link)
        raise SwapError(f"{install_path}: was replaced while it was being kept; try again")

    os.replace(link, release)
    logger.debug("Kept the previous binary as release %s (a hard link)", release.name)


def _keep_copy(
    descriptor: int, status: os.stat_result, release: Path, heartbeat: Heartbeat
) -> None:
    copy = copy_beside(descriptor, status.st_size, release, heartbeat, mode=EXECUTABLE_MODE)
    if copy.sha256 != release.name:
        remove_if_present(copy.path)
        raise SwapError(
            f"{release}: the copy of the installed binary has sha256 {copy.sha256}; "
            f"it changed while it was being kept"
        )

    os.replace(copy.path, release)
    logger.debug("Kept the previous binary as release %s (a copy)", release.name)


def _stale_temporaries(releases_dir: Path) -> list[Path]:
    found: list[Path] = []
    for folder, pattern in (
        (releases_dir, _STALE_KEEP_TEMPORARY),
        (releases_dir.parent, _STALE_RECORD_TEMPORARY),
    ):
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        found.extend(folder / name for name in names if pattern.fullmatch(name))

    return sorted(found)
