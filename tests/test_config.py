"""The configuration: defaults, relative paths, and errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stagewatch.cli import main
from stagewatch.config import Config, load_config, parse_config, read_secret
from stagewatch.errors import ConfigError


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stagewatch.toml"
    path.write_text(text)
    return path


def test_an_empty_file_gives_every_default_of_the_contract(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, ""))

    assert config.service.unit == "dealspace.service"
    assert config.service.binary == Path("/opt/dealspace/bin/dealspace")
    assert config.service.manager == "systemd"
    assert config.service.restart_timeout_seconds == 90
    assert config.staging.dir == Path("/opt/dealspace/staging")
    assert config.staging.artifact == "dealspace"
    assert config.staging.checksum_name == "dealspace.sha256"
    assert config.staging.settle_seconds == 2.0
    assert config.staging.max_size_mb == 1024
    assert config.staging.require_arm is True
    assert config.staging.arm_timeout_seconds == 900
    assert config.database.path == Path("/opt/dealspace/data/dealspace.db")
    assert config.database.snapshot_dir == Path("/var/lib/stagewatch/snapshots")
    assert config.database.keep == 7
    assert config.database.missing_ok is False
    assert config.database.restore_on_rollback is False
    assert config.webhook.listen == "0.0.0.0:9400"
    assert (config.webhook.host, config.webhook.port) == ("0.0.0.0", 9400)  # noqa: S104
    assert config.webhook.path == "/deploy"
    assert config.webhook.secret_file == Path("/etc/stagewatch/webhook-secret")
    assert config.webhook.auth == "any"
    assert config.webhook.tls_cert is None
    assert config.health.timeout_seconds == 60
    assert config.health.stable_seconds == 10
    assert config.health.url is None
    assert config.state.dir == Path("/var/lib/stagewatch")
    assert config.state.keep_releases == 3


def test_relative_paths_are_relative_to_the_config_files_folder(tmp_path: Path) -> None:
    config = load_config(
        write_config(
            tmp_path,
            '[service]\nbinary = "bin/app"\n[staging]\ndir = "in"\n[state]\ndir = "state"\n',
        )
    )

    assert config.service.binary == tmp_path.resolve() / "bin" / "app"
    assert config.staging.dir == tmp_path.resolve() / "in"
    assert config.state.dir == tmp_path.resolve() / "state"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[database]\nkeep = 0\n", "database.keep: must be >= 1"),
        ("[database]\nkeep = 1.5\n", "database.keep: must be an integer"),
        ("[database]\nkeep = true\n", "database.keep: must be an integer"),
        ('[database]\nmissing_ok = "yes"\n', "database.missing_ok: must be true or false"),
        ("[staging]\nsettle_seconds = -1\n", "staging.settle_seconds: must be >= 0"),
        ('[service]\nstop = ["/bin/true"]\n', "service.start: stop and start must be given"),
        ('[service]\nstart = ["/bin/true"]\n', "service.stop: stop and start must be given"),
        ("[staging]\nmax_size_mb = 0\n", "staging.max_size_mb: must be >= 1"),
        ('[staging]\nartifact = "a/b"\n', "staging.artifact: must be a plain file name"),
        ("[staging]\narm_timeout_seconds = 0\n", "staging.arm_timeout_seconds: must be > 0"),
        ("[health]\ntimeout_seconds = nan\n", "health.timeout_seconds: must be a finite number"),
        ('[health]\nurl = "ftp://x"\n', "health.url: must start with http:// or https://"),
        ('[service]\nmanager = "upstart"\n', "service.manager: must be one of"),
        ('[service]\nmanager = "command"\n', "service.restart: required when"),
        ('[service]\nrestart = "reboot"\n', "service.restart: must be a non-empty list"),
        ("[service]\nrestart = []\n", "service.restart: must be a non-empty list"),
        ('[service]\nunit = "a b"\n', "service.unit: must be a systemd unit name"),
        ('[webhook]\nlisten = "9400"\n', "webhook.listen: must be HOST:PORT"),
        ('[webhook]\nlisten = "0.0.0.0:70000"\n', "webhook.listen: port must be between"),
        ('[webhook]\npath = "deploy"\n', "webhook.path: must be an absolute URL path"),
        ('[webhook]\nauth = "none"\n', "webhook.auth: must be one of"),
        ('[webhook]\ntls_cert = "c.pem"\n', "webhook.tls_cert: tls_cert and tls_key"),
        ("[state]\nkeep_releases = -1\n", "state.keep_releases: must be >= 0"),
        ("[service]\ncolour = 1\n", "service.colour: unknown key"),
        ("[servcie]\n", "servcie: unknown section"),
        ("service = 3\n", "service: must be a table"),
        (
            '[staging]\ndir = "/srv/bin"\n[service]\nbinary = "/srv/bin/app"\n',
            "staging.dir: must not be the folder of service.binary",
        ),
    ],
)
def test_bad_values_are_errors_that_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write_config(tmp_path, text))

    assert str(raised.value).startswith(message)


def test_a_file_that_is_not_toml_names_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[service\n")

    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_the_command_line_exits_2_on_a_bad_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "[database]\nkeep = 0\n")

    assert main(["--config", str(path), "status"]) == 2
    assert "database.keep: must be >= 1" in capsys.readouterr().err


def test_the_config_path_comes_from_the_environment_when_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "[database]\nkeep = -3\n")
    monkeypatch.setenv("STAGEWATCH_CONFIG", str(path))

    assert main(["status"]) == 2
    assert "database.keep" in capsys.readouterr().err


def test_a_missing_config_file_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(tmp_path / "absent.toml"), "status"]) == 2
    assert "configuration file not found" in capsys.readouterr().err


def config_with_secret(tmp_path: Path, content: bytes, mode: int) -> Config:
    secret = tmp_path / "secret"
    secret.write_bytes(content)
    secret.chmod(mode)
    return parse_config({"webhook": {"secret_file": "secret"}}, base=tmp_path)


def test_the_secret_loses_its_trailing_newline(tmp_path: Path) -> None:
    assert read_secret(config_with_secret(tmp_path, b"s3cret\n", 0o600)) == b"s3cret"


def test_a_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    config = config_with_secret(tmp_path, b"s3cret\n", 0o644)

    with pytest.raises(ConfigError, match=r"readable by group or others.*chmod 0600"):
        read_secret(config)


def test_an_empty_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is empty"):
        read_secret(config_with_secret(tmp_path, b"\n", 0o600))


def test_the_systemd_credential_wins_over_the_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_with_secret(tmp_path, b"from-file\n", 0o600)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "webhook-secret").write_bytes(b"from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))

    assert read_secret(config) == b"from-credential"


def test_a_symlinked_secret_file_is_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"s3cret")
    real.chmod(0o600)
    os.symlink(real, tmp_path / "secret")
    config = parse_config({"webhook": {"secret_file": "secret"}}, base=tmp_path)

    with pytest.raises(ConfigError, match="cannot open"):
        read_secret(config)
