"""`stagewatch demo`: the whole flow in a throw-away sandbox, in well under a minute.

It builds a staging folder, an install path, a SQLite database and a small sample service
(run by the `command` manager, serving a health URL on 127.0.0.1), starts the real daemon
(`stagewatch run`) on it, and then does what a build machine does: copy a release and its
checksum into staging and arm the agent over HTTP. The first release is healthy and goes live;
the second never answers its health check and is rolled back by itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from stagewatch.sample_service import control_command, write_release

# A fresh secret per run: the sandbox's agent listens on 127.0.0.1 only, but still.
_SECRET = secrets.token_hex(16)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def run_demo(keep_folder: Path | None) -> int:
    """Run the demo; return 0 when both releases ended as they should."""
    with _sandbox(keep_folder) as root:
        sandbox = _Sandbox(root)
        click.echo(f"stagewatch demo: a sandbox in {root}")
        sandbox.build()
        click.echo(f"  service  sample dealspace 1.0 on {sandbox.health_url}")
        click.echo(f"  agent    stagewatch run, webhook {sandbox.webhook_url}/deploy")
        click.echo(f"  its log  {sandbox.log_path}\n")

        with sandbox.daemon():
            good = sandbox.push("2.0", "good", "a healthy release")
            bad = sandbox.push("3.0", "unhealthy", "a release whose /healthz answers 503")

        sandbox.show_history()
        passed = good == "succeeded" and bad == "rolled_back"
        click.echo(
            "\nThe healthy release went live and the broken one was rolled back by itself."
            if passed
            else "\nThe demo did not end as expected; the agent's log above says why."
        )
        sandbox.stop_service()
        return 0 if passed else 1


@contextlib.contextmanager
def _sandbox(keep_folder: Path | None) -> Iterator[Path]:
    if keep_folder is not None:
        keep_folder.mkdir(parents=True, exist_ok=True)
        yield keep_folder.resolve()
        return

    root = Path(tempfile.mkdtemp(prefix="stagewatch-demo-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _Sandbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.binary = root / "bin" / "dealspace"
        self.staging = root / "staging"
        self.database = root / "data" / "dealspace.db"
        self.config_path = root / "stagewatch.toml"
        self.log_path = root / "stagewatch.log"
        self.service_port = _free_port()
        self.webhook_port = _free_port()
        self.health_url = f"http://127.0.0.1:{self.service_port}/healthz"
        self.webhook_url = f"http://127.0.0.1:{self.webhook_port}"

    def build(self) -> None:
        for folder in (self.binary.parent, self.staging, self.database.parent):
            folder.mkdir(parents=True, exist_ok=True)

        secret = self.root / "webhook-secret"
        secret.write_text(_SECRET + "\n")
        secret.chmod(0o600)
        self._release(self.binary, "1.0", "good")
        self.config_path.write_text(self._config_text())
        self._control("start")
        _wait_for(lambda: _get_json(self.health_url) is not None, 10, "the sample service")

    def _config_text(self) -> str:
        def argv(action: str) -> str:
            return json.dumps(self._control_command(action))

        return f"""\
# Written by `stagewatch demo`: a sandbox configuration, not a production one.
[service]
binary = "bin/dealspace"
manager = "command"
restart = {argv("restart")}
is_active = {argv("is-active")}
stop = {argv("stop")}
start = {argv("start")}
restart_timeout_seconds = 15

[staging]
dir = "staging"
settle_seconds = 0.3
arm_timeout_seconds = 60

[database]
path = "data/dealspace.db"
snapshot_dir = "snapshots"

[webhook]
listen = "127.0.0.1:{self.webhook_port}"
secret_file = "webhook-secret"

[health]
url = "{self.health_url}"
timeout_seconds = 4
stable_seconds = 2

[state]
dir = "state"
"""

    @contextlib.contextmanager
    def daemon(self) -> Iterator[None]:
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        environment.pop("NOTIFY_SOCKET", None)
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "stagewatch", "--config", str(self.config_path), "run"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=environment,
            )
        try:
            _wait_for(
                lambda: _get_json(f"{self.webhook_url}/healthz") is not None,
                15,
                "the agent's webhook",
                process,
            )
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def push(self, version: str, behaviour: str, description: str) -> str | None:
        """Do what the build machine does: copy the pair into staging, POST the arm, poll."""
        click.echo(f"Push {version}: {description}")
        built = self.root / "build" / "dealspace"
        built.parent.mkdir(exist_ok=True)
        self._release(built, version, behaviour)
        digest = hashlib.sha256(built.read_bytes()).hexdigest()
        (built.parent / "dealspace.sha256").write_text(f"{digest}  dealspace\n")

        answer = _post_json(f"{self.webhook_url}/deploy", {"version": version})
        click.echo(f"  POST /deploy -> 202, id {answer['id']}, armed until {answer['armed_until']}")
        for name in ("dealspace", "dealspace.sha256"):
            shutil.copy(built.parent / name, self.staging / name)
        click.echo("  copied dealspace and dealspace.sha256 into staging/")

        record = self._wait_for_outcome(answer["id"])
        for step in record["steps"]:
            mark = "ok    " if step["ok"] else "FAILED"
            click.echo(f"    {mark} {step['name']:<13} {step['seconds']:6.2f} s  {step['detail']}")
        reason = f" ({record['reason']})" if record.get("reason") else ""
        click.echo(f"  outcome: {record['outcome']}{reason}")
        serving = _get_json(self.health_url) or {}
        click.echo(f"  the service now answers version {serving.get('version', '?')}\n")
        return str(record["outcome"]) if record.get("outcome") else None

    def _wait_for_outcome(self, deploy_id: str) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def finished() -> bool:
            found.update(_get_json(f"{self.webhook_url}/deploys/{deploy_id}") or {})
            return bool(found.get("outcome"))

        _wait_for(finished, 45, f"the outcome of {deploy_id}")
        return found

    def show_history(self) -> None:
        click.echo("stagewatch history:")
        shown = subprocess.run(
            [sys.executable, "-m", "stagewatch", "--config", str(self.config_path), "history"],
            capture_output=True,
            text=True,
            check=False,
        )
        for line in shown.stdout.splitlines():
            click.echo(f"  {line}")

    def stop_service(self) -> None:
        self._control("stop")

    def _release(self, path: Path, version: str, behaviour: str) -> None:
        write_release(
            path,
            port=self.service_port,
            database=self.database,
            version=version,
            behaviour=behaviour,
        )

    def _control_command(self, action: str) -> list[str]:
        return control_command(
            action,
            binary=self.binary,
            pidfile=self.root / "service.pid",
            log=self.root / "service.log",
        )

    def _control(self, action: str) -> None:
        subprocess.run(self._control_command(action), check=False, stdout=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get_json(url: str) -> dict[str, Any] | None:
    request = urllib.request.Request(url, headers={"X-Webhook-Secret": _SECRET})
    try:
        with _OPENER.open(request, timeout=2) as response:
            document: dict[str, Any] = json.load(response)
            return document
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"X-Webhook-Secret": _SECRET, "Content-Type": "application/json"},
        method="POST",
    )
    with _OPENER.open(request, timeout=5) as response:
        document: dict[str, Any] = json.load(response)
        return document


def _wait_for(
    condition: Any, seconds: float, what: str, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process is not None and process.poll() is not None:
            raise click.ClickException(f"{what} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise click.ClickException(f"{what} did not answer within {seconds:g} s")
        time.sleep(0.1)
