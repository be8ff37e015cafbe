"""The forwarding path's HTTP/1.1 client: pooled keep-alive connections to upstreams.

Why not ``aiohttp.ClientSession``: on this machine its ``request()`` costs
about 40 µs per call, half of it in machinery a gateway never uses on this
path (cookie jar, redirects, proxies, traces, auth, header merging), while
the same exchange done on aiohttp's own protocol costs about 20 µs (issue 7,
`make bench`). This client keeps the aiohttp parts that carry the safety —
the response protocol (llhttp parser with its size limits, read timeouts,
flow control, end-of-message detection) and the request writer (header
serialisation that refuses control characters, chunked framing) — and does
the per-request orchestration itself: one connection pool per endpoint, the
request line and framing headers, the body sent alongside the wait for the
answer, and one retry of an idempotent request whose reused connection the
upstream had closed (RFC 9112 §9.3.1). Unlike ``ClientSession``, which
retried any idempotent request once but never one with a streamed body, the
retry happens only on a reused connection and replays a body the
``RequestBody`` still holds. Connections are opened with happy eyeballs
(aiohappyeyeballs, as aiohttp does) and resolved addresses kept for 60 s.

The auth endpoints (login, refresh) still use ``ClientSession``: they are
rare and want its JSON helpers.

``aiohttp.client_proto.ResponseHandler`` and the timer helpers of
``aiohttp.helpers`` are aiohttp internals; pyproject pins aiohttp below its
next minor version for that reason, and tests/integration/test_upstream_client.py
is what an upgrade must pass.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohappyeyeballs
import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import _EXC_SENTINEL as _NO_CAUSE
from aiohttp.helpers import BaseTimerContext, TimeoutHandle, TimerNoop, set_exception
from aiohttp.http import RawResponseMessage, StreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import GatewayError, upstream_failure_of


class RequestBody(Protocol):
    """What this client needs of a request body (``gateway.proxy.RequestBody`` is one).

    A protocol rather than an import, so that this module does not depend on
    the proxy module that depends on it.
    """

    @property
    def replayable(self) -> bool: ...

    def stream(self) -> AsyncIterator[bytes]: ...


# RFC 9110 §9.2.2.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods whose requests are sent without Content-Length when they have no body
# (every other one gets ``Content-Length: 0``, which some servers require).
_LENGTHLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
KEEPALIVE_SECONDS = 15.0  # aiohttp's default: idle connections older than this are closed
READ_BUFSIZE = 2**16
DNS_TTL_SECONDS = 60.0  # aiohttp's ttl_dns_cache as the gateway configured it
HAPPY_EYEBALLS_DELAY = 0.25  # aiohttp's: the next address is tried after this long
_NO_TIMER = TimerNoop()
DEFAULT_CONNECTIONS = 1024  # per endpoint (Envoy's default circuit-breaker limit)
DEFAULT_QUEUE_TIMEOUT = 5.0


def upstream_busy() -> GatewayError:
    """Every connection to this upstream was in use for the whole queue timeout."""
    return GatewayError(
        503,
        "upstream_busy",
        "the upstream is at its connection limit; retry shortly",
        {"Retry-After": "1"},
    )


@functools.cache
def tls_context(verify: bool = True, ca_file: Path | None = None) -> ssl.SSLContext:
    """One context per distinct setting, so that routes to one upstream share a pool."""
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    context.set_alpn_protocols(["http/1.1"])
    return context


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to connect and how; requests to equal endpoints share connections."""

    host: str
    port: int
    tls: ssl.SSLContext | None


@dataclass(frozen=True, slots=True)
class CallTimeouts:
    """SPEC's per-call timeouts, in seconds (None: no limit)."""

    connect: float | None
    read: float | None  # between two reads from the upstream
    total: float | None  # the whole call, the response body included


class _UpstreamProtocol(ResponseHandler):
    """aiohttp's response protocol with a cheaper read timeout.

    aiohttp cancels and re-creates a timer on every read from the socket and
    at the end of every response, a measurable share of a small request. Here
    one timer per connection stays armed; reads only note the time, and when
    the timer fires it re-arms itself for what is left since the last read.
    The timeout means the same: the longest silence allowed from the upstream
    while an answer is awaited.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._watching = False  # an answer is awaited: silence counts
        self._last_read = 0.0
        self.parked = False  # idle in the pool: nothing was asked

    def data_received(self, data: bytes) -> None:
        if self.parked:
            # Bytes nobody asked for (a stray or planted response) must never
            # be read as the next request's answer: the connection goes.
            self.close()
            return
        super().data_received(data)

    def set_exception(self, exc: BaseException, exc_cause: BaseException = _NO_CAUSE) -> None:
        super().set_exception(exc, exc_cause)
        if isinstance(exc, HttpProcessingError):
            # A malformed chunk mid-body: aiohttp tells only the next read()
            # of a message, not the body being streamed, which would wait forever.
            self._fail_body(exc)

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._watching = False
            return
        self._watching = True
        self._last_read = now = self._loop.time()
        handle = self._read_timeout_handle
        if handle is not None and handle.when() > now + timeout:
            handle.cancel()  # armed for a longer timeout (another route's): too late
            handle = None
        if handle is None:
            self._read_timeout_handle = self._loop.call_at(now + timeout, self._on_read_timeout)

    def _drop_timeout(self) -> None:
        self._watching = False  # a pending timer finds nothing to do

    def _on_read_timeout(self) -> None:
        self._read_timeout_handle = None
        timeout = self._read_timeout
        if not (self._watching and timeout):
            return
        due = self._last_read + timeout
        if self._loop.time() < due:
            self._read_timeout_handle = self._loop.call_at(due, self._on_read_timeout)
            return
        super()._on_read_timeout()

    def holds_a_partial_message(self) -> bool:
        """Bytes of another message arrived after the answer (a stray, partial
        response head): the parser holds them, ``should_close`` does not see them."""
        parser = self._parser
        if parser is None:
            return False
        try:
            # At a message boundary this is a no-op returning None; with a
            # message begun it returns that message. The parser is not used
            # again: every exchange starts a fresh one.
            return parser.feed_eof() is not None
        except Exception:
            return True

    def connection_lost(self, exc: BaseException | None) -> None:
        body = self._payload
        super().connection_lost(exc)
        if body is not None:
            self._fail_body(exc, body)
        if self._read_timeout_handle is not None:  # do not keep a closed connection alive
            self._read_timeout_handle.cancel()
            self._read_timeout_handle = None

    def _fail_body(
        self, cause: BaseException | None, body: aiohttp.StreamReader | None = None
    ) -> None:
        body = body if body is not None else self._payload
        if body is not None and not body.is_eof() and body.exception() is None:
            set_exception(
                body,
                aiohttp.ClientPayloadError("the upstream's body broke off"),
                cause if cause is not None else _NO_CAUSE,
            )


class UpstreamResponse:
    """An upstream's answer: status, headers and a body stream.

    ``release()`` (or leaving ``async with``) hands the connection back to
    the pool when the whole exchange is over and the upstream keeps it open,
    and closes it otherwise; it must be called exactly when the caller is done.
    """

    __slots__ = (
        "_client",
        "_deadline",
        "_endpoint",
        "_message",
        "_protocol",
        "_sender",
        "content",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        client: UpstreamClient,
        endpoint: Endpoint,
        protocol: _UpstreamProtocol,
        message: RawResponseMessage,
        content: aiohttp.StreamReader,
        sender: asyncio.Task[None] | None,
        deadline: asyncio.TimerHandle | None,
    ) -> None:
        self._client: UpstreamClient | None = client
        self._endpoint = endpoint
        self._protocol = protocol
        self._message = message
        self._sender = sender
        self._deadline = deadline
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = content

    def release(self) -> None:
        client = self._client
        if client is None:
            return
        self._client = None
        protocol = self._protocol
        sender = self._sender
        if sender is not None and not sender.done():
            # The upstream answered before the whole request body was sent:
            # the connection is mid-request, never reusable.
            sender.cancel()
            protocol.close()
        elif (
            self._message.should_close
            or protocol.should_close
            or protocol.holds_a_partial_message()
        ):
            # Connection: close, HTTP/1.0, a body not read to its end, bytes
            # after the message, or a failed send: closed, never reused.
            protocol.close()
        else:
            client.park(self._endpoint, protocol)
        client.done(self._endpoint, self._deadline)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


class UpstreamClient:
    """A pool of keep-alive connections per endpoint, at most ``connections`` in use per
    endpoint; a request waits up to ``queue_timeout`` for a free one (503 ``upstream_busy``).

    The limit is per endpoint so that one slow upstream holding every connection
    cannot starve the others; the queue it builds is bounded in time here and in
    size by the listener's ``max_in_flight``.
    """

    def __init__(
        self,
        connections: int = DEFAULT_CONNECTIONS,
        keepalive: float = KEEPALIVE_SECONDS,
        queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT,
        on_busy: Callable[[], None] | None = None,
    ) -> None:
        self._connections = connections
        self._slots: dict[Endpoint, asyncio.Semaphore] = {}
        self._queue_timeout = queue_timeout
        self._on_busy = on_busy
        self._max_idle = connections
        self._keepalive = keepalive
        # Idle connections per endpoint, oldest first, with the time they went idle.
        self._idle: dict[Endpoint, deque[tuple[_UpstreamProtocol, float]]] = {}
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._addresses: dict[
            tuple[str, int], tuple[float, list[aiohappyeyeballs.AddrInfoType]]
        ] = {}
        self._closed = False

    async def request(
        self,
        method: str,
        endpoint: Endpoint,
        target: str,
        headers: CIMultiDict[str],
        body: RequestBody | None,
        timeouts: CallTimeouts,
    ) -> UpstreamResponse:
        """Send one request; return once the upstream's status and headers are in.

        ``headers`` gets the framing headers the request needs (``Host`` must
        be in it already). Failures to connect raise the SPEC §4.4 error; a
        connection that breaks raises aiohttp's client exceptions, and a body
        that fails raises what its stream raised (a 413 stays a 413).
        """
        loop = asyncio.get_running_loop()
        deadline: asyncio.TimerHandle | None = None
        timer: BaseTimerContext | None = None
        if timeouts.total:
            total = TimeoutHandle(loop, timeouts.total)
            deadline = total.start()
            timer = total.timer()
        slots = self._slots.get(endpoint)
        if slots is None:
            slots = self._slots[endpoint] = asyncio.Semaphore(self._connections)
        holding_slot = False
        try:
            with timer or _NO_TIMER:  # the total covers the wait for a free slot too
                if slots.locked():
                    await self._queue_for(slots)
                else:
                    await slots.acquire()  # free: never suspends
                holding_slot = True
                retry_allowed = method in IDEMPOTENT_METHODS
                retrying = False
                while True:
                    # A retry never takes another idle connection: after one
                    # went stale, its siblings (an upstream restart) may be too.
                    protocol = None if retrying else self._take_idle(endpoint, loop)
                    reused = protocol is not None
                    if protocol is None:
                        protocol = await self._connect(endpoint, timeouts.connect, loop)
                    try:
                        return await self._exchange(
                            protocol, endpoint, method, target, headers, body, timeouts, timer,
                            deadline, loop,
                        )  # fmt: skip
                    except BaseException as exc:
                        protocol.close()
                        if not (
                            reused
                            and retry_allowed
                            and _connection_died(exc)
                            and (body is None or body.replayable)
                        ):
                            raise
                        retry_allowed = False  # once,
                        retrying = True  # on a fresh connection
        except BaseException:
            if deadline is not None:
                deadline.cancel()
            if holding_slot:
                slots.release()
            raise

    async def _queue_for(self, slots: asyncio.Semaphore) -> None:
        """Wait for a connection of a busy endpoint, up to the queue timeout."""
        try:
            async with asyncio.timeout(self._queue_timeout):
                await slots.acquire()
        except TimeoutError:
            # Only the queue's own deadline arrives here: a total timeout that
            # expired first cancels the task, which asyncio.timeout passes on
            # as a cancellation (the caller's timer turns it into a 504).
            if self._on_busy is not None:
                self._on_busy()
            raise upstream_busy() from None

    async def _exchange(
        self,
        protocol: _UpstreamProtocol,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: RequestBody | None,
        timeouts: CallTimeouts,
        timer: BaseTimerContext | None,
        deadline: asyncio.TimerHandle | None,
        loop: asyncio.AbstractEventLoop,
    ) -> UpstreamResponse:
        protocol.set_response_params(
            timer=timer,
            skip_payload=method == "HEAD",
            read_until_eof=True,  # a body with no length ends when the upstream closes
            auto_decompress=False,
            read_timeout=timeouts.read,
            read_bufsize=READ_BUFSIZE,
        )
        writer = StreamWriter(protocol, loop)
        sender: asyncio.Task[None] | None = None
        if body is None:
            if method not in _LENGTHLESS_METHODS and "Content-Length" not in headers:
                headers["Content-Length"] = "0"
            await writer.write_headers(f"{method} {target} HTTP/1.1", headers)
            writer.set_eof()
            protocol.start_timeout()
        else:
            length = headers.get("Content-Length")
            if length is None:
                headers["Transfer-Encoding"] = "chunked"
                writer.enable_chunking()
            else:
                # Never more than declared: extra bytes would be a second request
                # to the upstream (the listener's parser already holds the client
                # to its length; this keeps it true whatever feeds the body).
                writer.length = int(length)
            await writer.write_headers(f"{method} {target} HTTP/1.1", headers)
            # Sent alongside the wait: an upstream may answer before reading it all.
            sender = loop.create_task(_send_body(writer, body.stream(), protocol))
        try:
            while True:
                message, content = await protocol.read()
                if message.code >= 200:
                    break
                if message.code < 100:
                    raise HttpProcessingError(message="status below 100")
                if message.code == 101:
                    # Upgrade is hop-by-hop and never forwarded: a 101 is bogus.
                    raise HttpProcessingError(message="unrequested 101")
                # 1xx interim answers (100, 103) are not relayed. The protocol
                # stopped the read timer at their end (a message without a
                # body): the final answer is awaited under it again.
                if sender is None or sender.done():
                    protocol.start_timeout()
        except BaseException:
            if sender is not None:
                sender.cancel()
            raise
        return UpstreamResponse(self, endpoint, protocol, message, content, sender, deadline)

    # -- the pool ---------------------------------------------------------------

    async def _connect(
        self, endpoint: Endpoint, timeout: float | None, loop: asyncio.AbstractEventLoop
    ) -> _UpstreamProtocol:
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._resolve(endpoint, loop)
                sock = await aiohappyeyeballs.start_connection(
                    addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1, loop=loop
                )
                _, protocol = await loop.create_connection(
                    lambda: _UpstreamProtocol(loop),
                    sock=sock,
                    ssl=endpoint.tls,
                    # A fully qualified name's dot is not in its certificate.
                    server_hostname=endpoint.host.rstrip(".") if endpoint.tls else None,
                )
        except BaseException as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, TimeoutError):
                raise upstream_failure_of("timeout") from None
            if isinstance(exc, ssl.SSLError | ssl.CertificateError):
                raise upstream_failure_of("tls") from None
            if isinstance(exc, OSError):  # refused, unreachable, no such name
                raise upstream_failure_of("connect") from None
            raise
        return protocol

    async def _resolve(
        self, endpoint: Endpoint, loop: asyncio.AbstractEventLoop
    ) -> list[aiohappyeyeballs.AddrInfoType]:
        key = (endpoint.host, endpoint.port)
        cached = self._addresses.get(key)
        now = loop.time()
        if cached is not None and cached[0] > now:
            return cached[1]
        found: list[aiohappyeyeballs.AddrInfoType] = list(
            await loop.getaddrinfo(
                endpoint.host, endpoint.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        )
        self._addresses[key] = (now + DNS_TTL_SECONDS, found)
        return found

    def _take_idle(
        self, endpoint: Endpoint, loop: asyncio.AbstractEventLoop
    ) -> _UpstreamProtocol | None:
        idle = self._idle.get(endpoint)
        if not idle:
            return None
        oldest_allowed = loop.time() - self._keepalive
        while idle:
            protocol, since = idle.pop()  # the most recently used: likeliest alive
            if since >= oldest_allowed and protocol.is_connected() and not protocol.should_close:
                protocol.parked = False
                return protocol
            protocol.close()
        return None

    def park(self, endpoint: Endpoint, protocol: _UpstreamProtocol) -> None:
        """Keep a connection whose exchange ended cleanly for the next request."""
        # A read timer the request body's end started after the answer was
        # complete must not fire while idle or during the next upload.
        protocol._drop_timeout()
        idle = self._idle.get(endpoint)
        if idle is None:
            idle = self._idle[endpoint] = deque()
        if self._closed or len(idle) >= self._max_idle:
            protocol.close()
            return
        loop = asyncio.get_running_loop()
        protocol.parked = True
        idle.append((protocol, loop.time()))
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_later(self._keepalive, self._sweep)

    def done(self, endpoint: Endpoint, deadline: asyncio.TimerHandle | None) -> None:
        """A response was released: its total timeout and its slot end."""
        if deadline is not None:
            deadline.cancel()
        self._slots[endpoint].release()

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive time."""
        self._sweep_handle = None
        loop = asyncio.get_running_loop()
        oldest_allowed = loop.time() - self._keepalive
        oldest_left: float | None = None
        for idle in self._idle.values():
            while idle and (idle[0][1] < oldest_allowed or not idle[0][0].is_connected()):
                idle.popleft()[0].close()
            if idle and (oldest_left is None or idle[0][1] < oldest_left):
                oldest_left = idle[0][1]
        if oldest_left is not None:  # next due when the oldest one left expires
            self._sweep_handle = loop.call_at(oldest_left + self._keepalive, self._sweep)

    async def close(self) -> None:
        """Close every idle connection; connections in use close when released."""
        self._closed = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for idle in self._idle.values():
            while idle:
                idle.pop()[0].close()


def _connection_died(exc: BaseException) -> bool:
    """A reused connection that failed before any answer: safe to try once more."""
    if isinstance(exc, TimeoutError):  # the upstream is slow, not gone
        return False
    return isinstance(exc, aiohttp.ClientConnectionError | OSError)


async def _send_body(
    writer: StreamWriter, chunks: AsyncIterator[bytes], protocol: ResponseHandler
) -> None:
    """Stream the request body; a failure reaches whoever waits for the answer."""
    try:
        async for chunk in chunks:
            await writer.write(chunk)
        await writer.write_eof()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the client's body failed (413, reset) or the upstream went away
        protocol.set_exception(exc)
        return
    protocol.start_timeout()
