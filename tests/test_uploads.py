"""Real uploads into staging through a real sshd: each client yields exactly one report.

scp (SFTP and legacy mode), an sftp batch that renames a temporary name, rsync (which writes a
dot-name and renames it), cp, and two slow uploads at 1 MiB/s: a remote `cat` fed slowly over
ssh and a rate-limited scp. Whatever the client's way of writing, the watcher reports the
pair once, with the identity the files have when the upload is over.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sshd_server import SshServer, running_sshd, sshd_missing_reason, traversable
from test_watcher import ARTIFACT, CHECKSUM, running_watcher, staged_pair

from stagewatch.config import StagingConfig

pytestmark = pytest.mark.skipif(
    sshd_missing_reason() is not None, reason=sshd_missing_reason() or ""
)

SETTLE_SECONDS = 0.5
ARTIFACT_SIZE = 3 << 20  # three seconds of upload at 1 MiB/s
CHUNK = 64 * 1024
CLIENT_TIMEOUT = 30


@pytest.fixture(scope="module")
def ssh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def build(tmp_path: Path) -> Path:
    """The build machine's output: the artifact and its sha256sum line."""
    folder = tmp_path / "build"
    folder.mkdir()
    content = os.urandom(ARTIFACT_SIZE)
    (folder / ARTIFACT).write_bytes(content)
    (folder / CHECKSUM).write_text(f"{hashlib.sha256(content).hexdigest()}  {ARTIFACT}\n")
    return folder


@pytest.fixture
def staging_dir(tmp_path: Path, ssh_server: SshServer) -> Iterator[Path]:
    with traversable(tmp_path):
        yield ssh_server.writable_folder(tmp_path / "staging")


def _run(command: list[str | Path]) -> None:
    subprocess.run(command, check=True, timeout=CLIENT_TIMEOUT)


def scp(server: SshServer, build: Path, staging: Path) -> None:
    _run(
        ["scp", *server.copy_options(), build / CHECKSUM, build / ARTIFACT, server.remote(staging)]
    )


def legacy_scp(server: SshServer, build: Path, staging: Path) -> None:
    _run(
        [
            "scp",
            "-O",
            *server.copy_options(),
            build / CHECKSUM,
            build / ARTIFACT,
            server.remote(staging),
        ]
    )


def sftp_rename(server: SshServer, build: Path, staging: Path) -> None:
    batch = build / "upload.sftp"
    lines = []
    for name in (CHECKSUM, ARTIFACT):
        lines.append(f"put {build / name} {staging / f'.{name}.part'}")
        lines.append(f"rename {staging / f'.{name}.part'} {staging / name}")
    batch.write_text("\n".join(lines) + "\n")
    _run(["sftp", "-b", str(batch), *server.copy_options(), server.login])


def rsync(server: SshServer, build: Path, staging: Path) -> None:
    _run(
        [
            "rsync",
            "-e",
            server.rsync_shell(),
            build / CHECKSUM,
            build / ARTIFACT,
            f"{server.remote(staging)}/",
        ]
    )


def cp(server: SshServer, build: Path, staging: Path) -> None:
    _run(["cp", build / CHECKSUM, build / ARTIFACT, staging])


def slow_remote_cat(server: SshServer, build: Path, staging: Path) -> None:
    """The artifact fed to a remote `cat` at 1 MiB/s, in 64 KiB pieces."""
    for name in (CHECKSUM, ARTIFACT):
        remote = [*server.ssh_command(), f"cat > {shlex.quote(str(staging / name))}"]
        with subprocess.Popen(remote, stdin=subprocess.PIPE) as client:
            assert client.stdin is not None
            content = (build / name).read_bytes()
            started = time.monotonic()
            for index, offset in enumerate(range(0, len(content), CHUNK)):
                client.stdin.write(content[offset : offset + CHUNK])
                client.stdin.flush()
                time.sleep(max(0.0, started + (index + 1) * CHUNK / (1 << 20) - time.monotonic()))
            client.stdin.close()
            assert client.wait(timeout=CLIENT_TIMEOUT) == 0


def slow_scp(server: SshServer, build: Path, staging: Path) -> None:
    """scp limited to 8192 Kbit/s, that is 1 MiB/s (scp(1), -l)."""
    _run(
        [
            "scp",
            "-l",
            "8192",
            *server.copy_options(),
            build / CHECKSUM,
            build / ARTIFACT,
            server.remote(staging),
        ]
    )


@dataclass(frozen=True)
class Upload:
    send: Callable[[SshServer, Path, Path], None]
    slow: bool = False
    over_ssh: bool = True


UPLOADS = {
    "scp": Upload(scp),
    "scp-legacy": Upload(legacy_scp),
    "sftp-put-then-rename": Upload(sftp_rename),
    "rsync": Upload(rsync),
    "cp": Upload(cp, over_ssh=False),
    "ssh-cat-at-1MiB/s": Upload(slow_remote_cat, slow=True),
    "scp-at-1MiB/s": Upload(slow_scp, slow=True),
}


@pytest.mark.parametrize("upload", UPLOADS.values(), ids=UPLOADS.keys())
def test_upload_yields_one_report_with_the_final_identity(
    upload: Upload, ssh_server: SshServer, build: Path, staging_dir: Path
) -> None:
    staging = StagingConfig(dir=staging_dir, artifact=ARTIFACT, settle_seconds=SETTLE_SECONDS)

    with running_watcher(staging) as (_, reports):
        started = time.monotonic()
        upload.send(ssh_server, build, staging_dir)
        finished = time.monotonic()

        [pair] = reports.wait(1, timeout=15)
        assert pair == staged_pair(staging_dir)
        assert pair.artifact.size == ARTIFACT_SIZE
        assert pair.checksum.size == (build / CHECKSUM).stat().st_size
        if upload.slow:
            assert finished - started >= 2.5, "the upload was not slow"
            assert reports.times[0] >= finished, "reported while the upload was running"
        reports.assert_no_more(1, seconds=3 * SETTLE_SECONDS)

    assert (staging_dir / ARTIFACT).read_bytes() == (build / ARTIFACT).read_bytes()
    if upload.over_ssh:
        assert (staging_dir / ARTIFACT).stat().st_uid == ssh_server.user.pw_uid
