"""The packaging files on their own, without booting anything: quick checks that need no root.

The end-to-end modules beside this one prove the same files at work under a real systemd.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from systemd_sandbox import CHECKOUT

from stagewatch.config import Config, load_config

EXAMPLE = CHECKOUT / "etc" / "stagewatch.toml"
UNIT = CHECKOUT / "packaging" / "systemd" / "stagewatch.service"
EXPOSURE_LIMIT = 1.1
SHELL_SCRIPTS = [CHECKOUT / "packaging" / "install.sh", Path(__file__).with_name("boot_systemd.sh")]


def test_example_configuration_is_the_defaults() -> None:
    assert dataclasses.replace(load_config(EXAMPLE), source=None) == Config()


@pytest.mark.parametrize(
    "section", [field.name for field in dataclasses.fields(Config) if field.name != "source"]
)
def test_example_configuration_shows_every_key_with_a_comment(section: str) -> None:
    text = EXAMPLE.read_text()
    table = re.search(rf"^\[{section}\]\n(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    assert table, f"no [{section}] table"

    section_class = type(getattr(Config(), section))
    for key in (field.name for field in dataclasses.fields(section_class)):
        # A key with a default is set; one without (restart, tls_cert, url, ...) is shown
        # commented out. Either way a comment line comes right before it.
        found = re.search(rf"^(# )?{key} = .*$", table.group(1), re.MULTILINE)
        assert found, f"{section}.{key} is missing from {EXAMPLE.name}"
        before = table.group(1)[: found.start()].rstrip("\n").rsplit("\n", 1)[-1]
        assert before.startswith("#"), f"{section}.{key} has no comment"


def test_unit_keeps_its_security_exposure_offline() -> None:
    report = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    found = re.search(r"Overall exposure level for stagewatch\.service: (\d+\.\d+)", report.stdout)
    assert found, report.stdout + report.stderr
    assert float(found.group(1)) <= EXPOSURE_LIMIT, report.stdout


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_shell_scripts_pass_shellcheck(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is not installed (apt-get install shellcheck)")
        pytest.skip("shellcheck is not installed")

    checked = subprocess.run(
        ["shellcheck", "--shell=sh", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert checked.returncode == 0, checked.stdout
