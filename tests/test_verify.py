"""Verifying a staged pair: only safe, unchanged, matching files become a private copy."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from stagewatch import verify
from stagewatch.config import StagingConfig
from stagewatch.errors import ChecksumError, RejectedError, SwapError
from stagewatch.heartbeat import Heartbeat
from stagewatch.verify import (
    VerifiedCopy,
    copy_descriptor,
    remove_stale_copies,
    sha256_of_path,
    stage_verified_copy,
)

MiB = 1024 * 1024
OLD_BINARY = b"\x7fELF old dealspace " * 1000


class RecordingHeartbeat(Heartbeat):
    """A heartbeat that counts its beats and can act on the source mid-copy."""

    def __init__(self, on_beat: Callable[[int], None] | None = None) -> None:
        super().__init__("test", float("inf"))
        self.beats = 0
        self.on_beat = on_beat

    def beat(self) -> None:
        super().beat()
        self.beats += 1
        if self.on_beat is not None:
            self.on_beat(self.beats)


@pytest.fixture
def staging(tmp_path: Path) -> StagingConfig:
    folder = tmp_path / "staging"
    folder.mkdir()
    return StagingConfig(dir=folder, artifact="dealspace", max_size_mb=4)


@pytest.fixture
def install_path(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    path = folder / "dealspace"
    path.write_bytes(OLD_BINARY)
    path.chmod(0o755)
    return path


def stage(staging: StagingConfig, data: bytes, checksum: str | None = None) -> str:
    """Put `data` and its checksum file (sha256sum form unless given) in staging."""
    digest = hashlib.sha256(data).hexdigest()
    staging.artifact_path.write_bytes(data)
    text = checksum if checksum is not None else f"{digest}  {staging.artifact}\n"
    staging.checksum_path.write_text(text)
    return digest


def beside(install_path: Path) -> list[str]:
    return sorted(os.listdir(install_path.parent))


def assert_nothing_left(install_path: Path) -> None:
    assert beside(install_path) == ["dealspace"]
    assert install_path.read_bytes() == OLD_BINARY


def verify_now(
    staging: StagingConfig,
    install_path: Path,
    expected: str | None = None,
    heartbeat: Heartbeat | None = None,
) -> VerifiedCopy:
    return stage_verified_copy(staging, install_path, expected, heartbeat or RecordingHeartbeat())


def test_copy_beside_install_path_holds_the_verified_bytes(
    staging: StagingConfig, install_path: Path
) -> None:
    data = os.urandom(300_000)
    digest = stage(staging, data)

    copy = verify_now(staging, install_path)

    assert copy.path.parent == install_path.parent
    assert copy.path.name.startswith(".dealspace.incoming-")
    assert copy.path.read_bytes() == data
    assert (copy.sha256, copy.checksum_sha256, copy.size) == (digest, digest, len(data))
    assert stat.S_IMODE(copy.path.stat().st_mode) & 0o077 == 0
    assert install_path.read_bytes() == OLD_BINARY
    assert staging.artifact_path.read_bytes() == data


def test_copy_is_private_whatever_the_umask(staging: StagingConfig, install_path: Path) -> None:
    stage(staging, b"binary")
    previous = os.umask(0)
    try:
        copy = verify_now(staging, install_path)
    finally:
        os.umask(previous)

    assert stat.S_IMODE(copy.path.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    "checksum",
    [
        "{digest}\n",
        "{upper}  ./dealspace\r\n",
        "SHA256 (dealspace) = {digest}\n",
        "{other}  dealspace.sig\n{digest} *dealspace\n",
    ],
)
def test_each_checksum_form_verifies(
    staging: StagingConfig, install_path: Path, checksum: str
) -> None:
    data = b"release bytes"
    digest = hashlib.sha256(data).hexdigest()
    other = hashlib.sha256(b"other").hexdigest()
    stage(staging, data, checksum.format(digest=digest, upper=digest.upper(), other=other))

    assert verify_now(staging, install_path).sha256 == digest


def test_checksum_mismatch_is_rejected_with_both_digests(
    staging: StagingConfig, install_path: Path
) -> None:
    claimed = hashlib.sha256(b"what the build said").hexdigest()
    stage(staging, b"what arrived", f"{claimed}  dealspace\n")
    actual = hashlib.sha256(b"what arrived").hexdigest()

    with pytest.raises(ChecksumError) as raised:
        verify_now(staging, install_path)

    assert str(raised.value) == (
        f"staging/dealspace: sha256 is {actual}, dealspace.sha256 says {claimed}"
    )
    assert_nothing_left(install_path)


def test_malformed_checksum_file_is_rejected_naming_it(
    staging: StagingConfig, install_path: Path
) -> None:
    stage(staging, b"bytes", "d41d8cd98f00b204e9800998ecf8427e  dealspace\n")

    with pytest.raises(ChecksumError, match=r"^staging/dealspace\.sha256: line 1: .* MD5"):
        verify_now(staging, install_path)
    assert_nothing_left(install_path)


def test_sha256_named_by_the_webhook_must_match_too(
    staging: StagingConfig, install_path: Path
) -> None:
    digest = stage(staging, b"release")
    asked = hashlib.sha256(b"another release").hexdigest()

    with pytest.raises(ChecksumError) as raised:
        verify_now(staging, install_path, expected=asked)

    assert (
        str(raised.value) == f"staging/dealspace: sha256 is {digest}, the webhook asked for {asked}"
    )
    assert_nothing_left(install_path)


def test_sha256_named_by_the_webhook_is_compared_in_any_case(
    staging: StagingConfig, install_path: Path
) -> None:
    digest = stage(staging, b"release")

    assert verify_now(staging, install_path, expected=f" {digest.upper()} ").sha256 == digest


def test_requested_sha256_that_is_not_a_digest_is_rejected(
    staging: StagingConfig, install_path: Path
) -> None:
    stage(staging, b"release")

    with pytest.raises(RejectedError, match="--sha256 asked for sha256 'abc', which is not 64"):
        stage_verified_copy(
            staging, install_path, "abc", RecordingHeartbeat(), requested_by="--sha256"
        )
    assert_nothing_left(install_path)


@pytest.mark.parametrize("name", ["dealspace", "dealspace.sha256"])
def test_symbolic_link_is_refused(
    staging: StagingConfig, install_path: Path, tmp_path: Path, name: str
) -> None:
    stage(staging, b"release")
    target = tmp_path / "elsewhere"
    (staging.dir / name).rename(target)
    (staging.dir / name).symlink_to(target)

    with pytest.raises(RejectedError) as raised:
        verify_now(staging, install_path)

    assert str(raised.value) == (
        f"staging/{name}: is a symbolic link (only regular files are deployed)"
    )
    assert_nothing_left(install_path)


@pytest.mark.parametrize("name", ["dealspace", "dealspace.sha256"])
def test_hard_link_to_a_foreign_file_is_refused(
    staging: StagingConfig, install_path: Path, tmp_path: Path, name: str
) -> None:
    stage(staging, b"release")
    foreign = tmp_path / "foreign"
    (staging.dir / name).rename(foreign)
    os.link(foreign, staging.dir / name)

    with pytest.raises(RejectedError, match=rf"^staging/{name}: has 2 hard links"):
        verify_now(staging, install_path)
    assert_nothing_left(install_path)


@pytest.mark.parametrize("name", ["dealspace", "dealspace.sha256"])
def test_fifo_is_refused_without_hanging(
    staging: StagingConfig, install_path: Path, name: str
) -> None:
    stage(staging, b"release")
    (staging.dir / name).unlink()
    os.mkfifo(staging.dir / name)
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            verify_now(staging, install_path)
        except BaseException as error:
            outcome.append(error)

    worker = threading.Thread(target=attempt)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():
        # Open the FIFO for writing so that the blocked open returns and the thread ends.
        os.close(os.open(staging.dir / name, os.O_WRONLY | os.O_NONBLOCK))
        worker.join()
        pytest.fail("opening a FIFO in staging blocked")

    assert len(outcome) == 1
    assert isinstance(outcome[0], RejectedError)
    assert str(outcome[0]) == (
        f"staging/{name}: is a named pipe (FIFO) (only regular files are deployed)"
    )
    assert_nothing_left(install_path)


def test_directory_is_refused(staging: StagingConfig, install_path: Path) -> None:
    stage(staging, b"release")
    staging.artifact_path.unlink()
    staging.artifact_path.mkdir()

    with pytest.raises(RejectedError, match=r"^staging/dealspace: is a directory \(only regular"):
        verify_now(staging, install_path)
    assert_nothing_left(install_path)


@pytest.mark.parametrize("name", ["dealspace", "dealspace.sha256"])
def test_empty_file_is_refused(staging: StagingConfig, install_path: Path, name: str) -> None:
    stage(staging, b"release")
    (staging.dir / name).write_bytes(b"")

    with pytest.raises(RejectedError, match=rf"^staging/{name}: is empty$"):
        verify_now(staging, install_path)
    assert_nothing_left(install_path)


@pytest.mark.parametrize("name", ["dealspace", "dealspace.sha256"])
def test_missing_file_is_refused(staging: StagingConfig, install_path: Path, name: str) -> None:
    stage(staging, b"release")
    (staging.dir / name).unlink()

    with pytest.raises(RejectedError, match=rf"^staging/{name}: is missing$"):
        verify_now(staging, install_path)
    assert_nothing_left(install_path)


def test_file_over_max_size_is_refused(tmp_path: Path, install_path: Path) -> None:
    staging = StagingConfig(dir=tmp_path / "staging", max_size_mb=1)
    staging.dir.mkdir()
    stage(staging, b"x" * (MiB + 1))

    with pytest.raises(RejectedError) as raised:
        verify_now(staging, install_path)

    assert str(raised.value) == (
        "staging/dealspace: is 1048577 bytes, more than the 1048576 bytes allowed by "
        "staging.max_size_mb = 1"
    )
    assert_nothing_left(install_path)


def test_file_of_exactly_max_size_is_read(tmp_path: Path, install_path: Path) -> None:
    staging = StagingConfig(dir=tmp_path / "staging", max_size_mb=1)
    staging.dir.mkdir()
    digest = stage(staging, b"x" * MiB)

    assert verify_now(staging, install_path).sha256 == digest


def test_checksum_file_over_64_kib_is_refused(staging: StagingConfig, install_path: Path) -> None:
    digest = stage(staging, b"release")
    staging.checksum_path.write_text(f"{digest}  dealspace\n" + "\n" * 65536)

    with pytest.raises(RejectedError, match=r"^staging/dealspace\.sha256: is \d+ bytes, more than"):
        verify_now(staging, install_path)
    assert_nothing_left(install_path)


def test_artifact_growing_during_the_copy_is_refused(
    staging: StagingConfig, install_path: Path
) -> None:
    stage(staging, os.urandom(3 * MiB))

    def append(beats: int) -> None:
        if beats == 1:
            with staging.artifact_path.open("ab") as stream:
                stream.write(b"more from a still running upload")

    with pytest.raises(RejectedError) as raised:
        verify_now(staging, install_path, heartbeat=RecordingHeartbeat(append))

    assert str(raised.value) == (
        "staging/dealspace: changed while it was being read (was the upload still running?); "
        "upload it again"
    )
    assert_nothing_left(install_path)


def test_artifact_rewritten_in_place_during_the_copy_is_refused(
    staging: StagingConfig, install_path: Path
) -> None:
    stage(staging, os.urandom(MiB))
    # An mtime clearly in the past, so that the rewrite below moves it whatever the
    # granularity of the filesystem's clock.
    os.utime(staging.artifact_path, ns=(1_000_000_000, 1_000_000_000))

    def rewrite(beats: int) -> None:
        if beats == 1:
            with staging.artifact_path.open("r+b") as stream:
                stream.write(b"X" * 100)

    with pytest.raises(RejectedError, match="changed while it was being read"):
        verify_now(staging, install_path, heartbeat=RecordingHeartbeat(rewrite))
    assert_nothing_left(install_path)


def test_artifact_replaced_during_the_copy_is_refused(
    staging: StagingConfig, install_path: Path, tmp_path: Path
) -> None:
    stage(staging, os.urandom(MiB))
    replacement = staging.dir / "dealspace.part"
    replacement.write_bytes(b"a newer upload")

    def replace(beats: int) -> None:
        if beats == 1:
            replacement.rename(staging.artifact_path)

    with pytest.raises(RejectedError, match=r"^staging/dealspace: was replaced while"):
        verify_now(staging, install_path, heartbeat=RecordingHeartbeat(replace))
    assert_nothing_left(install_path)


def test_artifact_removed_during_the_copy_is_refused(
    staging: StagingConfig, install_path: Path
) -> None:
    stage(staging, os.urandom(MiB))

    def remove(beats: int) -> None:
        if beats == 1:
            staging.artifact_path.unlink()

    with pytest.raises(RejectedError, match=r"^staging/dealspace: was removed or renamed while"):
        verify_now(staging, install_path, heartbeat=RecordingHeartbeat(remove))
    assert_nothing_left(install_path)


def test_checksum_file_changed_during_the_copy_is_refused(
    staging: StagingConfig, install_path: Path
) -> None:
    stage(staging, os.urandom(MiB))

    def append(beats: int) -> None:
        if beats == 1:
            with staging.checksum_path.open("a") as stream:
                stream.write("\n")

    with pytest.raises(RejectedError, match=r"^staging/dealspace\.sha256: changed while"):
        verify_now(staging, install_path, heartbeat=RecordingHeartbeat(append))
    assert_nothing_left(install_path)


def test_bytes_installed_are_the_bytes_verified_even_if_staging_changes_later(
    staging: StagingConfig, install_path: Path
) -> None:
    data = os.urandom(MiB)
    digest = stage(staging, data)
    copy = verify_now(staging, install_path)

    staging.artifact_path.write_bytes(b"tampered after the check")

    assert copy.path.read_bytes() == data
    assert sha256_of_path(copy.path) == digest


def test_heartbeat_beats_per_chunk_while_copying_and_hashing(
    staging: StagingConfig, install_path: Path
) -> None:
    size = 20 * MiB
    staging = StagingConfig(dir=staging.dir, max_size_mb=32)
    stage(staging, os.urandom(size))
    heartbeat = RecordingHeartbeat()

    verify_now(staging, install_path, heartbeat=heartbeat)

    # Once as each chunk is copied, and once as it is hashed.
    copy_chunks = -(-size // verify.COPY_CHUNK_BYTES)
    assert heartbeat.beats == 2 * copy_chunks


def test_copy_across_filesystems_falls_back_to_sendfile(
    install_path: Path,
    mount_tmpfs: Callable[[str, str], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Since Linux 5.19, copy_file_range(2) between two filesystems works only where the
    # filesystem itself copies across them; tmpfs does not, so this is EXDEV.
    staging = StagingConfig(dir=mount_tmpfs("staging-tmpfs", "32m"), max_size_mb=32)
    data = os.urandom(17 * MiB)
    digest = stage(staging, data)
    caplog.set_level(logging.DEBUG, logger="stagewatch.verify")

    copy = verify_now(staging, install_path)

    assert copy.path.read_bytes() == data
    assert copy.sha256 == digest
    assert "copy_file_range refused the copy (Invalid cross-device link)" in caplog.text


def test_read_and_write_copy_copies_every_byte(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    (tmp_path / "source").write_bytes(data)
    source = os.open(tmp_path / "source", os.O_RDONLY)
    destination = os.open(tmp_path / "destination", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        offset = 0
        while copied := verify._read_write(source, destination, offset, len(data) - offset):
            offset += copied
    finally:
        os.close(source)
        os.close(destination)

    assert (tmp_path / "destination").read_bytes() == data


def test_copy_stops_where_the_source_ends(tmp_path: Path) -> None:
    (tmp_path / "source").write_bytes(b"short")
    source = os.open(tmp_path / "source", os.O_RDONLY)
    destination = os.open(tmp_path / "destination", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        copied = copy_descriptor(source, destination, 1000, RecordingHeartbeat())
    finally:
        os.close(source)
        os.close(destination)

    assert copied == 5


def test_disk_full_beside_the_install_path_is_a_clear_error_and_leaves_nothing(
    staging: StagingConfig, mount_tmpfs: Callable[[str, str], Path]
) -> None:
    install_path = mount_tmpfs("small-bin", "2m") / "dealspace"
    install_path.write_bytes(OLD_BINARY)
    install_path.chmod(0o755)
    stage(staging, os.urandom(3 * MiB))

    with pytest.raises(SwapError) as raised:
        verify_now(staging, install_path)

    assert str(raised.value).startswith(f"no space left beside {install_path}: ")
    assert_nothing_left(install_path)
    assert stat.S_IMODE(install_path.stat().st_mode) == 0o755


def test_missing_install_folder_is_a_swap_error(staging: StagingConfig, tmp_path: Path) -> None:
    stage(staging, b"release")

    with pytest.raises(SwapError, match=r"cannot copy 7 bytes beside .*: No such file"):
        verify_now(staging, tmp_path / "absent" / "dealspace")


def test_remove_stale_copies_removes_only_our_temporaries(install_path: Path) -> None:
    folder = install_path.parent
    ours = [folder / ".dealspace.incoming-0123abcd", folder / ".dealspace.incoming-ffff0000"]
    for path in ours:
        path.write_bytes(b"partial")
    kept = [
        folder / ".dealspace.incoming-notahex",
        folder / ".dealspace.tmp-0123abcd",
        folder / ".other.incoming-0123abcd",
        folder / "dealspace.incoming-0123abcd",
    ]
    for path in kept:
        path.write_bytes(b"not ours")
    (folder / ".dealspace.incoming-abcdef12").mkdir()

    removed = remove_stale_copies(install_path)

    assert removed == sorted(ours)
    assert sorted(folder.iterdir()) == sorted(
        [install_path, folder / ".dealspace.incoming-abcdef12", *kept]
    )


def test_remove_stale_copies_cleans_up_after_a_verified_copy(
    staging: StagingConfig, install_path: Path
) -> None:
    stage(staging, b"release")
    copy = verify_now(staging, install_path)

    assert remove_stale_copies(install_path) == [copy.path]
    assert_nothing_left(install_path)


def test_remove_stale_copies_of_a_missing_folder_is_nothing(tmp_path: Path) -> None:
    assert remove_stale_copies(tmp_path / "absent" / "dealspace") == []


def test_sha256_of_path_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 3)
    (tmp_path / "file").write_bytes(data)

    assert sha256_of_path(tmp_path / "file") == hashlib.sha256(data).hexdigest()


def test_sha256_of_path_refuses_links_and_special_files(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    os.mkfifo(tmp_path / "fifo")

    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        sha256_of_path(tmp_path / "link")
    with pytest.raises(SwapError, match="is not a regular file"):
        sha256_of_path(tmp_path / "fifo")
    with pytest.raises(FileNotFoundError):
        sha256_of_path(tmp_path / "absent")
