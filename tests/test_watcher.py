"""The staging watcher, on real inotify: what is reported, when, and how often.

Every test writes real files into a real folder and waits, with a deadline, for the reports
the watcher makes from its own thread. `Reports` and `running_watcher` are shared with
test_uploads.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest
from sandbox import wait_for

from stagewatch.config import StagingConfig
from stagewatch.heartbeat import Heartbeats
from stagewatch.watcher import FileIdentity, StagedPair, StagingWatcher

SETTLE_SECONDS = 0.3
ARTIFACT = "dealspace"
CHECKSUM = "dealspace.sha256"


class Reports:
    """The pairs a watcher reported, each with the monotonic time it arrived."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._arrivals: list[tuple[float, StagedPair]] = []
        self.threads: set[str] = set()

    def __call__(self, pair: StagedPair) -> None:
        with self._condition:
            self._arrivals.append((time.monotonic(), pair))
            self.threads.add(threading.current_thread().name)
            self._condition.notify_all()

    @property
    def pairs(self) -> list[StagedPair]:
        with self._condition:
            return [pair for _, pair in self._arrivals]

    @property
    def times(self) -> list[float]:
        with self._condition:
            return [arrived for arrived, _ in self._arrivals]

    def wait(self, count: int, timeout: float = 10.0) -> list[StagedPair]:
        """Wait until `count` pairs arrived; fail the test if they do not within `timeout`."""
        with self._condition:
            arrived = self._condition.wait_for(lambda: len(self._arrivals) >= count, timeout)
            assert arrived, f"{len(self._arrivals)} reports after {timeout:g} s, expected {count}"
            return [pair for _, pair in self._arrivals]

    def assert_no_more(self, count: int, seconds: float) -> None:
        """Watch for `seconds` (an absence takes a window to show) that no report follows."""
        with self._condition:
            self._condition.wait_for(lambda: len(self._arrivals) > count, seconds)
            assert len(self._arrivals) == count, f"reports: {self._arrivals}"


@contextmanager
def running_watcher(
    staging: StagingConfig, heartbeats: Heartbeats | None = None
) -> Iterator[tuple[StagingWatcher, Reports]]:
    """A started watcher; at exit it is stopped, within 2 s, leaving no thread behind."""
    before = set(threading.enumerate())
    reports = Reports()
    watcher = StagingWatcher(staging, reports, heartbeats)
    watcher.start()
    try:
        yield watcher, reports
    finally:
        started = time.monotonic()
        watcher.stop()
        assert time.monotonic() - started < 2.0
        leaked = [thread.name for thread in set(threading.enumerate()) - before]
        assert not leaked, f"threads left running after stop(): {leaked}"


def write_pair(folder: Path, content: bytes) -> None:
    """The checksum file, then the artifact, written in place as a plain writer would."""
    digest = hashlib.sha256(content).hexdigest()
    (folder / CHECKSUM).write_text(f"{digest}  {ARTIFACT}\n")
    (folder / ARTIFACT).write_bytes(content)


def staged_pair(folder: Path) -> StagedPair:
    """What is in `folder` now, as the watcher identifies it."""
    return StagedPair(FileIdentity.of(folder / ARTIFACT), FileIdentity.of(folder / CHECKSUM))


class WatcherLog(logging.Handler):
    """Log messages caught on one logger of ours (whatever the root logger does)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._lock = threading.Lock()
        self._messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self._messages.append(f"{record.levelname} {record.getMessage()}")

    def has(self, text: str) -> bool:
        with self._lock:
            return any(text in message for message in self._messages)

    def messages(self) -> list[str]:
        with self._lock:
            return list(self._messages)


@pytest.fixture
def watcher_log() -> Iterator[WatcherLog]:
    handler = WatcherLog()
    logger = logging.getLogger("stagewatch.watcher")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def staging_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "staging"
    folder.mkdir()
    return folder


@pytest.fixture
def staging(staging_dir: Path) -> StagingConfig:
    return StagingConfig(dir=staging_dir, artifact=ARTIFACT, settle_seconds=SETTLE_SECONDS)


def test_pair_copied_with_cp_is_reported_once_with_its_final_identity(
    tmp_path: Path, staging: StagingConfig
) -> None:
    build = tmp_path / "build"
    build.mkdir()
    write_pair(build, os.urandom(4 << 20))

    with running_watcher(staging) as (_, reports):
        subprocess.run(["cp", build / CHECKSUM, build / ARTIFACT, staging.dir], check=True)

        [pair] = reports.wait(1)
        assert pair == staged_pair(staging.dir)
        assert pair.artifact.size == 4 << 20
        assert reports.threads == {"stagewatch-watcher"}
        reports.assert_no_more(1, seconds=4 * SETTLE_SECONDS)


def test_pair_written_by_a_python_writer_is_reported_once(staging: StagingConfig) -> None:
    with running_watcher(staging) as (_, reports):
        (staging.dir / CHECKSUM).write_text("0" * 64 + "\n")
        with (staging.dir / ARTIFACT).open("wb") as stream:
            for _ in range(64):
                stream.write(os.urandom(16384))
                stream.flush()

        [pair] = reports.wait(1)
        assert pair == staged_pair(staging.dir)
        assert pair.artifact.size == 64 * 16384
        reports.assert_no_more(1, seconds=4 * SETTLE_SECONDS)


def test_pair_already_staged_at_start_is_reported_after_one_quiet_period(
    staging: StagingConfig,
) -> None:
    write_pair(staging.dir, b"release 1")
    started = time.monotonic()

    with running_watcher(staging) as (_, reports):
        [pair] = reports.wait(1)
        assert pair == staged_pair(staging.dir)
        assert reports.times[0] - started >= SETTLE_SECONDS


def test_pair_renamed_from_temporary_names_inside_staging_is_reported_once(
    staging: StagingConfig,
) -> None:
    with running_watcher(staging) as (_, reports):
        write_pair(staging.dir, os.urandom(1 << 20))
        (staging.dir / ARTIFACT).rename(staging.dir / f".{ARTIFACT}.part")
        (staging.dir / CHECKSUM).rename(staging.dir / f".{CHECKSUM}.part")
        reports.assert_no_more(0, seconds=3 * SETTLE_SECONDS)

        (staging.dir / f".{ARTIFACT}.part").rename(staging.dir / ARTIFACT)
        (staging.dir / f".{CHECKSUM}.part").rename(staging.dir / CHECKSUM)

        [pair] = reports.wait(1)
        assert pair == staged_pair(staging.dir)
        reports.assert_no_more(1, seconds=4 * SETTLE_SECONDS)


def test_pair_moved_in_from_another_folder_is_reported(
    tmp_path: Path, staging: StagingConfig
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write_pair(outside, os.urandom(1 << 20))

    with running_watcher(staging) as (_, reports):
        (outside / CHECKSUM).rename(staging.dir / CHECKSUM)
        (outside / ARTIFACT).rename(staging.dir / ARTIFACT)

        [pair] = reports.wait(1)
        assert pair == staged_pair(staging.dir)


def test_one_name_alone_is_never_reported(staging: StagingConfig) -> None:
    with running_watcher(staging) as (watcher, reports):
        (staging.dir / ARTIFACT).write_bytes(b"binary")
        reports.assert_no_more(0, seconds=4 * SETTLE_SECONDS)
        assert watcher.waiting() is None

        (staging.dir / CHECKSUM).write_text("0" * 64 + "\n")
        [pair] = reports.wait(1)
        assert pair == staged_pair(staging.dir)


def test_slow_writer_is_reported_only_once_it_has_finished(staging_dir: Path) -> None:
    staging = StagingConfig(dir=staging_dir, artifact=ARTIFACT, settle_seconds=0.5)
    chunk = 64 * 1024

    with running_watcher(staging) as (_, reports):
        (staging_dir / CHECKSUM).write_text("0" * 64 + "\n")
        with (staging_dir / ARTIFACT).open("wb") as stream:
            started = time.monotonic()
            for index in range(48):  # 3 MiB at 1 MiB/s
                stream.write(os.urandom(chunk))
                stream.flush()
                time.sleep(max(0.0, started + (index + 1) / 16 - time.monotonic()))
        finished = time.monotonic()

        [pair] = reports.wait(1)
        assert reports.times[0] >= finished
        assert pair == staged_pair(staging_dir)
        assert pair.artifact.size == 48 * chunk
        reports.assert_no_more(1, seconds=1.5)


def test_writer_pausing_less_than_settle_seconds_keeps_postponing(staging_dir: Path) -> None:
    staging = StagingConfig(dir=staging_dir, artifact=ARTIFACT, settle_seconds=0.5)

    with running_watcher(staging) as (_, reports):
        (staging_dir / CHECKSUM).write_text("0" * 64 + "\n")
        with (staging_dir / ARTIFACT).open("wb") as stream:
            for _ in range(6):  # one byte every 0.4 s: slower than any real upload
                stream.write(b"x")
                stream.flush()
                time.sleep(0.4)
        finished = time.monotonic()

        [pair] = reports.wait(1)
        assert reports.times[0] >= finished
        assert pair.artifact.size == 6


def test_many_events_make_one_report(staging: StagingConfig) -> None:
    with running_watcher(staging) as (_, reports):
        for round_number in range(20):
            write_pair(staging.dir, os.urandom(4096 * (round_number + 1)))
            for _ in range(10):
                os.utime(staging.dir / ARTIFACT)
                os.utime(staging.dir / CHECKSUM)

        [pair] = reports.wait(1)
        assert pair == staged_pair(staging.dir)
        assert pair.artifact.size == 4096 * 20
        reports.assert_no_more(1, seconds=4 * SETTLE_SECONDS)


def test_replaced_pair_is_reported_again_with_the_new_identity(staging: StagingConfig) -> None:
    with running_watcher(staging) as (watcher, reports):
        write_pair(staging.dir, b"release 1")
        [first] = reports.wait(1)
        assert watcher.waiting() == first

        write_pair(staging.dir.parent, b"release 2, a little longer")
        (staging.dir.parent / ARTIFACT).rename(staging.dir / ARTIFACT)
        (staging.dir.parent / CHECKSUM).rename(staging.dir / CHECKSUM)

        first_again, second = reports.wait(2)
        assert first_again == first
        assert second != first
        assert second == staged_pair(staging.dir)
        assert watcher.waiting() == second
        reports.assert_no_more(2, seconds=4 * SETTLE_SECONDS)


def test_waiting_offers_the_reported_pair_only_while_it_is_staged(
    staging: StagingConfig,
) -> None:
    with running_watcher(staging) as (watcher, reports):
        assert watcher.waiting() is None
        write_pair(staging.dir, b"release 1")
        [pair] = reports.wait(1)
        assert watcher.waiting() == pair

        (staging.dir / ARTIFACT).unlink()
        assert watcher.waiting() is None


def test_symlinked_artifact_is_reported_for_the_verify_step_to_reject(
    tmp_path: Path, staging: StagingConfig
) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not staged here")

    with running_watcher(staging) as (_, reports):
        (staging.dir / CHECKSUM).write_text("0" * 64 + "\n")
        (staging.dir / ARTIFACT).symlink_to(target)

        [pair] = reports.wait(1)
        assert pair.artifact.inode == os.lstat(staging.dir / ARTIFACT).st_ino
        assert pair.artifact.inode != os.stat(target).st_ino


def test_stopping_just_after_a_file_moved_out_logs_no_error(
    tmp_path: Path, staging: StagingConfig
) -> None:
    # The move out is still held back by watchdog (it waits 0.5 s to pair it) when stop() runs.
    watchdog_log = WatcherLog()
    logging.getLogger("watchdog").addHandler(watchdog_log)
    try:
        with running_watcher(staging) as (_, reports):
            write_pair(staging.dir, b"release 1")
            reports.wait(1)
            (staging.dir / ARTIFACT).rename(tmp_path / "rejected")
    finally:
        logging.getLogger("watchdog").removeHandler(watchdog_log)

    assert not watchdog_log.has("ERROR"), watchdog_log.messages()


def test_removed_staging_folder_is_watched_again_when_it_comes_back(
    staging: StagingConfig, watcher_log: WatcherLog
) -> None:
    with running_watcher(staging) as (watcher, reports):
        write_pair(staging.dir, b"release 1")
        reports.wait(1)

        shutil.rmtree(staging.dir)
        wait_for(
            lambda: watcher_log.has(
                f"WARNING Staging folder {staging.dir} was removed; watching for it to come back"
            ),
            what="the warning about the removed folder",
        )
        assert watcher.waiting() is None
        assert watcher.is_alive()

        staging.dir.mkdir()
        write_pair(staging.dir, b"release 2")
        _, second = reports.wait(2)
        assert second == staged_pair(staging.dir)


def test_staging_folder_renamed_away_and_replaced_is_followed(
    staging: StagingConfig, watcher_log: WatcherLog
) -> None:
    old = staging.dir.with_name("staging.old")

    with running_watcher(staging) as (_, reports):
        staging.dir.rename(old)
        wait_for(
            lambda: watcher_log.has(f"Staging folder {staging.dir} was removed"),
            what="the warning about the folder renamed away",
        )
        staging.dir.mkdir()
        write_pair(staging.dir, b"release in the new folder")

        [pair] = reports.wait(1)
        assert pair == staged_pair(staging.dir)

        write_pair(old, b"release in the folder renamed away")
        reports.assert_no_more(1, seconds=4 * SETTLE_SECONDS)


def test_staging_folder_swapped_in_one_step_is_followed(
    staging: StagingConfig, watcher_log: WatcherLog
) -> None:
    replacement = staging.dir.with_name("staging.new")
    replacement.mkdir()

    with running_watcher(staging) as (_, reports):
        staging.dir.rename(staging.dir.with_name("staging.old"))
        replacement.rename(staging.dir)
        wait_for(
            lambda: watcher_log.has("was replaced") or watcher_log.has("is back"),
            what="the watch to move to the new folder",
        )
        write_pair(staging.dir, b"release 1")

        [pair] = reports.wait(1)
        assert pair == staged_pair(staging.dir)


def test_staging_folder_missing_at_start_is_watched_once_created(
    tmp_path: Path, watcher_log: WatcherLog
) -> None:
    folder = tmp_path / "opt" / "dealspace" / "staging"
    staging = StagingConfig(dir=folder, artifact=ARTIFACT, settle_seconds=SETTLE_SECONDS)

    with running_watcher(staging) as (watcher, reports):
        assert watcher_log.has(f"WARNING Staging folder {folder} does not exist")
        assert not (tmp_path / "opt").exists()
        assert watcher.is_alive()

        folder.mkdir(parents=True)
        write_pair(folder, b"release 1")

        [pair] = reports.wait(1)
        assert pair == staged_pair(folder)


def test_rescan_finds_a_pair_in_a_folder_whose_parent_was_renamed_away(
    tmp_path: Path,
) -> None:
    # Nothing watched sees the rename of the staging folder's parent: that event goes to the
    # grandparent's watches. The daemon's rescan on arm is what notices it.
    folder = tmp_path / "dealspace" / "staging"
    folder.mkdir(parents=True)
    staging = StagingConfig(dir=folder, artifact=ARTIFACT, settle_seconds=SETTLE_SECONDS)

    with running_watcher(staging) as (watcher, reports):
        (tmp_path / "dealspace").rename(tmp_path / "dealspace.old")
        folder.mkdir(parents=True)
        write_pair(folder, b"release 1")

        watcher.rescan()
        [pair] = reports.wait(1)
        assert pair == staged_pair(folder)


def test_rescan_of_a_quiet_pair_reports_nothing_new(staging: StagingConfig) -> None:
    with running_watcher(staging) as (watcher, reports):
        write_pair(staging.dir, b"release 1")
        reports.wait(1)

        for _ in range(5):
            watcher.rescan()
        reports.assert_no_more(1, seconds=4 * SETTLE_SECONDS)


_OVERFLOW_CHILD = """
import json, logging, sys
from pathlib import Path
from stagewatch.config import StagingConfig
from stagewatch.watcher import StagingWatcher

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

def report(pair):
    print(json.dumps({"size": pair.artifact.size}), flush=True)

config = StagingConfig(dir=Path(sys.argv[1]), settle_seconds=float(sys.argv[2]))
watcher = StagingWatcher(config, report)
watcher.start()
print("ready", flush=True)
sys.stdin.read()
watcher.stop()
"""


def _thread_states(pid: int) -> set[str]:
    """The state letter of every thread of `pid` (proc(5): it follows the parenthesised name)."""
    return {
        stat_file.read_text().rpartition(")")[2].split()[0]
        for stat_file in Path(f"/proc/{pid}/task").glob("*/stat")
    }


def _lines_of(stream: IO[str]) -> queue.Queue[str]:
    """The lines `stream` yields, read on a thread, so that the test can wait with a deadline."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=read, name="child-stdout", daemon=True).start()
    return lines


def test_kernel_queue_overflow_makes_the_watcher_look_again(staging_dir: Path) -> None:
    # A real IN_Q_OVERFLOW: the watcher runs in a child that is stopped (SIGSTOP) while more
    # events than fs.inotify.max_queued_events are made; the pair rewritten after them has no
    # event of its own, so only the look that follows the overflow can find it. A first pair,
    # reported before the stop, proves that the watcher's first look is behind it: a look
    # still to come after SIGCONT would find the new pair without any overflow.
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    noise = [staging_dir / f"noise-{index}" for index in range(64)]
    for path in noise:
        path.touch()
    content = b"release written while the events were dropped"

    child = subprocess.Popen(
        [sys.executable, "-c", _OVERFLOW_CHILD, str(staging_dir), str(SETTLE_SECONDS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert child.stdout is not None
        lines = _lines_of(child.stdout)
        assert lines.get(timeout=20).strip() == "ready"
        first = b"the release before"
        write_pair(staging_dir, first)
        assert json.loads(lines.get(timeout=20)) == {"size": len(first)}

        child.send_signal(signal.SIGSTOP)
        wait_for(lambda: _thread_states(child.pid) == {"T"}, what="every thread to stop")
        for index in range(2 * limit):
            # Rotating names, since identical successive events are merged (inotify(7)),
            # and twice the limit, so that no merging can keep the queue under it.
            os.utime(noise[index % len(noise)])
        write_pair(staging_dir, content)
        stopped_states = _thread_states(child.pid)
        child.send_signal(signal.SIGCONT)

        report = lines.get(timeout=20)
    finally:
        child.send_signal(signal.SIGCONT)
        _, errors = child.communicate(timeout=10)

    assert child.returncode == 0, errors
    assert json.loads(report) == {"size": len(content)}
    assert "The inotify queue overflowed and events were lost" in errors, (
        f"no overflow; thread states while stopped: {stopped_states}; log: {errors!r}"
    )


def _context_switches(thread: threading.Thread) -> int:
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)


def test_idle_watcher_threads_never_wake(staging: StagingConfig) -> None:
    before = set(threading.enumerate())

    with running_watcher(staging) as (_, reports):
        write_pair(staging.dir, b"release 1")
        reports.wait(1)
        threads = set(threading.enumerate()) - before
        assert len(threads) >= 4  # ours, watchdog's dispatcher, emitters and inotify reader

        def switches() -> dict[str, int]:
            return {thread.name: _context_switches(thread) for thread in threads}

        def quiet_for(seconds: float) -> bool:
            first = switches()
            time.sleep(seconds)
            return switches() == first

        wait_for(lambda: quiet_for(0.2), what="the threads to settle down")
        assert quiet_for(1.5), "an idle watcher thread woke up"


def test_heartbeat_probe_is_alive_while_watching_and_removed_at_stop(
    staging: StagingConfig,
) -> None:
    heartbeats = Heartbeats()

    with running_watcher(staging, heartbeats) as (watcher, _):
        assert watcher.is_alive()
        assert heartbeats.stalled() == []

    assert not watcher.is_alive()
    assert heartbeats.stalled() == []


def test_stop_before_start_and_waiting_before_start_are_harmless(
    staging: StagingConfig,
) -> None:
    watcher = StagingWatcher(staging, Reports())
    assert watcher.waiting() is None
    assert not watcher.is_alive()
    watcher.stop()


def test_staging_folder_removed_and_recreated_at_once_is_watched_again(
    staging: StagingConfig, watcher_log: WatcherLog
) -> None:
    # ext4 hands the freed inode number straight to the next folder made in the same place,
    # so the new folder can look identical to the old one, whose watch died with it.
    with running_watcher(staging) as (_, reports):
        shutil.rmtree(staging.dir)
        staging.dir.mkdir()
        wait_for(
            lambda: watcher_log.has("was replaced") or watcher_log.has("is back"),
            what="the watch to move to the new folder",
        )
        write_pair(staging.dir, b"release 1")

        [pair] = reports.wait(1)
        assert pair == staged_pair(staging.dir)
