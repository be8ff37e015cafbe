"""The public listener's low-level aiohttp server: JSON errors and edge limits.

A request that aiohttp's parser rejects before any handler runs (an
over-long header line, a bad character) gets aiohttp's own plain-text error
page, and that page quotes part of the offending line: with a Cookie line,
part of a sealed session value. SPEC §5.1 forbids cookie values in any
response, so those pages are replaced by the JSON of SPEC §4.4 (status kept,
nothing quoted, connection closed).

aiohttp gives a connection that never finishes its request head as long as
its keep-alive timer allows (an hour by default), so a client that trickles
one header line every few seconds holds a socket forever. Here the head has a
deadline of its own (``header_timeout``): from the connection's start for its
first request, and from the first byte of each later one (the idle time
before it is ``keepalive_timeout``'s). A late head gets 408 and the
connection is closed. ``max_connections`` caps open connections per worker:
one past it is closed as soon as it is accepted, before any parsing.

aiohttp names itself and Python, with their versions, in the ``Server`` header
of every response it makes; the gateway says only ``bff-gateway`` (as nginx's
``server_tokens off``), so its answers tell nobody which releases to attack.
An upstream's own ``Server`` header is passed on as it was sent.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, StreamReader, web, web_protocol
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage

from gateway.errors import GatewayError, error_response
from gateway.headers import name_the_server
from gateway.observability.metrics import Metrics


def _raw_error(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole JSON error response as bytes, for when no handler runs at all."""
    body = json.dumps({"error": code, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


_SPOKEN = (HttpVersion10, HttpVersion11)
_HEAD_TIMEOUT_RESPONSE = _raw_error(
    408, "Request Timeout", "request_timeout", "the request head did not arrive in time"
)


class _EdgeRequest(web.BaseRequest):
    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # Every response passes here once its headers are final, just before they
        # are written; aiohttp has filled in its own Server header by then.
        name_the_server(response)


class _EdgeHandler(web_protocol.RequestHandler):
    __slots__ = ("_edge", "_head_deadline", "_refused")

    _edge: PublicServer
    _head_deadline: asyncio.TimerHandle | None
    _refused: bool

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        edge = self._edge
        self._head_deadline = None
        self._refused = len(edge.connections_open) >= edge.max_connections
        if self._refused:
            # Closed before aiohttp sees it: no parser, no task, no timer.
            edge.metrics.rejections.labels("max_connections").inc()
            self._force_close = True  # data_received ignores anything already read
            transport.close()
            return
        super().connection_made(transport)
        edge.connections_open.add(self)
        edge.metrics.open_connections.inc()
        self._arm_head_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._disarm_head_deadline()
        edge = self._edge
        if self in edge.connections_open:
            edge.connections_open.discard(self)
            edge.metrics.open_connections.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if self._head_deadline is None and data and waiter is not None and not waiter.done():
            # Idle between requests and bytes arrive: a new head has begun.
            self._arm_head_deadline()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # a whole head was parsed
            self._disarm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self._loop.call_later(self._edge.header_timeout, self._head_late)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_late(self) -> None:
        self._head_deadline = None
        transport = self.transport
        if transport is None or self._force_close:
            return
        self._edge.metrics.rejections.labels("header_timeout").inc()
        transport.write(_HEAD_TIMEOUT_RESPONSE)
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response already started: only close
            return super().handle_error(request, status, exc, message)
        if status < 500:
            error = GatewayError(status, "bad_request", "the request could not be parsed")
        else:
            error = GatewayError(500, "internal_error", "the gateway failed to handle the request")
        response = error_response(error)
        response.force_close()
        return response


class PublicServer(web.Server):
    """``web.Server`` whose connections render parser errors as JSON and keep
    the edge limits (head deadline, connection cap)."""

    def __init__(
        self,
        handler: Any,
        *,
        metrics: Metrics,
        header_timeout: float,
        max_connections: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.metrics = metrics
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.connections_open: set[_EdgeHandler] = set()

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web_protocol.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if message.version not in _SPOKEN:
            # aiohttp's parser takes any digit.digit and its response echoes it
            # ("HTTP/2.0 400" on an HTTP/1 connection): answer as HTTP/1.1 (RFC 9112
            # §2.3) and close after, as for any client we do not fully understand.
            message = message._replace(version=HttpVersion11, should_close=True)
        if message.method == "CONNECT":
            # The parser hands every later byte to a CONNECT as its tunnel: never
            # read another request on this connection (the gateway refuses it).
            message = message._replace(should_close=True)
        return _EdgeRequest(message, payload, protocol, writer, task, self._loop)

    def __call__(self) -> web_protocol.RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        handler = _EdgeHandler(self, loop=self._loop, **kwargs)
        handler._edge = self
        return handler
