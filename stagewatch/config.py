"""The TOML configuration: loading, defaults and validation.

Every key has the default the contract gives. Unknown keys, wrong types and impossible values
raise ConfigError with the dotted key first (`database.keep: must be >= 1`), so that the
operator knows which line to fix. Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from stagewatch.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/stagewatch/stagewatch.toml")
CONFIG_ENVIRONMENT_VARIABLE = "STAGEWATCH_CONFIG"
CREDENTIAL_NAME = "webhook-secret"


@dataclass(frozen=True)
class ServiceConfig:
    unit: str = "dealspace.service"
    binary: Path = Path("/opt/dealspace/bin/dealspace")
    manager: str = "systemd"
    restart: tuple[str, ...] | None = None
    is_active: tuple[str, ...] | None = None
    stop: tuple[str, ...] | None = None
    start: tuple[str, ...] | None = None
    restart_timeout_seconds: float = 90.0


@dataclass(frozen=True)
class StagingConfig:
    dir: Path = Path("/opt/dealspace/staging")
    artifact: str = "dealspace"
    settle_seconds: float = 2.0
    max_size_mb: int = 1024
    require_arm: bool = True
    arm_timeout_seconds: float = 900.0

    @property
    def artifact_path(self) -> Path:
        return self.dir / self.artifact

    @property
    def checksum_name(self) -> str:
        return f"{self.artifact}.sha256"

    @property
    def checksum_path(self) -> Path:
        return self.dir / self.checksum_name

    @property
    def max_size_bytes(self) -> int:
        return self.max_size_mb * 1024 * 1024


@dataclass(frozen=True)
class DatabaseConfig:
    path: Path = Path("/opt/dealspace/data/dealspace.db")
    snapshot_dir: Path = Path("/var/lib/stagewatch/snapshots")
    keep: int = 7
    missing_ok: bool = False
    restore_on_rollback: bool = False


@dataclass(frozen=True)
class WebhookConfig:
    listen: str = "0.0.0.0:9400"
    path: str = "/deploy"
    secret_file: Path = Path("/etc/stagewatch/webhook-secret")
    auth: str = "any"
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


@dataclass(frozen=True)
class HealthConfig:
    timeout_seconds: float = 60.0
    stable_seconds: float = 10.0
    url: str | None = None


@dataclass(frozen=True)
class StateConfig:
    dir: Path = Path("/var/lib/stagewatch")
    keep_releases: int = 3

    @property
    def journal_path(self) -> Path:
        return self.dir / "journal.json"

    @property
    def history_path(self) -> Path:
        return self.dir / "history.db"

    @property
    def lock_path(self) -> Path:
        return self.dir / "lock"

    @property
    def releases_dir(self) -> Path:
        return self.dir / "releases"

    @property
    def rejected_dir(self) -> Path:
        return self.dir / "rejected"

    @property
    def arm_path(self) -> Path:
        return self.dir / "arm.json"


@dataclass(frozen=True)
class Config:
    service: ServiceConfig = field(default_factory=ServiceConfig)
    staging: StagingConfig = field(default_factory=StagingConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    state: StateConfig = field(default_factory=StateConfig)
    source: Path | None = None


def split_listen(listen: str) -> tuple[str, int]:
    """Split `host:port` (or `[v6]:port`) into its parts; raise ValueError if malformed."""
    host, separator, port_text = listen.rpartition(":")
    if not separator or not port_text.isdigit():
        raise ValueError("must be HOST:PORT, for example 0.0.0.0:9400")

    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError("port must be between 0 and 65535")

    return host.strip("[]") or "0.0.0.0", port  # noqa: S104 - empty host means every address


def resolve_config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """The file to read: `--config`, else `$STAGEWATCH_CONFIG`, else the system default."""
    if explicit is not None:
        return Path(explicit)

    from_environment = os.environ.get(CONFIG_ENVIRONMENT_VARIABLE)
    if from_environment:
        return Path(from_environment)

    return DEFAULT_CONFIG_PATH


def load_config(path: Path) -> Config:
    """Read and validate the file at `path`; raise ConfigError naming the first bad key."""
    try:
        with path.open("rb") as stream:
            document = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found (give --config PATH or set "
            f"${CONFIG_ENVIRONMENT_VARIABLE})"
        ) from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the configuration: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None

    return parse_config(document, base=path.resolve().parent, source=path)


def parse_config(document: Mapping[str, Any], base: Path, source: Path | None = None) -> Config:
    """Build a Config from a parsed TOML document, resolving relative paths against `base`."""
    sections: dict[str, Any] = {}
    for name in document:
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(_SECTIONS)})")

    for name, (section_class, validators) in _SECTIONS.items():
        table = document.get(name, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name}: must be a table ([{name}])")
        sections[name] = _parse_section(name, table, section_class, validators, base)

    config = Config(**sections, source=source)
    _check_cross_field_rules(config)
    return config


Validator = Callable[[str, Any, Path], Any]


def _parse_section(
    name: str,
    table: Mapping[str, Any],
    section_class: type[Any],
    validators: Mapping[str, Validator],
    base: Path,
) -> Any:
    known = {section_field.name for section_field in fields(section_class)}
    for key in table:
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")

    values = {key: validators[key](f"{name}.{key}", value, base) for key, value in table.items()}
    return section_class(**values)


def _string(key: str, value: Any, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a non-empty string")
    return value


def _path(key: str, value: Any, base: Path) -> Path:
    text = _string(key, value, base)
    if "\0" in text:
        raise ConfigError(f"{key}: must not contain a NUL byte")
    return base / Path(text).expanduser()


def _boolean(key: str, value: Any, base: Path) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false")
    return value


def _number(minimum: float, *, strictly_greater: bool = False) -> Validator:
    def validate(key: str, value: Any, base: Path) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: must be a number")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: must be a finite number")
        if strictly_greater and value <= minimum:
            raise ConfigError(f"{key}: must be > {minimum:g}")
        if value < minimum:
            raise ConfigError(f"{key}: must be >= {minimum:g}")
        return float(value)

    return validate


def _integer(minimum: int) -> Validator:
    def validate(key: str, value: Any, base: Path) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer")
        if value < minimum:
            raise ConfigError(f"{key}: must be >= {minimum}")
        return value

    return validate


def _argv(key: str, value: Any, base: Path) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise ConfigError(f'{key}: must be a non-empty list of strings, like ["/usr/bin/true"]')
    return tuple(value)


def _choice(*choices: str) -> Validator:
    def validate(key: str, value: Any, base: Path) -> str:
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(repr(c) for c in choices)}")
        return str(value)

    return validate


def _file_name(key: str, value: Any, base: Path) -> str:
    text = _string(key, value, base)
    if "/" in text or text in (".", "..") or "\0" in text:
        raise ConfigError(f"{key}: must be a plain file name, not a path")
    return text


def _listen(key: str, value: Any, base: Path) -> str:
    text = _string(key, value, base)
    try:
        split_listen(text)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None
    return text


def _url_path(key: str, value: Any, base: Path) -> str:
    text = _string(key, value, base)
    if not text.startswith("/") or any(character in text for character in " ?#"):
        raise ConfigError(f"{key}: must be an absolute URL path like /deploy")
    return text


def _http_url(key: str, value: Any, base: Path) -> str:
    text = _string(key, value, base)
    if not text.startswith(("http://", "https://")):
        raise ConfigError(f"{key}: must start with http:// or https://")
    return text


def _unit(key: str, value: Any, base: Path) -> str:
    text = _string(key, value, base)
    if "/" in text or text.startswith("-") or any(character.isspace() for character in text):
        raise ConfigError(f"{key}: must be a systemd unit name like dealspace.service")
    return text


_SECTIONS: dict[str, tuple[type[Any], dict[str, Validator]]] = {
    "service": (
        ServiceConfig,
        {
            "unit": _unit,
            "binary": _path,
            "manager": _choice("systemd", "command"),
            "restart": _argv,
            "is_active": _argv,
            "stop": _argv,
            "start": _argv,
            "restart_timeout_seconds": _number(0, strictly_greater=True),
        },
    ),
    "staging": (
        StagingConfig,
        {
            "dir": _path,
            "artifact": _file_name,
            "settle_seconds": _number(0),
            "max_size_mb": _integer(1),
            "require_arm": _boolean,
            "arm_timeout_seconds": _number(0, strictly_greater=True),
        },
    ),
    "database": (
        DatabaseConfig,
        {
            "path": _path,
            "snapshot_dir": _path,
            "keep": _integer(1),
            "missing_ok": _boolean,
            "restore_on_rollback": _boolean,
        },
    ),
    "webhook": (
        WebhookConfig,
        {
            "listen": _listen,
            "path": _url_path,
            "secret_file": _path,
            "auth": _choice("any", "header", "signature"),
            "tls_cert": _path,
            "tls_key": _path,
        },
    ),
    "health": (
        HealthConfig,
        {
            "timeout_seconds": _number(0, strictly_greater=True),
            "stable_seconds": _number(0),
            "url": _http_url,
        },
    ),
    "state": (
        StateConfig,
        {
            "dir": _path,
            "keep_releases": _integer(0),
        },
    ),
}


def _check_cross_field_rules(config: Config) -> None:
    service = config.service
    if service.manager == "command":
        for key in ("restart", "is_active"):
            if getattr(service, key) is None:
                raise ConfigError(
                    f'service.{key}: required when service.manager = "command" '
                    f'(an argv list, like ["/usr/local/bin/{key}-dealspace"])'
                )

    if (service.stop is None) != (service.start is None):
        missing = "start" if service.start is None else "stop"
        raise ConfigError(
            f"service.{missing}: stop and start must be given together "
            "(`snapshots restore` stops the service, then starts it again)"
        )

    webhook = config.webhook
    if (webhook.tls_cert is None) != (webhook.tls_key is None):
        raise ConfigError("webhook.tls_cert: tls_cert and tls_key must be given together")

    if config.staging.dir == config.service.binary.parent:
        raise ConfigError(
            "staging.dir: must not be the folder of service.binary "
            "(the deploy user could then replace the live binary)"
        )

    if config.database.snapshot_dir == config.staging.dir:
        raise ConfigError("database.snapshot_dir: must not be the staging folder")


def read_secret(config: Config) -> bytes:
    """The webhook secret: the systemd credential when present, else `webhook.secret_file`.

    The trailing newline is stripped. A file readable by group or others is refused, since
    anyone who can read it can deploy.
    """
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    candidate = Path(credentials) / CREDENTIAL_NAME if credentials else None
    try:
        use_credential = candidate is not None and candidate.exists()
    except OSError as error:
        raise ConfigError(
            f"webhook.secret_file: cannot look into $CREDENTIALS_DIRECTORY {credentials}: "
            f"{error.strerror}"
        ) from None
    path = candidate if use_credential and candidate is not None else config.webhook.secret_file

    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"webhook.secret_file: {path} does not exist (create it with mode 0600)"
        ) from None
    except OSError as error:
        raise ConfigError(f"webhook.secret_file: cannot open {path}: {error.strerror}") from None

    with os.fdopen(descriptor, "rb") as stream:
        mode = os.fstat(stream.fileno()).st_mode
        if path != candidate and mode & 0o077:
            raise ConfigError(
                f"webhook.secret_file: {path} is readable by group or others "
                f"(mode {mode & 0o777:04o}); run chmod 0600 {path}"
            )
        secret = stream.read(65536).rstrip(b"\r\n")

    if not secret:
        raise ConfigError(f"webhook.secret_file: {path} is empty")

    return secret
