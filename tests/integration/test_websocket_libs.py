"""The relay against a second WebSocket server library (`websockets`, not aiohttp): its own
handshake, framing, ping and close handling, and its permessage-deflate left on (the relay
must not offer it, so none is negotiated)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

import pytest
from aiohttp import WSMsgType
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests.integration.test_websocket import MIB, connect, cookie_header, handshake_status
from tests.session_support import Env, demo_env, login
from tests.support import error_of, free_port

pytestmark = pytest.mark.asyncio


class Seen:
    def __init__(self) -> None:
        self.headers: list[Headers] = []
        self.extensions: list[str | None] = []
        self.closes: list[tuple[int | None, str | None]] = []
        self.closed = asyncio.Event()


@contextlib.asynccontextmanager
async def websockets_upstream(seen: Seen) -> AsyncIterator[str]:
    """A `websockets` server: echoes; "big" sends 2 MiB; "close" closes with 4100;
    "ping" sends a ping with a payload. /refuse is refused with 403 at the handshake."""

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        seen.headers.append(request.headers)
        if request.path.startswith("/refuse"):
            return connection.respond(HTTPStatus.FORBIDDEN, "no\n")
        return None

    async def handler(connection: ServerConnection) -> None:
        seen.extensions.append(connection.response.headers.get("Sec-WebSocket-Extensions"))
        try:
            async for message in connection:
                if message == "big":
                    await connection.send(b"B" * (2 * MIB))
                elif message == "close":
                    await connection.close(4100, "websockets says bye")
                    break
                elif message == "ping":
                    await connection.ping(b"lib-ping")
                else:
                    await connection.send(message)
        except ConnectionClosed:
            pass
        finally:
            await connection.wait_closed()
            seen.closes.append((connection.close_code, connection.close_reason))
            seen.closed.set()

    port = free_port()
    async with serve(
        handler,
        "127.0.0.1",
        port,
        process_request=process_request,
        max_size=4 * MIB,
        ping_interval=None,
        compression="deflate",
    ):
        yield f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def lib_env(**websocket: Any) -> AsyncIterator[tuple[Env, Seen]]:
    seen = Seen()
    async with websockets_upstream(seen) as base:

        def routes(_: str) -> list[dict[str, Any]]:
            route: dict[str, Any] = {"path": "/lib/", "upstream": f"{base}/", "auth": "demo"}
            if websocket:
                route["websocket"] = websocket
            return [route]

        async with demo_env(routes=routes) as env:
            yield env, seen


async def test_echo_text_binary_and_1_mib_through_a_websockets_server() -> None:
    async with lib_env() as (env, seen):
        await login(env.browser)
        async with connect(env, "/lib/echo") as ws:
            await ws.send_str("hi there")
            assert (await ws.receive(timeout=10)).data == "hi there"
            payload = bytes(range(256)) * (MIB // 256)
            await ws.send_bytes(payload)
            echoed = await ws.receive(timeout=30)
            assert echoed.type is WSMsgType.BINARY and echoed.data == payload
            assert "Sec-WebSocket-Extensions" not in ws._response.headers
        assert seen.extensions == [None]  # deflate on at the server, but never negotiated
        headers = seen.headers[0]
        assert headers["Authorization"].startswith("Bearer ")
        assert "Cookie" not in headers and "X-CSRF" not in headers


async def test_ping_from_a_websockets_server_reaches_the_browser_with_its_payload() -> None:
    async with lib_env() as (env, _):
        await login(env.browser)
        async with connect(env, "/lib/echo") as ws:
            await ws.send_str("ping")
            msg = await ws.receive(timeout=10)
            assert msg.type is WSMsgType.PING and msg.data == b"lib-ping"
            await ws.pong(msg.data)  # websockets matches it to its ping
            await ws.ping(b"browser-ping")
            pong = await ws.receive(timeout=10)
            assert pong.type is WSMsgType.PONG and pong.data == b"browser-ping"


async def test_close_codes_both_ways_with_a_websockets_server() -> None:
    async with lib_env() as (env, seen):
        await login(env.browser)
        async with connect(env, "/lib/echo") as ws:
            await ws.send_str("close")
            msg = await ws.receive(timeout=10)
            assert (msg.type, msg.data, msg.extra) == (
                WSMsgType.CLOSE,
                4100,
                "websockets says bye",
            )
        await asyncio.wait_for(seen.closed.wait(), 10)
        seen.closes.clear()
        seen.closed.clear()
        async with connect(env, "/lib/echo") as ws:
            await ws.send_str("x")
            await ws.receive(timeout=10)
            await ws.close(code=4200, message=b"browser says bye")
        await asyncio.wait_for(seen.closed.wait(), 10)
        assert seen.closes == [(4200, "browser says bye")]


async def test_a_websockets_handshake_refusal_comes_back_as_its_status() -> None:
    async with lib_env() as (env, _):
        await login(env.browser)
        status, body = await handshake_status(
            env, {"Cookie": cookie_header(env), "Origin": env.gateway.url}, path="/lib/refuse"
        )
        assert status == 403 and error_of(body) == "websocket_rejected"


async def test_upstream_message_over_the_limit_closes_the_browser_with_1014() -> None:
    async with lib_env(max_message_size="1MiB") as (env, seen):
        await login(env.browser)
        async with connect(env, "/lib/echo") as ws:
            await ws.send_str("big")  # the server answers 2 MiB
            msg = await ws.receive(timeout=30)
            assert msg.type is WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (1014, "upstream failed")
        await asyncio.wait_for(seen.closed.wait(), 10)
        assert seen.closes[0][0] == 1009  # the gateway told the server its message was too big
