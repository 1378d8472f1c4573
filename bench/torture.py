"""Crash consistency under random faults, through the real daemon and the real command line.

    python bench/torture.py --kills N [--disk-full M] [--jobs J] [--seed S] [--json FILE]

N deploys are each SIGKILLed at an instant drawn uniformly over the deploy's duration
(measured first on the same host, for healthy releases and for releases that are rolled
back, so that every step is covered, rollbacks included), and the agent is started again.
About half of them go through the daemon: `stagewatch run` armed over HTTP, killed, and run
again. The others go through `stagewatch deploy` started from a fork server that has
stagewatch imported already (so the instant measures the deploy, not the interpreter's
start), killed, and followed by another `stagewatch deploy`.

With --disk-full M (root only), M deploys per folder run with the snapshot folder, the
install folder or the state folder on a small tmpfs, filled up at an instant drawn the same
way; then the space is freed and the next `stagewatch deploy` runs. The mounts live in a
private mount namespace (unshare(1)), so they vanish with the run whatever happens to it.

After every fault, once the agent has run again, the contract's guarantees are checked:

- the install path holds exactly the old or the new bytes, mode 0755, and nothing else is in
  its folder (no temporary survives beside it);
- no journal is left, no attempt is unfinished, and the interrupted attempt's outcome is
  recorded (succeeded, rolled_back or rejected; never interrupted or failed, since the old
  release is healthy), consistent with the bytes installed and the version served;
- every snapshot is a `*.db` that passes `PRAGMA integrity_check`, at most `keep` of them,
  no `*.partial`;
- the staged files are gone from staging.

It prints a table of faults injected, survived and failed by the step they hit, then every
failure with what was wrong. Exit status 0 when every fault was survived, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deploy_child
from common import Daemon, Sandbox, request, wait_for
from sandbox import PORTS_VARIABLE, fill_filesystem, port_blocks

from stagewatch import journal, lock
from stagewatch.errors import RecoveryError
from stagewatch.history import History, Record

# Short health windows, so that a deploy takes about a second and a rollback about three.
OVERRIDES: dict[str, Any] = {
    "staging__settle_seconds": 0.1,
    "staging__arm_timeout_seconds": 120,
    "health__stable_seconds": 0.2,
    "health__timeout_seconds": 1.5,
    "database__keep": 3,
}
KEEP = 3
BEHAVIOURS = ("good", "good", "good", "unhealthy")
# Instants are drawn over the deploy's duration and a little beyond, where it has finished.
SPAN = 1.1
DECIDED = ("succeeded", "rolled_back", "rejected")
SETTLE_TIMEOUT_SECONDS = 90.0
STEP_ORDER = (
    "not started",
    "armed",
    "verifying",
    "snapshotting",
    "swapping",
    "restarting",
    "checking",
    "rolling_back",
    "finished",
    "after the outcome",
)
DISK_FULL_FOLDERS = {"snapshots": "4m", "install": "256k", "state": "4m"}
DISK_FULL_MODES = ("daemon", "command line")

FORK_SERVER = multiprocessing.get_context("forkserver")


@dataclass
class Fault:
    """One injected fault and what the checks found after the agent ran again."""

    fault: str
    step: str
    behaviour: str
    instant_seconds: float
    outcome: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def survived(self) -> bool:
        return not self.problems


class Host:
    """A sandbox host with its agent, and what is installed on it now."""

    def __init__(self, root: Path, prepare: Callable[[Sandbox], None] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.sandbox = Sandbox(root, **OVERRIDES)
        if prepare is not None:
            prepare(self.sandbox)
        self.installed = self.sandbox.install_initial("1.0")
        self.installed_version = "1.0"
        self.daemon = Daemon(self.sandbox, root / "daemon.log")
        self.command_log = root / "deploy-commands.log"
        self._releases = 0
        self._judged: set[str] = set()
        self._litter: set[str] = set()

    @property
    def history(self) -> History:
        return History(self.sandbox.state / "history.db")

    def close(self) -> None:
        self.daemon.stop()
        self.sandbox.stop_everything()

    def stage(self, behaviour: str) -> tuple[str, bytes]:
        self._releases += 1
        version = f"{self.sandbox.root.name}.{self._releases}"
        return version, self.sandbox.stage(version, behaviour)

    def start_command(self, *arguments: str) -> BaseProcess:
        """`stagewatch --config CFG ARGUMENTS` in a process from the fork server."""
        argv = ["--config", str(self.sandbox.config_path), *arguments]
        process = FORK_SERVER.Process(target=deploy_child.run, args=(argv, str(self.command_log)))
        process.start()
        return process

    def attempts(self) -> int:
        path = self.sandbox.state / "history.db"
        return len(History(path).recent(100_000)) if path.exists() else 0

    def wait_unlocked(self) -> None:
        # The kernel closes a killed process's files one by one: its lock goes last, as
        # systemd would wait for before starting the agent again.
        lock_path = self.sandbox.state / "lock"
        wait_for(lambda: not lock.is_held(lock_path), 10, "the lock released")

    def step_now(self, attempt_id: str | None, attempts_before: int) -> str:
        """The step the journal names now; without a journal, before or after the attempt."""
        try:
            entry = journal.read(self.sandbox.state / "journal.json")
        except RecoveryError:
            return "unreadable journal"
        if entry is not None:
            return entry.step
        if attempt_id is not None:
            record = self.history.get(attempt_id)
            return "after the outcome" if record is not None and record.outcome else "armed"
        return "after the outcome" if self.attempts() > attempts_before else "not started"

    def wait_idle(self) -> None:
        def idle() -> bool:
            status, document = request(
                self.sandbox.webhook_port, "GET", "/status", secret=self.sandbox.secret
            )
            return status == 200 and document.get("state") == "idle"

        wait_for(idle, SETTLE_TIMEOUT_SECONDS, "the agent idle")

    def check(self, fault: Fault, new: bytes, new_version: str, attempt: Record | None) -> None:
        """Check every guarantee after recovery, into `fault`; then note what is installed."""
        problems = fault.problems
        self._judged.add(attempt.id if attempt is not None else "")
        problems += self._check_files() + self._check_snapshots() + self._check_history()
        installed = self._installed_bytes(problems)
        old, old_version = self.installed, self.installed_version

        if attempt is None:
            fault.outcome = "not started"
            expected, expected_version = old, old_version
        else:
            fault.outcome = attempt.outcome or "none"
            if fault.outcome not in DECIDED:
                problems.append(f"attempt {attempt.id} ended {fault.outcome}: {attempt.reason}")
            succeeded = fault.outcome == "succeeded"
            expected = new if succeeded else old
            expected_version = new_version if succeeded else old_version
            if fault.outcome == "rejected":
                fault.outcome = f"rejected ({_reason_kind(attempt.reason or '')})"
        self._check_staging(fault)
        litter = {name for name in os.listdir(self.sandbox.state) if ".tmp-" in name}
        if litter - self._litter:
            fault.notes.append(f"temporaries left in the state folder: {sorted(litter)}")
        self._litter = litter

        if installed is not None and installed != expected:
            which = "the new" if installed == new else "the old" if installed == old else "other"
            problems.append(f"outcome {fault.outcome} but {which} bytes are installed")
        try:
            wait_for(
                lambda: self.sandbox.served_version() == expected_version,
                10,
                f"version {expected_version} served",
            )
        except AssertionError:
            problems.append(
                f"outcome {fault.outcome}, yet the service serves "
                f"{self.sandbox.served_version()} instead of {expected_version}"
            )

        if installed in (old, new):
            self.installed = installed
            self.installed_version = new_version if installed == new else old_version

    def _check_staging(self, fault: Fault) -> None:
        """The attempt's files are gone from staging, whatever its outcome."""
        staged = sorted(os.listdir(self.sandbox.staging))
        if staged:
            fault.problems.append(f"left in staging after the attempt: {staged}")
        for name in staged:
            (self.sandbox.staging / name).unlink()

    def _installed_bytes(self, problems: list[str]) -> bytes | None:
        binary = self.sandbox.binary
        try:
            installed = binary.read_bytes()
            mode = binary.stat().st_mode & 0o7777
        except FileNotFoundError:
            problems.append("the install path is missing")
            return None
        if mode != 0o755:
            problems.append(f"the install path has mode {mode:o}, not 755")
        return installed

    def _check_files(self) -> list[str]:
        problems: list[str] = []
        beside = sorted(os.listdir(self.sandbox.binary.parent))
        if beside != ["dealspace"]:
            problems.append(f"beside the install path: {beside}")
        if (self.sandbox.state / "journal.json").exists():
            problems.append("the journal is still there after recovery")
        return problems

    def _check_snapshots(self) -> list[str]:
        folder = self.sandbox.snapshots
        names = sorted(os.listdir(folder)) if folder.exists() else []
        snapshots = [name for name in names if name.endswith(".db")]
        problems = [f"not a snapshot: {name}" for name in names if name not in snapshots]
        if len(snapshots) > KEEP:
            problems.append(f"{len(snapshots)} snapshots kept, more than keep = {KEEP}")
        for name in snapshots:
            answer = _integrity(folder / name)
            if answer != "ok":
                problems.append(f"snapshot {name} fails PRAGMA integrity_check: {answer}")
        return problems

    def _check_history(self) -> list[str]:
        """Every other attempt since the last check is decided, none left interrupted."""
        problems: list[str] = []
        for record in self.history.recent(100_000):
            if record.id in self._judged:
                continue
            if record.outcome is None:
                problems.append(f"attempt {record.id} unfinished (state {record.state})")
            elif record.outcome in ("interrupted", "failed"):
                problems.append(f"attempt {record.id} ended {record.outcome}: {record.reason}")
            self._judged.add(record.id)
        return problems

    def reset(self) -> None:
        """After a failure: a healthy release deployed without faults, for the next fault.

        So that one broken guarantee is counted once, not again by every fault after it.
        """
        for name in os.listdir(self.sandbox.staging):
            (self.sandbox.staging / name).unlink()
        if self.daemon.process is not None:
            self.daemon.kill()
        self.wait_unlocked()
        version, new = self.stage("good")
        self.start_command("deploy", "--version", version).join(SETTLE_TIMEOUT_SECONDS)
        self.daemon.start()
        fault = Fault("none (reset)", "", "good", 0.0)
        self.check(fault, new, version, self.history.recent(1)[0])
        if fault.problems or fault.outcome != "succeeded":
            raise RuntimeError(f"the host could not be brought back: {fault.problems}")


def _integrity(path: Path) -> str:
    uri = path.absolute().as_uri() + "?mode=ro&immutable=1"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
            return str(connection.execute("PRAGMA integrity_check").fetchone()[0])
    except sqlite3.Error as error:
        return str(error)


def _reason_kind(reason: str) -> str:
    """The gist of a rejection's reason, without the paths and numbers of one attempt."""
    if "space" in reason:
        return "no space"
    words = [word for word in reason.split() if not word.startswith("/")]
    words = [word for word in words if not any(character.isdigit() for character in word)]
    return " ".join(words)[:60]


def sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# The measured durations of a whole deploy, by the release's behaviour.


def command_durations(host: Host) -> dict[str, float]:
    # The fork server starts with the first process: not during a measured deploy.
    host.start_command("--version").join()
    durations: dict[str, float] = {}
    for behaviour in ("good", "unhealthy"):
        version, new = host.stage(behaviour)
        started = time.monotonic()
        process = host.start_command("deploy", "--version", version)
        process.join(SETTLE_TIMEOUT_SECONDS)
        durations[behaviour] = time.monotonic() - started
        fault = Fault("none (measuring)", "", behaviour, 0.0)
        host.check(fault, new, version, host.history.recent(1)[0])
        if fault.problems:
            raise RuntimeError(f"a deploy without faults broke a guarantee: {fault.problems}")
    return durations


def daemon_durations(host: Host) -> dict[str, float]:
    durations: dict[str, float] = {}
    for behaviour in ("good", "unhealthy"):
        arm_id = host.daemon.arm()["id"]
        version, new = host.stage(behaviour)
        started = time.monotonic()
        record = host.daemon.wait_outcome(arm_id, SETTLE_TIMEOUT_SECONDS)
        durations[behaviour] = time.monotonic() - started
        host.wait_idle()
        fault = Fault("none (measuring)", "", behaviour, 0.0)
        host.check(fault, new, version, host.history.get(record["id"]))
        if fault.problems:
            raise RuntimeError(f"a deploy without faults broke a guarantee: {fault.problems}")
    return durations


# The faults.


def kill_daemon(host: Host, chooser: random.Random, durations: dict[str, float]) -> Fault:
    """Arm over HTTP, stage, SIGKILL `stagewatch run` at a random instant, run it again."""
    behaviour = chooser.choice(BEHAVIOURS)
    instant = chooser.uniform(0, durations[behaviour] * SPAN)
    arm_id = host.daemon.arm()["id"]
    version, new = host.stage(behaviour)
    sleep_until(time.monotonic() + instant)
    host.daemon.kill()
    fault = Fault("kill (daemon)", "", behaviour, round(instant, 3))
    host.wait_unlocked()
    fault.step = host.step_now(arm_id, 0)

    try:
        host.daemon.start()
        host.daemon.wait_outcome(arm_id, SETTLE_TIMEOUT_SECONDS)
        host.wait_idle()
    except (AssertionError, RuntimeError, OSError) as error:
        fault.problems.append(f"the agent did not settle the attempt after a restart: {error}")
        host.daemon.kill()
        host.daemon.start()
    host.check(fault, new, version, host.history.get(arm_id))
    return fault


def kill_command(host: Host, chooser: random.Random, durations: dict[str, float]) -> Fault:
    """Stage, SIGKILL `stagewatch deploy` at a random instant, then run `deploy` again."""
    behaviour = chooser.choice(BEHAVIOURS)
    instant = chooser.uniform(0, durations[behaviour] * SPAN)
    version, new = host.stage(behaviour)
    before = host.attempts()
    process = host.start_command("deploy", "--version", version)
    sleep_until(time.monotonic() + instant)
    process.kill()
    process.join()
    fault = Fault("kill (command line)", "", behaviour, round(instant, 3))
    host.wait_unlocked()
    fault.step = host.step_now(None, before)
    _run_again(host, fault)
    attempt = host.history.recent(1)[0] if host.attempts() > before else None
    host.check(fault, new, version, attempt)
    return fault


def _run_again(host: Host, fault: Fault) -> None:
    """The next `stagewatch deploy`: it settles the interrupted attempt first."""
    following = host.start_command("deploy")
    following.join(SETTLE_TIMEOUT_SECONDS)
    if following.is_alive():
        following.kill()
        following.join()
        fault.problems.append(
            f"the next deploy command did not finish within {SETTLE_TIMEOUT_SECONDS:g} s"
        )


def disk_full(
    host: Host,
    folder: str,
    chooser: random.Random,
    durations: dict[str, dict[str, float]],
    modes: tuple[str, ...] = DISK_FULL_MODES,
) -> Fault:
    """Start a deploy (through the daemon or the command line), fill `folder` at an instant."""
    mode = chooser.choice(modes)
    through_daemon = mode == "daemon"
    behaviour = chooser.choice(BEHAVIOURS)
    instant = chooser.uniform(0, durations[mode][behaviour] * SPAN)
    before = host.attempts()
    arm_id = host.daemon.arm()["id"] if through_daemon else None
    version, new = host.stage(behaviour)
    process = None if through_daemon else host.start_command("deploy", "--version", version)
    sleep_until(time.monotonic() + instant)
    fault = Fault(f"disk full: {folder} ({mode})", "", behaviour, round(instant, 3))
    fault.step = host.step_now(arm_id, before)
    waits_before = host.daemon.log_text().count(_WAITING_FOR_SPACE) if through_daemon else 0
    filler = fill_filesystem(_mount_point(host.sandbox, folder) / ".filler")

    if process is not None:
        process.join(SETTLE_TIMEOUT_SECONDS)
        if process.is_alive():
            fault.problems.append(f"the deploy did not end within {SETTLE_TIMEOUT_SECONDS:g} s")
            process.kill()
            process.join()
    elif arm_id is not None:
        _wait_deploy_ended(host, arm_id, waits_before, fault)
    filler.unlink()

    if arm_id is not None:
        _settled_without_restart(host, arm_id, fault)
        attempt = host.history.get(arm_id)
    else:
        host.wait_unlocked()
        _run_again(host, fault)
        attempt = host.history.recent(1)[0] if host.attempts() > before else None
    host.check(fault, new, version, attempt)
    return fault


# What the daemon logs once it waits for the state folder to take its attempt's outcome.
_WAITING_FOR_SPACE = "failed again"


def _wait_deploy_ended(host: Host, arm_id: str, waits_before: int, fault: Fault) -> None:
    """Wait until the running daemon has finished with the attempt, or waits for space.

    Its log says so (`waits_before` is how often it said it waited before this fault); its
    history may not be readable while the state folder is full.
    """

    def ended_or_waiting() -> bool:
        text = host.daemon.log_text()
        return f"Deploy {arm_id} ended" in text or text.count(_WAITING_FOR_SPACE) > waits_before

    try:
        wait_for(ended_or_waiting, SETTLE_TIMEOUT_SECONDS, "the deploy to end")
    except AssertionError:
        fault.problems.append(f"the deploy did not end within {SETTLE_TIMEOUT_SECONDS:g} s")


def _settled_without_restart(host: Host, arm_id: str, fault: Fault) -> None:
    """The space is back: the running daemon must decide the attempt by itself.

    If it does not, that is a failure; the daemon is then restarted, which must settle it.
    """

    def decided() -> bool:
        record = host.history.get(arm_id)
        journal_left = (host.sandbox.state / "journal.json").exists()
        return record is not None and record.outcome is not None and not journal_left

    with contextlib.suppress(AssertionError):
        wait_for(decided, SETTLE_TIMEOUT_SECONDS, "the daemon to settle the attempt")
    record = host.history.get(arm_id)
    journal_left = (host.sandbox.state / "journal.json").exists()
    if record is not None and record.outcome is not None and not journal_left:
        try:
            host.wait_idle()
            return
        except AssertionError:
            fault.problems.append("the daemon did not become idle after the attempt ended")
    else:
        where = f"its journal at {host.step_now(None, 0)}" if journal_left else "no journal"
        state = record.state if record is not None else "no record"
        fault.problems.append(
            f"the running daemon left attempt {arm_id} undecided (record {state}, {where}) "
            f"once the disk was full; settled only by a restart of the agent"
        )
    host.daemon.kill()
    host.wait_unlocked()
    host.daemon.start()
    try:
        host.daemon.wait_outcome(arm_id, SETTLE_TIMEOUT_SECONDS)
        host.wait_idle()
    except (AssertionError, RuntimeError, OSError) as error:
        fault.problems.append(f"even a restart did not settle the attempt: {error}")


def _mount_point(sandbox: Sandbox, folder: str) -> Path:
    return {
        "snapshots": sandbox.snapshots,
        "install": sandbox.binary.parent,
        "state": sandbox.state,
    }[folder]


# Workers: each runs its share of the faults on a host of its own.


def kill_worker(root: Path, count: int, seed: int, daemon_share: float) -> list[Fault]:
    chooser = random.Random(seed)
    host = Host(root / f"kills-{seed}")
    faults: list[Fault] = []
    try:
        by_command = command_durations(host)
        host.daemon.start()
        by_daemon = daemon_durations(host)
        _progress(
            f"seed {seed}: deploys take {_durations(by_command)} by the command line, "
            f"{_durations(by_daemon)} through the daemon"
        )
        for number in range(1, count + 1):
            started = time.monotonic()
            if chooser.random() < daemon_share:
                fault = kill_daemon(host, chooser, by_daemon)
            else:
                # The daemon keeps running: unarmed, it leaves the staged pair to the command.
                fault = kill_command(host, chooser, by_command)
            fault.seconds = round(time.monotonic() - started, 2)
            faults.append(fault)
            _report(f"seed {seed}", number, count, fault)
            if not fault.survived:
                host.reset()
    finally:
        host.close()
    return faults


def disk_full_worker(
    root: Path, count: int, seed: int, folders: list[str], modes: tuple[str, ...]
) -> list[Fault]:
    chooser = random.Random(seed)
    faults: list[Fault] = []
    durations: dict[str, dict[str, float]] = {}
    for folder in folders:

        def mount(sandbox: Sandbox, folder: str = folder) -> None:
            point = _mount_point(sandbox, folder)
            point.mkdir(parents=True, exist_ok=True)
            size = DISK_FULL_FOLDERS[folder]
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(point)],
                check=True,
            )

        host = Host(root / f"disk-full-{folder}", prepare=mount)
        try:
            # Which folder is small changes little in how long a deploy takes: the first
            # host's durations serve the others.
            if "command line" in modes and "command line" not in durations:
                durations["command line"] = command_durations(host)
            if "daemon" in modes:
                host.daemon.start()
                if "daemon" not in durations:
                    durations["daemon"] = daemon_durations(host)
            for number in range(1, count + 1):
                started = time.monotonic()
                fault = disk_full(host, folder, chooser, durations, modes)
                fault.seconds = round(time.monotonic() - started, 2)
                faults.append(fault)
                _report(f"disk full {folder}", number, count, fault)
                if not fault.survived:
                    host.reset()
        finally:
            host.close()
    return faults


def _durations(durations: dict[str, float]) -> str:
    return ", ".join(f"{behaviour} {seconds:.2f} s" for behaviour, seconds in durations.items())


def _progress(line: str) -> None:
    print(f"torture: {line}", file=sys.stderr, flush=True)


def _report(worker: str, number: int, count: int, fault: Fault) -> None:
    verdict = "survived" if fault.survived else f"FAILED: {'; '.join(fault.problems)}"
    _progress(
        f"{worker} {number}/{count}: {fault.fault} at {fault.step} "
        f"({fault.behaviour}, {fault.instant_seconds:.2f} s in), {fault.outcome}: {verdict} "
        f"[{fault.seconds:.1f} s]"
    )


# The run: workers in parallel, then the table.


def render(faults: list[Fault]) -> str:
    table: dict[tuple[str, str], Counter[str]] = {}
    for fault in faults:
        counts = table.setdefault((fault.fault, fault.step), Counter())
        counts["injected"] += 1
        counts["survived" if fault.survived else "failed"] += 1

    def order(key: tuple[str, str]) -> tuple[str, int]:
        fault, step = key
        return fault, STEP_ORDER.index(step) if step in STEP_ORDER else len(STEP_ORDER)

    lines = ["| fault | step | injected | survived | failed |", "| --- | --- | --- | --- | --- |"]
    for key in sorted(table, key=order):
        counts = table[key]
        lines.append(
            f"| {key[0]} | {key[1]} | {counts['injected']} | {counts['survived']} "
            f"| {counts['failed']} |"
        )
    survived = sum(fault.survived for fault in faults)
    lines.append(f"| **all** | | {len(faults)} | {survived} | {len(faults) - survived} |")

    outcomes = Counter(fault.outcome for fault in faults)
    lines += ["", "Outcomes: " + ", ".join(f"{name} {n}" for name, n in outcomes.most_common())]
    notes = Counter(note.partition(":")[0] for fault in faults for note in fault.notes)
    if notes:
        lines += ["", "Noted (not failures): " + ", ".join(f"{n} {k}" for k, n in notes.items())]
    failures = [fault for fault in faults if not fault.survived]
    if failures:
        lines += ["", "Failures:"]
        lines += [
            f"- {fault.fault} at {fault.step} ({fault.behaviour}, {fault.instant_seconds} s in): "
            + "; ".join(fault.problems)
            for fault in failures
        ]
    return "\n".join(lines) + "\n"


def _worker_argv(kind: str, count: int, seed: int, output: Path, work: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    argv += ["--count", str(count), "--seed", str(seed)]
    return [*argv, "--output", str(output), "--work", str(work)]


def run(arguments: argparse.Namespace) -> int:
    seed = arguments.seed if arguments.seed is not None else random.randrange(1_000_000)
    work = arguments.work or Path(tempfile.mkdtemp(prefix="stagewatch-torture-"))
    work.mkdir(parents=True, exist_ok=True)
    _progress(
        f"seed {seed}, {arguments.kills} kills on {arguments.jobs} hosts, "
        f"{arguments.disk_full} disk-full runs per folder, in {work}"
    )

    workers: list[tuple[subprocess.Popen[bytes], Path]] = []
    # Each worker's hosts take their ports from a block of its own.
    blocks = iter(port_blocks(arguments.jobs + 1))
    shares = [arguments.kills // arguments.jobs] * arguments.jobs
    for index in range(arguments.kills % arguments.jobs):
        shares[index] += 1
    for index, share in enumerate(shares):
        if share:
            output = work / f"kills-{index}.json"
            argv = _worker_argv("kills", share, seed + index, output, work)
            argv += ["--daemon-share", str(arguments.daemon_share)]
            workers.append((subprocess.Popen(argv, env=_with_ports(next(blocks))), output))
    if arguments.disk_full:
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            _progress("disk-full runs skipped: they need root and unshare(1) to mount tmpfs")
        else:
            output = work / "disk-full.json"
            argv = ["unshare", "--mount", "--propagation", "private", "--"]
            argv += _worker_argv("disk-full", arguments.disk_full, seed + 1000, output, work)
            argv += ["--folders", arguments.folders, "--modes", arguments.modes]
            workers.append((subprocess.Popen(argv, env=_with_ports(next(blocks))), output))

    faults: list[Fault] = []
    broken: list[str] = []
    for process, output in workers:
        if process.wait() != 0 or not output.exists():
            broken.append(f"worker {output.stem} exited with status {process.returncode}")
            continue
        faults += [Fault(**item) for item in json.loads(output.read_text())]

    print(render(faults), end="")
    for line in broken:
        print(f"**{line}**: its faults are missing from the table")
    if arguments.json is not None:
        document = {"seed": seed, "faults": [asdict(fault) for fault in faults], "broken": broken}
        arguments.json.write_text(json.dumps(document, indent=1) + "\n")
    if arguments.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if faults and not broken and all(fault.survived for fault in faults) else 1


def _with_ports(block: str) -> dict[str, str]:
    return {**os.environ, PORTS_VARIABLE: block}


def run_worker(arguments: argparse.Namespace) -> int:
    # Everything a deploy imports, and this module itself, so that a forked child starts
    # the deploy at once instead of importing first.
    FORK_SERVER.set_forkserver_preload(
        ["__main__", "stagewatch.cli", "stagewatch.engine", "stagewatch.daemon", "deploy_child"]
    )
    if arguments.worker == "kills":
        faults = kill_worker(
            arguments.work, arguments.count, arguments.seed, arguments.daemon_share
        )
    else:
        faults = disk_full_worker(
            arguments.work,
            arguments.count,
            arguments.seed,
            arguments.folders.split(","),
            tuple(arguments.modes.split(",")),
        )
    arguments.output.write_text(json.dumps([asdict(fault) for fault in faults]))
    return 0


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="deploys SIGKILLed (default 50)")
    parser.add_argument(
        "--disk-full", type=int, default=0, metavar="M", help="disk-full runs per folder"
    )
    parser.add_argument(
        "--folders",
        default=",".join(DISK_FULL_FOLDERS),
        help=f"the folders filled up, of {', '.join(DISK_FULL_FOLDERS)} (default all)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(DISK_FULL_MODES),
        help="how disk-full deploys are run: daemon, command line (default both)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="hosts run side by side (default 2)")
    parser.add_argument("--seed", type=int, help="for a run that repeats this one's choices")
    parser.add_argument("--daemon-share", type=float, default=0.5, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every fault here")
    parser.add_argument("--work", type=Path, metavar="DIR", help="keep the hosts in DIR")
    parser.add_argument("--worker", choices=("kills", "disk-full"), help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if set(arguments.folders.split(",")) - set(DISK_FULL_FOLDERS):
        parser.error(f"--folders: choose among {', '.join(DISK_FULL_FOLDERS)}")
    if set(arguments.modes.split(",")) - set(DISK_FULL_MODES):
        parser.error(f"--modes: choose among {', '.join(DISK_FULL_MODES)}")
    if arguments.jobs < 1 or arguments.kills < 0 or arguments.disk_full < 0:
        parser.error("--jobs must be at least 1, --kills and --disk-full at least 0")
    return arguments


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    if arguments.worker is not None:
        return run_worker(arguments)
    return run(arguments)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
