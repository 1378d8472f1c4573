"""Putting the previous release back after a failed deploy.

The previous binary was kept under `<state.dir>/releases/<sha256>` before the swap. It goes
back by a rename over the install path of a file beside it, its digest checked first: a hard
link to the kept release, or, where that is a copy on another filesystem, the second name the
replaced binary kept beside the install path during the deploy (`swap.hold_previous`). Either
needs no free space in the install folder; only where neither can be had is the release
copied beside the install path. Then the service is restarted and must pass the same
health probation. With `database.restore_on_rollback`, the service is stopped instead and the
deploy's snapshot is restored before it starts again, for releases that migrate the schema
irreversibly.
"""

from __future__ import annotations

import logging

from stagewatch import snapshot, swap, verify
from stagewatch.config import Config
from stagewatch.errors import SwapError
from stagewatch.health import check_health
from stagewatch.heartbeat import Heartbeat
from stagewatch.service import ServiceManager

log = logging.getLogger(__name__)


def put_back(
    config: Config,
    manager: ServiceManager,
    previous_sha256: str | None,
    snapshot_name: str | None,
    heartbeat: Heartbeat,
) -> str:
    """Reinstall `previous_sha256`, restart (restoring the snapshot if configured), check health.

    Safe to run again after a crash at any point. Return a one-line summary; raise SwapError,
    ServiceError, SnapshotError or HealthError when the previous release cannot be brought back.
    """
    install_path = config.service.binary
    if previous_sha256 is None:
        raise SwapError(f"there was no binary at {install_path} before this deploy to go back to")

    verify.remove_stale_copies(install_path)
    releases_dir = config.state.releases_dir
    if swap.installed_sha256(install_path, releases_dir) != previous_sha256:
        if swap.restore_previous(install_path, releases_dir, previous_sha256, heartbeat):
            how = "renamed back"
        else:
            release = swap.find_release(releases_dir, previous_sha256)
            swap.install_release(release.path, install_path, heartbeat, previous_sha256)
            how = "put back from its kept release"
        log.info("Previous binary %s %s at %s", previous_sha256[:12], how, install_path)

    state_before = manager.state()
    if config.database.restore_on_rollback and snapshot_name is not None:
        manager.stop()
        aside = snapshot.restore_snapshot(config.database, snapshot_name)
        log.info(
            "Database restored from %s; the one it replaced is kept at %s", snapshot_name, aside
        )
        manager.start()
    else:
        manager.restart()

    report = check_health(manager, config.health, heartbeat, state_before)
    return f"previous binary {previous_sha256[:12]} healthy again ({report.state.detail})"
