"""Fuzzing the webhook listener with hypothesis: more than 5,000 raw requests over real sockets.

Garbage, near-valid requests with wrong secrets and bad signatures, broken framing and huge
headers all go to one server. None of them may arm the target, crash or block the server,
or leave a connection open after the client has finished; afterwards a valid request still
arms.
"""

from __future__ import annotations

import itertools
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook
from test_webhook import read_until_closed

from stagewatch.config import WebhookConfig
from stagewatch.webhook import WebhookServer

SECRET = secrets.token_hex(32).encode()
# 200 is /healthz; 100 Continue is the interim answer to a request that asked for it.
ANSWERS_TO_INVALID_REQUESTS = {100, 200, 400, 401, 404, 405, 413, 429, 431}
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


class ArmRecorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arms: list[tuple[str | None, str | None, bool]] = []

    def arm(self, sha256: str | None, version: str | None, force: bool) -> dict[str, Any]:
        with self.lock:
            self.arms.append((sha256, version, force))
            return {"id": f"d{len(self.arms)}", "state": "armed", "armed_until": "later"}

    def deploy_record(self, deploy_id: str) -> dict[str, Any] | None:
        return None

    def status(self) -> dict[str, Any]:
        return {"state": "idle"}


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[tuple[WebhookServer, ArmRecorder]]:
    target = ArmRecorder()
    server = WebhookServer(WebhookConfig(listen="127.0.0.1:0"), SECRET, target)
    server.start()
    yield server, target
    server.stop()


def send(server: WebhookServer, pieces: list[bytes]) -> bytes:
    """Send the pieces, half-close, and read until the server closes (within 5 s)."""
    with socket.create_connection(server.address, timeout=5) as sock:
        # Each piece leaves at once, as its own segment, rather than waiting for an ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for piece in pieces:
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server refused the request and closed before all of it was sent

        return read_until_closed(sock)


def check_refused(server: WebhookServer, target: ArmRecorder, pieces: list[bytes]) -> None:
    answered = re.findall(rb"HTTP/1\.1 (\d{3}) ", send(server, pieces))

    assert {int(status) for status in answered} <= ANSWERS_TO_INVALID_REQUESTS, answered
    assert target.arms == []


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` in pieces, cut at the given offsets (taken modulo its length)."""
    offsets = sorted({cut % (len(data) or 1) for cut in cuts} | {0, len(data)})
    return [data[start:end] for start, end in itertools.pairwise(offsets)] or [data]


def wrong_signature(webhook_id: str, moment: datetime, body: bytes, key: bytes) -> str:
    return Webhook(key).sign(webhook_id, moment, body)


# Strategies

methods = st.sampled_from(
    [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"post", b"P0ST"]
)
paths = st.sampled_from(
    [
        b"/deploy",
        b"/deploy/",
        b"/deploy?force=true",
        b"/deploys/d1",
        b"/deploys/../status",
        b"/deploys/",
        b"/status",
        b"/healthz",
        b"/",
        b"*",
        b"http://127.0.0.1/deploy",
        b"/%64eploy",
        b"//deploy",
    ]
) | st.binary(max_size=40).map(lambda tail: b"/" + tail)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0", b"HTTP/1.x", b""])

wrong_secrets = st.one_of(
    st.just(b""),
    st.just(SECRET[:-1]),
    st.just(SECRET + b"0"),
    st.just(SECRET.upper()),
    st.integers(0, len(SECRET) - 1).map(
        lambda index: (
            SECRET[:index]
            + (b"x" if SECRET[index : index + 1] != b"x" else b"y")
            + SECRET[index + 1 :]
        )
    ),
    st.binary(max_size=80).filter(lambda value: value != SECRET),
)
timestamps = st.one_of(
    st.integers(-(10**12), 10**12).map(lambda seconds: str(seconds).encode()),
    st.sampled_from([b"", b"now", b"1e9", b"0x10", b" 1", b"1.5"]),
    st.integers(301, 10**7).map(lambda offset: str(int(time.time()) - offset).encode()),
    st.integers(301, 10**7).map(lambda offset: str(int(time.time()) + offset).encode()),
)
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    st.sampled_from(
        [
            b"{}",
            b"[]",
            b"null",
            b"{",
            b'{"sha256": "ab"}',
            b'{"force": "yes"}',
            b'{"version": "1.0", "force": true}',
            b'{"sha256": "' + b"ab" * 32 + b'", "extra": 1}',
        ]
    ),
)
header_names = st.sampled_from(
    [
        b"X-Webhook-Secret",
        b"x-webhook-secret",
        b"webhook-id",
        b"Webhook-Timestamp",
        b"webhook-signature",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Connection",
        b"Expect",
        b"Host",
        b"Upgrade",
    ]
) | st.binary(min_size=1, max_size=24)
header_values = st.one_of(
    wrong_secrets,
    timestamps,
    st.sampled_from([b"chunked", b"close", b"keep-alive", b"100-continue", b"Upgrade", b"0"]),
    st.integers(0, 10**6).map(lambda number: str(number).encode()),
    st.binary(max_size=60),
)


@st.composite
def near_valid_requests(draw: st.DrawFn) -> bytes:
    """A request that looks right but whose credentials are wrong, with some noise around."""
    method, path, version, body = draw(methods), draw(paths), draw(versions), draw(bodies)
    headers: list[tuple[bytes, bytes]] = [(b"Host", b"127.0.0.1")]

    credential = draw(st.sampled_from(["secret", "signature", "stale signature", "none"]))
    if credential == "secret":
        headers.append((b"X-Webhook-Secret", draw(wrong_secrets)))
    elif credential != "none":
        webhook_id = draw(st.text("abcdef0123456789_", min_size=1, max_size=20))
        stale = credential == "stale signature"
        offset = draw(st.integers(301, 10**6)) * draw(st.sampled_from([-1, 1])) if stale else 0
        moment = datetime.fromtimestamp(int(time.time()) + offset, tz=UTC)
        # A stale timestamp is signed with the right secret: only its age is wrong.
        key = SECRET if stale else draw(st.binary(min_size=1, max_size=40))
        signed_body = body if draw(st.booleans()) or stale else body + b"!"
        signature = wrong_signature(webhook_id, moment, signed_body, key)
        noise = draw(st.lists(st.binary(max_size=50).map(lambda value: b"v1," + value), max_size=2))
        headers += [
            (b"webhook-id", webhook_id.encode()),
            (b"webhook-timestamp", str(int(moment.timestamp())).encode()),
            (b"webhook-signature", b" ".join([*noise, signature.encode()])),
        ]

    headers += draw(st.lists(st.tuples(header_names, header_values), max_size=3))
    framing = draw(st.sampled_from(["length", "wrong length", "chunked", "none"]))
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "wrong length":
        headers.append((b"Content-Length", str(draw(st.integers(0, 20000))).encode()))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"

    head = b"%s %s %s\r\n" % (method, path, version)
    head += b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
    return head + b"\r\n" + body


framing_templates = st.sampled_from(
    [
        b"POST /deploy HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"POST /deploy HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
        b"POST /deploy HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;"
        + b"e" * 3000
        + b"\r\nabc\r\n",
        b"POST /deploy HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX: y\r\n\r\n",
        b"POST /deploy HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
        b"POST /deploy HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /deploy HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /deploy HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"POST /deploy HTTP/1.1\nX-Webhook-Secret: x\n\n",
        b"GET /healthz HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nX\x00: y\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\nGARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n\x00\x01\x02",
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\nSSH-2.0-x\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"POST /deploy HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
        b"POST /deploy HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 3000,
        b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 2500 + b"\r\n",
    ]
)


@st.composite
def broken_framing(draw: st.DrawFn) -> bytes:
    """A template of tricky framing, mutated at a few random places."""
    data = bytearray(draw(framing_templates))
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.sampled_from([b"\r", b"\n", b" ", b":", b"0", b"f", b"\x00", b"\xff"]))
        if action == "insert":
            data[position:position] = byte
        elif action == "delete":
            del data[position : position + 1]
        else:
            data[position : position + 1] = byte
    return bytes(data)


@st.composite
def huge_headers(draw: st.DrawFn) -> bytes:
    size = draw(st.integers(8000, 48000))
    shape = draw(st.sampled_from(["one value", "many headers", "long url", "long name"]))
    if shape == "one value":
        return b"POST /deploy HTTP/1.1\r\nX-Webhook-Secret: " + b"s" * size + b"\r\n\r\n"
    if shape == "many headers":
        return b"POST /deploy HTTP/1.1\r\n" + b"X-Pad: 0123456789\r\n" * (size // 19) + b"\r\n"
    if shape == "long url":
        return b"GET /deploys/" + b"d" * size + b" HTTP/1.1\r\n\r\n"
    return b"GET /healthz HTTP/1.1\r\n" + b"N" * size + b": v\r\n\r\n"


cuts = st.lists(st.integers(0, 10**6), max_size=6)


@settings(FUZZ, max_examples=1800)
@given(data=st.binary(max_size=4096), pieces=cuts)
def test_garbage_is_refused(
    fuzzed: tuple[WebhookServer, ArmRecorder], data: bytes, pieces: list[int]
) -> None:
    check_refused(*fuzzed, split(data, pieces))


@settings(FUZZ, max_examples=1500)
@given(requests=st.lists(near_valid_requests(), min_size=1, max_size=2), pieces=cuts)
def test_near_valid_requests_with_wrong_credentials_are_refused(
    fuzzed: tuple[WebhookServer, ArmRecorder], requests: list[bytes], pieces: list[int]
) -> None:
    check_refused(*fuzzed, split(b"".join(requests), pieces))


@settings(FUZZ, max_examples=1300)
@given(data=broken_framing(), pieces=cuts)
def test_broken_framing_is_refused(
    fuzzed: tuple[WebhookServer, ArmRecorder], data: bytes, pieces: list[int]
) -> None:
    check_refused(*fuzzed, split(data, pieces))


@settings(FUZZ, max_examples=500)
@given(data=huge_headers(), pieces=cuts)
def test_huge_headers_are_refused(
    fuzzed: tuple[WebhookServer, ArmRecorder], data: bytes, pieces: list[int]
) -> None:
    check_refused(*fuzzed, split(data, pieces))


def test_after_the_fuzzing_a_valid_request_still_arms(
    fuzzed: tuple[WebhookServer, ArmRecorder],
) -> None:
    server, target = fuzzed
    body = b'{"version": "after fuzzing"}'
    moment = datetime.now(tz=UTC)
    signature = Webhook(SECRET).sign("msg_final", moment, body)

    by_header = send(
        server,
        [
            b"POST /deploy HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (SECRET, len(body), body)
        ],
    )
    by_signature = send(
        server,
        [
            b"POST /deploy HTTP/1.1\r\nHost: x\r\nwebhook-id: msg_final\r\n"
            b"webhook-timestamp: %d\r\nwebhook-signature: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (int(moment.timestamp()), signature.encode(), len(body), body)
        ],
    )
    server.stop()  # its target thread must be gone before the check for leaked threads

    assert by_header.startswith(b"HTTP/1.1 202 ")
    assert by_signature.startswith(b"HTTP/1.1 202 ")
    assert target.arms == [(None, "after fuzzing", False)] * 2
