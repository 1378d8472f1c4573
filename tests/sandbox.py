"""A whole host in a folder, with a real sample service under the `command` manager.

The sandbox is what a host looks like to stagewatch: a staging folder, an install path
holding release 1.0 (running), a SQLite database the service writes to, a snapshot folder
and a state folder, all in the test's own tmp_path. Tests import it as `from sandbox import
Sandbox`; pytest puts `tests/` on sys.path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagewatch.config import Config, load_config
from stagewatch.sample_service import control_command, write_release


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something true; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


# Ports for the test suite's servers come from below the kernel's ephemeral range (32768 and
# up, where every client connection takes its local port), and from a block of this process's
# own: each pytest-xdist worker has one, and a process that starts workers of its own (the
# torture run) splits its block among them through PORTS_VARIABLE. A port that a test releases
# (a daemon it restarts on the same port) is then never handed to anyone else meanwhile.
PORTS_VARIABLE = "STAGEWATCH_TEST_PORTS"
_PORT_BLOCK_START = 12000
_PORT_BLOCK_SIZE = 2000
_next_port: int | None = None


def port_range() -> range:
    """This process's ports: from PORTS_VARIABLE ("START-END"), else its xdist worker's block."""
    given = os.environ.get(PORTS_VARIABLE)
    if given:
        start, end = given.split("-")
        return range(int(start), int(end))

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = _PORT_BLOCK_START + (int(worker) if worker.isdigit() else 0) * _PORT_BLOCK_SIZE
    return range(first, first + _PORT_BLOCK_SIZE)


def port_blocks(count: int) -> list[str]:
    """This process's ports split into `count` blocks, as values of PORTS_VARIABLE."""
    ports = port_range()
    size = len(ports) // count
    return [
        f"{ports.start + index * size}-{ports.start + (index + 1) * size}" for index in range(count)
    ]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, the next free one of this process's."""
    global _next_port
    ports = port_range()
    start = _next_port if _next_port in ports else ports.start
    for step in range(len(ports)):
        port = ports.start + (start - ports.start + step) % len(ports)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _next_port = port + 1
        return port
    raise RuntimeError(f"no free port in {ports.start} to {ports.stop - 1}")


def fill_filesystem(filler: Path) -> Path:
    """Write the file `filler` until its filesystem has no space left; return it.

    Smaller and smaller writes fill the last blocks too, so that nothing more fits.
    """
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            block = bytes(size)
            while True:
                try:
                    os.write(descriptor, block)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(descriptor)
    return filler


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Sandbox:
    """A host in a folder: config, staging, install path, database, running service."""

    def __init__(self, root: Path, **overrides: Any) -> None:
        self.root = root
        self.binary = root / "bin" / "dealspace"
        self.staging = root / "staging"
        self.database = root / "data" / "dealspace.db"
        self.snapshots = root / "snapshots"
        self.state = root / "state"
        self.pidfile = root / "service.pid"
        self.service_log = root / "service.log"
        self.port = free_port()
        self.webhook_port = free_port()
        self.config_path = root / "stagewatch.toml"
        self.secret = b"sandbox-secret-0123456789abcdef"
        for folder in (self.binary.parent, self.staging, self.database.parent):
            folder.mkdir(parents=True, exist_ok=True)
        (root / "webhook-secret").write_bytes(self.secret + b"\n")
        (root / "webhook-secret").chmod(0o600)
        self.write_config(**overrides)

    def control(self, action: str) -> list[str]:
        return control_command(
            action, binary=self.binary, pidfile=self.pidfile, log=self.service_log
        )

    def write_config(self, **overrides: Any) -> None:
        sections: dict[str, dict[str, Any]] = {
            "service": {
                "binary": str(self.binary),
                "manager": "command",
                "restart": self.control("restart"),
                "is_active": self.control("is-active"),
                "stop": self.control("stop"),
                "start": self.control("start"),
                "restart_timeout_seconds": 10,
            },
            "staging": {"dir": str(self.staging), "settle_seconds": 0.2},
            "database": {
                "path": str(self.database),
                "snapshot_dir": str(self.snapshots),
                "keep": 3,
            },
            "webhook": {
                "listen": f"127.0.0.1:{self.webhook_port}",
                "secret_file": str(self.root / "webhook-secret"),
            },
            "health": {
                "url": f"http://127.0.0.1:{self.port}/healthz",
                "timeout_seconds": 6,
                "stable_seconds": 0.6,
            },
            "state": {"dir": str(self.state), "keep_releases": 3},
        }
        for dotted, value in overrides.items():
            section, key = dotted.split("__")
            if value is None:
                sections[section].pop(key, None)
            else:
                sections[section][key] = value
        self.config_path.write_text(_to_toml(sections))

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    def release_bytes(self, version: str, behaviour: str = "good") -> bytes:
        scratch = self.root / "build" / f"dealspace-{version}-{behaviour}"
        scratch.parent.mkdir(exist_ok=True)
        write_release(
            scratch, port=self.port, database=self.database, version=version, behaviour=behaviour
        )
        return scratch.read_bytes()

    def install_initial(self, version: str = "1.0") -> bytes:
        """Put release `version` at the install path and start it, as a host before stagewatch."""
        content = self.release_bytes(version)
        self.binary.write_bytes(content)
        self.binary.chmod(0o755)
        self.start_service()
        return content

    def start_service(self) -> None:
        import subprocess

        subprocess.run(self.control("start"), check=True, stdout=subprocess.DEVNULL)
        wait_for(lambda: self.served_version() is not None, 10, "the sample service")

    def stage(
        self, version: str, behaviour: str = "good", checksum: str | bytes | None = None
    ) -> bytes:
        """Stage a release and its checksum file as the build machine would."""
        content = self.release_bytes(version, behaviour)
        (self.staging / "dealspace").write_bytes(content)
        if checksum is None:
            checksum = f"{hashlib.sha256(content).hexdigest()}  dealspace\n"
        if isinstance(checksum, str):
            checksum = checksum.encode()
        (self.staging / "dealspace.sha256").write_bytes(checksum)
        return content

    def served_version(self) -> str | None:
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as answer:
                return str(json.load(answer).get("version"))
        except OSError:
            return None

    def service_pid(self) -> int | None:
        """The running service's pid, as the `is_active` command reports it."""
        import subprocess

        shown = subprocess.run(self.control("is-active"), capture_output=True, text=True)
        words = shown.stdout.split()
        return int(words[0]) if shown.returncode == 0 and words and words[0].isdigit() else None

    def stop_everything(self) -> None:
        import subprocess

        subprocess.run(self.control("stop"), check=False, stdout=subprocess.DEVNULL)

    def row_count(self) -> int:
        with sqlite3.connect(f"file:{self.database}?mode=ro", uri=True) as connection:
            return int(connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])


def _to_toml(sections: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
