"""Logging set-up, done once at the entry point.

Every line of a deploy carries its id, so `grep ID` tells the whole story. Under systemd
(`$JOURNAL_STREAM` set, see systemd.exec(5)) each line starts with its syslog priority in
angle brackets, which journald turns into the entry's level (sd-daemon(3)), and carries no
timestamp of its own since the journal adds one.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Iterator

_deploy_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("deploy_id", default=None)

# syslog(3) priorities, as sd-daemon(3) expects them in the line prefix.
_PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


@contextlib.contextmanager
def deploy_context(deploy_id: str) -> Iterator[None]:
    """Tag every log line written in this block (and this thread) with `deploy_id`."""
    token = _deploy_id.set(deploy_id)
    try:
        yield
    finally:
        _deploy_id.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        deploy_id = _deploy_id.get()
        record.deploy = f"[{deploy_id}] " if deploy_id else ""
        record.priority = _PRIORITIES.get(record.levelno, 6)
        return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stagewatch's own handler, told apart from any other (a test runner's, say)."""


def setup_logging(verbose: bool = False) -> None:
    """Send stagewatch's logs to stderr, with journald priorities when run by systemd."""
    handler = _StderrHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter("<%(priority)d>%(deploy)s%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(deploy)s%(message)s"))

    # The libraries' own warnings (watchdog's, asyncio's) go the same way, with priorities;
    # their chatter below warning stays out unless --verbose asks for everything.
    root = logging.getLogger()
    for previous in [known for known in root.handlers if isinstance(known, _StderrHandler)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("stagewatch").setLevel(logging.DEBUG if verbose else logging.INFO)
