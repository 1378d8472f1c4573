"""verify_install_256mib: verify and install a 256 MiB release, as the deploy's steps do.

stagewatch's figure is `verify.stage_verified_copy` (checksum file parsed, the artifact copied
beside the install path, fsynced, the copy hashed and compared) followed by `swap.install`
(the current binary kept as a release, the copy renamed over the install path, the folder
fsynced). It runs in the steady state of a host that has deployed before: the installed
binary and the kept releases are 256 MiB files too. Pruning the release beyond
`keep_releases` follows each install untimed, since a deploy does it once it is decided.

The references, on the same file with its pages in the cache and no dirty pages pending:
Python's bare `hashlib.file_digest` (the floor: hashing must read every byte once), and the
naive `sha256sum FILE && cp FILE DEST`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from common import Figure, median, write_back

from stagewatch import swap, verify
from stagewatch.config import StagingConfig
from stagewatch.heartbeat import detached

ARTIFACT_BYTES = 256 * 1024 * 1024
KEEP_RELEASES = 3
_CHUNK_BYTES = 8 * 1024 * 1024


class Host:
    """A staging folder, an install path and a releases folder, each holding 256 MiB files."""

    def __init__(self, root: Path) -> None:
        self.staging = root / "staging"
        self.install_path = root / "bin" / "dealspace"
        self.releases = root / "state" / "releases"
        self.naive_copy = root / "naive" / "dealspace"
        for folder in (self.staging, self.install_path.parent, self.releases.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self.naive_copy.parent.mkdir(exist_ok=True)
        self.config = StagingConfig(dir=self.staging, max_size_mb=1024)
        self.artifact = self.config.artifact_path
        self._release = 0
        _write_random(self.artifact, ARTIFACT_BYTES)
        _write_random(self.install_path, ARTIFACT_BYTES)
        self.install_path.chmod(0o755)

    def stage_next(self) -> None:
        """Make the staged artifact a new release (new first page), its checksum file beside."""
        self._release += 1
        with self.artifact.open("r+b") as stream:
            stream.write(os.urandom(4096))
        with self.artifact.open("rb") as stream:
            digest = hashlib.file_digest(stream, "sha256").hexdigest()
        self.config.checksum_path.write_text(f"{digest}  {self.artifact.name}\n")

    def verify_and_install(self) -> tuple[float, float]:
        """The deploy's verify and install; return the seconds of each."""
        started = time.perf_counter()
        copy = verify.stage_verified_copy(self.config, self.install_path, None, detached("bench"))
        verified = time.perf_counter()
        previous = swap.install(copy, self.install_path, self.releases, detached("bench"))
        installed = time.perf_counter()

        # After the deploy is decided, as the engine does it: not part of verify and install.
        swap.release_previous(self.install_path)
        swap.prune_releases(self.releases, KEEP_RELEASES, protect=previous)
        return verified - started, installed - verified

    def floor(self) -> float:
        started = time.perf_counter()
        with self.artifact.open("rb") as stream:
            hashlib.file_digest(stream, "sha256")
        return time.perf_counter() - started

    def naive(self) -> float:
        self.naive_copy.unlink(missing_ok=True)
        write_back()
        started = time.perf_counter()
        subprocess.run(
            [
                "sh",
                "-c",
                'sha256sum "$1" >/dev/null && cp "$1" "$2"',
                "sh",
                str(self.artifact),
                str(self.naive_copy),
            ],
            check=True,
        )
        return time.perf_counter() - started


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as stream:
        for _ in range(size // _CHUNK_BYTES):
            stream.write(os.urandom(_CHUNK_BYTES))


def measure(work: Path, quick: bool) -> list[Figure]:
    """Interleaved repetitions of the three; medians compared."""
    host = Host(work / "verify-install")
    repetitions = 3 if quick else 9
    # Three installs reach the steady state: from the fourth on, each prunes a release.
    for _ in range(KEEP_RELEASES):
        host.stage_next()
        host.verify_and_install()

    ours: list[float] = []
    verifying: list[float] = []
    installing: list[float] = []
    floors: list[float] = []
    naives: list[float] = []
    for _ in range(repetitions):
        host.stage_next()
        write_back()
        verify_seconds, install_seconds = host.verify_and_install()
        verifying.append(verify_seconds)
        installing.append(install_seconds)
        ours.append(verify_seconds + install_seconds)
        write_back()
        floors.append(host.floor())
        naives.append(host.naive())
    write_back()

    value = median(ours) * 1000
    breakdown = (
        f"verify_install_256mib: median of {repetitions} interleaved runs, the source cached "
        f"and no dirty pages pending before each; stagewatch's verify "
        f"(copy, fsync, hash) {median(verifying) * 1000:.0f} ms and install (keep, rename, "
        f"fsync) {median(installing) * 1000:.0f} ms; fastest run "
        f"{min(ours) * 1000:.0f} ms against a fastest floor of {min(floors) * 1000:.0f} ms."
    )
    return [
        Figure.against(
            "verify_install_256mib",
            value,
            "ms",
            "hashlib.file_digest",
            median(floors) * 1000,
            max_ratio=1.3,
            note=breakdown,
        ),
        Figure.against(
            "verify_install_256mib",
            value,
            "ms",
            "sha256sum && cp",
            median(naives) * 1000,
            faster_by=2.5,
        ),
    ]
