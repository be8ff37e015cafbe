"""The gateway names no product version in a Server header (an edge answer that
says "Python/3.11 aiohttp/3.14.5" tells an attacker which releases to try).

aiohttp adds that value to every response it makes; the gateway says only
``bff-gateway`` instead, on the public and the admin listener, and passes an
upstream's own Server header on as it was sent (SPEC §4.2).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from tests.support import config_dict, raw_request, running_app, running_gateway


def upstream_app() -> web.Application:
    async def named(request: web.Request) -> web.Response:
        return web.Response(text="named", headers={"Server": "upstream/1.0"})

    async def default(request: web.Request) -> web.Response:
        return web.Response(text="aiohttp names itself")

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/named", named)
    app.router.add_get("/default", default)
    app.router.add_get("/socket", socket)
    return app


@contextlib.asynccontextmanager
async def nameless_upstream() -> AsyncIterator[str]:
    """An upstream that sends no Server header at all (aiohttp's server always does)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nnameless")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def test_no_answer_of_the_gateway_names_aiohttp_or_python() -> None:
    async with running_app(upstream_app()) as upstream, nameless_upstream() as nameless:
        routes = [
            {"path": "/api/", "upstream": f"{upstream}/"},
            {"path": "/bare/", "upstream": f"{nameless}/"},
        ]
        async with (
            running_gateway(config_dict(routes)) as gateway,
            aiohttp.ClientSession() as http,
        ):
            seen: dict[str, str | None] = {}
            paths = ("/api/named", "/api/default", "/bare/x", "/elsewhere", "/auth/x/session")
            for path in paths:
                async with http.get(gateway.url + path) as response:
                    seen[path] = response.headers.get("Server")
            for path in ("/metrics", "/nothing"):
                async with http.get(gateway.admin_url + path) as response:
                    seen[f"admin {path}"] = response.headers.get("Server")
            handshake = await raw_request(
                gateway.port,
                b"GET /api/socket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                read_until_close=False,
            )
            # A request the HTTP parser refuses (answered before any handler runs).
            refused = await raw_request(
                gateway.port, b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01: y\r\n\r\n"
            )

    # An upstream's own Server header is passed on, even one equal to aiohttp's default.
    assert seen.pop("/api/named") == "upstream/1.0"
    assert seen.pop("/api/default") == SERVER_SOFTWARE
    assert seen == dict.fromkeys(seen, "bff-gateway")
    head = handshake.split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 101 ") and b"\r\nServer: bff-gateway" in head
    assert b" 400 " in refused.split(b"\r\n")[0]
    assert b"\r\nServer: bff-gateway\r\n" in refused
    assert SERVER_SOFTWARE.encode() not in refused
