"""The service manager seam, against real processes: the sample service and a stand-in systemctl."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from service_fixtures import (  # the two *_fixture names provide fake_systemctl and sample_service
    FakeSystemctl,
    Response,
    SampleService,
    fake_systemctl_fixture,  # noqa: F401
    process_is_running,
    sample_service_fixture,  # noqa: F401
    show_output,
    wait_for,
    wait_until_gone,
)

from stagewatch.config import ServiceConfig
from stagewatch.errors import ServiceError
from stagewatch.sample_service import control_command
from stagewatch.service import CommandManager, ServiceState, SystemdManager, manager_for

PYTHON = sys.executable
SHOW_PROPERTIES = "--property=LoadState,ActiveState,SubState,MainPID,NRestarts"


def python_command(code: str) -> tuple[str, ...]:
    return (PYTHON, "-c", code)


def command_config(**keys: Any) -> ServiceConfig:
    values: dict[str, Any] = {
        "manager": "command",
        "restart": ("true",),
        "is_active": ("true",),
        "restart_timeout_seconds": 10.0,
    }
    return ServiceConfig(**{**values, **keys})


# The command manager with the sample service


def test_command_manager_restarts_stops_and_starts_the_sample_service(
    sample_service: SampleService,
) -> None:
    sample_service.install("1")
    manager = CommandManager(sample_service.service_config())
    assert manager.state().active is False

    manager.restart()
    first = manager.state()
    assert first.active
    assert first.main_pid is not None and process_is_running(first.main_pid)
    assert first.restarts is None
    assert f"MainPID {first.main_pid}" in first.detail
    assert sample_service.wait_healthy()["version"] == "1"

    sample_service.install("2")
    manager.restart()
    second = manager.state()
    assert second.active and second.main_pid not in (None, first.main_pid)
    assert not process_is_running(first.main_pid)
    assert sample_service.wait_healthy()["version"] == "2"

    manager.stop()
    stopped = manager.state()
    assert not stopped.active and stopped.main_pid is None
    assert second.main_pid is not None and not process_is_running(second.main_pid)

    manager.start()
    assert manager.state().active
    assert sample_service.wait_healthy()["version"] == "2"


def test_manager_for_picks_the_configured_manager(sample_service: SampleService) -> None:
    assert isinstance(manager_for(sample_service.service_config()), CommandManager)
    assert isinstance(manager_for(ServiceConfig(manager="systemd")), SystemdManager)


def test_stale_pidfile_naming_another_process_is_not_running_and_left_alone(
    sample_service: SampleService,
) -> None:
    # Our own pid with a start time that is not ours: a pidfile left over after pid reuse.
    sample_service.pidfile.write_text(f"{os.getpid()} 1\n")
    manager = CommandManager(sample_service.service_config())

    assert manager.state().active is False
    manager.stop()
    assert not sample_service.pidfile.exists()

    sample_service.install("1")
    manager.start()
    state = manager.state()
    assert state.active and state.main_pid != os.getpid()


def test_binary_that_exits_at_once_shows_as_not_running_and_can_be_started_again(
    sample_service: SampleService,
) -> None:
    sample_service.install("1", "exit")
    manager = CommandManager(sample_service.service_config())
    manager.start()
    wait_for(lambda: not manager.state().active, what="the failed service to show as stopped")

    sample_service.install("2")
    manager.start()
    assert manager.state().active
    assert sample_service.wait_healthy()["version"] == "2"


def test_stop_kills_a_service_that_ignores_sigterm(sample_service: SampleService) -> None:
    sample_service.binary.write_text(
        f"#!{PYTHON}\nimport signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"
    )
    sample_service.binary.chmod(0o755)
    pid = sample_service.start()

    started = time.monotonic()
    subprocess.run([*sample_service.command("stop"), "--stop-timeout", "0.5"], check=True)

    assert time.monotonic() - started < 5
    assert not process_is_running(pid)
    assert sample_service.pid() is None


# The command manager with operator commands


def test_missing_stop_and_start_commands_name_their_keys() -> None:
    manager = CommandManager(command_config())

    with pytest.raises(ServiceError, match=r"^service\.stop: not configured"):
        manager.stop()
    with pytest.raises(ServiceError, match=r"^service\.start: not configured"):
        manager.start()


def test_failing_restart_reports_exit_status_and_stderr_tail_without_retrying(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    restart = python_command(
        "import sys\n"
        f"open({str(runs)!r}, 'a').write('run\\n')\n"
        "for n in range(10): print(f'noise {n}', file=sys.stderr)\n"
        "print('cannot bind 0.0.0.0:8080: address in use', file=sys.stderr)\n"
        "sys.exit(1)\n"
    )
    manager = CommandManager(command_config(restart=restart))

    with pytest.raises(ServiceError) as raised:
        manager.restart()

    message = str(raised.value)
    assert message.startswith("service.restart: ")
    assert "exited with status 1" in message
    assert message.endswith("noise 9 | cannot bind 0.0.0.0:8080: address in use")
    assert "noise 0" not in message
    assert runs.read_text() == "run\n"


def test_restart_program_that_does_not_exist_is_named() -> None:
    manager = CommandManager(command_config(restart=("/nonexistent/restart-dealspace",)))

    with pytest.raises(ServiceError) as raised:
        manager.restart()

    assert str(raised.value) == (
        "service.restart: cannot run /nonexistent/restart-dealspace: No such file or directory"
    )


def test_restart_that_hangs_is_killed_with_its_children_at_the_timeout(tmp_path: Path) -> None:
    child_pid_file = tmp_path / "child.pid"
    restart = ("sh", "-c", f"sleep 60 & echo $! > {child_pid_file}; wait")
    manager = CommandManager(command_config(restart=restart, restart_timeout_seconds=1.0))

    started = time.monotonic()
    with pytest.raises(ServiceError, match=r"did not finish within 1 s and was killed"):
        manager.restart()

    assert time.monotonic() - started < 4
    child = int(wait_for(child_pid_file.read_text, what="the child's pid"))
    wait_until_gone(child)


def test_state_query_that_times_out_is_tried_again(tmp_path: Path) -> None:
    first_call = tmp_path / "called"
    is_active = python_command(
        "import os, time\n"
        f"if not os.path.exists({str(first_call)!r}):\n"
        f"    open({str(first_call)!r}, 'w').close()\n"
        "    time.sleep(60)\n"
        "print('4242 running')\n"
    )
    manager = CommandManager(command_config(is_active=is_active), query_timeout_seconds=0.5)

    state = manager.state()

    assert state == ServiceState(
        active=True, main_pid=4242, restarts=None, detail="running, MainPID 4242"
    )


def test_state_query_that_always_hangs_gives_up_at_the_deadline() -> None:
    is_active = python_command("import time; time.sleep(60)")
    manager = CommandManager(
        command_config(is_active=is_active, restart_timeout_seconds=1.5),
        query_timeout_seconds=0.4,
    )

    started = time.monotonic()
    with pytest.raises(
        ServiceError, match=r"^service\.is_active: .* \(gave up after \d+ tries in 1\.5 s\)$"
    ):
        manager.state()

    assert time.monotonic() - started < 4


@pytest.mark.parametrize(
    ("code", "active", "main_pid"),
    [
        ("print('812')", True, 812),
        ("print('  812\\n')", True, 812),
        ("print('running')", True, None),
        ("print('0')", True, None),
        ("pass", True, None),
        ("import sys; print('812'); sys.exit(3)", False, None),
    ],
)
def test_is_active_exit_status_and_first_word_give_the_state(
    code: str, active: bool, main_pid: int | None
) -> None:
    state = CommandManager(command_config(is_active=python_command(code))).state()

    assert (state.active, state.main_pid, state.restarts) == (active, main_pid, None)


def test_inactive_state_says_how_is_active_exited() -> None:
    state = CommandManager(command_config(is_active=("false",))).state()

    assert state.detail == "service.is_active exited with status 1"


def test_huge_error_output_is_cut_to_its_end() -> None:
    restart = python_command(
        "import sys\nsys.stderr.write('x' * 5_000_000 + '\\nthe real reason\\n'); sys.exit(2)"
    )

    with pytest.raises(ServiceError) as raised:
        CommandManager(command_config(restart=restart)).restart()

    message = str(raised.value)
    assert len(message) < 600
    assert message.endswith("the real reason")


# The systemd manager with a stand-in systemctl


def test_systemd_state_parses_systemctl_show(fake_systemctl: FakeSystemctl) -> None:
    fake_systemctl.respond("show", Response(show_output(main_pid=812, restarts=2)))

    state = SystemdManager(ServiceConfig()).state()

    assert state == ServiceState(
        active=True,
        main_pid=812,
        restarts=2,
        detail="active (running), MainPID 812, NRestarts 2",
    )
    assert fake_systemctl.calls() == [
        ["--no-ask-password", "show", "dealspace.service", SHOW_PROPERTIES]
    ]


@pytest.mark.parametrize(
    ("output", "active", "failed", "main_pid", "detail"),
    [
        (
            show_output("failed", "failed", main_pid=0, restarts=5),
            False,
            True,
            None,
            "failed (failed), MainPID none, NRestarts 5",
        ),
        (show_output("reloading", "reload"), True, False, 812, "reloading (reload), MainPID 812"),
        (
            show_output("activating", "auto-restart", main_pid=0),
            False,
            False,
            None,
            "activating (auto-restart), MainPID none",
        ),
        (show_output("inactive", "dead", main_pid=0), False, False, None, "inactive (dead)"),
        (
            show_output("inactive", "dead", main_pid=0, load_state="not-found"),
            False,
            True,
            None,
            "unit not-found",
        ),
        (show_output(restarts=None), True, False, 812, "NRestarts unknown"),
    ],
)
def test_systemd_states_map_to_active_and_failed(
    fake_systemctl: FakeSystemctl,
    output: str,
    active: bool,
    failed: bool,
    main_pid: int | None,
    detail: str,
) -> None:
    fake_systemctl.respond("show", Response(output))

    state = SystemdManager(ServiceConfig()).state()

    assert (state.active, state.failed, state.main_pid) == (active, failed, main_pid)
    assert detail in state.detail


def test_systemd_restart_stop_and_start_call_systemctl_without_password_prompts(
    fake_systemctl: FakeSystemctl,
) -> None:
    manager = SystemdManager(ServiceConfig(unit="other.service"))

    manager.restart()
    manager.stop()
    manager.start()

    # A start is preceded by reset-failed, so that a start limit hit by a release that exited
    # at once does not refuse the rollback's restart.
    assert fake_systemctl.calls() == [
        ["--no-ask-password", "reset-failed", "other.service"],
        ["--no-ask-password", "restart", "other.service"],
        ["--no-ask-password", "stop", "other.service"],
        ["--no-ask-password", "reset-failed", "other.service"],
        ["--no-ask-password", "start", "other.service"],
    ]


def test_systemd_unknown_unit_fails_at_once_with_a_hint(fake_systemctl: FakeSystemctl) -> None:
    fake_systemctl.respond(
        "restart",
        Response(stderr="Failed to restart x.service: Unit x.service not found.\n", status=5),
    )

    with pytest.raises(ServiceError) as raised:
        SystemdManager(ServiceConfig(unit="x.service")).restart()

    assert str(raised.value) == (
        "systemctl --no-ask-password restart x.service exited with status 5: "
        "Failed to restart x.service: Unit x.service not found. (check service.unit "
        "(systemctl list-unit-files))"
    )
    assert [call[1] for call in fake_systemctl.calls()] == ["reset-failed", "restart"]


def test_systemd_access_denied_points_at_polkit(fake_systemctl: FakeSystemctl) -> None:
    fake_systemctl.respond(
        "restart",
        Response(stderr="Failed to restart dealspace.service: Access denied\n", status=1),
    )

    with pytest.raises(ServiceError, match=r"Access denied \(allow .* polkit rule\)$"):
        SystemdManager(ServiceConfig()).restart()

    assert [call[1] for call in fake_systemctl.calls()] == ["reset-failed", "restart"]


def test_systemd_bus_error_is_tried_again(fake_systemctl: FakeSystemctl) -> None:
    bus_down = Response(stderr="Failed to connect to bus: Connection refused\n", status=1)
    fake_systemctl.respond("restart", bus_down, bus_down, Response())

    SystemdManager(ServiceConfig()).restart()

    assert [call[1] for call in fake_systemctl.calls()] == [
        "reset-failed",
        "restart",
        "restart",
        "restart",
    ]


def test_systemd_bus_that_stays_down_gives_up_at_the_deadline(
    fake_systemctl: FakeSystemctl,
) -> None:
    fake_systemctl.respond(
        "show", Response(stderr="Failed to connect to bus: No such file or directory\n", status=1)
    )

    started = time.monotonic()
    with pytest.raises(ServiceError, match=r"Failed to connect to bus.* \(gave up after \d+ tries"):
        SystemdManager(ServiceConfig(restart_timeout_seconds=1.5)).state()

    assert 1.5 <= time.monotonic() - started < 4
    assert len(fake_systemctl.calls()) >= 2


def test_systemd_without_systemctl_on_path_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(
        ServiceError, match=r"^systemctl: cannot run it .* service\.manager = \"command\"$"
    ):
        SystemdManager(ServiceConfig()).state()


# The sample service itself


def test_releases_of_different_versions_differ_and_are_executable(
    sample_service: SampleService, tmp_path: Path
) -> None:
    one = sample_service.write_release(tmp_path / "one", "1.0.0")
    two = sample_service.write_release(tmp_path / "two", "1.0.1")

    assert one != two
    assert one.startswith(f"#!{PYTHON}\n".encode())
    assert (tmp_path / "one").stat().st_mode & 0o777 == 0o755
    assert sample_service.write_release(tmp_path / "again", "1.0.0") == one


def test_sample_service_writes_in_wal_mode_and_stops_cleanly_on_sigterm(
    sample_service: SampleService, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    sample_service.write_release(release, "7")
    process = subprocess.Popen([str(release)], stdin=subprocess.DEVNULL)
    try:
        assert sample_service.wait_healthy() == {"ok": True, "version": "7"}
        first = wait_for(sample_service.rows, what="a first row")
        wait_for(lambda: sample_service.rows() >= first + 3, what="more rows")

        process.send_signal(signal.SIGTERM)
        assert process.wait(5) == 0
    finally:
        process.kill()
        process.wait()

    with sqlite3.connect(sample_service.database) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("SELECT DISTINCT version FROM deals").fetchall() == [("7",)]


def test_sample_service_behaviour_exit_exits_1_at_once(
    sample_service: SampleService, tmp_path: Path
) -> None:
    sample_service.write_release(tmp_path / "release", "1", "exit")

    completed = subprocess.run([str(tmp_path / "release")], capture_output=True, timeout=10)

    assert completed.returncode == 1


def test_control_is_active_without_a_pidfile_exits_3(tmp_path: Path) -> None:
    argv = control_command(
        "is-active", binary=tmp_path / "bin", pidfile=tmp_path / "pid", log=tmp_path / "log"
    )

    completed = subprocess.run(argv, capture_output=True, text=True, timeout=10)

    assert completed.returncode == 3
    assert completed.stdout == ""


def test_control_is_active_names_the_recorded_process_only_while_it_is_that_process(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "pid"
    argv = control_command(
        "is-active", binary=tmp_path / "bin", pidfile=pidfile, log=tmp_path / "log"
    )
    process = subprocess.Popen(["sleep", "60"])
    try:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        start_time = fields[19]

        pidfile.write_text(f"{process.pid} {start_time}\n")
        alive = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        # The same PID with another start time: a newcomer that reused it, not ours.
        pidfile.write_text(f"{process.pid} {int(start_time) + 1}\n")
        reused = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    finally:
        process.kill()
        process.wait()
    pidfile.write_text(f"{process.pid} {start_time}\n")
    gone = subprocess.run(argv, capture_output=True, text=True, timeout=10)

    assert (alive.returncode, alive.stdout) == (0, f"{process.pid}\n")
    assert (reused.returncode, reused.stdout) == (3, "")
    assert (gone.returncode, gone.stdout) == (3, "")
    assert gone.stderr == f"not running ({pidfile} names no live process)\n"
