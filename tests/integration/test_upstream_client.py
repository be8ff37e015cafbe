"""The forwarding path's own HTTP/1.1 client (gateway/upstream_client.py), called directly.

Every test talks to a real server on loopback: a raw asyncio server (``RawUpstream``)
wherever the exact bytes on the wire, the connection a request arrived on, or a
misbehaving upstream matter; an aiohttp app where a well-behaved HTTP server is
enough (concurrency, TLS). Connections are told apart by the server: a raw
upstream numbers them in accept order and answers with ``conn<N> <method> <target>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import GatewayError, UpstreamFailure
from gateway.proxy import RequestBody
from gateway.upstream_client import (
    CallTimeouts,
    Endpoint,
    UpstreamClient,
    UpstreamResponse,
    tls_context,
)
from tests.support import free_port, running_app

T = TypeVar("T")

TIMEOUTS = CallTimeouts(connect=5, read=5, total=None)
GUARD = 10.0  # seconds before a wait that should end promptly fails the test


# -- a raw upstream ------------------------------------------------------------------


@dataclass
class RawRequest:
    """One request as a raw upstream read it off the wire."""

    line: str
    headers: CIMultiDict[str]
    head: bytes  # request line to blank line, raw
    body: bytearray = field(default_factory=bytearray)  # de-chunked when sent chunked
    chunk_sizes: list[int] | None = None  # the chunks as sent, when chunked
    complete: bool = False  # the whole body arrived (a last chunk, or Content-Length bytes)

    @property
    def method(self) -> str:
        return self.line.split(" ")[0]

    @property
    def target(self) -> str:
        return self.line.split(" ")[1]


class Peer:
    """One connection a RawUpstream accepted, as the server sees it."""

    def __init__(
        self,
        upstream: RawUpstream,
        index: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.upstream = upstream
        self.index = index
        self._reader = reader
        self._writer = writer
        self._buffer = bytearray()
        self.received = bytearray()  # every byte the client sent on this connection
        self.requests: list[RawRequest] = []
        self.closed_by_client = asyncio.Event()  # the client closed (or reset) its side

    async def _fill(self) -> bool:
        try:
            data = await self._reader.read(65536)
        except ConnectionError:
            data = b""
        if not data:
            self.closed_by_client.set()
            return False
        self._buffer += data
        self.received += data
        return True

    async def _read_until(self, separator: bytes) -> bytes | None:
        while (end := self._buffer.find(separator)) < 0:
            if not await self._fill():
                return None
        end += len(separator)
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        return data

    async def _read_exactly(self, size: int) -> bytes | None:
        while len(self._buffer) < size:
            if not await self._fill():
                return None
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def read_head(self) -> RawRequest | None:
        """The next request's line and headers (recorded as arrived); None if the client closed."""
        head = await self._read_until(b"\r\n\r\n")
        if head is None:
            return None
        line, *lines = head[:-4].decode("latin-1").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for header in lines:
            name, _, value = header.partition(":")
            headers.add(name.strip(), value.strip())
        request = RawRequest(line, headers, head)
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            request.chunk_sizes = []
        self.requests.append(request)
        await self.upstream.arrived(request)
        return request

    async def read_chunk(self, request: RawRequest) -> bytes | None:
        """The next chunk of a chunked body (b"" for the last one); None if the client closed."""
        size_line = await self._read_until(b"\r\n")
        if size_line is None:
            return None
        size = int(size_line.split(b";")[0], 16)
        data = await self._read_exactly(size + 2)  # the chunk and its CRLF
        if data is None:
            return None
        assert data.endswith(b"\r\n"), data
        assert request.chunk_sizes is not None
        request.chunk_sizes.append(size)
        if size == 0:
            request.complete = True
        else:
            request.body += data[:-2]
        return data[:-2]

    async def read_body(self, request: RawRequest) -> None:
        if request.chunk_sizes is not None:
            while await self.read_chunk(request):
                pass
            return
        data = await self._read_exactly(int(request.headers.get("Content-Length", "0")))
        if data is not None:
            request.body += data
            request.complete = True

    async def next_request(self) -> RawRequest | None:
        """The next whole request; None if the client closed before its head was in."""
        request = await self.read_head()
        if request is not None:
            await self.read_body(request)
        return request

    async def read_until_closed(self) -> None:
        """Discard whatever comes until the client closes: only the client can end this one."""
        while await self._fill():
            pass

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()


class RawUpstream:
    """An asyncio server on loopback; ``serve(peer)`` scripts each connection."""

    def __init__(self, serve: Callable[[Peer], Awaitable[None]]) -> None:
        self._serve = serve
        self.port = 0
        self.peers: list[Peer] = []
        self.requests: list[RawRequest] = []  # every connection's, in arrival order
        self.log: list[str] = []  # arrivals ("arrived /x"), and whatever a test adds
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(self, len(self.peers), reader, writer)
        self.peers.append(peer)
        try:
            await self._serve(peer)
        except ConnectionError:
            pass  # the client went away mid-script: what it did is in peer.received
        except asyncio.CancelledError:
            pass  # torn down; ended quietly (3.11's start_server logs a cancelled handler)
        finally:
            writer.close()

    async def arrived(self, request: RawRequest) -> None:
        self.requests.append(request)
        self.log.append(f"arrived {request.target}")
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_requests(self, count: int) -> None:
        async def enough() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.requests) >= count)

        await guarded(enough(), f"{count} requests at the upstream")

    def targets(self) -> list[str]:
        return [request.target for request in self.requests]


@contextlib.asynccontextmanager
async def raw_upstream(serve: Callable[[Peer], Awaitable[None]]) -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream(serve)
    server = await asyncio.start_server(upstream._handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    try:
        yield upstream
    finally:
        server.close()
        for task in upstream._tasks:
            task.cancel()
        await asyncio.gather(*upstream._tasks, return_exceptions=True)
        await server.wait_closed()


def answer(
    body: bytes = b"ok", *, status: str = "200 OK", headers: str = "", version: str = "HTTP/1.1"
) -> bytes:
    """A complete response framed by Content-Length; ``headers`` are extra "Name: v\\r\\n" lines."""
    return f"{version} {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def identify(peer: Peer, request: RawRequest) -> bytes:
    return f"conn{peer.index} {request.method} {request.target}".encode()


async def keep_alive(peer: Peer) -> None:
    """Answer every request on the connection with which connection and request it was
    (for HEAD, the head of that answer only)."""
    while (request := await peer.next_request()) is not None:
        response = answer(identify(peer, request))
        if request.method == "HEAD":
            response = response[: response.index(b"\r\n\r\n") + 4]
        await peer.send(response)


def first_answer(first: bytes, *, then_serve: bool) -> Callable[[Peer], Awaitable[None]]:
    """Connection 0 answers its first request with ``first``; after that it goes on serving
    (``then_serve``) or only waits for the client to close it, so a wrongly reused
    connection shows up as a close that never comes. Later connections keep alive."""

    async def serve(peer: Peer) -> None:
        if peer.index > 0:
            await keep_alive(peer)
            return
        if await peer.next_request() is None:
            return
        await peer.send(first)
        if then_serve:
            await keep_alive(peer)
        else:
            await peer.read_until_closed()

    return serve


def dies_on_reuse(dying: int = 1) -> Callable[[Peer], Awaitable[None]]:
    """The first ``dying`` connections answer one request each, then read the next one whole
    and close without answering: what a client sees when it reuses a connection the
    upstream has just timed out. Their first answers wait until all ``dying`` requests are
    in, so that the client opens that many connections. Later connections keep alive."""

    async def serve(peer: Peer) -> None:
        if peer.index >= dying:
            await keep_alive(peer)
            return
        request = await peer.next_request()
        if request is None:
            return
        await peer.upstream.wait_for_requests(dying)
        await peer.send(answer(identify(peer, request)))
        await peer.next_request()

    return serve


# -- calling the client ------------------------------------------------------------


async def guarded(
    awaitable: Coroutine[Any, Any, T] | asyncio.Future[T], what: str, seconds: float = GUARD
) -> T:
    """Await with a limit, so that a hang fails the test rather than stalling the suite.

    The limit expiring is a test failure, never a TimeoutError that a test expecting
    the client's own timeout could mistake for it.
    """
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        pytest.fail(f"still waiting after {seconds} s for {what}")
    return task.result()


def endpoint(port: int, tls: ssl.SSLContext | None = None) -> Endpoint:
    return Endpoint("127.0.0.1", port, tls)


def host_headers(port: int, extra: dict[str, str] | None = None) -> CIMultiDict[str]:
    headers = CIMultiDict({"Host": f"127.0.0.1:{port}"})
    headers.extend(extra or {})
    return headers


async def call(
    client: UpstreamClient,
    port: int,
    method: str = "GET",
    target: str = "/",
    *,
    headers: CIMultiDict[str] | None = None,
    body: RequestBody | None = None,
    timeouts: CallTimeouts = TIMEOUTS,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """One whole exchange: (status, body); the response is released."""
    sent = headers if headers is not None else host_headers(port)
    response = await client.request(method, endpoint(port, tls), target, sent, body, timeouts)
    async with response:
        return response.status, await response.content.read()


async def open_response(
    client: UpstreamClient, port: int, target: str = "/", timeouts: CallTimeouts = TIMEOUTS
) -> UpstreamResponse:
    """GET ``target``: the response, its body unread, for the caller to release."""
    return await client.request("GET", endpoint(port), target, host_headers(port), None, timeouts)


async def dropped_and_replaced(client: UpstreamClient, upstream: RawUpstream) -> None:
    """The client closed the first connection, and the next request is answered on a new one."""
    await guarded(upstream.peers[0].closed_by_client.wait(), "the client to close it")
    assert await call(client, upstream.port, target="/next") == (200, b"conn1 GET /next")


@contextlib.asynccontextmanager
async def open_client(**options: Any) -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient(**options)
    try:
        yield client
    finally:
        await client.close()


Upload = Callable[..., tuple[RequestBody, aiohttp.StreamReader]]


@pytest.fixture
async def upload() -> AsyncIterator[Upload]:
    """Makes request bodies as the gateway gets them: a RequestBody over the aiohttp
    StreamReader of a live connection, fed by the test. A socket pair stands in for the
    browser's connection (aiohttp's StreamReader waits for data only while it is open).

    ``upload(*chunks, eof=True, limit=..., keep=...)`` returns the body and its reader.
    """
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, browser = await loop.create_connection(lambda: BaseProtocol(loop), sock=ours)

    def make(
        *chunks: bytes, eof: bool = True, limit: int = 2**20, keep: int = 2**16
    ) -> tuple[RequestBody, aiohttp.StreamReader]:
        content = aiohttp.StreamReader(browser, 2**16, loop=loop)
        for chunk in chunks:
            content.feed_data(chunk)
        if eof:
            content.feed_eof()
        return RequestBody(content, limit, keep), content

    yield make
    transport.close()
    theirs.close()


# -- keep-alive reuse --------------------------------------------------------------


async def test_sequential_requests_share_one_connection() -> None:
    async with raw_upstream(keep_alive) as upstream, open_client() as client:
        answers = [await call(client, upstream.port, target=f"/{n}") for n in range(3)]
    assert answers == [(200, f"conn0 GET /{n}".encode()) for n in range(3)]
    assert len(upstream.peers) == 1


async def test_concurrent_requests_open_separate_connections_then_reuse_them() -> None:
    # The upstream answers only when three requests are in at once: three connections.
    barrier = asyncio.Barrier(3)
    ports: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        await barrier.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handle)
    async with running_app(app) as url, open_client() as client:
        port = URL(url).port
        assert port is not None
        for _ in range(2):
            answers = await guarded(
                asyncio.gather(*(call(client, port) for _ in range(3))), "three answers"
            )
            assert answers == [(200, b"ok")] * 3
    first_round, second_round = ports[:3], ports[3:]
    assert len(set(first_round)) == 3
    assert set(second_round) == set(first_round)  # the same three connections, reused


async def test_bodyless_responses_keep_the_connection_in_step() -> None:
    """HEAD (with a Content-Length it does not send), 204 and 304 have no body: the
    client must not wait for one, nor read the next answer as one."""

    async def serve(peer: Peer) -> None:
        while (request := await peer.next_request()) is not None:
            if request.method == "HEAD":
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
            elif request.target == "/204":
                await peer.send(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif request.target == "/304":
                await peer.send(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
            else:
                await peer.send(answer(identify(peer, request)))

    async with raw_upstream(serve) as upstream, open_client() as client:
        assert await call(client, upstream.port, "HEAD") == (200, b"")
        assert await call(client, upstream.port, target="/204") == (204, b"")
        assert await call(client, upstream.port, target="/304") == (304, b"")
        assert await call(client, upstream.port, target="/last") == (200, b"conn0 GET /last")
    assert len(upstream.peers) == 1


async def test_chunked_response_is_read_whole_and_the_connection_reused() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    async with (
        raw_upstream(first_answer(chunked, then_serve=True)) as upstream,
        open_client() as client,
    ):
        assert await call(client, upstream.port) == (200, b"abcde")
        assert await call(client, upstream.port, target="/2") == (200, b"conn0 GET /2")
    assert len(upstream.peers) == 1


# -- connections that must not be reused -------------------------------------------


NOT_REUSABLE = {
    "connection-close": (answer(headers="Connection: close\r\n"), True),
    "http-1.0": (answer(version="HTTP/1.0"), True),
    # Headers and half the body: the rest is still on its way when the caller lets go.
    "body-not-read": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234", False),
    # A second, unsolicited response after the first one (response smuggling): if the
    # connection were reused, the next request would be answered with it.
    "unsolicited-response": (
        answer() + answer(b"INJECTED", headers="X-Injected: 1\r\n"),
        True,
    ),
}
# Unsolicited bytes after a response that are not (yet) a whole response.
PARTIAL_RESPONSE = b"HTTP/1.1 200 OK\r\nX-Injected: 1\r\n"


@pytest.mark.parametrize(("first", "read_body"), NOT_REUSABLE.values(), ids=NOT_REUSABLE.keys())
async def test_connection_is_closed_not_reused(first: bytes, read_body: bool) -> None:
    async with (
        raw_upstream(first_answer(first, then_serve=False)) as upstream,
        open_client() as client,
    ):
        async with await open_response(client, upstream.port) as response:
            assert response.status == 200
            if read_body:
                assert await response.content.read() == b"ok"
        # The first connection is never used again.
        await dropped_and_replaced(client, upstream)
    assert len(upstream.peers[0].requests) == 1


async def test_unsolicited_partial_response_is_never_taken_for_the_next_answer() -> None:
    first = answer() + PARTIAL_RESPONSE
    async with (
        raw_upstream(first_answer(first, then_serve=True)) as upstream,
        open_client() as client,
    ):
        assert await call(client, upstream.port) == (200, b"ok")
        status, body = await call(client, upstream.port, target="/next")
    assert (status, body) in [(200, b"conn0 GET /next"), (200, b"conn1 GET /next")]


async def test_connection_with_unsolicited_partial_bytes_is_not_reused() -> None:
    first = answer() + PARTIAL_RESPONSE
    async with (
        raw_upstream(first_answer(first, then_serve=False)) as upstream,
        open_client() as client,
    ):
        assert await call(client, upstream.port) == (200, b"ok")
        await guarded(upstream.peers[0].closed_by_client.wait(), "its close", seconds=2)


async def test_body_without_framing_ends_when_the_upstream_closes() -> None:
    async def serve(peer: Peer) -> None:
        if peer.index == 0:
            await peer.next_request()
            await peer.send(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
            return  # closing is what ends this body
        await keep_alive(peer)

    async with raw_upstream(serve) as upstream, open_client() as client:
        assert await call(client, upstream.port) == (200, b"until the end")
        assert await call(client, upstream.port, target="/2") == (200, b"conn1 GET /2")


async def test_bytes_arriving_on_an_idle_connection_close_it() -> None:
    """A stray head sent while the connection sits in the pool, and its end after the
    next request went out, must never become that request's answer (it would be
    another user's)."""
    parked = asyncio.Event()
    stray_sent = asyncio.Event()

    async def serve(peer: Peer) -> None:
        if peer.index > 0:
            await keep_alive(peer)
            return
        await peer.next_request()
        await peer.send(answer())
        await parked.wait()
        await peer.send(b"HTTP/1.1 200 OK\r\nX-Pad: ")  # while idle
        stray_sent.set()
        if await peer.next_request() is not None:  # a wrongly reused connection
            await peer.send(b"1\r\nContent-Length: 4\r\n\r\nEVIL")
        await peer.read_until_closed()

    async with raw_upstream(serve) as upstream, open_client() as client:
        assert await call(client, upstream.port) == (200, b"ok")  # released: pooled
        parked.set()
        await guarded(stray_sent.wait(), "the stray bytes")
        await dropped_and_replaced(client, upstream)  # the idle connection closed
    assert len(upstream.peers[0].requests) == 1


# -- a reused connection the upstream had closed: one retry --------------------------


async def test_get_on_a_dead_reused_connection_is_retried_on_a_new_one() -> None:
    async with raw_upstream(dies_on_reuse()) as upstream, open_client() as client:
        assert await call(client, upstream.port) == (200, b"conn0 GET /")
        assert await call(client, upstream.port, target="/again") == (200, b"conn1 GET /again")
    # Sent on the reused connection (which took it and closed), then once more on a new one.
    assert [len(peer.requests) for peer in upstream.peers] == [2, 1]
    assert upstream.targets() == ["/", "/again", "/again"]


async def test_put_with_a_replayable_body_is_retried_with_the_whole_body(upload: Upload) -> None:
    async with raw_upstream(dies_on_reuse()) as upstream, open_client() as client:
        assert await call(client, upstream.port) == (200, b"conn0 GET /")
        body, _ = upload(b"the ", b"payload")
        status, answer_body = await call(client, upstream.port, "PUT", "/doc", body=body)
    assert (status, answer_body) == (200, b"conn1 PUT /doc")
    replayed = upstream.peers[1].requests[0]
    assert (replayed.body, replayed.complete) == (b"the payload", True)


async def test_post_on_a_dead_reused_connection_is_not_retried() -> None:
    async with raw_upstream(dies_on_reuse()) as upstream, open_client() as client:
        assert await call(client, upstream.port) == (200, b"conn0 GET /")
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await call(client, upstream.port, "POST", "/order")
    # The upstream may have acted on it: it is never sent twice.
    assert upstream.targets() == ["/", "/order"]
    assert len(upstream.peers) == 1


async def test_put_whose_body_was_not_kept_is_not_retried(upload: Upload) -> None:
    async with raw_upstream(dies_on_reuse()) as upstream, open_client() as client:
        assert await call(client, upstream.port) == (200, b"conn0 GET /")
        body, _ = upload(b"more than the two bytes kept", keep=2)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await call(client, upstream.port, "PUT", "/doc", body=body)
    assert upstream.targets() == ["/", "/doc"]
    assert len(upstream.peers) == 1


async def test_failure_on_a_new_connection_is_not_retried() -> None:
    async def serve(peer: Peer) -> None:
        await peer.next_request()  # and close without answering

    async with raw_upstream(serve) as upstream, open_client() as client:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await call(client, upstream.port)
    assert upstream.targets() == ["/"]


async def test_retry_is_on_a_new_connection_even_with_more_dead_ones_pooled() -> None:
    async with raw_upstream(dies_on_reuse(dying=2)) as upstream, open_client() as client:
        first_two = await guarded(
            asyncio.gather(call(client, upstream.port), call(client, upstream.port)), "2 answers"
        )
        assert sorted(first_two) == [(200, b"conn0 GET /"), (200, b"conn1 GET /")]
        # Both connections are pooled now and both die when reused (an upstream restart):
        # the one retry goes to a new connection, not to the other stale one.
        assert await call(client, upstream.port, target="/again") == (200, b"conn2 GET /again")
    stale_one, stale_two, fresh = (len(peer.requests) for peer in upstream.peers)
    assert (sorted([stale_one, stale_two]), fresh) == ([1, 2], 1)


# -- what is sent ------------------------------------------------------------------


async def test_request_line_and_host_are_sent_as_given() -> None:
    headers = CIMultiDict({"Host": "api.internal:8443", "X-Request-Id": "r-1"})
    async with raw_upstream(keep_alive) as upstream, open_client() as client:
        await call(client, upstream.port, target="/a%2Fb?x=1&y", headers=headers)
    (request,) = upstream.requests
    assert request.line == "GET /a%2Fb?x=1&y HTTP/1.1"
    assert request.headers.getall("Host") == ["api.internal:8443"]
    assert request.head.lower().count(b"\r\nhost:") == 1
    assert request.headers["X-Request-Id"] == "r-1"


@pytest.mark.parametrize(
    ("method", "framing"),
    [
        ("GET", None),
        ("HEAD", None),
        ("OPTIONS", None),
        ("POST", "0"),
        ("PUT", "0"),
        ("PATCH", "0"),
        ("DELETE", "0"),
    ],
)
async def test_bodyless_request_framing(method: str, framing: str | None) -> None:
    """Only methods that may have a body say it is empty (``Content-Length: 0``, which
    some servers require); none is ever sent chunked."""
    async with raw_upstream(keep_alive) as upstream, open_client() as client:
        status, _ = await call(client, upstream.port, method)
    assert status == 200
    (request,) = upstream.requests
    assert request.headers.getall("Content-Length", []) == ([framing] if framing else [])
    assert "Transfer-Encoding" not in request.headers


async def test_streamed_body_without_length_is_sent_chunked_as_it_arrives(upload: Upload) -> None:
    first_chunk_in = asyncio.Event()

    async def serve(peer: Peer) -> None:
        while (request := await peer.read_head()) is not None:
            if request.chunk_sizes is None:
                await peer.read_body(request)
            while request.chunk_sizes is not None and await peer.read_chunk(request):
                first_chunk_in.set()
            await peer.send(answer(identify(peer, request)))

    body, content = upload(b"hello, ", eof=False)
    async with raw_upstream(serve) as upstream, open_client() as client:
        exchange = asyncio.create_task(call(client, upstream.port, "POST", "/up", body=body))
        # The first part reaches the upstream before the rest of the body exists.
        await guarded(first_chunk_in.wait(), "the first chunk at the upstream")
        content.feed_data(b"world")
        content.feed_eof()
        assert await guarded(exchange, "the answer") == (200, b"conn0 POST /up")
        # The last chunk ended the request cleanly: the connection is reused.
        assert await call(client, upstream.port, target="/next") == (200, b"conn0 GET /next")
    request = upstream.requests[0]
    assert "Content-Length" not in request.headers
    assert request.headers.getall("Transfer-Encoding") == ["chunked"]
    assert (request.body, request.complete) == (b"hello, world", True)
    assert request.chunk_sizes == [7, 5, 0]


async def test_body_with_content_length_is_sent_as_is(upload: Upload) -> None:
    headers = CIMultiDict({"Host": "up", "Content-Length": "11"})
    body, _ = upload(b"hello", b" world")
    async with raw_upstream(keep_alive) as upstream, open_client() as client:
        assert await call(client, upstream.port, "POST", headers=headers, body=body) == (
            200,
            b"conn0 POST /",
        )
        assert await call(client, upstream.port, target="/next") == (200, b"conn0 GET /next")
    request = upstream.requests[0]
    assert "Transfer-Encoding" not in request.headers
    assert request.headers.getall("Content-Length") == ["11"]
    # Exactly the body after the head, no chunk framing, and then the next request.
    received = bytes(upstream.peers[0].received)
    assert received[len(request.head) :].startswith(b"hello worldGET /next HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("target", "extra"),
    [
        ("/", {"X-Note": "a\r\nX-Injected: 1"}),
        ("/", {"X-Note\r\nX-Injected": "1"}),
        ("/ HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /smuggled", {}),
        ("/", {"X-Note": "a\nX-Injected: 1"}),
    ],
    ids=["header-value", "header-name", "target", "bare-lf"],
)
async def test_line_breaks_in_the_request_head_are_refused(
    target: str, extra: dict[str, str]
) -> None:
    async with raw_upstream(keep_alive) as upstream, open_client(connections=1) as client:
        with pytest.raises(ValueError):
            await call(
                client, upstream.port, target=target, headers=host_headers(upstream.port, extra)
            )
        # The connection opened for it is closed, having carried nothing.
        await guarded(upstream.peers[0].closed_by_client.wait(), "the client to close it")
        # And the refused request gave its slot back (there is only one).
        assert await guarded(call(client, upstream.port), "a later request") == (
            200,
            b"conn1 GET /",
        )
    assert upstream.peers[0].received == b""
    assert all(b"X-Injected" not in peer.received for peer in upstream.peers)


async def test_body_over_its_limit_is_a_413_and_never_looks_complete(
    upload: Upload,
) -> None:
    first_chunk_in = asyncio.Event()

    async def serve(peer: Peer) -> None:
        request = await peer.read_head()
        if request is not None:
            while await peer.read_chunk(request):
                first_chunk_in.set()
            await peer.read_until_closed()

    body, content = upload(b"abcd", eof=False, limit=5)
    async with raw_upstream(serve) as upstream, open_client() as client:
        exchange = asyncio.create_task(call(client, upstream.port, "POST", body=body))
        await guarded(first_chunk_in.wait(), "the first chunk at the upstream")
        content.feed_data(b"efgh")  # 8 bytes in all: over the limit of 5
        with pytest.raises(GatewayError) as raised:
            await guarded(exchange, "the failure")
        await guarded(upstream.peers[0].closed_by_client.wait(), "the client to close it")
    assert not isinstance(raised.value, UpstreamFailure)
    assert (raised.value.status, raised.value.code) == (413, "payload_too_large")
    (request,) = upstream.requests
    assert (request.body, request.complete) == (b"abcd", False)  # no last chunk was sent


async def test_an_answer_before_the_whole_body_closes_the_connection(upload: Upload) -> None:
    async def serve(peer: Peer) -> None:
        if peer.index > 0:
            await keep_alive(peer)
            return
        await peer.read_head()  # answered at once, the body left unread
        await peer.send(answer(b"too big", status="413 Payload Too Large"))
        await peer.read_until_closed()

    body, _ = upload(b"a first part", eof=False)  # and the rest never comes
    async with raw_upstream(serve) as upstream, open_client() as client:
        assert await call(client, upstream.port, "POST", body=body) == (413, b"too big")
        # Mid-request, the connection cannot carry another one.
        await dropped_and_replaced(client, upstream)


# -- interim responses -------------------------------------------------------------


async def test_interim_responses_are_skipped() -> None:
    interim_then_final = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        + answer(b"final", headers="X-Final: yes\r\n")
    )
    async with (
        raw_upstream(first_answer(interim_then_final, then_serve=True)) as upstream,
        open_client() as client,
    ):
        async with await open_response(client, upstream.port) as response:
            assert (response.status, response.headers["X-Final"]) == (200, "yes")
            assert "Link" not in response.headers
            assert await response.content.read() == b"final"
        # Nothing of the exchange is left over on the connection.
        assert await call(client, upstream.port, target="/next") == (200, b"conn0 GET /next")


async def test_unrequested_101_is_refused_and_the_connection_dropped() -> None:
    switching = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    async with (
        raw_upstream(first_answer(switching, then_serve=False)) as upstream,
        open_client() as client,
    ):
        with pytest.raises(HttpProcessingError):
            await guarded(call(client, upstream.port), "the refusal")
        await dropped_and_replaced(client, upstream)


async def test_read_timeout_still_runs_after_an_interim_response() -> None:
    async def serve(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </app.js>; rel=preload\r\n\r\n")
        await peer.read_until_closed()  # and never the final answer

    async with raw_upstream(serve) as upstream, open_client() as client:
        with pytest.raises(TimeoutError):
            await guarded(
                call(client, upstream.port, timeouts=CallTimeouts(5, 0.3, None)),
                "a read timeout",
                seconds=2,
            )


# -- timeouts ----------------------------------------------------------------------


@contextlib.contextmanager
def listener_with_a_full_backlog() -> Iterator[int]:
    """A port whose accept queue is full: Linux drops further SYNs, so connecting hangs."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # room for one connection that nobody accepts
        port = listener.getsockname()[1]
        filler.settimeout(GUARD)
        filler.connect(("127.0.0.1", port))
        yield port
    finally:
        filler.close()
        listener.close()


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs on a full queue")
async def test_connect_timeout_is_an_upstream_timeout() -> None:
    with listener_with_a_full_backlog() as port:
        async with open_client() as client:
            started = time.monotonic()
            with pytest.raises(UpstreamFailure) as raised:
                await guarded(call(client, port, timeouts=CallTimeouts(0.3, 5, None)), "timeout")
            elapsed = time.monotonic() - started
    assert (raised.value.kind, raised.value.status) == ("timeout", 504)
    assert elapsed < 5  # the connect timeout, not the read timeout, ended it


async def test_read_timeout_before_the_answer_is_not_retried() -> None:
    async def serve(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(answer(identify(peer, peer.requests[0])))
        await peer.next_request()  # the reused connection's request, never answered
        await peer.read_until_closed()

    async with raw_upstream(serve) as upstream, open_client() as client:
        assert await call(client, upstream.port) == (200, b"conn0 GET /")
        with pytest.raises(aiohttp.ServerTimeoutError):
            await guarded(
                call(client, upstream.port, target="/slow", timeouts=CallTimeouts(5, 0.3, None)),
                "a read timeout",
            )
        await guarded(upstream.peers[0].closed_by_client.wait(), "the client to close it")
    # A timeout is no sign of a dead connection: the GET is not sent again.
    assert upstream.targets() == ["/", "/slow"]
    assert len(upstream.peers) == 1


async def test_read_timeout_while_reading_the_body() -> None:
    stalled = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234"
    async with (
        raw_upstream(first_answer(stalled, then_serve=False)) as upstream,
        open_client() as client,
    ):
        response = await open_response(client, upstream.port, timeouts=CallTimeouts(5, 0.3, None))
        async with response:
            assert response.status == 200
            with pytest.raises(aiohttp.ServerTimeoutError):
                await guarded(response.content.read(), "a read timeout")
        await guarded(upstream.peers[0].closed_by_client.wait(), "the client to close it")


async def test_total_timeout_covers_a_body_that_keeps_coming() -> None:
    async def trickle(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        watch = asyncio.create_task(peer.read_until_closed())
        try:
            # A byte every 50 ms: never silent long enough for the read timeout.
            while not peer.closed_by_client.is_set():
                await peer.send(b"x")
                await asyncio.sleep(0.05)
        finally:
            watch.cancel()

    async def read_all(response: UpstreamResponse) -> int:
        received = 0
        while chunk := await response.content.readany():
            received += len(chunk)
        return received

    async with raw_upstream(trickle) as upstream, open_client() as client:
        started = time.monotonic()
        response = await open_response(client, upstream.port, timeouts=CallTimeouts(5, 5, 0.5))
        async with response:
            assert response.status == 200
            with pytest.raises(TimeoutError) as raised:
                await guarded(read_all(response), "the total timeout")
        elapsed = time.monotonic() - started
        await guarded(upstream.peers[0].closed_by_client.wait(), "the client to close it")
    assert not isinstance(raised.value, aiohttp.ServerTimeoutError)  # not the read timeout
    assert 0.4 < elapsed < 5


async def test_total_timeout_before_the_answer() -> None:
    async def silent_first(peer: Peer) -> None:
        if peer.index > 0:
            return await keep_alive(peer)
        await peer.next_request()
        await peer.read_until_closed()

    async with raw_upstream(silent_first) as upstream, open_client(connections=1) as client:
        with pytest.raises(TimeoutError):
            await guarded(call(client, upstream.port, timeouts=CallTimeouts(5, None, 0.3)), "it")
        await guarded(upstream.peers[0].closed_by_client.wait(), "the client to close it")
        # The timed-out call gave back its slot (there is only one).
        assert await guarded(call(client, upstream.port), "a later request") == (
            200,
            b"conn1 GET /",
        )


# -- failures ----------------------------------------------------------------------


async def test_refused_connection_is_an_upstream_failure_of_kind_connect() -> None:
    async with open_client(connections=1) as client:
        port = free_port()  # nothing listens there
        for _ in range(2):  # and a failure gives its slot back
            with pytest.raises(UpstreamFailure) as raised:
                await guarded(call(client, port), "the refusal")
            assert (raised.value.kind, raised.value.status) == ("connect", 502)


GARBAGE = {
    "not-http": b"garbage\r\n\r\n",
    "bad-status-line": b"HTTP/1.1 OK\r\n\r\n",
    "length-and-chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    ),
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    "bad-header-line": b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
async def test_malformed_answer_raises_http_processing_error(garbage: bytes) -> None:
    async with (
        raw_upstream(first_answer(garbage, then_serve=False)) as upstream,
        open_client() as client,
    ):
        with pytest.raises(HttpProcessingError):
            await call(client, upstream.port)
        await dropped_and_replaced(client, upstream)


async def test_body_cut_short_raises_payload_error() -> None:
    async def serve(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        # and close: five bytes short

    async with raw_upstream(serve) as upstream, open_client() as client:
        with pytest.raises(aiohttp.ClientPayloadError):
            await call(client, upstream.port)


async def test_a_malformed_chunk_mid_body_fails_the_body_at_once() -> None:
    """aiohttp reports a parse error to the next read() of a message only; the body
    being streamed must fail too, not wait for a total timeout that may never come."""

    async def serve(peer: Peer) -> None:
        await peer.next_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await peer.upstream.wait_for_requests(1)
        await first_chunk_read.wait()
        await peer.send(b"zz\r\nnot a chunk\r\n")
        await peer.read_until_closed()

    first_chunk_read = asyncio.Event()
    timeouts = CallTimeouts(connect=5, read=None, total=None)  # nothing else would end it
    async with raw_upstream(serve) as upstream, open_client() as client:
        response = await open_response(client, upstream.port, timeouts=timeouts)
        async with response:
            assert await response.content.readany() == b"hello"
            first_chunk_read.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await guarded(response.content.readany(), "the body to fail")


async def test_a_status_below_100_is_refused() -> None:
    async with (
        raw_upstream(first_answer(answer(status="099 Odd"), then_serve=False)) as upstream,
        open_client() as client,
    ):
        with pytest.raises(HttpProcessingError):
            await call(client, upstream.port)
        await guarded(upstream.peers[0].closed_by_client.wait(), "the client to close it")


async def test_a_body_longer_than_its_content_length_is_cut_at_the_length(
    upload: Upload,
) -> None:
    """Whatever feeds the body, no byte past the declared length reaches the upstream
    (it would be read as a second request)."""
    body, _ = upload(b"hello", b" worldGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    headers = host_headers(0, {"Content-Length": "11"})
    async with raw_upstream(keep_alive) as upstream, open_client() as client:
        headers["Host"] = f"127.0.0.1:{upstream.port}"
        assert await call(client, upstream.port, "PUT", headers=headers, body=body) == (
            200,
            b"conn0 PUT /",
        )
        assert await call(client, upstream.port, target="/next") == (200, b"conn0 GET /next")
    assert upstream.targets() == ["/", "/next"]
    assert bytes(upstream.requests[0].body) == b"hello world"


# -- the pool ----------------------------------------------------------------------


async def test_idle_connection_past_keepalive_is_closed_and_not_reused() -> None:
    async with raw_upstream(keep_alive) as upstream, open_client(keepalive=0.2) as client:
        assert await call(client, upstream.port) == (200, b"conn0 GET /")
        # Idle past the keep-alive time, the client closes it itself...
        await guarded(upstream.peers[0].closed_by_client.wait(), "the idle connection's close")
        # ...and the next request opens another.
        assert await call(client, upstream.port, target="/2") == (200, b"conn1 GET /2")


async def test_idle_connection_past_keepalive_is_not_reused_even_before_the_sweep() -> None:
    """The sweep runs every ``keepalive`` seconds, so a connection can outlive its keep-alive
    time in the pool by up to that much: taking one must check its age itself."""
    keepalive = 0.4
    async with raw_upstream(keep_alive) as upstream, open_client(keepalive=keepalive) as client:
        assert await call(client, upstream.port) == (200, b"conn0 GET /")  # sweeps: +0.4, +0.8
        await asyncio.sleep(keepalive / 2)
        assert await call(client, upstream.port, target="/2") == (200, b"conn0 GET /2")
        # Idle since +0.2, conn0 outlives the sweep at +0.4; at +0.7 it is past its
        # keep-alive time but (unless this machine stalls for 0.1 s) not yet swept.
        await asyncio.sleep(keepalive * 1.25)
        assert await call(client, upstream.port, target="/3") == (200, b"conn1 GET /3")
        await guarded(upstream.peers[0].closed_by_client.wait(), "the expired one's close")


async def test_close_closes_idle_connections_and_in_use_ones_on_release() -> None:
    async with raw_upstream(keep_alive) as upstream, open_client() as client:
        held = await open_response(client, upstream.port, target="/held")
        assert await call(client, upstream.port, target="/done") == (200, b"conn1 GET /done")
        await client.close()
        # The idle connection is closed at once; the one in use stays usable...
        await guarded(upstream.peers[1].closed_by_client.wait(), "the idle connection's close")
        assert not upstream.peers[0].closed_by_client.is_set()
        async with held:
            assert await held.content.read() == b"conn0 GET /held"
        # ...until it is released: a closed client pools nothing.
        await guarded(upstream.peers[0].closed_by_client.wait(), "the released one's close")


async def test_connection_limit_queues_the_extra_request_until_a_release() -> None:
    async with raw_upstream(keep_alive) as upstream, open_client(connections=2) as client:
        calls = [
            asyncio.create_task(open_response(client, upstream.port, target=f"/{n}"))
            for n in (1, 2, 3)
        ]
        # The first two get connections and answers, and are held.
        first, second = await guarded(asyncio.gather(calls[0], calls[1]), "two answers")
        assert not calls[2].done()
        freed = (await first.content.read()).split()[0]  # b"conn<N>"
        upstream.log.append("released /1")
        first.release()
        third = await guarded(calls[2], "the third answer")
        # The third went out only once a connection was free, and on that one.
        assert await third.content.read() == freed + b" GET /3"
        third.release()
        second.release()
    assert sorted(upstream.log[:2]) == ["arrived /1", "arrived /2"]
    assert upstream.log[2:] == ["released /1", "arrived /3"]
    assert len(upstream.peers) == 2


async def test_the_connection_limit_is_per_endpoint() -> None:
    async with (
        raw_upstream(keep_alive) as busy,
        raw_upstream(keep_alive) as other,
        open_client(connections=1, queue_timeout=5) as client,
    ):
        held = await open_response(client, busy.port, target="/held")
        async with held:
            # busy's one connection is in use; other's is not held up by it.
            answer = await guarded(call(client, other.port), "the other endpoint's answer")
            assert answer == (200, b"conn0 GET /")


async def test_a_request_queued_past_the_queue_timeout_is_upstream_busy() -> None:
    refusals: list[str] = []
    async with (
        raw_upstream(keep_alive) as upstream,
        open_client(
            connections=1, queue_timeout=0.3, on_busy=lambda: refusals.append("busy")
        ) as client,
    ):
        held = await open_response(client, upstream.port, target="/held")
        async with held:
            with pytest.raises(GatewayError) as raised:
                await guarded(call(client, upstream.port, target="/queued"), "the refusal")
            error = raised.value
            assert (error.status, error.code, error.headers) == (
                503,
                "upstream_busy",
                {"Retry-After": "1"},
            )
            assert refusals == ["busy"]
            assert await held.content.read() == b"conn0 GET /held"
        # The refused request never went out, and took no slot with it.
        assert await guarded(call(client, upstream.port, target="/next"), "a later one") == (
            200,
            b"conn0 GET /next",
        )
        assert [r.target for r in upstream.requests] == ["/held", "/next"]


async def test_total_timeout_covers_the_wait_for_a_free_connection() -> None:
    async with raw_upstream(keep_alive) as upstream, open_client(connections=1) as client:
        held = await open_response(client, upstream.port, target="/held")
        async with held:
            with pytest.raises(TimeoutError):
                await guarded(
                    call(client, upstream.port, timeouts=CallTimeouts(5, 5, 0.3)),
                    "a total timeout",
                    seconds=2,
                )


# -- TLS ---------------------------------------------------------------------------


@pytest.fixture
async def https_port(ca: trustme.CA) -> AsyncIterator[tuple[int, list[int]]]:
    """An https upstream whose certificate no system CA vouches for; yields its port
    and the client ports of the requests it served (one per request)."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_ports: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        assert request.transport is not None
        client_ports.append(request.transport.get_extra_info("peername")[1])
        return web.Response(text=f"{request.scheme} {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    async with running_app(app, ssl_context=server_context) as url:
        port = URL(url).port
        assert port is not None
        yield port, client_ports


async def test_tls_upstream_not_trusted_is_a_tls_failure(https_port: tuple[int, list[int]]) -> None:
    port, served = https_port
    async with open_client() as client:
        with pytest.raises(UpstreamFailure) as raised:
            await call(client, port, tls=tls_context())
    assert (raised.value.kind, raised.value.status) == ("tls", 502)
    assert served == []


async def test_tls_upstream_signed_by_another_ca_is_a_tls_failure(
    https_port: tuple[int, list[int]], tmp_path: Path
) -> None:
    port, _ = https_port
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    async with open_client() as client:
        with pytest.raises(UpstreamFailure) as raised:
            await call(client, port, tls=tls_context(True, other))
    assert raised.value.kind == "tls"


@pytest.mark.parametrize("trust", ["ca-file", "no-verify"])
async def test_tls_upstream_trusted_is_served_over_one_connection(
    https_port: tuple[int, list[int]], ca_file: Path, trust: str
) -> None:
    port, served = https_port
    context = tls_context(True, ca_file) if trust == "ca-file" else tls_context(False)
    async with open_client() as client:
        assert await call(client, port, target="/a", tls=context) == (200, b"https /a")
        assert await call(client, port, target="/b", tls=context) == (200, b"https /b")
    assert len(served) == 2 and len(set(served)) == 1  # kept alive over TLS too
