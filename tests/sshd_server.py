"""A real OpenSSH server on 127.0.0.1 for tests, with a key-only deploy user.

    from sshd_server import running_sshd, sshd_missing_reason

    with running_sshd(base_folder) as server:
        subprocess.run(["scp", *server.copy_options(), "file", server.remote(path)], check=True)

`running_sshd` starts Debian's sshd in the foreground (`sshd -D -e -f CONFIG`) on a free
loopback port, with its own host key, configuration, authorized keys and pid file, all in
`base_folder`. Only the deploy user `swdeploy` may log in, with the generated client key.
The server is stopped by its PID when the block ends. Needs root (sshd changes to the user).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sandbox import free_port

SSHD = Path("/usr/sbin/sshd")
DEPLOY_USER = "swdeploy"

# sshd(8) refuses to start without its privilege separation folder, a path fixed when
# Debian built it; systemd's RuntimeDirectory= creates it on a booted host.
PRIVILEGE_SEPARATION_DIR = Path("/run/sshd")

# The shadow password field of a key-only account. useradd's default, "!", marks the account
# locked on Linux, and without PAM sshd refuses a locked account whatever the authentication
# (sshd(8), AUTHENTICATION); "*" matches no password and locks nothing.
_NO_PASSWORD = "*"

_CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
AllowUsers {user}
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
# The test folders live below /tmp, which is writable by all: strict mode would refuse the
# authorized keys file for that reason alone (sshd_config(5), StrictModes).
StrictModes no
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""


def sshd_missing_reason() -> str | None:
    """Why the server cannot run here, in one line; None when it can."""
    if not SSHD.exists():
        return f"OpenSSH server not installed ({SSHD} is absent)"

    return None


@dataclass(frozen=True)
class SshServer:
    """A running server and what a client needs to reach it as the deploy user."""

    port: int
    user: pwd.struct_passwd
    client_key: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    host: str = "127.0.0.1"

    def client_options(self) -> list[str]:
        """Options common to ssh, scp and sftp: this key only, no host key prompts."""
        return [
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(self.client_key),
        ]

    def ssh_command(self) -> list[str]:
        """`ssh` to the deploy user, ready for a remote command to be appended."""
        return ["ssh", "-p", str(self.port), *self.client_options(), self.login]

    def copy_options(self) -> list[str]:
        """Options for scp and sftp, which both take the port as -P."""
        return ["-P", str(self.port), *self.client_options()]

    def rsync_shell(self) -> str:
        """The `rsync -e` value: ssh on this port with this key."""
        return " ".join(["ssh", "-p", str(self.port), *self.client_options()])

    @property
    def login(self) -> str:
        return f"{self.user.pw_name}@{self.host}"

    def remote(self, path: Path) -> str:
        """`user@host:path`, as scp and rsync take a destination."""
        return f"{self.login}:{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def writable_folder(self, path: Path) -> Path:
        """Create `path`, owned by the deploy user and readable by all (the watcher runs as
        another user), and return it."""
        path.mkdir(mode=0o755)
        os.chown(path, self.user.pw_uid, self.user.pw_gid)
        return path


def ensure_deploy_user(name: str = DEPLOY_USER) -> pwd.struct_passwd:
    """The system user `name`, created if missing, with a shell and a login sshd accepts.

    scp in legacy mode and rsync run a command through the user's shell, so a user kept
    from earlier runs without one is given /bin/sh, and a locked password field is set to
    "no password" (keys only).
    """
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--shell",
                "/bin/sh",
                "--home-dir",
                "/nonexistent",
                "--no-create-home",
                "--password",
                _NO_PASSWORD,
                name,
            ],
            check=True,
        )
        return pwd.getpwnam(name)

    if user.pw_shell != "/bin/sh" or _password_field(name).startswith("!"):
        subprocess.run(
            ["usermod", "--shell", "/bin/sh", "--password", _NO_PASSWORD, name], check=True
        )
    return pwd.getpwnam(name)


def _password_field(name: str) -> str:
    for line in Path("/etc/shadow").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields[1]

    return ""


@contextmanager
def traversable(path: Path) -> Iterator[None]:
    """Let every user pass through `path` and the folders above it (search permission only,
    no listing); the modes are restored at exit."""
    changed: list[tuple[Path, int]] = []
    try:
        for folder in (path, *path.parents):
            mode = stat.S_IMODE(folder.stat().st_mode)
            if mode & stat.S_IXOTH:
                continue
            folder.chmod(mode | stat.S_IXOTH)
            changed.append((folder, mode))
        yield
    finally:
        for folder, mode in reversed(changed):
            folder.chmod(mode)


@contextmanager
def running_sshd(base: Path) -> Iterator[SshServer]:
    """Start sshd with its files in `base` (an empty folder); stop it by its PID at exit."""
    user = ensure_deploy_user()
    host_key = _new_key(base / "host_key")
    client_key = _new_key(base / "client_key")
    authorized_keys = base / "authorized_keys"
    shutil.copyfile(client_key.with_suffix(".pub"), authorized_keys)
    authorized_keys.chmod(0o644)  # sshd reads it as the deploy user
    PRIVILEGE_SEPARATION_DIR.mkdir(mode=0o755, exist_ok=True)

    with traversable(base):
        server = _start(base, user, host_key, client_key, authorized_keys)
        try:
            yield server
        finally:
            server.process.terminate()
            try:
                server.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


def _new_key(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )
    return path


def _start(
    base: Path,
    user: pwd.struct_passwd,
    host_key: Path,
    client_key: Path,
    authorized_keys: Path,
) -> SshServer:
    """Start sshd on a free port, trying another if the one picked was taken meanwhile."""
    for attempt in range(3):
        port = free_port()
        config = base / f"sshd_config.{attempt}"
        config.write_text(
            _CONFIG.format(
                port=port,
                host_key=host_key,
                pid_file=base / "sshd.pid",
                authorized_keys=authorized_keys,
                user=user.pw_name,
            )
        )
        log_path = base / f"sshd.{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = SshServer(port, user, client_key, log_path, process)
        if _wait_until_listening(server):
            return server

    raise RuntimeError(f"sshd did not start; its last log:\n{server.log()}")


def _wait_until_listening(server: SshServer, timeout: float = 10.0) -> bool:
    """True once sshd says it listens; False if it exited (its port was taken, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"Server listening on {server.host} port {server.port}" in server.log():
            return True
        if server.process.poll() is not None:
            return False
        time.sleep(0.02)

    server.process.kill()
    server.process.wait()
    raise RuntimeError(f"sshd did not listen within {timeout:g} s; its log:\n{server.log()}")
