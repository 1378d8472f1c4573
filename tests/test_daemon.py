"""`stagewatch run` end to end: arm and files in either order, one deploy per push, expiry.

Every test starts the daemon as a real process on a sandbox host with a real sample service,
arms it over a real socket and watches it through GET /deploys/ID and GET /status.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

from daemon_fixtures import (  # noqa: F401 - fixtures
    Daemon,
    daemon_sandbox_fixture,
    sha256_hex,
)
from sandbox import Sandbox, fill_filesystem, wait_for

from stagewatch import lock
from stagewatch.history import History

MakeSandbox = Callable[..., tuple[Sandbox, Daemon]]


def deploy_records(sandbox: Sandbox) -> list[dict[str, object]]:
    history = sandbox.state / "history.db"
    if not history.exists():
        return []
    return [record.to_json() for record in History(history).recent(100) if record.kind == "deploy"]


def settled_count(daemon: Daemon) -> int:
    return daemon.log().count("Staged pair settled")


def assert_deployed_once(sandbox: Sandbox, daemon: Daemon, deploy_id: str, content: bytes) -> None:
    """One deploy record, this one, succeeded; the new bytes live; staging empty; idle."""
    records = deploy_records(sandbox)
    assert [(record["id"], record["outcome"]) for record in records] == [
        (deploy_id, "succeeded")
    ], records
    assert sandbox.binary.read_bytes() == content
    assert sandbox.binary.stat().st_mode & 0o777 == 0o755
    assert os.listdir(sandbox.staging) == []
    assert daemon.log().count("Deploy started") == 1
    wait_for(lambda: daemon.state() == "idle", 5, "the daemon to be idle again")


def test_arm_then_files_deploys_once_and_the_record_is_polled_from_armed_to_succeeded(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox()
    daemon.start()
    daemon.wait_serving()

    armed = daemon.arm({"version": "2.0"})
    assert armed.status == 202, armed
    deploy_id = armed.document["id"]
    assert armed.document["state"] == "armed"
    record = daemon.record(deploy_id)
    assert record is not None
    assert (record["state"], record["outcome"]) == ("armed", None)
    assert daemon.status()["state"] == "armed"

    seen: list[str] = []

    def poll() -> bool:
        record = daemon.record(deploy_id)
        assert record is not None
        if not seen or seen[-1] != record["state"]:
            seen.append(record["state"])
        return record["outcome"] is not None

    new = sandbox.stage("2.0")
    wait_for(poll, 20, "the deploy to finish")

    final = daemon.record(deploy_id)
    assert final is not None
    assert final["outcome"] == "succeeded", final
    assert (final["version"], final["sha256"]) == ("2.0", sha256_hex(new))
    assert final["trigger"] == "webhook"
    assert [step["name"] for step in final["steps"]] == [
        "verifying",
        "snapshotting",
        "swapping",
        "restarting",
        "checking",
    ]
    assert seen[0] == "armed" and seen[-1] == "finished", seen
    assert "checking" in seen, seen
    assert sandbox.served_version() == "2.0"
    assert_deployed_once(sandbox, daemon, deploy_id, new)


def test_files_then_arm_deploys_once(daemon_sandbox: MakeSandbox) -> None:
    sandbox, daemon = daemon_sandbox()
    daemon.start()
    daemon.wait_serving()

    new = sandbox.stage("2.0")
    daemon.wait_for_log("waiting for the webhook to arm a deploy")
    assert deploy_records(sandbox) == []

    armed = daemon.arm({"version": "2.0"})
    assert armed.status == 202, armed
    record = daemon.wait_outcome(armed.document["id"])

    assert record["outcome"] == "succeeded", record
    assert sandbox.served_version() == "2.0"
    assert_deployed_once(sandbox, daemon, armed.document["id"], new)


def test_files_staged_before_the_agent_started_deploy_with_the_first_arm(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox()
    new = sandbox.stage("2.0")
    daemon.start()
    daemon.wait_serving()
    daemon.wait_for_log("waiting for the webhook to arm a deploy")

    armed = daemon.arm()
    record = daemon.wait_outcome(armed.document["id"])

    assert record["outcome"] == "succeeded", record
    assert_deployed_once(sandbox, daemon, armed.document["id"], new)


def test_an_arm_that_no_files_follow_expires_and_the_agent_is_idle_again(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox(staging__arm_timeout_seconds=1)
    daemon.start()
    daemon.wait_serving()

    armed = daemon.arm({"version": "2.0"})
    assert armed.status == 202
    assert daemon.status()["armed_until"] == armed.document["armed_until"]

    record = daemon.wait_outcome(armed.document["id"], timeout=5)

    assert (record["state"], record["outcome"]) == ("finished", "expired")
    assert "1 s" in record["reason"]
    assert record["finished_at"] is not None
    status = daemon.status()
    assert (status["state"], status["armed_until"]) == ("idle", None)
    assert not (sandbox.state / "arm.json").exists()

    # Files that come after the expiry wait for a new arm like any others.
    sandbox.stage("2.0")
    daemon.wait_for_log("waiting for the webhook to arm a deploy")
    assert [record["outcome"] for record in deploy_records(sandbox)] == ["expired"]
    assert sandbox.served_version() == "1.0"


def test_files_without_an_arm_wait_and_say_so_once_however_many_pushes(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox()
    daemon.start()
    daemon.wait_serving()

    for number, version in enumerate(("2.0", "2.1", "2.2"), start=1):
        last = sandbox.stage(version)
        wait_for(lambda: settled_count(daemon) >= number, 10, f"push {number} to settle")  # noqa: B023

    assert deploy_records(sandbox) == []
    assert sandbox.served_version() == "1.0"
    armed = daemon.arm()
    record = daemon.wait_outcome(armed.document["id"])

    assert record["outcome"] == "succeeded", record
    assert sandbox.served_version() == "2.2"
    assert daemon.log().count("waiting for the webhook to arm a deploy") == 1, daemon.log()
    assert_deployed_once(sandbox, daemon, armed.document["id"], last)


def test_without_require_arm_complete_files_alone_deploy_once(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox(staging__require_arm=False)
    daemon.start()
    daemon.wait_serving()

    new = sandbox.stage("2.0")
    wait_for(lambda: deploy_records(sandbox), 10, "a deploy record")
    deploy_id = str(deploy_records(sandbox)[0]["id"])
    record = daemon.wait_outcome(deploy_id)

    assert record["outcome"] == "succeeded", record
    assert record["trigger"] == "files"
    assert sandbox.served_version() == "2.0"
    assert "waiting for the webhook" not in daemon.log()
    assert_deployed_once(sandbox, daemon, deploy_id, new)


def test_an_upload_in_a_hundred_writes_and_two_touches_is_one_deploy(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox(staging__settle_seconds=0.5)
    daemon.start()
    daemon.wait_serving()
    armed = daemon.arm({"version": "2.0"})

    content = sandbox.release_bytes("2.0")
    pieces = [content[index : index + 8] for index in range(0, len(content), 8)]
    pieces += [b"# padding\n"] * (100 - len(pieces))
    content = b"".join(pieces)
    with (sandbox.staging / "dealspace").open("wb") as stream:
        for piece in pieces:
            stream.write(piece)
            stream.flush()
            time.sleep(0.005)
    checksum = sandbox.staging / "dealspace.sha256"
    checksum.write_text(f"{sha256_hex(content)}  dealspace\n")
    for _ in range(2):
        time.sleep(0.02)
        os.utime(checksum)

    record = daemon.wait_outcome(armed.document["id"])

    assert record["outcome"] == "succeeded", record
    assert settled_count(daemon) == 1, daemon.log()
    assert sandbox.served_version() == "2.0"
    assert_deployed_once(sandbox, daemon, armed.document["id"], content)


def test_a_push_during_a_deploy_gets_409_and_waits_for_the_next_arm(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox(health__stable_seconds=2)
    daemon.start()
    daemon.wait_serving()
    first = daemon.arm({"version": "2.0"})
    deployed = sandbox.stage("2.0")
    wait_for(lambda: daemon.state() == "checking", 10, "the first deploy to be checking")

    pending = sandbox.stage("3.0")
    refused = daemon.arm({"version": "3.0"})
    record = daemon.wait_outcome(first.document["id"])

    assert refused.status == 409, refused
    assert refused.document["id"] == first.document["id"]
    assert first.document["id"] in refused.document["error"]
    assert record["outcome"] == "succeeded", record
    assert record["version"] == "2.0"
    assert record["sha256"] == sha256_hex(deployed)
    assert sandbox.served_version() == "2.0"
    daemon.wait_for_log("waiting for the webhook to arm a deploy")
    assert len(deploy_records(sandbox)) == 1
    assert (sandbox.staging / "dealspace").read_bytes() == pending

    second = daemon.arm({"version": "3.0"})
    assert second.status == 202, second
    assert second.document["id"] != first.document["id"]
    record = daemon.wait_outcome(second.document["id"])

    assert record["outcome"] == "succeeded", record
    assert sandbox.served_version() == "3.0"
    assert [record["outcome"] for record in deploy_records(sandbox)] == ["succeeded"] * 2


def test_a_second_post_while_armed_renews_the_same_arm(daemon_sandbox: MakeSandbox) -> None:
    sandbox, daemon = daemon_sandbox()
    daemon.start()
    daemon.wait_serving()

    first = daemon.arm({"version": "2.0"})
    time.sleep(0.01)
    again = daemon.arm({"version": "2.0"})

    assert again.status == 202
    assert again.document["id"] == first.document["id"]
    assert again.document["armed_until"] >= first.document["armed_until"]
    new = sandbox.stage("2.0")
    record = daemon.wait_outcome(first.document["id"])
    assert record["outcome"] == "succeeded", record
    assert_deployed_once(sandbox, daemon, first.document["id"], new)


def test_a_renewal_without_a_body_keeps_the_sha256_the_first_post_pinned(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox()
    daemon.start()
    daemon.wait_serving()
    pinned = "0" * 64

    first = daemon.arm({"sha256": pinned, "version": "2.0"})
    before = daemon.record(first.document["id"])
    again = daemon.arm()
    armed = daemon.record(first.document["id"])

    assert again.document["id"] == first.document["id"]
    assert before is not None and armed is not None
    assert (armed["sha256"], armed["version"]) == (pinned, "2.0")
    assert armed["started_at"] == before["started_at"]
    sandbox.stage("2.0")
    record = daemon.wait_outcome(first.document["id"])
    assert record["outcome"] == "rejected", record
    assert pinned in record["reason"]


def test_an_arm_gets_409_while_a_command_line_operation_holds_the_lock(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox()
    daemon.start()
    daemon.wait_serving()

    # This test's process is another process, as `stagewatch deploy` run by hand would be.
    with lock.exclusive(sandbox.config.state.lock_path, "deploy"):
        refused = daemon.arm()
    accepted = daemon.arm()

    assert refused.status == 409, refused
    assert "is running from the command line" in refused.document["error"]
    assert accepted.status == 202, accepted
    assert [record["id"] for record in deploy_records(sandbox)] == [accepted.document["id"]]


def test_an_unknown_deploy_id_is_404_and_requests_need_the_secret(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox()
    daemon.start()
    daemon.wait_serving()

    assert daemon.request("GET", "/deploys/20260101T000000Z-000000").status == 404
    assert daemon.request("GET", "/status", secret=None).status == 401
    assert daemon.arm(secret=b"wrong").status == 401
    assert deploy_records(sandbox) == []


def test_the_agent_exits_2_naming_the_key_when_the_webhook_port_is_taken(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox(install=False)
    with socket.create_server(("127.0.0.1", sandbox.webhook_port), reuse_port=False):
        daemon.start()
        assert daemon.process is not None
        code = daemon.process.wait(15)

    assert code == 2, daemon.log()
    assert "webhook.listen" in daemon.log()


def test_under_journald_every_line_has_a_priority_prefix_and_no_timestamp(
    daemon_sandbox: MakeSandbox,
) -> None:
    sandbox, daemon = daemon_sandbox()
    daemon.start({"JOURNAL_STREAM": "8:1234"})
    daemon.wait_serving()

    # A rejected release, so that warnings and errors are logged as well as information.
    sandbox.stage("2.0", checksum="0" * 64 + "  dealspace\n")
    armed = daemon.arm()
    assert daemon.wait_outcome(armed.document["id"])["outcome"] == "rejected"
    daemon.stop()

    lines = daemon.log().splitlines()
    assert lines, "nothing was logged"
    unprefixed = [line for line in lines if not re.match(r"<[0-7]>\S", line)]
    assert not unprefixed, unprefixed
    stamped = [line for line in lines if re.search(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d", line)]
    assert not stamped, stamped
    priorities = {line[1] for line in lines}
    assert {"3", "4", "6"} <= priorities, lines


def test_outside_journald_lines_carry_a_timestamp_and_the_level(
    daemon_sandbox: MakeSandbox,
) -> None:
    _, daemon = daemon_sandbox(install=False)
    daemon.start()
    daemon.wait_serving()
    daemon.stop()

    lines = daemon.log().splitlines()
    assert lines
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line) for line in lines)


def test_a_deploy_refused_before_its_first_step_is_recorded_as_rejected(
    daemon_sandbox: MakeSandbox,
) -> None:
    # A journal that cannot be read stops every deploy before it starts, until the operator
    # looks at it; the armed attempt must not be left without an outcome meanwhile.
    sandbox, daemon = daemon_sandbox()
    old = sandbox.binary.read_bytes()
    sandbox.state.mkdir(parents=True, exist_ok=True)
    (sandbox.state / "journal.json").write_text("{ torn")
    daemon.start()
    daemon.wait_serving()
    assert daemon.state() == "interrupted"

    armed = daemon.arm()
    sandbox.stage("2.0")
    record = daemon.wait_outcome(armed.document["id"])

    assert (record["state"], record["outcome"]) == ("finished", "rejected")
    assert "journal" in record["reason"]
    assert sandbox.binary.read_bytes() == old
    assert os.listdir(sandbox.staging) == []
    assert sorted(os.listdir(sandbox.state / "rejected" / armed.document["id"])) == [
        "dealspace",
        "dealspace.sha256",
    ]


def test_under_journald_a_traceback_keeps_the_priority_on_every_line(
    daemon_sandbox: MakeSandbox,
) -> None:
    # A folder where the journal should be: reading it fails in a way nobody planned for.
    sandbox, daemon = daemon_sandbox(install=False)
    (sandbox.state / "journal.json").mkdir(parents=True)
    daemon.start({"JOURNAL_STREAM": "8:1234"})
    daemon.wait_serving()
    daemon.stop()

    lines = daemon.log().splitlines()
    assert any("Could not settle the interrupted deploy" in line for line in lines), lines
    unprefixed = [line for line in lines if not re.match(r"<[0-7]>", line)]
    assert not unprefixed, lines


def test_a_deploy_stopped_by_a_full_state_folder_is_settled_once_there_is_room(
    mount_tmpfs: Callable[[str, str], Path], daemon_sandbox: MakeSandbox
) -> None:
    # mount_tmpfs first, so that it is unmounted after the daemon, which holds files there.
    state = mount_tmpfs("state-tmpfs", "4m")
    sandbox, daemon = daemon_sandbox(state__dir=str(state), health__stable_seconds=1.5)
    daemon.start()
    daemon.wait_serving()
    armed = daemon.arm()
    deploy_id = armed.document["id"]
    new = sandbox.stage("2.0")

    # Full while the health probation runs: the outcome cannot be journaled.
    wait_for(lambda: daemon.state() == "checking", 15, "the probation to start")
    filler = fill_filesystem(state / "filler")
    daemon.wait_for_log("failed again", timeout=20)

    refused = daemon.arm()
    assert refused.status == 409, refused.document
    assert (state / "journal.json").exists()

    filler.unlink()
    record = daemon.wait_outcome(deploy_id, timeout=60)

    assert (record["state"], record["outcome"]) == ("finished", "succeeded"), record
    assert sandbox.binary.read_bytes() == new
    # The outcome is saved first; the journal goes last, once the attempt is tidied up.
    wait_for(lambda: daemon.state() == "idle", 10, "the daemon to be idle again")
    assert not (state / "journal.json").exists()
    assert sorted(os.listdir(sandbox.binary.parent)) == ["dealspace"]
