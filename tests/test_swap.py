"""Swapping the binary: always a complete 0755 file at the install path, earlier ones kept."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sandbox import fill_filesystem

from stagewatch import swap
from stagewatch.config import StagingConfig
from stagewatch.errors import SwapError
from stagewatch.heartbeat import Heartbeat
from stagewatch.swap import (
    find_release,
    hold_previous,
    install,
    install_release,
    installed_sha256,
    keep_current,
    kept_releases,
    previous_path,
    prune_releases,
    release_previous,
    restore_previous,
)
from stagewatch.verify import VerifiedCopy, stage_verified_copy

MiB = 1024 * 1024


class CountingHeartbeat(Heartbeat):
    def __init__(self) -> None:
        super().__init__("test", float("inf"))
        self.beats = 0

    def beat(self) -> None:
        super().beat()
        self.beats += 1


@pytest.fixture
def install_path(tmp_path: Path) -> Path:
    (tmp_path / "bin").mkdir()
    return tmp_path / "bin" / "dealspace"


@pytest.fixture
def releases_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "releases"


@pytest.fixture
def staging(tmp_path: Path) -> StagingConfig:
    (tmp_path / "staging").mkdir()
    return StagingConfig(dir=tmp_path / "staging", max_size_mb=8)


def release_bytes(version: int, size: int = 64 * 1024) -> bytes:
    header = f"\x7fELF dealspace {version}\n".encode()
    return header + bytes(version % 251 for _ in range(size - len(header)))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified(staging: StagingConfig, install_path: Path, data: bytes) -> VerifiedCopy:
    """Stage `data` with its checksum file and verify it, as a deploy does."""
    staging.artifact_path.write_bytes(data)
    staging.checksum_path.write_text(f"{sha256(data)}  {staging.artifact}\n")
    return stage_verified_copy(staging, install_path, None, CountingHeartbeat())


def deploy(
    staging: StagingConfig,
    install_path: Path,
    releases_dir: Path,
    data: bytes,
    keep_releases: int = 3,
) -> str | None:
    """Verify and install `data`, then prune as the engine does once the deploy is decided."""
    copy = verified(staging, install_path, data)
    previous = install(copy, install_path, releases_dir, CountingHeartbeat())
    prune_releases(releases_dir, keep_releases, protect=previous)
    release_previous(install_path)
    return previous


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_only_the_binary_beside(install_path: Path) -> None:
    assert os.listdir(install_path.parent) == [install_path.name]


def test_first_install_puts_the_binary_in_place(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    data = release_bytes(1)

    previous = deploy(staging, install_path, releases_dir, data)

    assert previous is None
    assert install_path.read_bytes() == data
    assert mode_of(install_path) == 0o755
    assert_only_the_binary_beside(install_path)
    assert kept_releases(releases_dir) == []


def test_install_keeps_the_previous_binary_as_a_hard_linked_release(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    old, new = release_bytes(1), release_bytes(2)
    deploy(staging, install_path, releases_dir, old)
    old_inode = install_path.stat().st_ino

    previous = deploy(staging, install_path, releases_dir, new)

    assert previous == sha256(old)
    assert install_path.read_bytes() == new
    assert mode_of(install_path) == 0o755
    assert_only_the_binary_beside(install_path)
    [release] = kept_releases(releases_dir)
    assert release.sha256 == sha256(old)
    assert release.path == releases_dir / sha256(old)
    assert release.path.read_bytes() == old
    assert release.path.stat().st_ino == old_inode
    assert mode_of(release.path) == 0o755


def test_install_over_a_binary_it_did_not_put_there_hashes_it(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    old = b"installed by hand\n"
    install_path.write_bytes(old)
    install_path.chmod(0o750)

    previous = deploy(staging, install_path, releases_dir, release_bytes(2))

    assert previous == sha256(old)
    assert (releases_dir / sha256(old)).read_bytes() == old
    assert mode_of(releases_dir / sha256(old)) == 0o755


def test_pruning_keeps_the_most_recent_releases(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    versions = [release_bytes(version) for version in range(1, 7)]
    for data in versions:
        deploy(staging, install_path, releases_dir, data, keep_releases=2)

    kept = kept_releases(releases_dir)

    assert [release.sha256 for release in kept] == [sha256(versions[4]), sha256(versions[3])]
    assert sorted(os.listdir(releases_dir)) == sorted(release.sha256 for release in kept)
    assert kept[0].kept_at > kept[1].kept_at
    assert install_path.read_bytes() == versions[5]


def test_pruning_never_removes_the_release_just_kept(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    for version in (1, 2, 3):
        deploy(staging, install_path, releases_dir, release_bytes(version), keep_releases=0)

    assert [release.sha256 for release in kept_releases(releases_dir)] == [sha256(release_bytes(2))]


def test_install_runs_twice_harmlessly(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    deploy(staging, install_path, releases_dir, release_bytes(1))
    copy = verified(staging, install_path, release_bytes(2))
    install(copy, install_path, releases_dir, CountingHeartbeat())
    releases_before = kept_releases(releases_dir)

    again = install(copy, install_path, releases_dir, CountingHeartbeat())
    release_previous(install_path)

    assert again == copy.sha256
    assert install_path.read_bytes() == release_bytes(2)
    assert mode_of(install_path) == 0o755
    assert kept_releases(releases_dir) == releases_before
    assert_only_the_binary_beside(install_path)


def test_install_without_its_copy_and_without_its_bytes_in_place_fails(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    deploy(staging, install_path, releases_dir, release_bytes(1))
    copy = verified(staging, install_path, release_bytes(2))
    copy.path.unlink()

    with pytest.raises(SwapError, match=r"the verified copy is gone .* verify the release again"):
        install(copy, install_path, releases_dir, CountingHeartbeat())
    assert install_path.read_bytes() == release_bytes(1)


def test_copy_from_another_folder_is_refused(
    staging: StagingConfig, install_path: Path, releases_dir: Path, tmp_path: Path
) -> None:
    copy = verified(staging, install_path, release_bytes(1))
    elsewhere = tmp_path / copy.path.name
    copy.path.rename(elsewhere)
    moved = VerifiedCopy(elsewhere, copy.sha256, copy.size, copy.checksum_sha256)

    with pytest.raises(SwapError, match="must be in the folder of"):
        install(moved, install_path, releases_dir, CountingHeartbeat())


def test_copy_changed_after_verification_is_refused_and_removed(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    deploy(staging, install_path, releases_dir, release_bytes(1))
    copy = verified(staging, install_path, release_bytes(2))
    with copy.path.open("ab") as stream:
        stream.write(b"appended")

    with pytest.raises(SwapError, match="was changed after it was verified"):
        install(copy, install_path, releases_dir, CountingHeartbeat())

    assert install_path.read_bytes() == release_bytes(1)
    assert_only_the_binary_beside(install_path)


def test_symbolic_link_at_the_install_path_is_refused(
    staging: StagingConfig, install_path: Path, releases_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "real").write_bytes(b"binary")
    install_path.symlink_to(tmp_path / "real")
    copy = verified(staging, install_path, release_bytes(1))

    with pytest.raises(SwapError, match="cannot be read: it is a symbolic link"):
        install(copy, install_path, releases_dir, CountingHeartbeat())

    assert install_path.is_symlink()
    assert_only_the_binary_beside(install_path)


def test_readers_always_see_a_complete_binary(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    size = 256 * 1024
    versions = {sha256(release_bytes(version, size)): version for version in range(1, 11)}
    deploy(staging, install_path, releases_dir, release_bytes(1, size))
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def read_continuously() -> None:
        while not stop.is_set():
            with install_path.open("rb") as stream:
                mode = stat.S_IMODE(os.fstat(stream.fileno()).st_mode)
                seen.append((sha256(stream.read()), mode))

    reader = threading.Thread(target=read_continuously)
    reader.start()
    try:
        for version in range(2, 11):
            deploy(staging, install_path, releases_dir, release_bytes(version, size))
    finally:
        stop.set()
        reader.join()

    assert len(seen) > 1
    assert {digest for digest, _ in seen} <= set(versions)
    assert {mode for _, mode in seen} == {0o755}
    assert_only_the_binary_beside(install_path)


SWAP_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from stagewatch.config import StagingConfig
    from stagewatch.heartbeat import detached
    from stagewatch.swap import install, install_release
    from stagewatch.verify import stage_verified_copy

    action, staging_dir, install_path, releases_dir, release = sys.argv[1:]
    install_path, releases_dir = Path(install_path), Path(releases_dir)
    if action == "install":
        staging = StagingConfig(dir=Path(staging_dir), max_size_mb=8)
        copy = stage_verified_copy(staging, install_path, None, detached())
        install(copy, install_path, releases_dir, detached())
    else:
        install_release(releases_dir / release, install_path, detached(), release)
    """
)


def traced_swap(
    action: str, staging: StagingConfig, install_path: Path, releases_dir: Path, release: str
) -> list[str]:
    """Run `action` in a process under strace; return its file system calls, in order."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace)")

    trace = install_path.parent.parent / "trace"
    package_root = Path(swap.__file__).resolve().parents[1]
    subprocess.run(
        [
            strace,
            # One file per task (-ff), so that a call in one is never split by another's,
            # each call stamped (-ttt) to merge the tasks' files back into one order.
            *("-ff", "-ttt", "-qq", "-y", "-o", str(trace)),
            *("-e", "trace=openat,rename,renameat,renameat2,fsync,fdatasync"),
            *(sys.executable, "-c", SWAP_SCRIPT, action),
            *(str(staging.dir), str(install_path), str(releases_dir), release),
        ],
        check=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(package_root)},
    )

    # Each line is "SECONDS call(...) = result"; -y shows the path behind each descriptor.
    # The copy is fsynced on a thread of its own while it is hashed, so every task counts.
    stamped = [
        line.split(" ", 1)
        for path in trace.parent.glob("trace.*")
        for line in path.read_text().splitlines()
    ]
    return [call for _, call in sorted(stamped, key=lambda pair: float(pair[0]))]


def assert_swapped_by_one_rename_then_folder_fsync(calls: list[str], install_path: Path) -> None:
    renames = [
        index
        for index, call in enumerate(calls)
        if call.startswith("rename") and f', "{install_path}"' in call
    ]
    assert len(renames) == 1
    rename = calls[renames[0]]
    assert rename.endswith("= 0")

    temporary = re.search(r'"([^"]*/\.dealspace\.incoming-[0-9a-f]+)"', rename)
    assert temporary is not None
    fsyncs_before = [call for call in calls[: renames[0]] if call.startswith("fsync(")]
    assert any(f"<{temporary[1]}>" in call for call in fsyncs_before)
    fsyncs_after = [call for call in calls[renames[0] + 1 :] if call.startswith("fsync(")]
    assert any(f"<{install_path.parent}>)" in call for call in fsyncs_after)

    opened_for_writing = [
        call
        for call in calls
        if call.startswith("openat(")
        and f'"{install_path}"' in call
        and re.search(r"O_WRONLY|O_RDWR|O_TRUNC", call)
    ]
    assert opened_for_writing == []


def test_install_is_one_rename_of_an_fsynced_copy_then_an_fsync_of_the_folder(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    deploy(staging, install_path, releases_dir, release_bytes(1))
    staging.artifact_path.write_bytes(release_bytes(2))
    staging.checksum_path.write_text(f"{sha256(release_bytes(2))}  dealspace\n")

    calls = traced_swap("install", staging, install_path, releases_dir, "")

    assert_swapped_by_one_rename_then_folder_fsync(calls, install_path)
    assert install_path.read_bytes() == release_bytes(2)


def test_install_release_is_one_rename_of_an_fsynced_copy_then_an_fsync_of_the_folder(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    deploy(staging, install_path, releases_dir, release_bytes(1))
    deploy(staging, install_path, releases_dir, release_bytes(2))

    calls = traced_swap(
        "install_release", staging, install_path, releases_dir, sha256(release_bytes(1))
    )

    assert_swapped_by_one_rename_then_folder_fsync(calls, install_path)
    assert install_path.read_bytes() == release_bytes(1)


def test_install_release_puts_a_kept_release_back(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    for version in (1, 2):
        deploy(staging, install_path, releases_dir, release_bytes(version))
    release = find_release(releases_dir, sha256(release_bytes(1))[:8])

    install_release(release.path, install_path, CountingHeartbeat(), release.sha256)

    assert install_path.read_bytes() == release_bytes(1)
    assert mode_of(install_path) == 0o755
    assert_only_the_binary_beside(install_path)
    assert release.path.read_bytes() == release_bytes(1)
    assert installed_sha256(install_path, releases_dir) == release.sha256


def test_install_release_refuses_a_damaged_release(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    for version in (1, 2):
        deploy(staging, install_path, releases_dir, release_bytes(version))
    release = find_release(releases_dir, sha256(release_bytes(1)))
    # The release is a hard link to the binary it kept; give it its own damaged bytes.
    release.path.unlink()
    release.path.write_bytes(b"bit rot")

    with pytest.raises(SwapError, match=r"the kept release is damaged: its sha256 is [0-9a-f]{64}"):
        install_release(release.path, install_path, CountingHeartbeat(), release.sha256)

    assert install_path.read_bytes() == release_bytes(2)
    assert_only_the_binary_beside(install_path)


def test_install_release_of_a_missing_release_fails(install_path: Path, releases_dir: Path) -> None:
    install_path.write_bytes(b"current")

    with pytest.raises(SwapError, match="the kept release is missing"):
        install_release(releases_dir / ("a" * 64), install_path, CountingHeartbeat(), "a" * 64)
    assert_only_the_binary_beside(install_path)


def test_install_release_refuses_an_expected_sha256_that_is_not_a_digest(
    install_path: Path, releases_dir: Path
) -> None:
    install_path.write_bytes(b"current")
    release = make_release(releases_dir, "a" * 64, 1_000)

    with pytest.raises(SwapError, match="'é' is not a sha256"):
        install_release(release, install_path, CountingHeartbeat(), "é")
    assert_only_the_binary_beside(install_path)


def test_rollback_sequence_keeps_the_failed_release_and_restores_the_old_one(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    deploy(staging, install_path, releases_dir, release_bytes(1))
    previous = deploy(staging, install_path, releases_dir, release_bytes(2))
    assert previous is not None

    kept = keep_current(install_path, releases_dir, CountingHeartbeat())
    install_release(releases_dir / previous, install_path, CountingHeartbeat(), previous)

    assert kept == sha256(release_bytes(2))
    assert install_path.read_bytes() == release_bytes(1)
    assert {release.sha256 for release in kept_releases(releases_dir)} == {previous, kept}
    assert kept_releases(releases_dir)[0].sha256 == kept


def test_keep_current_with_nothing_installed_keeps_nothing(
    install_path: Path, releases_dir: Path
) -> None:
    assert keep_current(install_path, releases_dir, CountingHeartbeat()) is None
    assert kept_releases(releases_dir) == []


def test_keeping_a_binary_stagewatch_installed_needs_no_second_hash(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    deploy(staging, install_path, releases_dir, release_bytes(1, 4 * MiB))
    heartbeat = CountingHeartbeat()

    kept = keep_current(install_path, releases_dir, heartbeat)

    assert kept == sha256(release_bytes(1, 4 * MiB))
    assert heartbeat.beats == 0
    assert (releases_dir / kept).read_bytes() == release_bytes(1, 4 * MiB)


def test_a_binary_changed_in_place_is_hashed_again(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    deploy(staging, install_path, releases_dir, release_bytes(1, 4 * MiB))
    status = install_path.stat()
    with install_path.open("r+b") as stream:
        stream.write(b"patched")
    # Even with size and mtime put back, the ctime gives the change away.
    os.utime(install_path, ns=(status.st_atime_ns, status.st_mtime_ns))
    patched = install_path.read_bytes()
    heartbeat = CountingHeartbeat()

    kept = keep_current(install_path, releases_dir, heartbeat)

    assert kept == sha256(patched)
    assert heartbeat.beats > 0
    assert (releases_dir / sha256(patched)).read_bytes() == patched


def test_unreadable_record_means_hashing(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    deploy(staging, install_path, releases_dir, release_bytes(1))
    (releases_dir.parent / swap.INSTALLED_RECORD_NAME).write_text("{not json")
    heartbeat = CountingHeartbeat()

    assert installed_sha256(install_path, releases_dir, heartbeat) == sha256(release_bytes(1))
    assert heartbeat.beats > 0


def test_record_names_what_is_installed_and_stays_out_of_the_releases(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    deploy(staging, install_path, releases_dir, release_bytes(1))
    deploy(staging, install_path, releases_dir, release_bytes(2))

    record = json.loads((releases_dir.parent / swap.INSTALLED_RECORD_NAME).read_text())

    assert record["sha256"] == sha256(release_bytes(2))
    assert os.listdir(releases_dir) == [sha256(release_bytes(1))]
    assert installed_sha256(install_path, releases_dir) == sha256(release_bytes(2))
    assert installed_sha256(install_path.with_name("absent"), releases_dir) is None


def test_a_damaged_release_of_the_same_name_is_replaced(
    install_path: Path, releases_dir: Path
) -> None:
    data = b"the installed binary"
    install_path.write_bytes(data)
    releases_dir.mkdir(parents=True)
    (releases_dir / sha256(data)).write_bytes(b"damaged")

    keep_current(install_path, releases_dir, CountingHeartbeat())

    assert (releases_dir / sha256(data)).read_bytes() == data
    assert [path.name for path in releases_dir.iterdir()] == [sha256(data)]


def test_keeping_across_filesystems_copies_and_checks(
    install_path: Path, mount_tmpfs: Callable[[str, str], Path]
) -> None:
    releases_dir = mount_tmpfs("releases-tmpfs", "8m") / "releases"
    data = release_bytes(1, 3 * MiB)
    install_path.write_bytes(data)

    kept = keep_current(install_path, releases_dir, CountingHeartbeat())

    release = releases_dir / sha256(data)
    assert kept == sha256(data)
    assert release.read_bytes() == data
    assert release.stat().st_ino != install_path.stat().st_ino
    assert mode_of(release) == 0o755
    assert os.listdir(releases_dir) == [sha256(data)]


def test_disk_full_while_keeping_leaves_the_old_binary_and_no_temporaries(
    staging: StagingConfig, install_path: Path, mount_tmpfs: Callable[[str, str], Path]
) -> None:
    releases_dir = mount_tmpfs("small-releases", "2m") / "releases"
    old = release_bytes(1, 3 * MiB)
    install_path.write_bytes(old)
    install_path.chmod(0o755)
    copy = verified(staging, install_path, release_bytes(2))

    with pytest.raises(SwapError, match=r"^no space left beside .*releases/[0-9a-f]{64}: "):
        install(copy, install_path, releases_dir, CountingHeartbeat())

    assert install_path.read_bytes() == old
    assert mode_of(install_path) == 0o755
    assert_only_the_binary_beside(install_path)
    assert os.listdir(releases_dir) == []


def test_disk_full_beside_the_install_path_leaves_the_old_binary_untouched(
    staging: StagingConfig, releases_dir: Path, mount_tmpfs: Callable[[str, str], Path]
) -> None:
    install_path = mount_tmpfs("small-bin", "2m") / "dealspace"
    old = release_bytes(1, 512 * 1024)
    install_path.write_bytes(old)
    install_path.chmod(0o755)

    with pytest.raises(SwapError, match=f"^no space left beside {re.escape(str(install_path))}: "):
        deploy(staging, install_path, releases_dir, release_bytes(2, 3 * MiB))

    assert install_path.read_bytes() == old
    assert mode_of(install_path) == 0o755
    assert_only_the_binary_beside(install_path)


@pytest.fixture
def releases_elsewhere(mount_tmpfs: Callable[[str, str], Path]) -> Path:
    """A releases folder on another filesystem than the install path: releases are copies."""
    return mount_tmpfs("other-releases", "8m") / "releases"


def test_install_across_filesystems_holds_the_previous_binary_beside_until_released(
    staging: StagingConfig, install_path: Path, releases_elsewhere: Path
) -> None:
    deploy(staging, install_path, releases_elsewhere, release_bytes(1))
    old_inode = install_path.stat().st_ino
    copy = verified(staging, install_path, release_bytes(2))

    install(copy, install_path, releases_elsewhere, CountingHeartbeat())

    held = previous_path(install_path)
    assert held.read_bytes() == release_bytes(1)
    assert held.stat().st_ino == old_inode
    assert install_path.read_bytes() == release_bytes(2)

    release_previous(install_path)

    assert_only_the_binary_beside(install_path)
    assert (releases_elsewhere / sha256(release_bytes(1))).read_bytes() == release_bytes(1)


def test_install_on_one_filesystem_needs_no_second_name(
    staging: StagingConfig, install_path: Path, releases_dir: Path
) -> None:
    deploy(staging, install_path, releases_dir, release_bytes(1))
    copy = verified(staging, install_path, release_bytes(2))

    install(copy, install_path, releases_dir, CountingHeartbeat())

    assert_only_the_binary_beside(install_path)


def test_a_failed_install_leaves_no_second_name(
    staging: StagingConfig, install_path: Path, releases_elsewhere: Path
) -> None:
    deploy(staging, install_path, releases_elsewhere, release_bytes(1))
    copy = verified(staging, install_path, release_bytes(2))
    os.link(copy.path, install_path.with_name("second-name"))

    with pytest.raises(SwapError, match="was changed after it was verified"):
        install(copy, install_path, releases_elsewhere, CountingHeartbeat())

    assert sorted(os.listdir(install_path.parent)) == ["dealspace", "second-name"]
    assert install_path.read_bytes() == release_bytes(1)


def test_the_previous_binary_goes_back_by_rename_on_a_full_filesystem(
    staging: StagingConfig, releases_dir: Path, mount_tmpfs: Callable[[str, str], Path]
) -> None:
    install_path = mount_tmpfs("full-bin", "4m") / "dealspace"
    old = release_bytes(1, 1 * MiB)
    deploy(staging, install_path, releases_dir, old)
    copy = verified(staging, install_path, release_bytes(2, 1 * MiB))
    install(copy, install_path, releases_dir, CountingHeartbeat())
    fill_filesystem(install_path.parent / "filler")

    restored = restore_previous(install_path, releases_dir, sha256(old), CountingHeartbeat())

    assert restored
    assert install_path.read_bytes() == old
    assert mode_of(install_path) == 0o755
    assert installed_sha256(install_path, releases_dir) == sha256(old)
    assert sorted(os.listdir(install_path.parent)) == ["dealspace", "filler"]


def test_a_release_on_the_same_full_filesystem_goes_back_as_a_link(
    staging: StagingConfig, mount_tmpfs: Callable[[str, str], Path]
) -> None:
    root = mount_tmpfs("full-host", "4m")
    install_path, releases_dir = root / "bin" / "dealspace", root / "state" / "releases"
    install_path.parent.mkdir()
    old = release_bytes(1, 1 * MiB)
    deploy(staging, install_path, releases_dir, old)
    deploy(staging, install_path, releases_dir, release_bytes(2, 1 * MiB))
    fill_filesystem(root / "filler")

    install_release(releases_dir / sha256(old), install_path, CountingHeartbeat(), sha256(old))

    assert install_path.read_bytes() == old
    assert install_path.stat().st_ino == (releases_dir / sha256(old)).stat().st_ino
    assert mode_of(install_path) == 0o755
    assert_only_the_binary_beside(install_path)


def test_a_second_name_holding_other_bytes_is_not_put_back(
    staging: StagingConfig, install_path: Path, releases_elsewhere: Path
) -> None:
    deploy(staging, install_path, releases_elsewhere, release_bytes(1))
    copy = verified(staging, install_path, release_bytes(2))
    install(copy, install_path, releases_elsewhere, CountingHeartbeat())
    held = previous_path(install_path)
    held.unlink()
    held.write_bytes(b"not the previous binary")

    restored = restore_previous(
        install_path, releases_elsewhere, sha256(release_bytes(1)), CountingHeartbeat()
    )

    assert not restored
    assert install_path.read_bytes() == release_bytes(2)
    assert_only_the_binary_beside(install_path)


def test_without_a_binary_installed_there_is_nothing_to_hold(
    install_path: Path, releases_dir: Path
) -> None:
    assert not hold_previous(install_path, releases_dir, None)
    assert not previous_path(install_path).exists()


def make_release(releases_dir: Path, sha: str, mtime_seconds: int) -> Path:
    releases_dir.mkdir(parents=True, exist_ok=True)
    path = releases_dir / sha
    path.write_bytes(sha.encode())
    os.utime(path, (mtime_seconds, mtime_seconds))
    return path


def test_kept_releases_are_newest_first_and_only_sha256_names(releases_dir: Path) -> None:
    older = make_release(releases_dir, "a" * 64, 1_000)
    newer = make_release(releases_dir, "b" * 64, 2_000)
    (releases_dir / "notes.txt").write_text("not a release")
    (releases_dir / ("C" * 64)).write_text("upper case is not our name")
    (releases_dir / ("d" * 64)).mkdir()
    (releases_dir / ("e" * 64)).symlink_to(older)

    kept = kept_releases(releases_dir)

    assert [release.path for release in kept] == [newer, older]
    assert kept[0].kept_at.timestamp() == 2_000


def test_kept_releases_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert kept_releases(tmp_path / "absent") == []


def test_find_release_by_prefix(releases_dir: Path) -> None:
    wanted = "3f2a" + "1" * 60
    make_release(releases_dir, wanted, 1_000)
    make_release(releases_dir, "9b1c" + "2" * 60, 2_000)

    assert find_release(releases_dir, "3f").sha256 == wanted
    assert find_release(releases_dir, " 3F2A11 ").sha256 == wanted
    assert find_release(releases_dir, wanted).sha256 == wanted


def test_find_release_with_an_ambiguous_prefix_fails(releases_dir: Path) -> None:
    make_release(releases_dir, "ab12" + "0" * 60, 1_000)
    make_release(releases_dir, "ab34" + "0" * 60, 2_000)

    with pytest.raises(SwapError) as raised:
        find_release(releases_dir, "ab")

    assert str(raised.value) == (
        "ab matches 2 kept releases (ab3400000000, ab1200000000); give more digits"
    )


def test_find_release_with_an_unknown_prefix_fails(releases_dir: Path) -> None:
    make_release(releases_dir, "ab12" + "0" * 60, 1_000)

    with pytest.raises(SwapError) as raised:
        find_release(releases_dir, "cd")

    assert str(raised.value) == "no kept release starts with cd (kept: ab1200000000)"


def test_find_release_with_none_kept_fails(releases_dir: Path) -> None:
    with pytest.raises(SwapError, match=r"no kept release starts with cd \(kept: none\)"):
        find_release(releases_dir, "cd")


@pytest.mark.parametrize("prefix", ["", "xyz", "3f2a-", "../etc"])
def test_find_release_with_a_prefix_that_is_not_hex_fails(releases_dir: Path, prefix: str) -> None:
    make_release(releases_dir, "3f2a" + "1" * 60, 1_000)

    with pytest.raises(SwapError, match="is not the start of a sha256"):
        find_release(releases_dir, prefix)


def test_prune_removes_stale_temporaries_and_protects_the_named_release(
    releases_dir: Path,
) -> None:
    oldest = make_release(releases_dir, "a" * 64, 1_000)
    middle = make_release(releases_dir, "b" * 64, 2_000)
    newest = make_release(releases_dir, "c" * 64, 3_000)
    stale = [
        releases_dir / f".{'d' * 64}.incoming-0123abcd",
        releases_dir / f".{'d' * 64}.link-89abcdef",
        releases_dir.parent / ".installed.json.tmp-00ff00ff",
    ]
    for path in stale:
        path.write_bytes(b"partial")
    left_alone = [releases_dir / ".unrelated", releases_dir.parent / ".journal.json.tmp-00ff00ff"]
    for path in left_alone:
        path.write_text("not ours to remove")

    removed = prune_releases(releases_dir, 1, protect="a" * 64)

    assert sorted(removed) == sorted([middle, *stale])
    assert sorted(releases_dir.iterdir()) == sorted([oldest, newest, left_alone[0]])
    assert left_alone[1].exists()
