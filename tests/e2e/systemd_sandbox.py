"""The machinery of the end-to-end suite: a booted systemd, and production set up inside it.

SystemdSandbox boots systemd 252 as PID 1 of a throwaway overlay of this host
(boot_systemd.sh says how the host is kept out of reach), runs commands in it through
nsenter(1), and tears it down leaving no process, mount or cgroup behind. Production is that
machine once conftest.py has set it up as an operator would, with the build machine's side
of a deploy: scp into staging, the webhook, and a look at what is running.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sandbox import wait_for

CHECKOUT = Path(__file__).resolve().parents[2]
BOOT_SCRIPT = Path(__file__).with_name("boot_systemd.sh")
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_SECONDS = 30.0

VENV = "/opt/stagewatch/venv"
VENV_PYTHON = f"{VENV}/bin/python"
STAGEWATCH = f"{VENV}/bin/stagewatch"
CONFIG = "/etc/stagewatch/stagewatch.toml"
SECRET = "/etc/stagewatch/webhook-secret"
DEPLOY_KEYS = "/etc/stagewatch/deploy_authorized_keys"
STAGING = "/opt/dealspace/staging"
BINARY = "/opt/dealspace/bin/dealspace"
DATA_DIR = "/opt/dealspace/data"
DATABASE = f"{DATA_DIR}/dealspace.db"
STATE_DIR = "/var/lib/stagewatch"
SNAPSHOT_DIR = f"{STATE_DIR}/snapshots"
RELEASES_DIR = "/srv/releases"

# What the suite runs, inside the sandbox or as the build machine (Debian packages systemd,
# util-linux, dbus, polkitd, openssh-server, openssh-client, curl, sqlite3, python3-venv).
REQUIRED_PROGRAMS = (
    "/lib/systemd/systemd",
    "/usr/bin/unshare",
    "/usr/bin/nsenter",
    "/usr/sbin/pivot_root",
    "/usr/bin/dbus-daemon",
    "/usr/lib/polkit-1/polkitd",
    "/usr/sbin/sshd",
    "/usr/bin/scp",
    "/usr/bin/curl",
    "/usr/bin/sqlite3",
    "/usr/bin/python3",
)


def require_root() -> None:
    """Skip (fail under CI=true) unless this process is root and every program is installed."""
    problems = []
    if os.geteuid() != 0:
        problems.append("they need root (they boot systemd in a private overlay)")
    for program in REQUIRED_PROGRAMS:
        if not Path(program).exists():
            problems.append(f"{program} is missing")

    if not problems:
        return
    reason = "end-to-end tests: " + "; ".join(problems)
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (CI=true: they must run)")
    pytest.skip(reason)


class SystemdSandbox:
    """A booted systemd in its own namespaces; commands reach it through nsenter(1)."""

    def __init__(self, base: Path, log_path: Path) -> None:
        self.base = base
        self.log_path = log_path
        self.cgroup = _make_cgroup()
        self.pid = 0
        self._launcher: subprocess.Popen[bytes] | None = None

    def boot(self) -> None:
        """Start systemd and wait until it reached basic.target."""
        self.base.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # The launcher joins the sandbox's cgroup before unshare(1) makes that cgroup the
            # root of the new cgroup namespace.
            self._launcher = subprocess.Popen(
                [
                    "sh",
                    "-c",
                    'echo $$ > "$1/cgroup.procs" && shift && exec "$@"',
                    "sh",
                    str(self.cgroup),
                    "unshare",
                    "--pid",
                    "--fork",
                    "--mount",
                    "--uts",
                    "--ipc",
                    "--cgroup",
                    "--propagation",
                    "private",
                    "sh",
                    str(BOOT_SCRIPT),
                    str(self.base),
                    str(CHECKOUT),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = wait_for(self._systemd_pid, BOOT_SECONDS, "systemd to start in the sandbox")
        # systemctl reaches PID 1 through this socket, which systemd makes a moment later.
        wait_for(
            lambda: self.path("/run/systemd/private").exists(),
            BOOT_SECONDS,
            "systemd's private socket",
        )
        state = self.run(
            "systemctl", "is-system-running", "--wait", check=False, timeout=BOOT_SECONDS
        )
        assert state.stdout.strip() in ("running", "degraded"), self.describe_failure(state)

    def _systemd_pid(self) -> int | None:
        assert self._launcher is not None
        if self._launcher.poll() is not None:
            pytest.fail(f"the sandbox did not boot: {self.log_path.read_text()[-2000:]}")
        children = Path(f"/proc/{self._launcher.pid}/task/{self._launcher.pid}/children")
        with contextlib.suppress(OSError):
            for word in children.read_text().split():
                comm = Path(f"/proc/{word}/comm").read_text().strip()
                if comm == "systemd":
                    return int(word)
        return None

    def save_journal(self, target: Path) -> None:
        """Write the whole journal of this boot to `target`, for a look after a failure."""
        if not self.pid:
            return
        with target.open("w") as output:
            subprocess.run(
                self.command(["journalctl", "-b", "-o", "short-precise", "--no-pager"]),
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=60,
                check=False,
            )

    def shutdown(self) -> None:
        """Kill systemd (and so every process of its PID namespace) and remove the cgroups."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        # Also whatever a boot that failed half-way left running, the launcher included:
        # writing 1 to cgroup.kill kills every process of the subtree (cgroups(7)).
        kill_switch = self.cgroup / "cgroup.kill"
        if kill_switch.exists():
            kill_switch.write_text("1")
        if self._launcher is not None:
            self._launcher.wait(timeout=30)
        wait_for(self._remove_cgroups, 30, f"the processes of {self.cgroup} to go")

        leftover = [line for line in _mount_table() if str(self.base) in line]
        assert not leftover, f"mounts left behind on the host: {leftover}"

    def _remove_cgroups(self) -> bool:
        folders = sorted(
            (path for path in self.cgroup.rglob("*") if path.is_dir()),
            key=lambda path: len(path.parts),
            reverse=True,
        )
        for folder in [*folders, self.cgroup]:
            with contextlib.suppress(FileNotFoundError):
                try:
                    folder.rmdir()
                except OSError:
                    return False
        return True

    def command(self, argv: Sequence[str], user: str | None = None) -> list[str]:
        """The host's argv that runs `argv` inside the sandbox, as root or as `user`."""
        prefix = ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-i", "-r", "-w"]
        environment = ["env", "-i", f"PATH={SANDBOX_PATH}", "LANG=C.UTF-8", "SYSTEMD_COLORS=0"]
        if user is not None:
            # setpriv(1), not su or runuser: no PAM session, no logind, the plain credentials.
            identity = [
                "setpriv",
                f"--reuid={user}",
                f"--regid={user}",
                "--init-groups",
                "--",
            ]
            return [*prefix, *environment, f"HOME={STATE_DIR}", *identity, *argv]
        return [*prefix, *environment, "HOME=/root", *argv]

    def run(
        self,
        *argv: str,
        user: str | None = None,
        input: str | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the sandbox; with `check`, fail the test when it exits non-zero."""
        completed = subprocess.run(
            self.command(argv, user),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and completed.returncode != 0:
            pytest.fail(self.describe_failure(completed))
        return completed

    def describe_failure(self, completed: subprocess.CompletedProcess[str]) -> str:
        inside = completed.args[completed.args.index("-w") + 1 :]
        return (
            f"{' '.join(inside)} exited {completed.returncode}\n"
            f"--- stdout\n{completed.stdout[-4000:]}\n--- stderr\n{completed.stderr[-4000:]}"
        )

    def path(self, inside: str) -> Path:
        """The host's path of the sandbox's `inside` (through /proc/PID/root)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644, owner: str = "root") -> None:
        """Create or replace a file inside the sandbox, with its parents."""
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
        self.run("chown", f"{owner}:", inside)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show UNIT` of `properties`, as a dictionary."""
        shown = self.run("systemctl", "show", unit, "--property=" + ",".join(properties))
        pairs = (line.partition("=") for line in shown.stdout.splitlines())
        return {key: value for key, _, value in pairs}

    def main_pid(self, unit: str) -> int:
        return int(self.show(unit, "MainPID")["MainPID"])

    def journal(self, unit: str, since_cursor: str | None = None) -> list[dict[str, Any]]:
        """The journal entries of `unit`, oldest first, as journalctl -o json gives them."""
        argv = ["journalctl", "--no-pager", "-o", "json", "-u", unit]
        if since_cursor:
            argv += ["--after-cursor", since_cursor]
        output = self.run(*argv).stdout
        return [json.loads(line) for line in output.splitlines() if line.strip()]


def _make_cgroup() -> Path:
    """A new cgroup on the host's cgroup2 hierarchy, for the sandbox's systemd to manage."""
    for line in _mount_table():
        fields = line.split()
        if fields[2] == "cgroup2":
            folder = Path(fields[1]) / f"stagewatch-e2e-{uuid.uuid4().hex[:12]}"
            folder.mkdir()
            return folder
    pytest.fail("no cgroup2 hierarchy is mounted on this host; systemd 252 needs one")


def _mount_table() -> list[str]:
    return Path("/proc/self/mounts").read_text().splitlines()


@dataclass
class Production:
    """The sandbox set up as production, with what the tests need to act as the build machine."""

    sandbox: SystemdSandbox
    client_folder: Path
    webhook_port: int
    service_port: int
    ssh_port: int
    install_output: str
    releases: dict[str, str] = field(default_factory=dict)

    @property
    def secret(self) -> str:
        return self.sandbox.path(SECRET).read_text().strip()

    @property
    def ssh_key(self) -> Path:
        return self.client_folder / "deploy_key"

    def ssh_options(self) -> list[str]:
        """Options for ssh, scp and sftp: this key only, the sandbox's pinned host key."""
        return [
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"IdentityFile={self.ssh_key}",
            "-o",
            f"UserKnownHostsFile={self.client_folder / 'known_hosts'}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=10",
        ]

    def client(self, program: str, *arguments: str) -> list[str]:
        """The argv of ssh, scp or sftp to the sandbox's sshd; `arguments` follow the options."""
        port_option = "-p" if program == "ssh" else "-P"
        return [program, *self.ssh_options(), port_option, str(self.ssh_port), *arguments]

    def release(self, version: str, behaviour: str = "good") -> Path:
        """A release "binary" made by the sample service, on the host side; cached by name."""
        name = f"{version}-{behaviour}"
        inside = f"{RELEASES_DIR}/{name}/dealspace"
        if name not in self.releases:
            self.sandbox.run("mkdir", "-p", f"{RELEASES_DIR}/{name}")
            self.sandbox.run(
                VENV_PYTHON,
                "-m",
                "stagewatch.sample_service",
                "release",
                inside,
                "--port",
                str(self.service_port),
                "--database",
                DATABASE,
                "--version",
                version,
                "--behaviour",
                behaviour,
            )
            digest = hashlib.sha256(self.sandbox.path(inside).read_bytes()).hexdigest()
            self.sandbox.path(f"{inside}.sha256").write_text(f"{digest}  dealspace\n")
            self.releases[name] = digest

        local = self.client_folder / name
        local.mkdir(exist_ok=True)
        shutil.copy(self.sandbox.path(inside), local / "dealspace")
        shutil.copy(self.sandbox.path(f"{inside}.sha256"), local / "dealspace.sha256")
        return local / "dealspace"

    def sha256(self, version: str, behaviour: str = "good") -> str:
        return self.releases[f"{version}-{behaviour}"]

    def push(self, artifact: Path) -> None:
        """What the build machine does: scp the binary and its checksum into staging."""
        completed = subprocess.run(
            self.client(
                "scp",
                str(artifact),
                str(artifact.with_name("dealspace.sha256")),
                f"deploy@127.0.0.1:{STAGING}/",
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 0, f"scp failed: {completed.stderr}"

    def arm(self, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST /deploy with the secret in X-Webhook-Secret, through curl; the 202 answer."""
        completed = subprocess.run(
            [
                "curl",
                "--silent",
                "--show-error",
                "--max-time",
                "10",
                "--write-out",
                "\n%{http_code}",
                "--header",
                f"X-Webhook-Secret: {self.secret}",
                "--header",
                "Content-Type: application/json",
                "--data",
                json.dumps(body or {}),
                f"http://127.0.0.1:{self.webhook_port}/deploy",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert completed.returncode == 0, f"curl failed: {completed.stderr}"
        answer, _, status = completed.stdout.rpartition("\n")
        assert status == "202", f"POST /deploy answered {status}: {answer}"
        document: dict[str, Any] = json.loads(answer)
        return document

    def get(self, path: str) -> tuple[int, Any]:
        """An authenticated GET of the webhook; the status and the JSON answer."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.webhook_port}{path}",
            headers={"X-Webhook-Secret": self.secret},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def finished(self, deploy_id: str) -> dict[str, Any] | None:
        """The history record of `deploy_id` once it has an outcome, else None."""
        status, record = self.get(f"/deploys/{deploy_id}")
        if status != 200 or not record.get("finished_at"):
            return None
        return dict(record)

    def history(self) -> list[dict[str, Any]]:
        """`stagewatch history --json`, run by root as an operator would."""
        output = self.sandbox.run(STAGEWATCH, "history", "--json").stdout
        records: list[dict[str, Any]] = json.loads(output)
        return records

    def serving_version(self) -> str | None:
        """The version the running dealspace answers on /healthz, None when it does not."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.service_port}/healthz", timeout=2
            ) as response:
                version: str = json.loads(response.read())["version"]
                return version
        except (OSError, ValueError, KeyError):
            return None

    def installed_sha256(self) -> str:
        return hashlib.sha256(self.sandbox.path(BINARY).read_bytes()).hexdigest()


DEALSPACE_UNIT = """\
[Unit]
Description=dealspace (the sample service standing in for it)

[Service]
User=dealspace
Group=dealspace
ExecStart=/opt/dealspace/bin/dealspace
# systemd's own RestartSec= and start limits, as most units have them: a release that exits
# at once makes the unit hit its start limit within half a second.
Restart=always
# The database and its -wal and -shm are made 0640: group dealspace (which stagewatch joins)
# reads them, nobody else does.
UMask=0027

[Install]
WantedBy=multi-user.target
"""

OTHER_UNIT = """\
[Unit]
Description=a unit that stagewatch must not be able to touch

[Service]
ExecStart=/bin/sleep infinity
"""

SSHD_UNIT = """\
[Unit]
Description=sshd with the packaging's deploy configuration, on 127.0.0.1:{port}
Requires=opt-stagewatch-chroot-opt-dealspace-staging.mount
After=opt-stagewatch-chroot-opt-dealspace-staging.mount

[Service]
ExecStart=/usr/sbin/sshd -D -e -p {port} -o ListenAddress=127.0.0.1
RuntimeDirectory=sshd
RuntimeDirectoryMode=0755
"""


def e2e_configuration(webhook_port: int, service_port: int, stable_seconds: float = 2) -> str:
    """The configuration of the tests: the packaged paths, short windows, local ports."""
    return f"""\
# The end-to-end suite's configuration: production paths, short health windows.
[service]
unit = "dealspace.service"
binary = "{BINARY}"
restart_timeout_seconds = 30

[staging]
dir = "{STAGING}"
settle_seconds = 0.5
arm_timeout_seconds = 120

[database]
path = "{DATABASE}"
snapshot_dir = "{SNAPSHOT_DIR}"
keep = 3

[webhook]
listen = "127.0.0.1:{webhook_port}"

[health]
timeout_seconds = 8
stable_seconds = {stable_seconds:g}
url = "http://127.0.0.1:{service_port}/healthz"

[state]
dir = "{STATE_DIR}"
keep_releases = 3
"""


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0
