"""The webhook listener: HTTP/1.1 on an asyncio event loop, parsed by llhttp through httptools.

    POST <webhook.path>   arm the agent (authenticated)          202, 400, 409
    GET  /deploys/<id>    one history record (authenticated)     200, 404
    GET  /status          the agent's state (authenticated)      200
    GET  /healthz         liveness, and nothing else             200

The listener runs its own event loop on one thread. Everything a client without the secret
can reach is answered on that loop from pre-encoded bytes, before any JSON is parsed: unknown
paths, wrong methods, /healthz, and every refusal of size or of credentials. Only
authenticated requests reach the ArmTarget, through a pool of two threads, so that a target
waiting on its lock never stalls the loop.

Each limit closes one way for a client to hold the agent:

- at most 16 KiB of body (413, decided from Content-Length at once, or while a chunked body
  arrives) and 16 KiB of request line and headers (431); the connection is then closed;
- 10 s for a request to arrive from its first byte, and 10 s for a connection to begin one
  (after accept, or after the previous answer on a keep-alive connection);
- at most 1024 connections (fewer if the open file limit is lower): one more evicts the
  connection that has waited longest without a complete request, so that a crowd of idle
  sockets cannot lock the build machine out;
- at most 16 pipelined requests waiting behind one that the target answers.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import re
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from typing import Any, Protocol, TypeVar, cast

import httptools

from stagewatch.authentication import Authenticator, FailureLimiter, ReplayCache
from stagewatch.config import WebhookConfig
from stagewatch.errors import BusyError, ConfigError
from stagewatch.heartbeat import Heartbeats

logger = logging.getLogger(__name__)

_Result = TypeVar("_Result")

MAX_BODY_BYTES = 16 * 1024
MAX_HEAD_BYTES = 16 * 1024
# Everything one request may send, framing included: a chunked body in tiny chunks, or
# trailers, costs more than its 16 KiB of content, and llhttp keeps no limit of its own.
MAX_REQUEST_BYTES = 64 * 1024
REQUEST_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 1024
# Descriptors left to the rest of the agent (SQLite, inotify, logs, child processes) when the
# open file limit is what bounds the connections.
DESCRIPTORS_KEPT_FREE = 128
LISTEN_BACKLOG = 1024
# New connections taken per turn of the event loop. Few enough that the descriptors of the
# connections they evict are closed before many more are taken (DESCRIPTORS_KEPT_FREE).
ACCEPTS_PER_TURN = 16
MAX_PIPELINED_REQUESTS = 16
TARGET_THREADS = 2
# How long the event loop may take to answer a ping before the watchdog calls it stalled.
LOOP_PING_GRACE_SECONDS = 5.0
STOP_TIMEOUT_SECONDS = 2.0

ARM_FIELDS = ("sha256", "version", "force")
MAX_VERSION_LENGTH = 128

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_DEPLOY_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_DEPLOYS_PREFIX = b"/deploys/"

_HEALTHY = b'{"ok": true}'
_UNAUTHORIZED = b'{"error": "unauthorized"}'
_THROTTLED = b'{"error": "too many failed attempts"}'
_NOT_FOUND = b'{"error": "not found"}'
_UNKNOWN_DEPLOY = b'{"error": "no deploy has this id"}'
_METHOD_NOT_ALLOWED = b'{"error": "method not allowed"}'
_BODY_TOO_LARGE = b'{"error": "request body over 16 KiB"}'
_HEAD_TOO_LARGE = b'{"error": "request line and headers over 16 KiB"}'
_MALFORMED = b'{"error": "malformed HTTP request"}'
_INTERNAL = b'{"error": "internal error"}'
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# The Connection header of an answer: none for HTTP/1.1 keep-alive, which is the default.
_KEEP_ALIVE = b""
_KEEP_ALIVE_HTTP_10 = b"Connection: keep-alive\r\n"
_CLOSE = b"Connection: close\r\n"

# The request headers that are kept, by their lowercase name; the rest are only counted.
_KEPT_HEADERS = {
    b"x-webhook-secret": "header_secret",
    b"webhook-id": "webhook_id",
    b"webhook-timestamp": "webhook_timestamp",
    b"webhook-signature": "webhook_signature",
    b"content-length": "content_length",
    b"expect": "expect",
}


class ArmTarget(Protocol):
    """What the webhook drives: the daemon's coordinator. Every method is quick and thread-safe.

    What the methods return, and the message of BusyError, go to the client as they are, so
    they must name no path of the host (`stagewatch.status.without_host_paths` cuts them).
    """

    def arm(self, sha256: str | None, version: str | None, force: bool) -> dict[str, Any]:
        """Arm the agent; return `{"id", "state": "armed", "armed_until"}`.

        Raise BusyError while a deploy runs; its message is shown to the client, with its
        `deploy_id` attribute, when it has one, as the running deploy's id.
        """

    def deploy_record(self, deploy_id: str) -> dict[str, Any] | None:
        """The history record of `deploy_id`, as `history --json` prints it; None if unknown."""

    def status(self) -> dict[str, Any]:
        """The agent's state, as `status --json` prints it."""


@dataclass(frozen=True)
class ArmRequest:
    """The optional fields of a POST to the webhook path."""

    sha256: str | None = None
    version: str | None = None
    force: bool = False


def parse_arm_body(body: bytes) -> ArmRequest:
    """Parse the JSON body of an arm request; raise ValueError naming the field that is wrong.

    An empty body has no fields. A field given as null counts as not given.
    """
    if not body:
        return ArmRequest()

    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("body: not valid JSON") from None

    if not isinstance(document, dict):
        raise ValueError("body: must be a JSON object")

    for name in document:
        if name not in ARM_FIELDS:
            raise ValueError(f"{name[:64]}: unknown field (known: {', '.join(ARM_FIELDS)})")

    sha256 = document.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        raise ValueError("sha256: must be a string of 64 hexadecimal digits")

    version = document.get("version")
    if version is not None and not (
        isinstance(version, str)
        and 0 < len(version) <= MAX_VERSION_LENGTH
        and version.isprintable()
    ):
        raise ValueError(
            f"version: must be a string of 1 to {MAX_VERSION_LENGTH} printable characters"
        )

    force = document.get("force")
    if force is not None and not isinstance(force, bool):
        raise ValueError("force: must be true or false")

    return ArmRequest(sha256.lower() if sha256 is not None else None, version, bool(force))


class WebhookServer:
    """The webhook listener, serving on a thread of its own.

    The daemon calls start() once, reload() on SIGHUP and stop() on the way out; they may
    be called from any one thread. `request_timeout_seconds` and `max_connections` exist so
    that tests can reach the limits quickly.
    """

    def __init__(
        self,
        config: WebhookConfig,
        secret: bytes,
        target: ArmTarget,
        heartbeats: Heartbeats | None = None,
        *,
        request_timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        """Raise ConfigError if the secret or `webhook.auth` cannot be used."""
        self._replays = ReplayCache()
        self._limiter = FailureLimiter()
        self._settings = _Settings.build(config, secret, self._replays)
        self._config = config
        self._target = target
        self._heartbeats = heartbeats
        self._request_timeout_seconds = request_timeout_seconds
        self._max_connections = max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._handler: _Handler | None = None
        self._server: asyncio.Server | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the listener is bound to; raise RuntimeError before start()."""
        if self._address is None:
            raise RuntimeError("the webhook server is not started")
        return self._address

    def start(self) -> None:
        """Bind `webhook.listen` and serve on a new thread.

        Raise ConfigError naming `webhook.listen` if the address cannot be bound, or naming
        `webhook.tls_cert` if the certificate and key cannot be loaded.
        """
        if self._loop is not None:
            raise RuntimeError("the webhook server is already started")

        ssl_context = _tls_context(self._config)
        listener = _bind(self._config.listen, self._config.host, self._config.port)

        loop = asyncio.new_event_loop()
        self._executor = ThreadPoolExecutor(TARGET_THREADS, "stagewatch-webhook-target")
        connections = _ConnectionTable(
            loop, _connection_cap(self._max_connections), self._request_timeout_seconds
        )
        self._handler = _Handler(
            self._settings, self._target, loop, self._executor, self._limiter, connections
        )
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="stagewatch-webhook", daemon=True
        )
        self._thread.start()

        try:
            self._on_loop(self._serve(listener, ssl_context))
        except BaseException:
            listener.close()
            self.stop()
            raise

        self._ssl_context = ssl_context
        self._address = _bound_address(listener)
        if self._heartbeats is not None:
            self._heartbeats.add_probe("webhook", _LoopProbe(loop, connections).is_alive)

        logger.info(
            "Webhook listening on %s:%d (%s)",
            *self._address,
            "HTTPS" if ssl_context is not None else "HTTP",
        )

    def reload(self, config: WebhookConfig, secret: bytes) -> None:
        """Use a new configuration and secret for the requests that arrive from now on.

        The listener is bound again only if `listen` or the TLS files changed; with the same
        TLS files, the certificate is read again (a renewed certificate takes effect).
        Raise ConfigError, keeping everything as it was, if the new ones cannot be used.
        """
        settings = _Settings.build(config, secret, self._replays)

        if self._loop is not None:
            if _endpoint(config) != _endpoint(self._config):
                self._rebind(config)
            elif self._ssl_context is not None:
                _reload_certificate(self._ssl_context, config)

        self._config = config
        self._settings = settings
        if self._handler is not None:
            self._handler.settings = settings

        logger.info("Webhook configuration reloaded (auth = %s)", config.auth)

    def stop(self) -> None:
        """Stop listening, close every connection and join the thread, within 2 s."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        if self._heartbeats is not None:
            self._heartbeats.remove_probe("webhook")

        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        try:
            self._on_loop(self._close_everything(), timeout=STOP_TIMEOUT_SECONDS / 2)
        except TimeoutError:
            logger.warning("The webhook's event loop did not close its connections in time")

        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            logger.warning(
                "The webhook's event loop did not stop within %g s", STOP_TIMEOUT_SECONDS
            )
        else:
            loop.close()

        if self._executor is not None:
            # A target call still running finishes on its own; its answer is dropped.
            self._executor.shutdown(wait=False, cancel_futures=True)

        self._loop = None
        self._thread = None
        self._executor = None
        self._handler = None
        self._server = None
        self._address = None
        logger.info("Webhook stopped")

    def _on_loop(
        self, coroutine: Coroutine[Any, Any, _Result], timeout: float = STOP_TIMEOUT_SECONDS
    ) -> _Result:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the webhook server is not started")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _serve(self, listener: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        handler = self._handler
        if handler is None:
            raise RuntimeError("the webhook server is not started")

        # asyncio turns Nagle's algorithm off on every TCP transport it makes (TCP_NODELAY),
        # which an answer written in one piece needs to leave at once.
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(handler),
            sock=listener,
            backlog=ACCEPTS_PER_TURN,
            ssl=ssl_context,
            ssl_handshake_timeout=self._request_timeout_seconds if ssl_context else None,
        )
        # asyncio uses its `backlog` twice: as the number of connections accepted per turn,
        # and for listen(2), which it has just called. Give the kernel its longer queue.
        listener.listen(LISTEN_BACKLOG)

    def _rebind(self, config: WebhookConfig) -> None:
        ssl_context = _tls_context(config)
        old_server, old_context = self._server, self._ssl_context

        if config.listen != self._config.listen:
            listener = _bind(config.listen, config.host, config.port)
        else:
            # Same address, other TLS files: the port must be let go before it is bound again.
            host, port = self.address
            self._on_loop(_close_server(old_server))
            try:
                listener = _bind(config.listen, host, port)
            except ConfigError:
                self._on_loop(self._serve(_bind(self._config.listen, host, port), old_context))
                raise

        try:
            self._on_loop(self._serve(listener, ssl_context))
        except BaseException:
            listener.close()
            raise

        self._on_loop(_close_server(old_server))
        self._ssl_context = ssl_context
        self._address = _bound_address(listener)
        logger.info("Webhook listening on %s:%d instead", *self._address)

    async def _close_everything(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._handler is not None:
            self._handler.connections.drop_all()

        # Aborted transports close their sockets from callbacks of the next loop iterations.
        for _ in range(3):
            await asyncio.sleep(0)


async def _close_server(server: asyncio.Server | None) -> None:
    if server is not None:
        server.close()


def _endpoint(config: WebhookConfig) -> tuple[object, ...]:
    return config.listen, config.tls_cert, config.tls_key


def _bind(listen: str, host: str, port: int) -> socket.socket:
    """A listening socket on host:port; raise ConfigError naming `webhook.listen` if it fails.

    Two sockets with SO_REUSEADDR may both bind a port that neither listens on yet; only
    listen(2) tells, so it is called here, where its error can name the key.
    """
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, protocol)
    except OSError as error:
        raise ConfigError(
            f"webhook.listen: cannot listen on {listen}: {error.strerror or error}"
        ) from None

    try:
        # A restarted agent must not wait for the old connections' TIME_WAIT (socket(7)).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except OSError as error:
        listener.close()
        raise ConfigError(
            f"webhook.listen: cannot listen on {listen}: {error.strerror or error} "
            "(is another program using the port?)"
        ) from None

    return listener


def _connection_cap(requested: int) -> int:
    """`requested`, or fewer if the open file limit would run out first.

    A listener out of descriptors cannot accept(), so it would never reach its cap and evict
    an idle connection for a new one: a crowd of idle sockets would lock every client out.
    """
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY or soft_limit - DESCRIPTORS_KEPT_FREE >= requested:
        return requested

    cap = max(1, soft_limit - DESCRIPTORS_KEPT_FREE)
    logger.warning(
        "The webhook takes at most %d connections, not %d: the open file limit is %d "
        "(raise LimitNOFILE= in the unit for more)",
        cap,
        requested,
        soft_limit,
    )
    return cap


def _bound_address(listener: socket.socket) -> tuple[str, int]:
    host, port = listener.getsockname()[:2]
    return str(host), int(port)


def _tls_context(config: WebhookConfig) -> ssl.SSLContext | None:
    """The server side TLS context, TLS 1.2 or later; None when TLS is not configured."""
    if config.tls_cert is None or config.tls_key is None:
        return None

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_certificate(context, config)
    return context


def _reload_certificate(context: ssl.SSLContext, config: WebhookConfig) -> None:
    # Load into a scratch context first: a failed load must not leave the live context with
    # a new certificate and the old key.
    _tls_context(config)
    _load_certificate(context, config)


def _load_certificate(context: ssl.SSLContext, config: WebhookConfig) -> None:
    try:
        context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"webhook.tls_cert: cannot load the certificate {config.tls_cert} with the key "
            f"{config.tls_key}: {error.strerror or error}"
        ) from None


class _LoopProbe:
    """Tells the watchdog whether the event loop still turns, without waking it when idle.

    A loop with no connection, and none accepted since it last answered, waits in epoll for
    the listener and cannot be stuck in stagewatch's code: it is alive without being asked.
    Otherwise each question sends the loop a ping unless one is still unanswered; the loop is
    alive while its last ping was answered, or was sent less than the grace period ago.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, connections: _ConnectionTable) -> None:
        self._loop = loop
        self._connections = connections
        self._sent_at = 0.0
        self._answered_at = 0.0

    def is_alive(self) -> bool:
        now = time.monotonic()
        if self._answered_at < self._sent_at:
            return now - self._sent_at < LOOP_PING_GRACE_SECONDS

        if self._connections.idle_since(self._answered_at):
            return True

        self._sent_at = now
        try:
            self._loop.call_soon_threadsafe(self._answer)
        except RuntimeError:
            return False
        return True

    def _answer(self) -> None:
        self._answered_at = time.monotonic()


class _Route(enum.Enum):
    ARM = "arm"
    RECORD = "record"
    STATUS = "status"
    HEALTH = "health"


@dataclass(frozen=True)
class _Resource:
    methods: dict[bytes, _Route]
    allow: bytes

    @classmethod
    def of(cls, methods: dict[bytes, _Route]) -> _Resource:
        return cls(methods, b"Allow: %s\r\n" % b", ".join(sorted(methods)))


_RECORD_RESOURCE = _Resource.of({b"GET": _Route.RECORD})


@dataclass(frozen=True)
class _Settings:
    """What a reload replaces: the credentials check and the paths."""

    authenticator: Authenticator
    resources: dict[bytes, _Resource]

    @classmethod
    def build(cls, config: WebhookConfig, secret: bytes, replays: ReplayCache) -> _Settings:
        methods: dict[bytes, dict[bytes, _Route]] = {
            b"/status": {b"GET": _Route.STATUS},
            b"/healthz": {b"GET": _Route.HEALTH},
        }
        methods.setdefault(config.path.encode(), {})[b"POST"] = _Route.ARM

        return cls(
            Authenticator(secret, config.auth, replays),
            {path: _Resource.of(allowed) for path, allowed in methods.items()},
        )


class _Request:
    """One request as it arrives; `method` stays empty until the headers are complete.

    The defaults live on the class, so that a new request costs no more than an empty
    object: most requests are refused after reading a few of these.
    """

    header_secret: bytes | None = None
    webhook_id: bytes | None = None
    webhook_timestamp: bytes | None = None
    webhook_signature: bytes | None = None
    url: bytes = b""
    method: bytes = b""
    connection: bytes = _CLOSE
    content_length: bytes | None = None
    expect: bytes | None = None
    body: bytearray | None = None
    head_bytes: int = 0
    raw_bytes: int = 0


# The request of a connection between two messages; never written to.
_BETWEEN_REQUESTS = _Request()

_Job = Callable[[], tuple[int, bytes]]


class _Refusal(Exception):
    """Raised from a parser callback: answer this and close the connection."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


class _Handler:
    """Decides the answer to each complete request; shared by the connections of a server.

    Used on the event loop's thread only, except `settings`, which reload() replaces whole.
    """

    def __init__(
        self,
        settings: _Settings,
        target: ArmTarget,
        loop: asyncio.AbstractEventLoop,
        executor: ThreadPoolExecutor,
        limiter: FailureLimiter,
        connections: _ConnectionTable,
    ) -> None:
        self.settings = settings
        self.connections = connections
        self._target = target
        self._loop = loop
        self._executor = executor
        self._limiter = limiter
        self.responses = _Responses()

    def answer(self, request: _Request, address: str) -> bytes | _Job:
        """The encoded answer, or the call of the target that will give it."""
        settings = self.settings
        path = request.url.partition(b"?")[0]
        resource = settings.resources.get(path)
        if resource is None:
            if not path.startswith(_DEPLOYS_PREFIX):
                return self.responses.canned(request, 404, _NOT_FOUND)
            resource = _RECORD_RESOURCE

        route = resource.methods.get(request.method)
        if route is None:
            return self.responses.canned(request, 405, _METHOD_NOT_ALLOWED, resource.allow)
        if route is _Route.HEALTH:
            return self.responses.canned(request, 200, _HEALTHY)

        body = bytes(request.body) if request.body is not None else b""
        failure = settings.authenticator.check(request, body)
        if failure is not None:
            retry_after = self._limiter.record_failure(address, failure)
            if retry_after:
                extra = b"Retry-After: %d\r\n" % retry_after
                return self.responses.canned(request, 429, _THROTTLED, extra)
            return self.responses.canned(request, 401, _UNAUTHORIZED)

        return self._authenticated(request, route, path, body)

    def _authenticated(
        self, request: _Request, route: _Route, path: bytes, body: bytes
    ) -> bytes | _Job:
        if route is _Route.STATUS:
            return partial(_status_job, self._target)

        if route is _Route.RECORD:
            deploy_id = path[len(_DEPLOYS_PREFIX) :]
            if not _DEPLOY_ID.fullmatch(deploy_id):
                return self.responses.canned(request, 404, _UNKNOWN_DEPLOY)
            return partial(_record_job, self._target, deploy_id.decode("ascii"))

        try:
            arm = parse_arm_body(body)
        except ValueError as error:
            return self.responses.render(request, 400, _encode({"error": str(error)}))
        return partial(_arm_job, self._target, arm)

    def call_target(self, job: _Job) -> asyncio.Future[tuple[int, bytes]]:
        return self._loop.run_in_executor(self._executor, _guarded, job)


def _guarded(job: _Job) -> tuple[int, bytes]:
    try:
        return job()
    except Exception:
        logger.exception("The webhook could not answer an authenticated request")
        return 500, _INTERNAL


def _arm_job(target: ArmTarget, arm: ArmRequest) -> tuple[int, bytes]:
    try:
        armed = target.arm(arm.sha256, arm.version, arm.force)
    except BusyError as error:
        running = {"error": str(error) or "a deploy is running"}
        return 409, _encode({**running, "id": getattr(error, "deploy_id", None)})
    return 202, _encode(armed)


def _record_job(target: ArmTarget, deploy_id: str) -> tuple[int, bytes]:
    record = target.deploy_record(deploy_id)
    if record is None:
        return 404, _UNKNOWN_DEPLOY
    return 200, _encode(record)


def _status_job(target: ArmTarget) -> tuple[int, bytes]:
    return 200, _encode(target.status())


def _encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


class _Responses:
    """Encodes answers; the fixed ones are kept encoded, with a Date renewed once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._date = b""
        self._cache: dict[tuple[int, bytes, bytes, bytes], bytes] = {}

    def canned(self, request: _Request, status: int, body: bytes, extra: bytes = b"") -> bytes:
        """A fixed answer to `request`; `extra` holds further header lines."""
        self._renew_date()
        key = (status, body, request.connection, extra)
        response = self._cache.get(key)
        if response is None:
            response = self._cache[key] = self._encode(status, body, request.connection, extra)

        if request.method == b"HEAD":
            return response[: len(response) - len(body)]
        return response

    def render(self, request: _Request, status: int, body: bytes) -> bytes:
        """An answer to `request` whose body is not fixed (only GET and POST get one)."""
        self._renew_date()
        return self._encode(status, body, request.connection)

    def closing(self, status: int, body: bytes) -> bytes:
        """A fixed answer after which the connection is closed."""
        return self.canned(_BETWEEN_REQUESTS, status, body)

    def _renew_date(self) -> None:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._date = formatdate(second, usegmt=True).encode()
            self._cache.clear()

    def _encode(self, status: int, body: bytes, connection: bytes, extra: bytes = b"") -> bytes:
        head = (
            b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s%s\r\n"
        )
        phrase = HTTPStatus(status).phrase.encode()
        return head % (status, phrase, self._date, len(body), extra, connection) + body


class _ConnectionTable:
    """The open connections, and the deadlines of those waiting for a request.

    `_waiting` is kept in the order the connections began to wait: the first one has the
    earliest deadline, and is the one to evict when the table is full. One timer, set for
    the first deadline, is all it takes to enforce them all.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, max_connections: int, timeout_seconds: float
    ) -> None:
        self._loop = loop
        self._max_connections = max_connections
        self._timeout_seconds = timeout_seconds
        self._open: set[_Connection] = set()
        self._waiting: dict[_Connection, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._last_admitted = 0.0  # time.monotonic(), read by the watchdog's probe

    def admit(self, connection: _Connection) -> None:
        """Take a new connection, evicting the longest waiting one if the table is full."""
        if len(self._open) >= self._max_connections:
            longest_waiting = next(iter(self._waiting), None)
            if longest_waiting is None:
                # Every connection has a request in the target's hands: refuse the new one.
                connection.drop()
                return
            longest_waiting.drop()

        self._open.add(connection)
        self._last_admitted = time.monotonic()
        self.wait(connection)

    def idle_since(self, moment: float) -> bool:
        """No connection is open, and none was accepted after `moment` (time.monotonic)."""
        return not self._open and self._last_admitted <= moment

    def wait(self, connection: _Connection) -> None:
        """Start the connection's deadline again: it waits for a request, or for its end."""
        if connection not in self._open:
            return

        self._waiting.pop(connection, None)
        deadline = self._loop.time() + self._timeout_seconds
        self._waiting[connection] = deadline
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire)

    def stop_waiting(self, connection: _Connection) -> None:
        """The connection's request is complete; it has no deadline until it is answered."""
        self._waiting.pop(connection, None)

    def forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        self._waiting.pop(connection, None)

    def drop_all(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for connection in list(self._open):
            connection.drop()

    def _expire(self) -> None:
        self._timer = None
        # Timers may fire up to the clock's resolution early; a millisecond covers it.
        now = self._loop.time() + 0.001
        while self._waiting:
            connection, deadline = next(iter(self._waiting.items()))
            if deadline > now:
                self._timer = self._loop.call_at(deadline, self._expire)
                return
            connection.drop()


class _Connection(asyncio.Protocol):
    """One client connection: feeds llhttp, answers its requests in order, keeps the limits.

    Requests that arrive while the target answers an earlier one (pipelining) wait in
    `_queue`; reading is paused meanwhile, so the queue holds at most what one read brought.
    """

    __slots__ = (
        "_address",
        "_busy",
        "_closed",
        "_discarding",
        "_eof",
        "_handler",
        "_last_words",
        "_parser",
        "_queue",
        "_request",
        "_transport",
        "_write_paused",
    )

    _transport: asyncio.Transport

    def __init__(self, handler: _Handler) -> None:
        self._handler = handler
        self._parser = httptools.HttpRequestParser(self)
        self._address = "unknown"
        self._request = _BETWEEN_REQUESTS
        self._queue: list[_Request] = []
        self._busy = False
        self._closed = False
        self._discarding = False
        self._eof = False
        self._write_paused = False
        self._last_words: bytes | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._address = _client_address(transport.get_extra_info("peername"))
        self._handler.connections.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._handler.connections.forget(self)
        self._queue.clear()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return

        started = self._request
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            self._refuse_for(error.__context__)
            return
        except httptools.HttpParserError:
            self._refuse(self._handler.responses.closing(400, _MALFORMED))
            return
        except httptools.HttpParserUpgrade:
            # What follows an Upgrade or CONNECT request is not HTTP: answer it, then close.
            self._refuse(b"")
            return

        self._measure(started, len(data))

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._busy:
            self._refuse(b"")
            return True
        return None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._request = _Request()
        if not self._busy:
            self._handler.connections.wait(self)

    def on_url(self, url: bytes) -> None:
        request = self._request
        request.url += url
        request.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._request
        if request.method:
            return  # a trailer: credentials and framing come from the header section only

        request.head_bytes += len(name) + len(value)
        kept = _KEPT_HEADERS.get(name.lower())
        if kept is not None:
            setattr(request, kept, value.rstrip(b" \t"))

    def on_headers_complete(self) -> None:
        request = self._request
        parser = self._parser
        request.method = parser.get_method()
        if not parser.should_keep_alive():
            request.connection = _CLOSE
        elif parser.get_http_version() == "1.0":
            request.connection = _KEEP_ALIVE_HTTP_10
        else:
            request.connection = _KEEP_ALIVE

        if request.head_bytes > MAX_HEAD_BYTES:
            raise _Refusal(431, _HEAD_TOO_LARGE)

        # llhttp has checked that Content-Length is one number below 2**64.
        length = request.content_length
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            raise _Refusal(413, _BODY_TOO_LARGE)

        # A client that asked to wait for it sends its body only after "100 Continue"; an
        # answer still owed must go first, so such a client waits for its own timeout then.
        expect = request.expect
        if expect is not None and expect.lower() == b"100-continue" and not self._busy:
            self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        request = self._request
        if request.body is None:
            request.body = bytearray(body)
        else:
            request.body += body

        if len(request.body) > MAX_BODY_BYTES:
            raise _Refusal(413, _BODY_TOO_LARGE)

    def on_message_complete(self) -> None:
        request, self._request = self._request, _BETWEEN_REQUESTS
        if self._closed:
            return

        if not self._busy:
            self._serve(request)
            return

        self._queue.append(request)
        if len(self._queue) > MAX_PIPELINED_REQUESTS:
            self.drop()

    # The connection's own steps

    def drop(self) -> None:
        """Close at once, without a word: a deadline passed, or the connection was evicted."""
        self._closed = True
        self._handler.connections.forget(self)
        self._transport.abort()

    def _measure(self, started: _Request, size: int) -> None:
        # A request that began within this read was measured by the callbacks; one that
        # goes on across reads is measured here, since llhttp keeps what it has not yet
        # handed over (a header still arriving) without a limit of its own.
        request = self._request
        if request is _BETWEEN_REQUESTS or request is not started or self._closed:
            return

        request.raw_bytes += size
        if not request.method and request.raw_bytes > MAX_HEAD_BYTES:
            self._refuse(self._handler.responses.closing(431, _HEAD_TOO_LARGE))
        elif request.raw_bytes > MAX_REQUEST_BYTES:
            self._refuse(self._handler.responses.closing(413, _BODY_TOO_LARGE))

    def _refuse_for(self, cause: BaseException | None) -> None:
        if isinstance(cause, _Refusal):
            self._refuse(self._handler.responses.closing(cause.status, cause.body))
            return

        logger.error("The webhook failed on a request", exc_info=cause)
        self._refuse(self._handler.responses.closing(500, _INTERNAL))

    def _serve(self, request: _Request) -> None:
        if self._write_paused:
            self.drop()  # the client sends requests but does not read the answers
            return

        answer = self._handler.answer(request, self._address)
        if isinstance(answer, bytes):
            self._send(request, answer)
            return

        self._busy = True
        self._handler.connections.stop_waiting(self)
        self._transport.pause_reading()
        self._handler.call_target(answer).add_done_callback(partial(self._answered, request))

    def _answered(self, request: _Request, outcome: asyncio.Future[tuple[int, bytes]]) -> None:
        if outcome.cancelled() or self._closed:
            return

        self._busy = False
        status, body = outcome.result()
        self._send(request, self._handler.responses.render(request, status, body))

        while self._queue and not self._busy and not self._closed:
            self._serve(self._queue.pop(0))
        if self._busy or self._closed:
            return

        if self._last_words is not None:
            self._finish(self._last_words)
        else:
            self._transport.resume_reading()

    def _send(self, request: _Request, response: bytes) -> None:
        self._transport.write(response)
        if request.connection == _CLOSE:
            self._close()
        else:
            self._handler.connections.wait(self)

    def _refuse(self, response: bytes) -> None:
        """Send `response` after the answers still owed, then close."""
        if self._closed:
            return
        if self._busy:
            self._last_words = response
            return
        self._finish(response)

    def _finish(self, response: bytes) -> None:
        self._discarding = True
        self._transport.write(response)
        if self._eof or not self._transport.can_write_eof():
            self._close()
            return

        # Closing a socket with unread input makes the kernel send RST, which can destroy
        # the answer before the client reads it; half-close and read on until the client
        # closes or the deadline passes (RFC 9112, section 9.6).
        self._transport.write_eof()
        self._handler.connections.wait(self)

    def _close(self) -> None:
        self._closed = True
        self._handler.connections.forget(self)
        self._transport.close()


def _client_address(peer: Any) -> str:
    if not peer:
        return "unknown"

    address = str(peer[0])
    # An IPv4 client of a dual-stack socket is the same client as over IPv4.
    if address.startswith("::ffff:") and "." in address:
        return address[len("::ffff:") :]
    return address
