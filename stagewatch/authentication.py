"""Who may talk to the webhook: the two forms of credential, the replay cache, the failure limit.

A request proves it knows the webhook secret in one of two ways (CONTRACT.md, "Webhook"):

- the header `X-Webhook-Secret: <secret>`, compared in constant time;
- a Standard Webhooks signature (https://www.standardwebhooks.com/): the headers
  `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature`, a space-separated
  list of `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`. The key is the secret's
  bytes, or for a secret `whsec_<base64>` the bytes that base64 decodes to. A timestamp more
  than 300 s away from our clock is refused, and an id is accepted once.

`webhook.auth` narrows the choice to `header` or `signature`; `any` accepts either.

Failed attempts are counted per client address. Valid credentials are always served, however
many failures came from the same address: the build machine may share its address with an
attacker, and the secret is 32 random bytes, so throttling is not what protects it. Beyond
the limit an address's failures get 429 instead of 401, which slows a guesser down and keeps
the log quiet.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from stagewatch.errors import ConfigError

logger = logging.getLogger(__name__)

AUTH_MODES = ("any", "header", "signature")
TIMESTAMP_TOLERANCE_SECONDS = 300
SECRET_PREFIX = b"whsec_"

MAX_FAILURES = 20
FAILURE_WINDOW_SECONDS = 60.0
THROTTLE_SECONDS = 60
MAX_ADDRESSES = 4096
MAX_REMEMBERED_IDS = 4096
MAX_WARNINGS_PER_WINDOW = 50

# Why an attempt failed, as the log names it. A client only ever sees 401 or 429.
MISSING_CREDENTIALS = "missing credentials"
WRONG_SECRET = "wrong secret"  # noqa: S105 - a reason for the log, not a secret
STALE_TIMESTAMP = "stale timestamp"
MALFORMED_TIMESTAMP = "malformed webhook-timestamp"
REPLAYED_ID = "replayed webhook-id"


class Credentials(Protocol):
    """The raw values of the credential headers of one request; None where absent."""

    header_secret: bytes | None
    webhook_id: bytes | None
    webhook_timestamp: bytes | None
    webhook_signature: bytes | None


class ReplayCache:
    """The Standard Webhooks ids accepted recently, so that a captured request is not replayed.

    An id need only be remembered until its timestamp leaves the tolerance window, since the
    request is refused as stale from then on. Only validly signed requests add ids, so only a
    holder of the secret can fill the cache; when full, the oldest id is forgotten first.
    """

    def __init__(self, max_ids: int = MAX_REMEMBERED_IDS) -> None:
        self._max_ids = max_ids
        self._expires_at: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self._expires_at)

    def accept_once(self, webhook_id: bytes, expires_at: float, now: float) -> bool:
        """Remember `webhook_id` until `expires_at`; False if it is already remembered."""
        self._forget_expired(now)

        known_until = self._expires_at.get(webhook_id)
        if known_until is not None and known_until > now:
            return False

        if len(self._expires_at) >= self._max_ids:
            del self._expires_at[next(iter(self._expires_at))]

        self._expires_at[webhook_id] = expires_at
        return True

    def _forget_expired(self, now: float) -> None:
        # Insertion order is nearly expiry order (timestamps are close to arrival times), so
        # the expired ids are found at the front; a straggler waits for its turn.
        while self._expires_at:
            oldest, expires_at = next(iter(self._expires_at.items()))
            if expires_at > now:
                return
            del self._expires_at[oldest]


class Authenticator:
    """Checks the credentials of a request against one secret and one `webhook.auth` mode.

    The secret and the mode never change; a reload builds a new Authenticator around the
    same ReplayCache, so that an id accepted before the reload is still refused after it.
    """

    def __init__(
        self,
        secret: bytes,
        mode: str,
        replays: ReplayCache,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Raise ConfigError if the mode is unknown or a `whsec_` secret is not base64."""
        if mode not in AUTH_MODES:
            raise ConfigError(f"webhook.auth: must be one of {', '.join(AUTH_MODES)}")

        self._secret = secret
        self._signing_key = signing_key(secret)
        self._accepts_header = mode in ("any", "header")
        self._accepts_signature = mode in ("any", "signature")
        self._replays = replays
        self._clock = clock

    def check(self, credentials: Credentials, body: bytes) -> str | None:
        """None when the request is authenticated, else why not (one of the reasons above)."""
        header_secret = credentials.header_secret if self._accepts_header else None
        if header_secret is not None and hmac.compare_digest(header_secret, self._secret):
            return None

        if self._accepts_signature and _has_signature_headers(credentials):
            return self._check_signature(credentials, body)

        return MISSING_CREDENTIALS if header_secret is None else WRONG_SECRET

    def _check_signature(self, credentials: Credentials, body: bytes) -> str | None:
        webhook_id = credentials.webhook_id
        timestamp = credentials.webhook_timestamp
        signatures = credentials.webhook_signature
        if webhook_id is None or timestamp is None or signatures is None:
            return MISSING_CREDENTIALS

        if not timestamp.isdigit() or len(timestamp) > 12:
            return MALFORMED_TIMESTAMP

        now = self._clock()
        sent_at = int(timestamp)
        if abs(now - sent_at) > TIMESTAMP_TOLERANCE_SECONDS:
            return STALE_TIMESTAMP

        signed = b"%s.%s.%s" % (webhook_id, timestamp, body)
        digest = hmac.new(self._signing_key, signed, hashlib.sha256).digest()
        expected = b"v1," + base64.b64encode(digest)
        if not any(hmac.compare_digest(given, expected) for given in signatures.split(b" ")):
            return WRONG_SECRET

        # Checked only once the signature holds, so that nobody without the secret can make
        # an id unusable by sending it first.
        if not self._replays.accept_once(webhook_id, sent_at + TIMESTAMP_TOLERANCE_SECONDS, now):
            return REPLAYED_ID

        return None


def signing_key(secret: bytes) -> bytes:
    """The HMAC key for a secret: the decoded bytes of `whsec_<base64>`, else the secret."""
    if not secret.startswith(SECRET_PREFIX):
        return secret

    # Standard Webhooks secrets are often written without base64 padding; restore it.
    encoded = secret[len(SECRET_PREFIX) :].rstrip(b"=")
    try:
        key = base64.b64decode(encoded + b"=" * (-len(encoded) % 4), validate=True)
    except ValueError:
        raise ConfigError(
            "webhook.secret_file: the secret starts with whsec_ but the rest is not base64; "
            "write the whole whsec_... value as given, or a secret without that prefix"
        ) from None

    if not key:
        raise ConfigError("webhook.secret_file: the secret whsec_ has nothing after the prefix")

    return key


def _has_signature_headers(credentials: Credentials) -> bool:
    return (
        credentials.webhook_id is not None
        or credentials.webhook_timestamp is not None
        or credentials.webhook_signature is not None
    )


@dataclass(slots=True)
class _AddressRecord:
    window_started: float
    failures: int = 0
    throttled_until: float = 0.0


class FailureLimiter:
    """Counts failed attempts per client address and says when to answer 429 instead of 401.

    More than `max_failures` failures within `window_seconds` throttle the address for
    `throttle_seconds`; its failures during that time are answered 429 and not counted. The
    table holds at most `max_addresses` addresses, the one that failed least recently being
    forgotten first. The log gets one warning for the first failure of an address in a
    window and one when its throttling starts, and at most `max_warnings` lines a window in
    all, so that a flood from many addresses cannot flood the journal either.
    """

    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window_seconds: float = FAILURE_WINDOW_SECONDS,
        throttle_seconds: int = THROTTLE_SECONDS,
        max_addresses: int = MAX_ADDRESSES,
        max_warnings: int = MAX_WARNINGS_PER_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_failures = max_failures
        self._window_seconds = window_seconds
        self._throttle_seconds = throttle_seconds
        self._max_addresses = max_addresses
        self._max_warnings = max_warnings
        self._clock = clock
        self._records: dict[str, _AddressRecord] = {}
        self._warnings_window_started = -math.inf
        self._warnings = 0

    def __len__(self) -> int:
        return len(self._records)

    def record_failure(self, address: str, reason: str) -> int:
        """Count one failure from `address`: 0 to answer 401, else the seconds of Retry-After."""
        now = self._clock()
        record = self._records.pop(address, None)
        if record is None:
            record = self._new_record(now)
        self._records[address] = record

        if now < record.throttled_until:
            return math.ceil(record.throttled_until - now)

        if now - record.window_started >= self._window_seconds:
            record.window_started = now
            record.failures = 0

        record.failures += 1
        if record.failures > self._max_failures:
            record.throttled_until = now + self._throttle_seconds
            self._warn(
                now,
                "Throttling webhook clients from %s for %d s: more than %d failed attempts "
                "within %g s (the last: %s)",
                address,
                self._throttle_seconds,
                self._max_failures,
                self._window_seconds,
                reason,
            )
            return self._throttle_seconds

        if record.failures == 1:
            self._warn(
                now,
                "Webhook authentication failed from %s: %s (further failures from it "
                "within %g s are counted, not logged)",
                address,
                reason,
                self._window_seconds,
            )

        return 0

    def _new_record(self, now: float) -> _AddressRecord:
        if len(self._records) >= self._max_addresses:
            del self._records[next(iter(self._records))]
        return _AddressRecord(window_started=now)

    def _warn(self, now: float, message: str, *arguments: object) -> None:
        if now - self._warnings_window_started >= self._window_seconds:
            self._warnings_window_started = now
            self._warnings = 0

        self._warnings += 1
        if self._warnings <= self._max_warnings:
            logger.warning(message, *arguments)
        elif self._warnings == self._max_warnings + 1:
            logger.warning(
                "Webhook authentication keeps failing from many addresses; no more of it "
                "is logged for up to %g s",
                self._window_seconds,
            )
