"""Every error stagewatch raises on purpose, rooted in one class.

    StagewatchError                 one line an operator can act on
    ├── ConfigError                 the configuration file or the host is wrong (exit 2)
    ├── BusyError                   another deploy, rollback or restore holds the lock (exit 3)
    ├── RejectedError               the staged release was refused before anything changed
    │   └── ChecksumError           the checksum file is malformed or does not match
    ├── SnapshotError               the database could not be copied or the copy is not intact
    ├── SwapError                   the binary could not be installed or put back
    ├── ServiceError                the service manager failed to restart, stop or start
    ├── HealthError                 the service did not become or stay healthy
    └── RecoveryError               an interrupted deploy could not be finished or undone

The message of each is complete on its own: it names the thing (a path, a key, a unit)
and, where there is one, what to do about it.
"""

from __future__ import annotations


class StagewatchError(Exception):
    """The root of every error stagewatch raises on purpose."""


class ConfigError(StagewatchError):
    """The configuration is invalid; the message names the key."""


class BusyError(StagewatchError):
    """Another deploy, rollback or restore is running; `deploy_id` names it when known."""

    def __init__(self, message: str, deploy_id: str | None = None) -> None:
        super().__init__(message)
        self.deploy_id = deploy_id


class RejectedError(StagewatchError):
    """The staged release was refused before anything on the host changed."""


class ChecksumError(RejectedError):
    """The checksum file cannot be parsed or does not match the artifact."""


class SnapshotError(StagewatchError):
    """The database snapshot failed; the live database is untouched."""


class SwapError(StagewatchError):
    """Installing a binary failed; the install path still holds a complete binary."""


class ServiceError(StagewatchError):
    """The service manager command failed."""


class HealthError(StagewatchError):
    """The service did not become healthy, or did not stay healthy."""


class RecoveryError(StagewatchError):
    """An interrupted deploy could not be finished or undone."""
