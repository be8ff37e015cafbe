"""The streaming forwarder: one upstream call, its body, its errors (SPEC §4.1, §4.2).

The forwarder knows nothing of sessions. The caller (``Gateway``) opens an
upstream call on the shared client, looks at the status (a session route may
want to refresh and replay), and then either relays the response or discards
it and calls again.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus, unquote_plus

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Route, Timeouts
from gateway.errors import GatewayError, UpstreamFailure, upstream_failure_of
from gateway.upstream_client import CallTimeouts, Endpoint, UpstreamResponse, tls_context

_NO_BODY_STATUSES = frozenset({204, 304})
_MIN_SECRET = 6


def payload_too_large(limit: int) -> GatewayError:
    return GatewayError(413, "payload_too_large", f"the request body is over {limit} bytes")


class RequestBody:
    """The client's body, streamed once to the upstream and replayable if small.

    A client silent for longer than ``timeout`` mid-body ends the request (408).
    Bytes are counted against ``limit`` as they arrive (aiohttp does not
    enforce ``client_max_size`` on streamed bodies). Up to ``keep`` bytes are
    kept so that a refresh can replay the request; a replay sends the kept
    bytes and then whatever the first attempt had not yet read.
    """

    __slots__ = (
        "_content",
        "_keep",
        "_kept",
        "_kept_size",
        "_reader_free",
        "_timeout",
        "limit",
        "overflowed",
        "received",
        "stalled",
    )

    def __init__(
        self, content: aiohttp.StreamReader, limit: int, keep: int, timeout: float | None = None
    ) -> None:
        self._content = content
        self._timeout = timeout  # longest silence of the client mid-body
        self.limit = limit
        self._keep = keep
        self._kept: list[bytes] = []
        self._kept_size = 0
        # Set while no stream is waiting in readany(): a replay must not read
        # until the abandoned first attempt has noticed its cancellation.
        self._reader_free = asyncio.Event()
        self._reader_free.set()
        self.received = 0
        self.overflowed = False  # more than `keep` bytes read: no replay possible
        self.stalled = False  # the client fell silent mid-body (408)

    @property
    def too_large(self) -> bool:
        return self.received > self.limit

    @property
    def replayable(self) -> bool:
        return not self.overflowed

    async def _read(self) -> bytes:
        self._reader_free.clear()
        try:
            async with asyncio.timeout(self._timeout):
                return await self._content.readany()
        except TimeoutError:
            self.stalled = True
            # Raised into the upstream call, which then closes that connection
            # without ending the body: the upstream never sees a clean truncation.
            raise GatewayError(408, "request_timeout", "the request body stalled") from None
        finally:
            self._reader_free.set()

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in list(self._kept):
            yield chunk
        while True:
            await self._reader_free.wait()
            chunk = await self._read()
            if not chunk:
                return
            self.received += len(chunk)
            if self.received > self.limit:
                raise payload_too_large(self.limit)
            if not self.overflowed:
                if self._kept_size + len(chunk) <= self._keep:
                    self._kept.append(chunk)
                    self._kept_size += len(chunk)
                else:
                    self.overflowed = True
                    self._kept.clear()
            yield chunk


@dataclass(frozen=True, slots=True)
class Upstream:
    """Everything about a route's upstream that can be computed once at startup."""

    endpoint: Endpoint
    host_header: str  # host[:port] as the upstream's URL gives it
    base_path: str
    timeouts: CallTimeouts
    inject_headers: Mapping[str, str] = field(repr=False)
    # (decoded name, encoded "name=value")
    inject_query: tuple[tuple[str, str], ...] = field(repr=False)
    inject_names: frozenset[str]  # the decoded names of inject_query
    # Injected values as they could come back in a response header (raw and
    # percent-encoded); short ones are left out to avoid dropping innocent headers.
    secrets: tuple[str, ...] = field(repr=False, default=())

    @classmethod
    def from_route(cls, route: Route, server_timeouts: Timeouts) -> Upstream:
        assert route.upstream is not None
        url = URL(route.upstream)
        timeouts = route.timeouts.over(server_timeouts)
        tls = tls_context(route.tls.verify, route.tls.ca_file) if url.scheme == "https" else None
        host, port, host_header = url.raw_host, url.port, url.host_port_subcomponent
        assert host is not None and port is not None and host_header is not None  # validated
        return cls(
            endpoint=Endpoint(host, port, tls),
            host_header=host_header,
            base_path=url.raw_path,
            timeouts=CallTimeouts(timeouts.connect, timeouts.read, timeouts.total),
            inject_headers=dict(route.inject_headers),
            inject_query=tuple(
                (name, f"{quote(name, safe='')}={quote(value, safe='')}")
                for name, value in route.inject_query.items()
            ),
            inject_names=frozenset(route.inject_query),
            secrets=tuple(
                {
                    form
                    for value in [*route.inject_headers.values(), *route.inject_query.values()]
                    for form in (value, quote(value, safe=""), quote_plus(value))
                    if len(value) >= _MIN_SECRET
                }
            ),
        )

    def target(self, raw_path: str, raw_query: str) -> str:
        """The request target (path and query) to send upstream."""
        query = self._query(raw_query)
        return f"{raw_path}?{query}" if query else raw_path

    def _without_injected(self, raw_query: str) -> list[str]:
        return [
            pair
            for pair in raw_query.split("&")
            if pair and unquote_plus(pair.split("=", 1)[0]) not in self.inject_names
        ]

    def _location_without_injected(self, value: str) -> str:
        if "?" not in value:
            return value
        base, _, rest = value.partition("?")
        query, hash_mark, fragment = rest.partition("#")
        kept = "&".join(self._without_injected(query))
        return base + (f"?{kept}" if kept else "") + hash_mark + fragment

    def _query(self, raw_query: str) -> str:
        if not self.inject_query:
            return raw_query
        # Injected values replace the client's: drop any pair with that name.
        return "&".join(self._without_injected(raw_query) + [e for _, e in self.inject_query])

    def scrub_response_headers(self, headers: CIMultiDict[str]) -> None:
        """Keep server-held secrets out of what goes back to the browser.

        An upstream that redirects keeps the query, injected key included
        (``Location: /x/?q=1&appid=SECRET``): injected parameters are removed
        from Location and Content-Location; any other header that carries an
        injected value (an echo) is dropped. A body is streamed as it is.
        """
        # By name, whatever the value's length (short values are not in
        # ``secrets``, but their parameter still names an injected one).
        if self.inject_names:
            for name in ("Location", "Content-Location"):
                # Every line: a hostile upstream may send the header twice.
                values = headers.getall(name, ())
                if any("?" in value for value in values):
                    headers.popall(name)
                    for value in values:
                        headers.add(name, self._location_without_injected(value))
        if self.secrets:
            for name, value in list(headers.items()):
                if any(secret in value for secret in self.secrets):
                    headers.popall(name, None)


def client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.read
    )


# Seconds a logout waits for the provider to revoke its tokens. Revocation is best
# effort (RFC 7009 §2.2), and the logout answer, with the expired cookies, waits for
# it: a slow provider must not hold it (a browser that gives up keeps its cookie).
REVOKE_TIMEOUT = 5.0


def revoke_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    total = REVOKE_TIMEOUT if timeouts.total is None else min(REVOKE_TIMEOUT, timeouts.total)
    return aiohttp.ClientTimeout(total=total, sock_connect=timeouts.connect)


def client_session(connections: int = 1024) -> aiohttp.ClientSession:
    """The one pooled upstream client of a process (DESIGN.md: aiohttp facts)."""
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one user's cookies to the next
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=False,
        raise_for_status=False,
    )


def upstream_failure(exc: Exception, body: RequestBody | None) -> GatewayError:
    """The SPEC §4.4 error for a failure to *open* an upstream call.

    Only opening is mapped: what the caller raises while it holds the response
    (a relay cut short, a session store that failed) must pass through
    unchanged, since remapping it would log a 502 for a response whose 200
    headers the client already has.
    """
    if isinstance(exc, GatewayError):  # raised by the body stream (413)
        return exc
    if body is not None and body.too_large:
        return payload_too_large(body.limit)
    return map_client_error(exc)


def map_client_error(exc: BaseException) -> UpstreamFailure:
    """The SPEC §4.4 error for what the upstream client raised once connected
    (connecting fails with an UpstreamFailure of its own)."""
    if isinstance(exc, TimeoutError):  # aiohttp's read timeout is one too
        return upstream_failure_of("timeout")
    if isinstance(exc, ssl.SSLError):
        return upstream_failure_of("tls")
    if isinstance(exc, aiohttp.ClientPayloadError | HttpProcessingError):
        return upstream_failure_of("protocol")
    return upstream_failure_of("reset")


class _HeadersWithFirstChunk(web.StreamResponse):
    """A StreamResponse whose headers leave with the first body bytes.

    aiohttp sends a StreamResponse's headers at prepare(), a write of their
    own; holding them until the first body write saves a send() per response.
    relay() flushes them at once whenever no body is waiting yet, so a slow
    stream (SSE) still gets its headers immediately.
    """

    _send_headers_immediately = False


def reply_to(upstream_response: UpstreamResponse) -> web.StreamResponse:
    """The response to relay ``upstream_response`` in; its headers are the caller's to fill."""
    return _HeadersWithFirstChunk(status=upstream_response.status, reason=upstream_response.reason)


async def relay(
    request: web.BaseRequest, upstream_response: UpstreamResponse, response: web.StreamResponse
) -> web.StreamResponse:
    """Stream the upstream's answer to the client chunk by chunk as it arrives.

    If the upstream's body breaks off, the client's connection is dropped
    rather than ended cleanly, so the browser sees a truncated response.
    """
    await response.prepare(request)
    if request.method == "HEAD" or upstream_response.status in _NO_BODY_STATUSES:
        await response.write_eof()
        return response
    # Only reads from the upstream are guarded: a failed write means the
    # browser left, which is not an upstream failure (handle() lets it pass).
    content = upstream_response.content
    try:
        chunk = content.read_nowait()  # what already arrived with the headers
    except _UPSTREAM_BREAKS as exc:
        raise _cut_off(request, response, exc) from None
    if content.at_eof():
        await response.write_eof(chunk)  # headers, body and end in one write
        return response
    if chunk:
        await response.write(chunk)
    else:
        request.writer.send_headers()
    while True:
        try:
            chunk = await content.readany()
        except _UPSTREAM_BREAKS as exc:
            raise _cut_off(request, response, exc) from None
        if not chunk:
            break
        await response.write(chunk)
    await response.write_eof()
    return response


_UPSTREAM_BREAKS = (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)


def _cut_off(
    request: web.BaseRequest, response: web.StreamResponse, exc: BaseException
) -> UpstreamBodyBroken:
    # Never write_eof() here: a clean end would tell the browser the body is complete.
    if request.transport is not None:
        request.transport.abort()
    return UpstreamBodyBroken(map_client_error(exc).kind, response)


class UpstreamBodyBroken(Exception):
    """The upstream's body broke off after the response started; the client was cut off."""

    def __init__(self, kind: str, response: web.StreamResponse) -> None:
        super().__init__(kind)
        self.kind = kind
        self.response = response
