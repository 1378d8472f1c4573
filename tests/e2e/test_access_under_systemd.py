"""What the packaging lets each account do, tried for real: polkit for stagewatch, sshd for deploy.

The agent's user may start, stop, restart and reset dealspace.service and nothing else; the
build machine's key may upload into staging over SFTP and nothing else: no shell, no
terminal, no forwarding, no file outside staging.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from sandbox import free_port, wait_for
from systemd_sandbox import STAGING, Production, accepts

pytestmark = pytest.mark.e2e


def test_stagewatch_may_restart_stop_start_and_reset_dealspace(production: Production) -> None:
    sandbox = production.sandbox
    before = sandbox.main_pid("dealspace.service")

    _as_stagewatch(production, "restart", "dealspace.service")
    restarted = sandbox.main_pid("dealspace.service")
    assert restarted not in (0, before)

    _as_stagewatch(production, "stop", "dealspace.service")
    assert sandbox.show("dealspace.service", "ActiveState") == {"ActiveState": "inactive"}

    _as_stagewatch(production, "start", "dealspace.service")
    assert sandbox.show("dealspace.service", "ActiveState") == {"ActiveState": "active"}
    _as_stagewatch(production, "reset-failed", "dealspace.service")
    wait_for(lambda: production.serving_version() == "1.0.0", 15, "dealspace to serve again")


@pytest.mark.parametrize(
    "verb, unit",
    [
        ("restart", "e2e-other.service"),
        ("stop", "e2e-other.service"),
        ("reset-failed", "e2e-other.service"),
        ("stop", "stagewatch.service"),
        ("restart", "e2e-sshd.service"),
        ("kill", "dealspace.service"),
        ("reload", "dealspace.service"),
        ("daemon-reload", None),
    ],
)
def test_stagewatch_is_refused_other_units_and_verbs(
    production: Production, verb: str, unit: str | None
) -> None:
    sandbox = production.sandbox
    watched = unit or "e2e-other.service"
    before = sandbox.show(watched, "MainPID", "ActiveState")

    refused = _as_stagewatch(production, verb, *([unit] if unit else []), check=False)

    assert refused.returncode != 0, refused.stdout
    assert (
        "Access denied" in refused.stderr or "Interactive authentication required" in refused.stderr
    ), refused.stderr
    assert sandbox.show(watched, "MainPID", "ActiveState") == before


def test_deploy_key_runs_no_command_but_the_sftp_server(production: Production) -> None:
    answer = _ssh(production, command=["id; echo shell-reached"], stdin=b"")

    # What sshd answers a session that is not an SFTP subsystem under ForceCommand
    # internal-sftp: the command is never run, by a shell or otherwise.
    assert answer.stdout == b"This service allows sftp connections only.\n", answer
    assert answer.returncode != 0


def test_deploy_key_gets_no_terminal(production: Production) -> None:
    answer = _ssh(production, options=["-tt"], stdin=b"")

    assert b"PTY allocation request failed" in answer.stderr, answer.stderr


def test_legacy_scp_protocol_cannot_run_scp_on_the_server(
    production: Production, tmp_path: Path
) -> None:
    # scp -O speaks the old protocol: it asks the server to run `scp -t DIR`, which the
    # forced internal-sftp never does. OpenSSH 9's scp uses SFTP and works (the deploy tests).
    probe = tmp_path / "dealspace-legacy"
    probe.write_text("not a release\n")

    copied = subprocess.run(
        production.client("scp", "-O", str(probe), f"deploy@127.0.0.1:{STAGING}/"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert copied.returncode != 0, copied
    assert not production.sandbox.path(f"{STAGING}/{probe.name}").exists()


def test_deploy_key_cannot_forward_a_port_through_stdio(production: Production) -> None:
    target = f"127.0.0.1:{production.ssh_port}"

    answer = _ssh(production, options=["-W", target], stdin=b"", timeout=20)

    assert answer.returncode != 0, answer
    assert b"SSH-2.0" not in answer.stdout, "the forwarded connection reached sshd"
    assert b"prohibited" in answer.stderr, answer.stderr


def test_deploy_key_cannot_forward_a_local_port(production: Production) -> None:
    local_port = free_port()
    forward = f"{local_port}:127.0.0.1:{production.ssh_port}"
    client = subprocess.Popen(
        production.client("ssh", "-N", "-L", forward, "deploy@127.0.0.1"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # The client listens locally whatever the server allows; the server decides when a
        # connection arrives through it.
        wait_for(lambda: accepts(local_port), 15, "the local end of the forward")
        with socket.create_connection(("127.0.0.1", local_port), timeout=10) as connection:
            received = connection.recv(64)
    finally:
        client.terminate()
        _, errors = client.communicate(timeout=10)

    assert b"SSH-2.0" not in received, "the forwarded connection reached sshd"
    assert b"prohibited" in errors, errors


def test_deploy_key_cannot_forward_a_remote_port(production: Production) -> None:
    forward = f"0:127.0.0.1:{production.ssh_port}"

    answer = _ssh(
        production, options=["-N", "-o", "ExitOnForwardFailure=yes", "-R", forward], stdin=b""
    )

    assert answer.returncode != 0, answer
    assert b"forwarding failed" in answer.stderr, answer.stderr


ESCAPES = ["/tmp/escaped", "/escaped", "/opt/escaped", "/opt/dealspace/escaped", "/etc/escaped"]


def test_deploy_key_can_write_only_into_staging(production: Production, tmp_path: Path) -> None:
    sandbox = production.sandbox
    probe = tmp_path / "probe.txt"
    probe.write_text("not a release\n")

    for command in (
        *(f"put {probe} {target}" for target in ESCAPES),
        f"put {probe} {STAGING}/../escaped",
        f"mkdir {STAGING}/folder",
        f"symlink /etc/passwd {STAGING}/link",
        f"hardlink /etc/passwd {STAGING}/link",
    ):
        refused = _sftp(production, command)
        assert refused.returncode != 0, f"{command} was allowed: {refused.stdout}"

    listing = _sftp(production, "ls -1 /")
    assert _names(listing.stdout) == ["opt"], listing.stdout

    accepted = _sftp(production, f"put {probe} {STAGING}/probe.txt")
    assert accepted.returncode == 0, accepted.stderr
    uploaded = sandbox.run("stat", "-c", "%a %U %G", f"{STAGING}/probe.txt").stdout.split()
    assert uploaded == ["640", "deploy", "stagewatch"]
    assert _sftp(production, f"rm {STAGING}/probe.txt").returncode == 0

    chroot = "/opt/stagewatch/chroot"
    for escape in ESCAPES:
        for path in (escape, chroot + escape):
            assert not sandbox.path(path).exists(), path
    for name in ("folder", "link"):
        assert not sandbox.path(f"{STAGING}/{name}").exists(), name


def _as_stagewatch(
    production: Production, *arguments: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return production.sandbox.run(
        "systemctl", "--no-ask-password", *arguments, user="stagewatch", check=check
    )


def _ssh(
    production: Production,
    *,
    options: list[str] | None = None,
    command: list[str] | None = None,
    stdin: bytes,
    timeout: float = 30,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        production.client("ssh", *(options or []), "deploy@127.0.0.1", *(command or [])),
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def _sftp(production: Production, command: str) -> subprocess.CompletedProcess[str]:
    """One sftp batch command; sftp exits non-zero when the server refused it."""
    return subprocess.run(
        production.client("sftp", "-b", "-", "deploy@127.0.0.1"),
        input=command + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _names(listing: str) -> list[str]:
    """The entries of an sftp `ls -1` in its batch output (commands are echoed as "sftp> ...")."""
    lines = (line.strip() for line in listing.splitlines())
    return sorted(Path(line).name for line in lines if line and not line.startswith("sftp>"))
