"""The command line: parse, hand over to the engine, turn the result into an exit code.

Exit codes (CONTRACT.md): 0 done; 1 the operation ran and did not succeed; 2 usage or
configuration error; 3 busy. Errors reach the user here and only here, as one line naming the
thing and what to do; the traceback only with --verbose.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from stagewatch import __version__
from stagewatch.config import Config, load_config, resolve_config_path
from stagewatch.errors import BusyError, ConfigError, StagewatchError
from stagewatch.history import History, Record
from stagewatch.logs import setup_logging

EXIT_OK = 0
EXIT_NOT_SUCCEEDED = 1
EXIT_USAGE = 2
EXIT_BUSY = 3

log = logging.getLogger("stagewatch.cli")


class Context:
    """What every command is given: the config path, loaded on first use."""

    def __init__(self, config_path: str | None, verbose: bool) -> None:
        self.config_path = resolve_config_path(config_path)
        self.verbose = verbose
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config


pass_context = click.make_pass_decorator(Context)

_VERSION_LINE = f"stagewatch, version {__version__}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help="Configuration file [default: $STAGEWATCH_CONFIG, else /etc/stagewatch/stagewatch.toml].",
)
@click.option("-v", "--verbose", is_flag=True, help="Log paths and commands, and tracebacks.")
@click.version_option(__version__, message=_VERSION_LINE)
@click.pass_context
def cli(click_context: click.Context, config_path: str | None, verbose: bool) -> None:
    """stagewatch: deploy a staged binary safely, with snapshot, health check and rollback."""
    setup_logging(verbose)
    click_context.obj = Context(config_path, verbose)


@cli.command()
@pass_context
def run(context: Context) -> None:
    """Run the agent: watch staging, serve the webhook, recover, notify systemd."""
    from stagewatch.daemon import run_daemon

    sys.exit(run_daemon(context.config_path))


@cli.command("check-config")
@pass_context
def check_config(context: Context) -> None:
    """Validate the configuration file and the host it describes."""
    from stagewatch.hostcheck import check_host

    problems, notes = check_host(context.config)
    for note in notes:
        click.echo(f"ok: {note}")
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(EXIT_USAGE)
    click.echo(f"{context.config_path}: configuration is valid")


# `deploy --version V` names the release (CONTRACT.md); `deploy --version` alone, as on every
# other command, prints stagewatch's own version.
_OWN_VERSION = "\0own version"


def _release_version(
    click_context: click.Context, _parameter: click.Parameter, value: str | None
) -> str | None:
    if value == _OWN_VERSION:
        click.echo(_VERSION_LINE)
        click_context.exit()
    return value


@cli.command()
@click.option("--sha256", "sha256", metavar="HEX", help="Also require this sha256.")
@click.option(
    "--version",
    "version",
    metavar="V",
    is_flag=False,
    flag_value=_OWN_VERSION,
    is_eager=True,
    callback=_release_version,
    help="The release's version, for the history; alone, stagewatch's version.",
)
@click.option("--force", is_flag=True, help="Deploy even a release that was rolled back before.")
@pass_context
def deploy(context: Context, sha256: str | None, version: str | None, force: bool) -> None:
    """Deploy what is staged now, in the foreground, without the webhook."""
    from stagewatch.engine import DeployRequest, Engine

    if sha256 is not None:
        sha256 = _valid_sha256(sha256)
    record = Engine(context.config).deploy(
        DeployRequest(sha256=sha256, version=version, force=force, trigger="cli")
    )
    _report(record)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_context
def status(context: Context, as_json: bool) -> None:
    """Show the state now, the installed binary, the arm and the last outcome."""
    from stagewatch.status import current_status

    config = context.config
    document = current_status(config, _history(config))
    if as_json:
        _print_json(document)
        return

    click.echo(f"state:     {document['state']}")
    installed = document["installed_sha256"] or "nothing installed"
    click.echo(f"installed: {installed} ({config.service.binary})")
    click.echo(f"armed:     {document['armed_until'] or 'no'}")
    if document["interrupted"]:
        click.echo(f"interrupted: {document['interrupted']} (the next run or deploy settles it)")
    last = document["last"]
    click.echo(f"last:      {_one_line(last) if last else 'no attempt yet'}")


@cli.command()
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_context
def history(context: Context, limit: int, as_json: bool) -> None:
    """Show past attempts, newest first."""
    found = _history(context.config)
    records = found.recent(limit) if found is not None else []
    if as_json:
        _print_json([record.to_json() for record in records])
        return

    if not records:
        click.echo("no attempt yet")
    for record in records:
        click.echo(_one_line(record.to_json()))


@cli.command()
@click.option("--to", "to_prefix", metavar="SHA256_PREFIX", help="A kept release to reinstall.")
@pass_context
def rollback(context: Context, to_prefix: str | None) -> None:
    """Reinstall the previous (or a named kept) release, restart, health check."""
    from stagewatch.engine import Engine

    if to_prefix is not None:
        to_prefix = _valid_sha256_prefix(to_prefix)
    _report(Engine(context.config).rollback(to_prefix))


@cli.group()
def snapshots() -> None:
    """List, take and restore database snapshots."""


@snapshots.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_context
def snapshots_list(context: Context, as_json: bool) -> None:
    """Snapshots, newest first."""
    from stagewatch.snapshot import list_snapshots

    found = list_snapshots(context.config.database.snapshot_dir)
    if as_json:
        _print_json(
            [
                {
                    "name": item.name,
                    "size": item.size,
                    "created_at": item.created_at.isoformat().replace("+00:00", "Z"),
                }
                for item in found
            ]
        )
        return

    if not found:
        click.echo(f"no snapshot in {context.config.database.snapshot_dir}")
    for item in found:
        click.echo(f"{item.name}  {item.size:>12} bytes  {item.created_at:%Y-%m-%d %H:%M:%S} UTC")


@snapshots.command("create")
@pass_context
def snapshots_create(context: Context) -> None:
    """Take a snapshot now (same rules as a deploy's, counts toward keep)."""
    from stagewatch.engine import Engine

    taken = Engine(context.config).take_snapshot()
    if taken is None:
        click.echo(f"no database at {context.config.database.path}: nothing to snapshot")
        return
    click.echo(f"{taken.name} ({taken.size} bytes, integrity ok)")


@snapshots.command("restore")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_context
def snapshots_restore(context: Context, name: str, yes: bool) -> None:
    """Stop the service, keep the current database aside, restore NAME, start."""
    from stagewatch.engine import Engine

    config = context.config
    if not yes:
        click.confirm(
            f"Stop {config.service.unit} and replace {config.database.path} with {name}?",
            abort=True,
        )
    record = Engine(config).restore_snapshot(name)
    # The restoring step's line says where the previous database was kept.
    for step in record.steps:
        if step["name"] == "restoring" and step["ok"]:
            click.echo(step["detail"])
    _report(record)


@cli.command()
@click.option("--keep", "keep_folder", metavar="DIR", help="Build the sandbox here and keep it.")
def demo(keep_folder: str | None) -> None:
    """Show the whole idea in a throw-away sandbox: a good release, then a bad one."""
    from stagewatch.demo import run_demo

    sys.exit(run_demo(Path(keep_folder) if keep_folder else None))


def _version_everywhere(group: click.Group) -> None:
    """`--version` on every command and subcommand, as on `stagewatch` itself."""
    for command in group.commands.values():
        if not any("--version" in parameter.opts for parameter in command.params):
            click.version_option(__version__, message=_VERSION_LINE)(command)
        if isinstance(command, click.Group):
            _version_everywhere(command)


_version_everywhere(cli)


def main(argv: list[str] | None = None) -> int:
    """The entry point: run a command and return its exit code."""
    try:
        cli.main(args=argv, prog_name="stagewatch", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_NOT_SUCCEEDED
    except click.ClickException as error:
        error.show()
        return EXIT_USAGE
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_NOT_SUCCEEDED
    except StagewatchError as error:
        return _fail(error)
    except OSError as error:
        # A host fault the stages did not expect (a state folder full or gone): one line, and
        # the journal, written before each step, lets the next command settle the attempt.
        log.debug("Failure details", exc_info=error)
        where = f": {error.filename}" if error.filename else ""
        click.echo(f"stagewatch: {error.strerror or error}{where}", err=True)
        return EXIT_NOT_SUCCEEDED
    return EXIT_OK


def _fail(error: StagewatchError) -> int:
    log.debug("Failure details", exc_info=error)
    click.echo(f"stagewatch: {error}", err=True)
    if isinstance(error, ConfigError):
        return EXIT_USAGE
    if isinstance(error, BusyError):
        return EXIT_BUSY
    return EXIT_NOT_SUCCEEDED


def _report(record: Record) -> NoReturn:
    click.echo(_one_line(record.to_json()))
    sys.exit(EXIT_OK if record.outcome == "succeeded" else EXIT_NOT_SUCCEEDED)


def _one_line(record: dict[str, Any]) -> str:
    sha256 = (record.get("sha256") or "-")[:12]
    version = f" version {record['version']}" if record.get("version") else ""
    reason = f": {record['reason']}" if record.get("reason") else ""
    outcome = record.get("outcome") or record.get("state")
    return f"{record['id']}  {record['kind']:<8} {outcome:<11} {sha256}{version}{reason}"


def _print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2))


def _history(config: Config) -> History | None:
    """The history for reading, None before the first attempt: these commands create nothing."""
    path = config.state.history_path
    return History(path) if path.exists() else None


def _valid_sha256_prefix(text: str) -> str:
    prefix = text.strip().lower()
    if not 1 <= len(prefix) <= 64 or not _is_hex(prefix):
        raise click.BadParameter(
            "must be the first hexadecimal digits of a sha256, as `stagewatch history` shows",
            param_hint="--to",
        )
    return prefix


def _valid_sha256(text: str) -> str:
    digest = text.strip().lower()
    if len(digest) != 64 or not _is_hex(digest):
        raise click.BadParameter("must be 64 hexadecimal digits", param_hint="--sha256")
    return digest


def _is_hex(text: str) -> bool:
    return all(character in "0123456789abcdef" for character in text)
