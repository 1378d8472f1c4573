"""Fixtures of the end-to-end suite: a booted systemd, and stagewatch installed in it.

`booted_systemd` boots systemd 252 in a throwaway overlay of this host (systemd_sandbox.py,
boot_systemd.sh) and tears it down after the module. `production` then sets that machine up
the way an operator would: a `dealspace` user and its unit (the sample service from
`stagewatch.sample_service`), the configuration, `packaging/install.sh` run from this
checkout, and a real sshd with the packaging's deploy-user configuration on a free port of
127.0.0.1. Both are module-scoped: one boot and one install per test module.

Everything runs for real and needs root. Outside CI a run without root skips these tests with
one line saying so; with CI=true they fail instead, so that CI never passes by skipping them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from sandbox import free_port, wait_for
from systemd_sandbox import (
    BINARY,
    CHECKOUT,
    CONFIG,
    DATA_DIR,
    DEALSPACE_UNIT,
    DEPLOY_KEYS,
    OTHER_UNIT,
    RELEASES_DIR,
    SSHD_UNIT,
    Production,
    SystemdSandbox,
    accepts,
    e2e_configuration,
    require_root,
)


@pytest.fixture(scope="module")
def booted_systemd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdSandbox]:
    """A booted systemd with dbus and polkit running, torn down after the module.

    Its journal is kept as journal.txt beside the module's other temporary files.
    """
    require_root()
    folder = tmp_path_factory.mktemp("systemd")
    machine = SystemdSandbox(folder / "overlay", folder / "boot.log")
    try:
        machine.boot()
        # What multi-user.target would start on a real host, as far as the tests need it: the
        # bus, polkit, and the end of the boot's /run/nologin (pam_nologin refuses sshd logins
        # until then).
        machine.run(
            "systemctl", "start", "dbus.service", "polkit.service", "systemd-user-sessions.service"
        )
        yield machine
    finally:
        machine.save_journal(folder / "journal.txt")
        machine.shutdown()


@pytest.fixture(scope="module")
def production(
    booted_systemd: SystemdSandbox, tmp_path_factory: pytest.TempPathFactory
) -> Production:
    """dealspace serving release 1.0.0, stagewatch installed and running, sshd listening."""
    sandbox = booted_systemd
    client = tmp_path_factory.mktemp("build-machine")
    webhook_port, service_port, ssh_port = free_port(), free_port(), free_port()

    # What the host had before stagewatch: the service, its user, its database folder.
    sandbox.run("useradd", "--system", "--user-group", "--home-dir", "/opt/dealspace", "dealspace")
    sandbox.run("install", "-d", "-m", "0755", "/opt/dealspace", "/opt/dealspace/bin")
    sandbox.run("install", "-d", "-m", "0750", "-o", "dealspace", "-g", "dealspace", DATA_DIR)
    sandbox.write(CONFIG, e2e_configuration(webhook_port, service_port), mode=0o644)

    installed = sandbox.run("sh", f"{CHECKOUT}/packaging/install.sh", timeout=300)

    production = Production(
        sandbox=sandbox,
        client_folder=client,
        webhook_port=webhook_port,
        service_port=service_port,
        ssh_port=ssh_port,
        install_output=installed.stdout + installed.stderr,
    )
    production.release("1.0.0")
    sandbox.run("install", "-m", "0755", f"{RELEASES_DIR}/1.0.0-good/dealspace", BINARY)
    sandbox.write("/etc/systemd/system/dealspace.service", DEALSPACE_UNIT)
    sandbox.write("/etc/systemd/system/e2e-other.service", OTHER_UNIT)
    sandbox.write("/etc/systemd/system/e2e-sshd.service", SSHD_UNIT.format(port=ssh_port))
    sandbox.run("systemctl", "daemon-reload")
    sandbox.run("systemctl", "start", "dealspace.service", "e2e-other.service")
    wait_for(lambda: production.serving_version() == "1.0.0", 15, "dealspace 1.0.0 to serve")

    _authorize_build_machine(production)
    sandbox.run("ssh-keygen", "-A")  # host keys, when the host has none yet
    sandbox.run("systemctl", "start", "e2e-sshd.service")
    wait_for(lambda: accepts(ssh_port), 15, "sshd to listen")
    return production


def _authorize_build_machine(production: Production) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "build@ci", "-f", production.ssh_key],
        check=True,
    )
    public_key = production.ssh_key.with_suffix(".pub").read_text().strip()
    keys = production.sandbox.path(DEPLOY_KEYS)
    keys.write_text(keys.read_text() + f'restrict,from="127.0.0.1" {public_key}\n')

    host_key = production.sandbox.path("/etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
    known_hosts = production.client_folder / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{production.ssh_port} {host_key[0]} {host_key[1]}\n")
