"""The gateway names no product version in a Server header (an edge answer that
says "Python/3.11 aiohttp/3.14.5" tells an attacker which releases to try).

aiohttp adds that value to every response it makes; the gateway says only
``bff-gateway`` instead, on the public and the admin listener, and passes an
upstream's own Server header on as it was sent.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from tests.support import config_dict, raw_request, running_app, running_gateway


def upstream_app() -> web.Application:
    async def named(request: web.Request) -> web.Response:
        return web.Response(text="named", headers={"Server": "upstream/1.0"})

    async def unnamed(request: web.Request) -> web.Response:
        return web.Response(text="unnamed")

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/named", named)
    app.router.add_get("/unnamed", unnamed)
    app.router.add_get("/socket", socket)
    return app


async def test_no_answer_names_aiohttp_or_python() -> None:
    async with running_app(upstream_app()) as upstream:
        routes = [{"path": "/api/", "upstream": f"{upstream}/"}]
        async with (
            running_gateway(config_dict(routes)) as gateway,
            aiohttp.ClientSession() as http,
        ):
            seen: dict[str, str | None] = {}
            for path in ("/api/named", "/api/unnamed", "/elsewhere", "/auth/nobody/session"):
                async with http.get(gateway.url + path) as response:
                    seen[path] = response.headers.get("Server")
            async with http.get(gateway.admin_url + "/metrics") as response:
                seen["admin"] = response.headers.get("Server")
            async with http.get(gateway.admin_url + "/nothing") as response:
                seen["admin 404"] = response.headers.get("Server")
            handshake = await raw_request(
                gateway.port,
                b"GET /api/socket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                read_until_close=False,
            )
            # A request the HTTP parser refuses (answered before any handler runs).
            raw = await raw_request(
                gateway.port, b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01: y\r\n\r\n"
            )

        assert seen["/api/named"] == "upstream/1.0"  # the upstream's own, passed on
        others = {k: v for k, v in seen.items() if k != "/api/named"}
        assert others == dict.fromkeys(others, "bff-gateway")
        head = handshake.split(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 101 ") and b"\r\nServer: bff-gateway" in head
        assert b" 400 " in raw.split(b"\r\n")[0] and b"\r\nServer: bff-gateway\r\n" in raw
        assert SERVER_SOFTWARE.encode() not in raw
