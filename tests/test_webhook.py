"""The webhook listener over real sockets on 127.0.0.1: the HTTP API, its limits, TLS, reload.

Clients are curl, http.client, raw sockets and the `standardwebhooks` package as an
independent signer. The target is a small real implementation that records every arm.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import resource
import secrets
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sandbox import free_port, wait_for
from standardwebhooks.webhooks import Webhook

from stagewatch import webhook
from stagewatch.config import WebhookConfig
from stagewatch.errors import BusyError, ConfigError
from stagewatch.heartbeat import Heartbeats
from stagewatch.webhook import WebhookServer

SHA256 = "AB" * 32


class RecordingTarget:
    """A coordinator stand-in: records arms, can be busy, knows a few deploy records."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arms: list[tuple[str | None, str | None, bool]] = []
        self.running: str | None = None
        self.records: dict[str, dict[str, Any]] = {}
        self.state: dict[str, Any] = {"state": "idle", "armed_until": None, "last": None}
        self.delay_seconds = 0.0
        self.release = threading.Event()
        self.release.set()

    def arm(self, sha256: str | None, version: str | None, force: bool) -> dict[str, Any]:
        self.release.wait()
        with self.lock:
            if self.running is not None:
                error = BusyError("a deploy is running")
                error.deploy_id = self.running  # type: ignore[attr-defined]
                raise error
            self.arms.append((sha256, version, force))
            return {
                "id": f"d{len(self.arms)}",
                "state": "armed",
                "armed_until": "2030-01-01T00:00:00Z",
            }

    def deploy_record(self, deploy_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self.records.get(deploy_id)

    def status(self) -> dict[str, Any]:
        time.sleep(self.delay_seconds)
        with self.lock:
            return dict(self.state)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Setup:
    """What a test needs to talk to one server."""

    server: WebhookServer
    secret: bytes
    target: RecordingTarget
    config: WebhookConfig
    started: list[WebhookServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        host, port = self.server.address
        return f"http://{host}:{port}"

    def call(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Answer:
        connection = http.client.HTTPConnection(*self.server.address, timeout=5)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Answer(response.status, dict(response.getheaders()), response.read())
        finally:
            connection.close()

    def post(self, body: bytes = b"", **headers: str) -> Answer:
        return self.call(
            "POST", "/deploy", body, {"X-Webhook-Secret": self.secret.decode(), **headers}
        )

    def authenticated_get(self, path: str) -> Answer:
        return self.call("GET", path, headers={"X-Webhook-Secret": self.secret.decode()})


@pytest.fixture
def target() -> RecordingTarget:
    return RecordingTarget()


@pytest.fixture
def serve(target: RecordingTarget) -> Iterator[Callable[..., Setup]]:
    """Start servers on 127.0.0.1:0; every one is stopped, and its thread gone, at the end."""
    started: list[WebhookServer] = []

    def start(secret: bytes | None = None, **options: Any) -> Setup:
        secret = secret if secret is not None else secrets.token_hex(32).encode()
        config_keys = {
            key: options.pop(key)
            for key in ("auth", "path", "tls_cert", "tls_key")
            if key in options
        }
        config = WebhookConfig(listen="127.0.0.1:0", **config_keys)
        server = WebhookServer(config, secret, target, **options)
        server.start()
        started.append(server)
        return Setup(server, secret, target, config, started)

    yield start

    target.release.set()
    for server in started:
        server.stop()
    assert not [thread for thread in threading.enumerate() if thread.name == "stagewatch-webhook"]


@pytest.fixture
def setup(serve: Callable[..., Setup]) -> Setup:
    return serve()


def signature_headers(
    signer: Webhook, body: bytes, webhook_id: str | None = None, at: float | None = None
) -> dict[str, str]:
    webhook_id = webhook_id or f"msg_{secrets.token_hex(8)}"
    moment = datetime.fromtimestamp(at if at is not None else time.time(), tz=UTC)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signer.sign(webhook_id, moment, body),
    }


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes; fail if it does not close in time."""
    sock.settimeout(timeout)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def exchange(setup: Setup, data: bytes, half_close: bool = True) -> bytes:
    """Send raw bytes on a new connection and read until the server closes it."""
    with socket.create_connection(setup.server.address, timeout=5) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock)


def statuses(raw: bytes) -> list[int]:
    """The status of every answer in `raw`, pipelined ones included."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def is_closed(sock: socket.socket, timeout: float) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout)
    if not readable:
        return False
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


# Arming


def test_curl_with_the_header_secret_arms_and_gets_202(setup: Setup) -> None:
    shown = subprocess.run(
        [
            "curl", "-sS", "--max-time", "5", "-X", "POST",
            "-H", f"X-Webhook-Secret: {setup.secret.decode()}",
            "--data-binary", json.dumps({"sha256": SHA256, "version": "1.4.2", "force": True}),
            "-w", "\n%{http_code} %{content_type}",
            f"{setup.url}/deploy",
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip

    body, status_line = shown.stdout.rsplit("\n", 1)
    assert status_line == "202 application/json"
    assert json.loads(body) == {"id": "d1", "state": "armed", "armed_until": "2030-01-01T00:00:00Z"}
    assert setup.target.arms == [(SHA256.lower(), "1.4.2", True)]


def test_an_empty_body_arms_with_no_fields(setup: Setup) -> None:
    assert setup.post().status == 202
    assert setup.post(b'{"sha256": null, "version": null, "force": null}').status == 202

    assert setup.target.arms == [(None, None, False), (None, None, False)]


def test_a_standard_webhooks_signature_arms(setup: Setup) -> None:
    body = json.dumps({"version": "2.0"}).encode()

    answer = setup.call("POST", "/deploy", body, signature_headers(Webhook(setup.secret), body))

    assert answer.status == 202
    assert setup.target.arms == [(None, "2.0", False)]


def test_a_whsec_secret_verifies_signatures_with_its_decoded_key_and_works_in_the_header(
    serve: Callable[..., Setup],
) -> None:
    import base64

    text = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    setup = serve(text.encode())
    body = b'{"force": false}'

    assert setup.call("POST", "/deploy", body, signature_headers(Webhook(text), body)).status == 202
    assert setup.post(body).status == 202
    assert len(setup.target.arms) == 2


def test_one_right_signature_among_several_is_enough(setup: Setup) -> None:
    body = b"{}"
    headers = signature_headers(Webhook(setup.secret), body)
    wrong = signature_headers(Webhook(b"an old secret"), body, headers["webhook-id"])
    headers["webhook-signature"] = f"{wrong['webhook-signature']} {headers['webhook-signature']}"

    assert setup.call("POST", "/deploy", body, headers).status == 202


def test_a_replayed_webhook_id_is_refused(setup: Setup) -> None:
    body = b"{}"
    headers = signature_headers(Webhook(setup.secret), body)

    assert setup.call("POST", "/deploy", body, headers).status == 202
    replay = setup.call("POST", "/deploy", body, headers)

    assert (replay.status, replay.json) == (401, {"error": "unauthorized"})
    assert len(setup.target.arms) == 1


@pytest.mark.parametrize("offset_seconds", [-400, 400])
def test_stale_and_future_timestamps_are_refused(setup: Setup, offset_seconds: int) -> None:
    body = b"{}"
    headers = signature_headers(Webhook(setup.secret), body, at=time.time() + offset_seconds)

    assert setup.call("POST", "/deploy", body, headers).status == 401
    assert setup.target.arms == []


def test_a_signature_over_another_body_is_refused(setup: Setup) -> None:
    headers = signature_headers(Webhook(setup.secret), b'{"force": false}')

    assert setup.call("POST", "/deploy", b'{"force": true}', headers).status == 401
    assert setup.target.arms == []


def test_wrong_and_missing_credentials_get_the_same_401(setup: Setup) -> None:
    wrong_secret = setup.call("POST", "/deploy", b"{}", {"X-Webhook-Secret": "guess"})
    missing = setup.call("POST", "/deploy", b"{}")
    bad_signature = setup.call(
        "POST", "/deploy", b"{}", signature_headers(Webhook(b"guess"), b"{}")
    )

    for answer in (wrong_secret, missing, bad_signature):
        assert answer.status == 401
        assert answer.body == b'{"error": "unauthorized"}'
        assert answer.headers["Content-Type"] == "application/json"
        assert setup.secret not in answer.body
    without_date = [
        {name: value for name, value in answer.headers.items() if name != "Date"}
        for answer in (wrong_secret, missing, bad_signature)
    ]
    assert without_date[0] == without_date[1] == without_date[2]
    assert setup.target.arms == []


def test_auth_header_refuses_signatures(serve: Callable[..., Setup]) -> None:
    setup = serve(auth="header")
    body = b"{}"

    assert (
        setup.call("POST", "/deploy", body, signature_headers(Webhook(setup.secret), body)).status
        == 401
    )
    assert setup.post(body).status == 202


def test_auth_signature_refuses_the_header(serve: Callable[..., Setup]) -> None:
    setup = serve(auth="signature")
    body = b"{}"

    assert setup.post(body).status == 401
    assert (
        setup.call("POST", "/deploy", body, signature_headers(Webhook(setup.secret), body)).status
        == 202
    )


def test_the_webhook_path_is_the_configured_one(serve: Callable[..., Setup]) -> None:
    setup = serve(path="/hooks/stagewatch")

    assert (
        setup.call(
            "POST", "/hooks/stagewatch", headers={"X-Webhook-Secret": setup.secret.decode()}
        ).status
        == 202
    )
    assert setup.post().status == 404


def test_a_busy_target_gives_409_with_the_running_deploy(setup: Setup) -> None:
    setup.target.running = "d41"

    answer = setup.post()

    assert (answer.status, answer.json) == (409, {"error": "a deploy is running", "id": "d41"})


# Bodies


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{", "body: not valid JSON"),
        (b"\xff\xfe{}", "body: not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "body: not valid JSON"),
        (b"1" * 5000, "body: not valid JSON"),
        (b"[]", "body: must be a JSON object"),
        (b'"sha256"', "body: must be a JSON object"),
        (b'{"sha": "ab"}', "sha: unknown field"),
        (b'{"sha256": "abc"}', "sha256: "),
        (b'{"sha256": 5}', "sha256: "),
        (b'{"sha256": "' + b"g" * 64 + b'"}', "sha256: "),
        (b'{"sha256": "' + b"a" * 64 + b'\\n"}', "sha256: "),
        (b'{"version": ""}', "version: "),
        (b'{"version": "1.0\\nrm -rf"}', "version: "),
        (b'{"version": "' + b"v" * 129 + b'"}', "version: "),
        (b'{"version": 3}', "version: "),
        (b'{"force": "yes"}', "force: "),
        (b'{"force": 1}', "force: "),
    ],
)
def test_a_malformed_body_gets_400_naming_the_field(setup: Setup, body: bytes, named: str) -> None:
    answer = setup.post(body)

    assert answer.status == 400
    assert answer.json["error"].startswith(named)
    assert setup.target.arms == []


def test_a_body_is_judged_only_after_the_credentials(setup: Setup) -> None:
    answer = setup.call("POST", "/deploy", b"{", {"X-Webhook-Secret": "guess"})

    assert answer.status == 401


def test_a_content_length_over_16_kib_gets_413_before_the_body_is_sent(setup: Setup) -> None:
    with socket.create_connection(setup.server.address, timeout=5) as sock:
        sock.sendall(
            b"POST /deploy HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: %s\r\n"
            b"Content-Length: 16385\r\n\r\n" % setup.secret
        )
        raw = read_until_closed(sock)

    assert statuses(raw) == [413]
    assert b"Connection: close" in raw
    assert setup.target.arms == []


def test_a_body_of_exactly_16_kib_is_read(setup: Setup) -> None:
    body = b'{"version": "' + b"x" * (16 * 1024 - 15) + b'"}'
    assert len(body) == 16 * 1024

    assert setup.post(body).status == 400  # read whole, and refused for its version's length


def test_a_chunked_body_over_16_kib_gets_413_while_it_streams(setup: Setup) -> None:
    chunk = b"x" * 4096
    with socket.create_connection(setup.server.address, timeout=5) as sock:
        sock.sendall(
            b"POST /deploy HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: %s\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" % setup.secret
        )
        for _ in range(5):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        # The terminating chunk is never sent: the answer must come while the body streams.
        raw = read_until_closed(sock)

    assert statuses(raw) == [413]
    assert setup.target.arms == []


def test_a_chunked_body_within_16_kib_is_accepted(setup: Setup) -> None:
    body = b'{"version": "7"}'
    raw = exchange(
        setup,
        b"POST /deploy HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: %s\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (setup.secret, len(body), body),
    )

    assert statuses(raw) == [202]
    assert setup.target.arms == [(None, "7", False)]


def test_headers_over_16_kib_get_431_sent_at_once_or_trickled(setup: Setup) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * 17000 + b"\r\n\r\n"

    assert statuses(exchange(setup, head)) == [431]

    with socket.create_connection(setup.server.address, timeout=5) as sock:
        for start in range(0, len(head), 1000):
            sock.sendall(head[start : start + 1000])
            time.sleep(0.002)
        assert statuses(read_until_closed(sock)) == [431]


def test_expect_100_continue_is_answered_so_that_curl_sends_its_body_at_once(setup: Setup) -> None:
    started = time.monotonic()
    shown = subprocess.run(
        [
            "curl", "-sS", "--max-time", "10", "--expect100-timeout", "5",
            "-H", "Expect: 100-continue", "-H", f"X-Webhook-Secret: {setup.secret.decode()}",
            "--data-binary", '{"version": "9"}', "-o", "/dev/null", "-w", "%{http_code}",
            f"{setup.url}/deploy",
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip

    assert shown.stdout == "202"
    assert time.monotonic() - started < 3
    assert setup.target.arms == [(None, "9", False)]


# The other requests


def test_healthz_answers_without_credentials_and_says_nothing_else(setup: Setup) -> None:
    plain = setup.call("GET", "/healthz")
    with_a_wrong_secret = setup.call("GET", "/healthz", headers={"X-Webhook-Secret": "guess"})

    for answer in (plain, with_a_wrong_secret):
        assert (answer.status, answer.body) == (200, b'{"ok": true}')
        assert answer.headers["Content-Type"] == "application/json"


def test_a_deploy_record_is_200_when_known_and_404_otherwise(setup: Setup) -> None:
    record = {"id": "d1", "outcome": "succeeded", "sha256": SHA256.lower(), "steps": []}
    setup.target.records["d1"] = record

    known = setup.authenticated_get("/deploys/d1")
    unknown = setup.authenticated_get("/deploys/d2")
    not_an_id = setup.authenticated_get("/deploys/..%2fstatus")
    unauthenticated = setup.call("GET", "/deploys/d1")

    assert (known.status, known.json) == (200, record)
    assert (unknown.status, not_an_id.status, unauthenticated.status) == (404, 404, 401)


def test_status_is_the_targets_status(setup: Setup) -> None:
    setup.target.state = {"state": "armed", "armed_until": "2030-01-01T00:00:00Z", "last": None}

    answer = setup.authenticated_get("/status?verbose=1")

    assert (answer.status, answer.json) == (200, setup.target.state)
    assert setup.call("GET", "/status").status == 401


def test_unknown_paths_get_404_and_wrong_methods_405_with_allow(setup: Setup) -> None:
    unknown = setup.call("GET", "/deploy/")
    deploy_by_get = setup.call("GET", "/deploy")
    status_by_post = setup.call("POST", "/status")
    healthz_by_delete = setup.call("DELETE", "/healthz")

    assert (unknown.status, unknown.json) == (404, {"error": "not found"})
    assert (deploy_by_get.status, deploy_by_get.headers["Allow"]) == (405, "POST")
    assert (status_by_post.status, status_by_post.headers["Allow"]) == (405, "GET")
    assert (healthz_by_delete.status, healthz_by_delete.headers["Allow"]) == (405, "GET")
    for answer in (unknown, deploy_by_get, status_by_post, healthz_by_delete):
        assert answer.headers["Content-Type"] == "application/json"
        assert json.loads(answer.body)["error"]


def test_an_answer_to_head_has_no_body(setup: Setup) -> None:
    raw = exchange(
        setup, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    )

    first, second = raw.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"405 ") and first.endswith(b"\r\n\r\n")
    assert second.startswith(b"200 ") and second.endswith(b'{"ok": true}')


def test_keep_alive_serves_several_requests_on_one_connection(setup: Setup) -> None:
    connection = http.client.HTTPConnection(*setup.server.address, timeout=5)
    try:
        seen = []
        for method, path in [("GET", "/healthz"), ("GET", "/status"), ("POST", "/deploy")]:
            connection.request(method, path, headers={"X-Webhook-Secret": setup.secret.decode()})
            response = connection.getresponse()
            response.read()
            seen.append((response.status, connection.sock))
    finally:
        connection.close()

    assert [status for status, _ in seen] == [200, 200, 202]
    assert seen[0][1] is seen[1][1] is seen[2][1]


def test_http_10_closes_unless_asked_to_keep_alive(setup: Setup) -> None:
    closing = exchange(setup, b"GET /healthz HTTP/1.0\r\n\r\n", half_close=False)
    assert statuses(closing) == [200]
    assert b"Connection: close" in closing

    with socket.create_connection(setup.server.address, timeout=5) as sock:
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            answer = sock.recv(65536)
            assert statuses(answer) == [200] and b"Connection: keep-alive" in answer


def test_pipelined_requests_are_answered_in_order_while_the_target_is_slow(setup: Setup) -> None:
    setup.target.delay_seconds = 0.2
    secret = setup.secret

    raw = exchange(
        setup,
        b"GET /status HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: %s\r\n\r\n"
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /deploy HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: %s\r\nContent-Length: 2\r\n\r\n{}"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" % (secret, secret),
    )

    assert statuses(raw) == [200, 404, 202, 200]
    assert raw.endswith(b'{"ok": true}')


def test_an_upgrade_request_is_answered_then_the_connection_closed(setup: Setup) -> None:
    raw = exchange(
        setup,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x85 not http",
        half_close=False,
    )

    assert statuses(raw) == [200]


def test_malformed_http_gets_400_and_the_connection_closed(setup: Setup) -> None:
    raw = exchange(setup, b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n", half_close=False)

    assert statuses(raw) == [400]
    assert b'"malformed HTTP request"' in raw


# Failures and throttling


def test_429_after_20_failures_while_valid_credentials_are_still_served(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = {"X-Webhook-Secret": "guess"}

    with caplog.at_level(logging.WARNING, logger="stagewatch.authentication"):
        failures = [setup.call("POST", "/deploy", b"", wrong).status for _ in range(20)]
        throttled = setup.call("POST", "/deploy", b"", wrong)
        for _ in range(30):
            setup.call("POST", "/deploy", b"", wrong)

    assert failures == [401] * 20
    assert (throttled.status, throttled.json) == (429, {"error": "too many failed attempts"})
    assert throttled.headers["Retry-After"] == "60"

    assert setup.post().status == 202
    body = b"{}"
    assert (
        setup.call("POST", "/deploy", body, signature_headers(Webhook(setup.secret), body)).status
        == 202
    )
    assert setup.call("GET", "/status", headers=wrong).status == 429
    assert setup.authenticated_get("/status").status == 200
    assert len(setup.target.arms) == 2

    first_failure, throttling = (record.getMessage() for record in caplog.records)
    assert "127.0.0.1: wrong secret" in first_failure
    assert "Throttling" in throttling and "127.0.0.1" in throttling


# Deadlines, idle connections, the connection cap


def test_slow_silent_and_idle_connections_are_closed_after_10_s(setup: Setup) -> None:
    address = setup.server.address
    slow = socket.create_connection(address)
    silent = socket.create_connection(address)
    idle = socket.create_connection(address)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(idle.recv(65536)) == [200]

    request = b"POST /deploy HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: %s\r\n\r\n" % setup.secret
    started = time.monotonic()
    closed_after: dict[str, float] = {}
    sockets = {"slow": slow, "silent": silent, "idle": idle}
    sent = 0
    try:
        while len(closed_after) < 3 and time.monotonic() - started < 14:
            if "slow" not in closed_after and time.monotonic() - started >= sent:
                try:
                    slow.send(request[sent : sent + 1])  # one byte a second
                except OSError:
                    closed_after["slow"] = time.monotonic() - started
                sent += 1
            for name, sock in sockets.items():
                if name not in closed_after and is_closed(sock, 0.05):
                    closed_after[name] = time.monotonic() - started
    finally:
        for sock in sockets.values():
            sock.close()

    assert sorted(closed_after) == ["idle", "silent", "slow"]
    for name, seconds in closed_after.items():
        assert 9.5 <= seconds <= 12, f"{name} closed after {seconds:.1f} s"
    assert sent < len(request)
    assert setup.target.arms == []


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_500_idle_connections_are_cheap_and_a_valid_request_is_served_at_once(
    setup: Setup, many_descriptors: None
) -> None:
    setup.call("GET", "/healthz")  # warm up, so that only the connections are measured
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    idle = [socket.create_connection(setup.server.address) for _ in range(500)]
    try:
        assert setup.call("GET", "/healthz").status == 200  # every connection before it is in
        per_connection = (tracemalloc.get_traced_memory()[0] - before) / len(idle)
        tracemalloc.stop()

        started = time.monotonic()
        armed = setup.post()
        seconds = time.monotonic() - started
        healthz = setup.call("GET", "/healthz")
    finally:
        tracemalloc.stop()
        for sock in idle:
            sock.close()

    assert armed.status == 202 and seconds < 1
    assert healthz.status == 200
    assert per_connection < 4096, f"{per_connection:.0f} bytes per idle connection"


def test_the_listen_queue_holds_600_connections_while_the_loop_is_busy(
    setup: Setup, many_descriptors: None
) -> None:
    loop = setup.server._loop
    assert loop is not None
    loop.call_soon_threadsafe(time.sleep, 2)  # nothing is accepted meanwhile
    time.sleep(0.1)

    started = time.monotonic()
    # Beyond the kernel's queue, a connect would wait a second or more for a SYN retry.
    queued = [socket.create_connection(setup.server.address, timeout=1) for _ in range(600)]
    seconds = time.monotonic() - started
    try:
        assert seconds < 1.5
        assert setup.call("GET", "/healthz").status == 200
    finally:
        for sock in queued:
            sock.close()


def test_at_the_cap_the_longest_waiting_connection_is_evicted_for_a_new_one(
    serve: Callable[..., Setup],
) -> None:
    setup = serve(max_connections=8)
    address = setup.server.address
    idle = [socket.create_connection(address) for _ in range(7)]
    kept_alive = socket.create_connection(address)
    try:
        kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(kept_alive.recv(65536)) == [200]  # all eight are in

        assert setup.post().status == 202

        assert is_closed(idle[0], 2)
        assert not any(is_closed(sock, 0) for sock in [*idle[1:], kept_alive])
    finally:
        for sock in [*idle, kept_alive]:
            sock.close()


SERVER_WITH_FEW_DESCRIPTORS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (300, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from stagewatch.config import WebhookConfig
from stagewatch.webhook import WebhookServer

class Target:
    def arm(self, sha256, version, force):
        return {"id": "d1", "state": "armed", "armed_until": "later"}

server = WebhookServer(WebhookConfig(listen="127.0.0.1:0"), b"the secret", Target())
server.start()
print(server.address[1], flush=True)
sys.stdin.read()
server.stop()
"""


def test_an_open_file_limit_below_the_cap_lowers_the_cap_so_that_eviction_still_works(
    many_descriptors: None,
) -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_WITH_FEW_DESCRIPTORS],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    idle: list[socket.socket] = []
    try:
        address = ("127.0.0.1", int(server.stdout.readline()))  # type: ignore[union-attr]
        idle = [socket.create_connection(address) for _ in range(400)]

        connection = http.client.HTTPConnection(*address, timeout=3)
        connection.request("POST", "/deploy", headers={"X-Webhook-Secret": "the secret"})
        assert connection.getresponse().status == 202
        connection.close()
    finally:
        for sock in idle:
            sock.close()
        _, errors = server.communicate(timeout=10)

    assert "takes at most 172 connections, not 1024: the open file limit is 300" in errors


# TLS, reload, start and stop


def make_certificate(cert: Path, key: Path) -> None:
    """A new self-signed certificate for 127.0.0.1, with a new key."""
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True, capture_output=True,
    )  # fmt: skip


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_certificate(cert, key)
    return cert, key


def curl_https(setup: Setup, cert: Path, secret: bytes) -> subprocess.CompletedProcess[str]:
    host, port = setup.server.address
    return subprocess.run(
        [
            "curl", "-sS", "--max-time", "5", "--cacert", str(cert), "-X", "POST",
            "-H", f"X-Webhook-Secret: {secret.decode()}", "-o", "/dev/null", "-w", "%{http_code}",
            f"https://{host}:{port}/deploy",
        ],
        capture_output=True, text=True,
    )  # fmt: skip


def test_tls_serves_https_with_a_self_signed_certificate(
    serve: Callable[..., Setup], certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    setup = serve(tls_cert=cert, tls_key=key)

    assert curl_https(setup, cert, setup.secret).stdout == "202"
    assert setup.target.arms == [(None, None, False)]

    plain = exchange(setup, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b'{"ok": true}' not in plain

    context = ssl.create_default_context(cafile=str(cert))
    with (
        socket.create_connection(setup.server.address, timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_tls_files_that_cannot_be_loaded_are_a_config_error(
    target: RecordingTarget, tmp_path: Path
) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    config = WebhookConfig(
        listen="127.0.0.1:0", tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem"
    )

    with pytest.raises(ConfigError, match=r"^webhook\.tls_cert: "):
        WebhookServer(config, b"s", target).start()


def test_start_raises_a_config_error_naming_webhook_listen_when_the_port_is_taken(
    target: RecordingTarget,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = WebhookServer(WebhookConfig(listen=f"127.0.0.1:{port}"), b"s", target)

        with pytest.raises(ConfigError, match=r"^webhook\.listen: cannot listen on 127\.0\.0\.1:"):
            server.start()


def test_reload_switches_the_secret_for_new_requests(setup: Setup) -> None:
    new_secret = secrets.token_hex(32).encode()

    setup.server.reload(setup.config, new_secret)

    assert setup.post().status == 401
    assert (
        setup.call("POST", "/deploy", headers={"X-Webhook-Secret": new_secret.decode()}).status
        == 202
    )


def test_reload_narrows_auth_and_keeps_the_replay_cache(setup: Setup) -> None:
    body = b"{}"
    headers = signature_headers(Webhook(setup.secret), body)
    assert setup.call("POST", "/deploy", body, headers).status == 202

    setup.server.reload(replace(setup.config, auth="header"), setup.secret)
    assert (
        setup.call("POST", "/deploy", body, signature_headers(Webhook(setup.secret), body)).status
        == 401
    )

    setup.server.reload(setup.config, setup.secret)
    assert setup.call("POST", "/deploy", body, headers).status == 401  # replayed


def test_a_reload_that_cannot_be_used_keeps_the_old_secret(setup: Setup) -> None:
    with pytest.raises(ConfigError, match=r"^webhook\.secret_file: "):
        setup.server.reload(setup.config, b"whsec_###")

    assert setup.post().status == 202


def test_reload_binds_a_new_address_and_lets_the_old_one_go(setup: Setup) -> None:
    old_address = setup.server.address
    new_port = free_port()

    setup.server.reload(replace(setup.config, listen=f"127.0.0.1:{new_port}"), setup.secret)

    assert setup.server.address == ("127.0.0.1", new_port)
    assert setup.post().status == 202
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(old_address, timeout=2).close()


def test_reload_turns_tls_on_at_the_same_address(
    setup: Setup, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    address = setup.server.address

    setup.server.reload(replace(setup.config, tls_cert=cert, tls_key=key), setup.secret)

    assert setup.server.address == address
    assert curl_https(setup, cert, setup.secret).stdout == "202"


def test_reload_reads_a_renewed_certificate_at_the_same_paths(
    serve: Callable[..., Setup], certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certificate
    setup = serve(tls_cert=cert, tls_key=key)
    old_cert = tmp_path / "old-cert.pem"
    old_cert.write_bytes(cert.read_bytes())
    make_certificate(cert, key)

    setup.server.reload(setup.config, setup.secret)

    assert curl_https(setup, cert, setup.secret).stdout == "202"
    assert curl_https(setup, old_cert, setup.secret).returncode != 0


def test_the_heartbeat_probe_says_whether_the_event_loop_turns(
    serve: Callable[..., Setup], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook, "LOOP_PING_GRACE_SECONDS", 0.3)
    heartbeats = Heartbeats()
    setup = serve(heartbeats=heartbeats)
    wait_for(lambda: heartbeats.stalled() == [], 2, "the first ping answered")

    # An idle loop is not asked: it waits in epoll, with nothing of ours to be stuck in.
    loop = setup.server._loop
    assert loop is not None
    loop.call_soon_threadsafe(time.sleep, 1.5)
    time.sleep(0.1)
    assert heartbeats.stalled() == []
    turned = threading.Event()
    loop.call_soon_threadsafe(turned.set)
    assert turned.wait(3), "the loop did not come back from its stall"

    # With a connection open the loop has work, and a stall of it is noticed.
    client = socket.create_connection(setup.server.address)
    try:
        # An answer proves the loop took the connection; keep-alive keeps it open.
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
        wait_for(lambda: heartbeats.stalled() == [], 2, "a ping answered with work on the loop")
        loop.call_soon_threadsafe(time.sleep, 1.5)
        time.sleep(0.1)
        heartbeats.stalled()  # sends a ping the stalled loop cannot answer

        wait_for(lambda: heartbeats.stalled() == ["webhook"], 1, "the stall noticed")
        wait_for(lambda: heartbeats.stalled() == [], 3, "the loop turning again")
    finally:
        client.close()

    setup.server.stop()
    assert heartbeats.stalled() == []


def test_stop_closes_every_connection_within_2_s_even_with_the_target_blocked(
    setup: Setup,
) -> None:
    idle = [socket.create_connection(setup.server.address) for _ in range(50)]
    setup.target.release.clear()
    blocked = threading.Thread(
        target=lambda: exchange(
            setup,
            b"POST /deploy HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: %s\r\n\r\n" % setup.secret,
        )
    )
    blocked.start()
    try:
        wait_for(lambda: setup.authenticated_get("/status").status == 200, 2, "the server")
        address = setup.server.address

        started = time.monotonic()
        setup.server.stop()

        assert time.monotonic() - started < 2
        assert all(is_closed(sock, 1) for sock in idle)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2).close()
    finally:
        setup.target.release.set()
        blocked.join(5)
        for sock in idle:
            sock.close()
