"""The webhook's credentials: header secret, Standard Webhooks signatures, replays, throttling.

The signatures are made by the `standardwebhooks` package, an implementation independent of
ours; the clock is a real stand-in that the tests move by hand.
"""

from __future__ import annotations

import base64
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook

from stagewatch.authentication import (
    MALFORMED_TIMESTAMP,
    MISSING_CREDENTIALS,
    REPLAYED_ID,
    STALE_TIMESTAMP,
    WRONG_SECRET,
    Authenticator,
    FailureLimiter,
    ReplayCache,
    signing_key,
)
from stagewatch.errors import ConfigError

NOW = 1_800_000_000.0
BODY = b'{"sha256": null}'


@dataclass
class Headers:
    header_secret: bytes | None = None
    webhook_id: bytes | None = None
    webhook_timestamp: bytes | None = None
    webhook_signature: bytes | None = None


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def signed(
    signer: Webhook, body: bytes = BODY, webhook_id: str = "msg_1", at: float = NOW
) -> Headers:
    signature = signer.sign(webhook_id, datetime.fromtimestamp(at, tz=UTC), body)
    return Headers(
        webhook_id=webhook_id.encode(),
        webhook_timestamp=str(int(at)).encode(),
        webhook_signature=signature.encode(),
    )


@pytest.fixture
def secret() -> bytes:
    return secrets.token_hex(32).encode()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def authenticator(secret: bytes, clock: Clock, mode: str = "any") -> Authenticator:
    return Authenticator(secret, mode, ReplayCache(), clock)


def test_the_header_secret_is_accepted_and_a_wrong_or_missing_one_is_named(
    secret: bytes, clock: Clock
) -> None:
    check = authenticator(secret, clock).check

    assert check(Headers(header_secret=secret), b"") is None
    assert check(Headers(header_secret=secret + b"x"), b"") == WRONG_SECRET
    assert check(Headers(header_secret=b""), b"") == WRONG_SECRET
    assert check(Headers(), b"") == MISSING_CREDENTIALS


def test_a_signature_of_the_standardwebhooks_package_is_accepted(
    secret: bytes, clock: Clock
) -> None:
    check = authenticator(secret, clock).check

    assert check(signed(Webhook(secret)), BODY) is None


def test_a_signature_over_another_body_or_with_another_secret_is_wrong(
    secret: bytes, clock: Clock
) -> None:
    check = authenticator(secret, clock).check

    assert check(signed(Webhook(secret)), BODY + b" ") == WRONG_SECRET
    assert check(signed(Webhook(secret + b"x"), webhook_id="msg_2"), BODY) == WRONG_SECRET


def test_a_whsec_secret_signs_with_its_decoded_bytes_and_works_whole_in_the_header(
    clock: Clock,
) -> None:
    text = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    check = authenticator(text.encode(), clock).check

    assert check(signed(Webhook(text)), BODY) is None
    assert check(Headers(header_secret=text.encode()), b"") is None


def test_a_whsec_secret_may_leave_out_its_base64_padding() -> None:
    key = secrets.token_bytes(32)  # 32 bytes encode to 44 characters, one of them padding
    encoded = base64.b64encode(key).rstrip(b"=")

    assert signing_key(b"whsec_" + encoded) == key


@pytest.mark.parametrize("secret", [b"whsec_not base64!", b"whsec_"])
def test_a_whsec_secret_that_does_not_decode_is_a_config_error(secret: bytes) -> None:
    with pytest.raises(ConfigError, match=r"^webhook\.secret_file: "):
        Authenticator(secret, "any", ReplayCache())


def test_an_unknown_mode_is_a_config_error_naming_webhook_auth(secret: bytes) -> None:
    with pytest.raises(ConfigError, match=r"^webhook\.auth: "):
        Authenticator(secret, "both", ReplayCache())


def test_one_right_signature_among_several_is_enough(secret: bytes, clock: Clock) -> None:
    check = authenticator(secret, clock).check
    headers = signed(Webhook(secret))
    wrong = signed(Webhook(b"old secret")).webhook_signature
    assert headers.webhook_signature is not None and wrong is not None

    headers.webhook_signature = b"v1a,AAAA " + wrong + b" " + headers.webhook_signature

    assert check(headers, BODY) is None


@pytest.mark.parametrize("offset", [-301, 301, -10_000, 10_000])
def test_a_timestamp_more_than_300_s_away_is_stale(
    secret: bytes, clock: Clock, offset: int
) -> None:
    check = authenticator(secret, clock).check

    assert check(signed(Webhook(secret), at=NOW + offset), BODY) == STALE_TIMESTAMP


@pytest.mark.parametrize("offset", [-300, 300])
def test_a_timestamp_300_s_away_is_still_accepted(secret: bytes, clock: Clock, offset: int) -> None:
    check = authenticator(secret, clock).check

    assert check(signed(Webhook(secret), at=NOW + offset), BODY) is None


@pytest.mark.parametrize("timestamp", [b"", b"-5", b"1.5", b"12e3", b" 1800000000", b"9" * 13])
def test_a_timestamp_that_is_not_unix_seconds_is_malformed(
    secret: bytes, clock: Clock, timestamp: bytes
) -> None:
    headers = signed(Webhook(secret))
    headers.webhook_timestamp = timestamp

    assert authenticator(secret, clock).check(headers, BODY) == MALFORMED_TIMESTAMP


def test_an_id_is_accepted_once(secret: bytes, clock: Clock) -> None:
    check = authenticator(secret, clock).check
    headers = signed(Webhook(secret))

    assert check(headers, BODY) is None
    assert check(headers, BODY) == REPLAYED_ID
    assert check(signed(Webhook(secret), webhook_id="msg_other"), BODY) is None


def test_an_id_sent_first_with_a_bad_signature_stays_usable(secret: bytes, clock: Clock) -> None:
    check = authenticator(secret, clock).check

    assert check(signed(Webhook(b"guess"), webhook_id="msg_7"), BODY) == WRONG_SECRET
    assert check(signed(Webhook(secret), webhook_id="msg_7"), BODY) is None


def test_a_replay_after_the_window_is_stale_and_the_id_is_forgotten(
    secret: bytes, clock: Clock
) -> None:
    replays = ReplayCache()
    check = Authenticator(secret, "any", replays, clock).check
    headers = signed(Webhook(secret))
    assert check(headers, BODY) is None

    clock.now += 301

    assert check(headers, BODY) == STALE_TIMESTAMP
    assert check(signed(Webhook(secret), webhook_id="msg_2", at=clock.now), BODY) is None
    assert len(replays) == 1


def test_the_replay_cache_keeps_at_most_its_bound_of_ids() -> None:
    replays = ReplayCache(max_ids=3)

    for number in range(10):
        assert replays.accept_once(b"id-%d" % number, NOW + 300, NOW)

    assert len(replays) == 3
    assert not replays.accept_once(b"id-9", NOW + 300, NOW)


def test_a_mode_of_header_ignores_signatures(secret: bytes, clock: Clock) -> None:
    check = authenticator(secret, clock, mode="header").check

    assert check(signed(Webhook(secret)), BODY) == MISSING_CREDENTIALS
    assert check(Headers(header_secret=secret), b"") is None


def test_a_mode_of_signature_ignores_the_header(secret: bytes, clock: Clock) -> None:
    check = authenticator(secret, clock, mode="signature").check

    assert check(Headers(header_secret=secret), b"") == MISSING_CREDENTIALS
    assert check(signed(Webhook(secret)), BODY) is None


def test_a_mode_of_any_takes_a_good_signature_beside_a_wrong_header(
    secret: bytes, clock: Clock
) -> None:
    headers = signed(Webhook(secret))
    headers.header_secret = b"wrong"

    assert authenticator(secret, clock).check(headers, BODY) is None


def test_incomplete_signature_headers_are_missing_credentials(secret: bytes, clock: Clock) -> None:
    headers = signed(Webhook(secret))
    headers.webhook_id = None

    assert authenticator(secret, clock).check(headers, BODY) == MISSING_CREDENTIALS


def test_more_than_20_failures_in_60_s_throttle_the_address_for_60_s(clock: Clock) -> None:
    limiter = FailureLimiter(clock=clock)

    assert [limiter.record_failure("192.0.2.1", WRONG_SECRET) for _ in range(20)] == [0] * 20
    assert limiter.record_failure("192.0.2.1", WRONG_SECRET) == 60
    assert limiter.record_failure("192.0.2.2", WRONG_SECRET) == 0

    clock.now += 45.5
    assert limiter.record_failure("192.0.2.1", WRONG_SECRET) == 15

    clock.now += 15
    assert limiter.record_failure("192.0.2.1", WRONG_SECRET) == 0


def test_failures_spread_over_more_than_60_s_never_throttle(clock: Clock) -> None:
    limiter = FailureLimiter(clock=clock)

    for _ in range(100):
        assert limiter.record_failure("192.0.2.1", WRONG_SECRET) == 0
        clock.now += 3.1


def test_the_table_of_addresses_is_bounded_forgetting_the_least_recent_first(
    clock: Clock,
) -> None:
    limiter = FailureLimiter(max_addresses=100, clock=clock)
    for _ in range(21):
        limiter.record_failure("192.0.2.1", WRONG_SECRET)

    for number in range(99):
        limiter.record_failure(f"198.51.100.{number}", WRONG_SECRET)
    assert len(limiter) == 100
    assert limiter.record_failure("192.0.2.1", WRONG_SECRET) > 0

    for number in range(100):
        limiter.record_failure(f"203.0.113.{number}", WRONG_SECRET)
    assert len(limiter) == 100
    assert limiter.record_failure("192.0.2.1", WRONG_SECRET) == 0


def test_a_flood_logs_the_first_failure_and_the_start_of_throttling_only(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = FailureLimiter(clock=clock)

    with caplog.at_level(logging.WARNING, logger="stagewatch.authentication"):
        for _ in range(5000):
            limiter.record_failure("192.0.2.1", STALE_TIMESTAMP)

    assert len(caplog.records) == 2
    first, throttling = (record.getMessage() for record in caplog.records)
    assert "192.0.2.1" in first and "stale timestamp" in first
    assert "192.0.2.1" in throttling and "Throttling" in throttling


def test_failures_from_many_addresses_log_a_bounded_number_of_lines(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = FailureLimiter(max_warnings=50, clock=clock)

    with caplog.at_level(logging.WARNING, logger="stagewatch.authentication"):
        for number in range(3000):
            limiter.record_failure(f"2001:db8::{number:x}", MISSING_CREDENTIALS)

    assert len(caplog.records) == 51
    assert "many addresses" in caplog.records[-1].getMessage()

    clock.now += 60
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stagewatch.authentication"):
        limiter.record_failure("192.0.2.9", REPLAYED_ID)
    assert "replayed webhook-id" in caplog.records[0].getMessage()
