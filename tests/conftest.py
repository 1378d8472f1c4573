"""Fixtures shared by the whole suite: a sandbox host, and a guard against leaked threads."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sandbox import Sandbox


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, so that the workers do not end waiting on one of them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mount small tmpfs filesystems under tmp_path; all are unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")

    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
            check=True,
        )
        mounted.append(point)
        return point

    yield mount

    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], check=True)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    host = Sandbox(tmp_path)
    try:
        yield host
    finally:
        host.stop_everything()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every thread a test starts must be stopped by the end of the test."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3
    while True:
        leaked = [
            thread
            for thread in threading.enumerate()
            if thread not in before and thread.is_alive() and not thread.daemon
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"threads left running: {[thread.name for thread in leaked]}"
