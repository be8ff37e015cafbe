"""WebSocket relay (SPEC §4.1, issue 14): a real aiohttp WebSocket upstream behind a real
gateway, the browser played by aiohttp's client with the session cookie and an Origin."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from gateway.demo.api import InvalidToken, TokenAuthority
from tests.session_support import Env, demo_env, last_pair, login, parse_set_cookie, unseal
from tests.support import config_dict, error_of, parse_metrics, running_app, running_gateway

pytestmark = pytest.mark.asyncio

MIB = 1024 * 1024


@dataclass
class Upstream:
    """What the recording WebSocket upstream saw."""

    handshakes: list[CIMultiDict[str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    valid_tokens: list[bool] = field(default_factory=list)
    closes: list[tuple[int | None, str]] = field(default_factory=list)
    pings: list[bytes] = field(default_factory=list)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    refuse_with: int | None = None
    redirect_to: str | None = None


def recording_upstream(upstream: Upstream, authority: TokenAuthority) -> web.Application:
    """Routes added to the demo API: ``/rec`` echoes and obeys commands
    (``close:CODE:REASON``, ``ping:PAYLOAD``); it answers pings itself (autoping off),
    so a pong's payload proves the ping's reached it."""

    async def rec(request: web.Request) -> web.StreamResponse:
        upstream.handshakes.append(CIMultiDict(request.headers))
        upstream.paths.append(request.raw_path)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            authority.verify_access_token(token)
            upstream.valid_tokens.append(True)
        except InvalidToken:
            upstream.valid_tokens.append(False)
        if upstream.refuse_with is not None:
            return web.json_response({"refused": True}, status=upstream.refuse_with)
        ws = web.WebSocketResponse(
            autoping=False, autoclose=False, protocols=("v2.demo", "v3.demo"), max_msg_size=0
        )
        await ws.prepare(request)
        upstream.opened.set()
        try:
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.TEXT:
                    if msg.data.startswith("close:"):
                        _, code, reason = msg.data.split(":", 2)
                        await ws.close(code=int(code), message=reason.encode())
                        return ws
                    if msg.data.startswith("ping:"):
                        await ws.ping(msg.data[5:].encode())
                        continue
                    await ws.send_str(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
                elif msg.type is WSMsgType.PING:
                    upstream.pings.append(msg.data)
                    await ws.pong(msg.data)
                elif msg.type is WSMsgType.PONG:
                    await ws.send_str(f"pong:{msg.data.decode()}")
                elif msg.type is WSMsgType.CLOSE:
                    upstream.closes.append((msg.data, msg.extra))
                    await ws.close(code=msg.data)
                    return ws
                else:
                    upstream.closes.append((None, msg.type.name))
                    return ws
        finally:
            upstream.closed.set()

    async def drop(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        assert request.transport is not None
        request.transport.abort()  # no close frame
        return ws

    async def moved(request: web.Request) -> web.Response:
        assert upstream.redirect_to is not None
        raise web.HTTPFound(upstream.redirect_to)

    app = web.Application()
    app.router.add_get("/rec", rec)
    app.router.add_get("/drop", drop)
    app.router.add_get("/moved", moved)
    return app


@contextlib.asynccontextmanager
async def ws_env(
    *,
    websocket: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    session: dict[str, Any] | None = None,
    extra_routes: Callable[[str], list[dict[str, Any]]] | None = None,
) -> AsyncIterator[tuple[Env, Upstream]]:
    upstream = Upstream()
    holder: dict[str, TokenAuthority] = {}

    def setup(app: web.Application) -> None:
        from gateway.demo.api import AUTHORITY_KEY

        holder["authority"] = app[AUTHORITY_KEY]
        sub = recording_upstream(upstream, app[AUTHORITY_KEY])
        for resource in sub.router.resources():
            for route in resource:
                app.router.add_route(route.method, resource.canonical, route.handler)

    def routes(base: str) -> list[dict[str, Any]]:
        ws_route: dict[str, Any] = {"path": "/ws/", "upstream": f"{base}/", "auth": "demo"}
        if websocket is not None:
            ws_route["websocket"] = websocket
        return [ws_route, *(extra_routes(base) if extra_routes else [])]

    async with demo_env(
        setup=setup, routes=routes, server=server or {}, session=session or {}
    ) as env:
        yield env, upstream


def cookie_header(env: Env) -> str:
    return "; ".join(f"{k}={v}" for k, v in env.browser.jar.items())


def connect(env: Env, path: str = "/ws/rec", *, origin: str | None = "same", **kw: Any) -> Any:
    headers = {"Cookie": cookie_header(env)} if env.browser.jar else {}
    if origin == "same":
        headers["Origin"] = env.gateway.url
    elif origin is not None:
        headers["Origin"] = origin
    headers.update(kw.pop("headers", {}))
    return env.http.ws_connect(
        env.gateway.url + path, headers=headers, autoping=False, autoclose=False, **kw
    )


async def handshake_status(
    env: Env, headers: dict[str, str], path: str = "/ws/rec"
) -> tuple[int, bytes]:
    """A raw handshake: (status, body) of the gateway's answer."""
    sent = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        **headers,
    }
    async with env.http.get(env.gateway.url + path, headers=sent) as response:
        return response.status, await response.read()


# --------------------------------------------------------------------------- data both ways


async def test_text_and_binary_echo_including_1_mib_messages() -> None:
    async with ws_env() as (env, _):
        await login(env.browser)
        async with connect(env) as ws:
            await ws.send_str("héllo")
            assert (await ws.receive()).data == "héllo"
            await ws.send_bytes(b"\x00\xff\x01")
            assert (await ws.receive()).data == b"\x00\xff\x01"
            big = bytes(range(256)) * (MIB // 256)
            await ws.send_bytes(big)
            echoed = await ws.receive(timeout=30)
            assert echoed.type is WSMsgType.BINARY and echoed.data == big
            text = "ü" * (MIB // 2)  # 1 MiB of UTF-8
            await ws.send_str(text)
            echoed = await ws.receive(timeout=30)
            assert echoed.type is WSMsgType.TEXT and echoed.data == text


async def test_fragmented_message_arrives_whole() -> None:
    """Raw frames from the browser: TEXT (fin=0), CONTINUATION, CONTINUATION (fin=1)."""
    async with ws_env() as (env, _):
        await login(env.browser)
        reader, writer = await raw_handshake(env)
        try:
            writer.write(_masked_frame(0x1, b"one ", fin=False))
            writer.write(_masked_frame(0x0, b"two ", fin=False))
            writer.write(_masked_frame(0x9, b"mid-ping", fin=True))  # control frames may interleave
            writer.write(_masked_frame(0x0, b"three", fin=True))
            await writer.drain()
            first = await read_frame(reader)
            second = await read_frame(reader)
            assert (0xA, b"mid-ping") in (first, second)  # the upstream's pong
            assert (0x1, b"one two three") in (first, second)
        finally:
            writer.close()


async def raw_handshake(
    env: Env, path: str = "/ws/rec"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", env.gateway.port)
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{env.gateway.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: {env.gateway.url}\r\nCookie: {cookie_header(env)}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked frame from the gateway: (opcode, payload)."""
    import struct

    first, second = await asyncio.wait_for(reader.readexactly(2), 10)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await asyncio.wait_for(reader.readexactly(length), 10)


def _masked_frame(opcode: int, payload: bytes, *, fin: bool) -> bytes:
    import os
    import struct

    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_ping_payloads_pass_both_ways() -> None:
    async with ws_env() as (env, upstream):
        await login(env.browser)
        async with connect(env) as ws:
            await ws.ping(b"from-browser")
            pong = await ws.receive(timeout=10)
            assert pong.type is WSMsgType.PONG and pong.data == b"from-browser"
            assert upstream.pings == [b"from-browser"]  # the upstream answered, not the gateway
            await ws.send_str("ping:from-upstream")
            ping = await ws.receive(timeout=10)
            assert ping.type is WSMsgType.PING and ping.data == b"from-upstream"
            await ws.pong(ping.data)
            confirmed = await ws.receive(timeout=10)
            assert confirmed.data == "pong:from-upstream"


async def test_subprotocol_selected_by_the_upstream_reaches_the_browser() -> None:
    async with ws_env() as (env, upstream):
        await login(env.browser)
        async with connect(env, protocols=("v1.demo", "v2.demo")) as ws:
            assert ws.protocol == "v2.demo"  # the upstream's choice, not the first offered
            offered = upstream.handshakes[0]["Sec-WebSocket-Protocol"]
            assert [p.strip() for p in offered.split(",")] == ["v1.demo", "v2.demo"]


# --------------------------------------------------------------------------- close codes


async def test_browser_close_code_and_reason_reach_the_upstream() -> None:
    async with ws_env() as (env, upstream):
        await login(env.browser)
        async with connect(env) as ws:
            await ws.send_str("x")
            await ws.receive()
            await ws.close(code=4321, message=b"leaving now")
            assert ws.close_code == 4321  # the upstream's answer, echoed back
        await asyncio.wait_for(upstream.closed.wait(), 10)
        assert upstream.closes == [(4321, "leaving now")]


async def test_upstream_close_code_and_reason_reach_the_browser() -> None:
    async with ws_env() as (env, _):
        await login(env.browser)
        async with connect(env) as ws:
            await ws.send_str("close:4005:done here")
            msg = await ws.receive(timeout=10)
            assert msg.type is WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (4005, "done here")


async def test_upstream_that_drops_the_connection_gives_1014() -> None:
    async with ws_env() as (env, _):
        await login(env.browser)
        async with connect(env, "/ws/drop") as ws:
            await ws.send_str("now")
            msg = await ws.receive(timeout=10)
            assert msg.type is WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (1014, "upstream failed")


async def test_browser_that_drops_the_connection_gives_the_upstream_1001() -> None:
    async with ws_env() as (env, upstream):
        await login(env.browser)
        reader, writer = await raw_handshake(env)
        writer.write(_masked_frame(0x1, b"hi", fin=True))
        assert await read_frame(reader) == (0x1, b"hi")
        writer.transport.abort()
        await asyncio.wait_for(upstream.closed.wait(), 10)
        assert upstream.closes == [(1001, "client went away")]


# --------------------------------------------------------------------------- upstream handshake


async def test_upstream_sees_the_token_and_no_cookie_or_csrf_header() -> None:
    async with ws_env() as (env, upstream):
        await login(env.browser)
        async with connect(
            env,
            headers={
                "X-CSRF": "1",
                "Authorization": "Bearer forged",
                "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits",
                "X-Request-Id": "ws-req-1",
            },
        ) as ws:
            await ws.send_str("x")
            await ws.receive()
            # The browser's deflate offer was not passed on, and none was accepted.
            assert "Sec-WebSocket-Extensions" not in ws._response.headers
        seen = upstream.handshakes[0]
        assert upstream.valid_tokens == [True]
        assert seen.getall("Authorization") != ["Bearer forged"]
        assert len(seen.getall("Authorization")) == 1
        assert "Cookie" not in seen
        assert "X-CSRF" not in seen
        assert "Sec-WebSocket-Extensions" not in seen
        assert seen["X-Request-Id"] == "ws-req-1"
        assert seen["X-Forwarded-For"] == "127.0.0.1"
        assert seen["X-Forwarded-Proto"] == "http"
        assert seen["Origin"] == env.gateway.url
        assert seen["Upgrade"].lower() == "websocket"


async def test_injected_headers_and_query_reach_the_upstream() -> None:
    def injected(base: str) -> list[dict[str, Any]]:
        return [
            {
                "path": "/wsi/",
                "upstream": f"{base}/",
                "auth": "demo",
                "inject_headers": {"X-Api-Key": "server-held-secret"},
                "inject_query": {"appid": "app-secret-1"},
            }
        ]

    async with ws_env(extra_routes=injected) as (env, upstream):
        await login(env.browser)
        async with connect(
            env, "/wsi/rec?appid=mine&x=1", headers={"X-Api-Key": "client-value"}
        ) as ws:
            await ws.send_str("x")
            await ws.receive()
        seen = upstream.handshakes[0]
        assert seen.getall("X-Api-Key") == ["server-held-secret"]
        assert upstream.paths == ["/rec?x=1&appid=app-secret-1"]


async def test_rejected_upstream_handshakes_come_back_with_their_status() -> None:
    async with ws_env() as (env, upstream):
        await login(env.browser)
        for status in (403, 404, 500):
            upstream.refuse_with = status
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                async with connect(env):
                    pass
            assert caught.value.status == status
            answer_status, body = await handshake_status(
                env, {"Cookie": cookie_header(env), "Origin": env.gateway.url}
            )
            assert answer_status == status
            assert error_of(body) == "websocket_rejected"


async def test_upstream_401_refreshes_once_then_connects() -> None:
    async with ws_env() as (env, upstream):
        await login(env.browser)
        upstream.refuse_with = 401
        status, body = await handshake_status(
            env, {"Cookie": cookie_header(env), "Origin": env.gateway.url}
        )
        # Refreshed once, and the second 401 came back as it is: no loop.
        assert status == 401 and error_of(body) == "websocket_rejected"
        assert env.stats.refresh_calls == 1
        assert len(upstream.handshakes) == 2
        first, second = (h["Authorization"] for h in upstream.handshakes)
        assert first != second


async def test_session_close_to_expiry_is_refreshed_before_the_handshake() -> None:
    async with ws_env() as (env, upstream):
        env.authority.access_ttl = 1.0  # within refresh_skew (30 s) at once
        await login(env.browser)
        async with connect(env) as ws:
            set_cookies = ws._response.headers.getall("Set-Cookie", [])
            await echo(ws)
        assert env.stats.refresh_calls == 1
        new_access, _ = last_pair(env.stats)
        assert upstream.handshakes[0]["Authorization"] == f"Bearer {new_access}"
        # The refreshed session's cookie comes with the 101.
        sealed = dict(parse_set_cookie(line)[:2] for line in set_cookies)
        assert unseal(sealed["bff-demo"]).access_token == new_access


async def echo(ws: Any, text: str = "x") -> None:
    await ws.send_str(text)
    assert (await ws.receive(timeout=10)).data == text


async def test_without_a_session_the_handshake_is_401_and_upstream_untouched() -> None:
    async with ws_env() as (env, upstream):
        status, body = await handshake_status(env, {"Origin": env.gateway.url})
        assert status == 401 and error_of(body) == "login_required"
        assert upstream.handshakes == []


async def test_unreachable_upstream_is_502() -> None:
    from tests.support import free_port

    port = free_port()

    def dead(base: str) -> list[dict[str, Any]]:
        return [{"path": "/dead/", "upstream": f"http://127.0.0.1:{port}/", "auth": "demo"}]

    async with ws_env(extra_routes=dead) as (env, _):
        await login(env.browser)
        status, body = await handshake_status(
            env, {"Cookie": cookie_header(env), "Origin": env.gateway.url}, path="/dead/rec"
        )
        assert status == 502 and error_of(body) == "upstream_unavailable"


async def test_invalid_browser_handshake_is_400() -> None:
    async with ws_env() as (env, upstream):
        await login(env.browser)
        status, body = await handshake_status(
            env,
            {
                "Cookie": cookie_header(env),
                "Origin": env.gateway.url,
                "Sec-WebSocket-Key": "too-short",
            },
        )
        assert status == 400 and error_of(body) == "bad_request"
        assert upstream.handshakes == []


# --------------------------------------------------------------------------- origin


@pytest.mark.parametrize(
    "origin",
    [None, "https://evil.example", "null", "http://127.0.0.1:1"],
    ids=["missing", "foreign", "null", "other-port"],
)
async def test_cross_site_handshake_is_refused_before_the_upstream(origin: str | None) -> None:
    async with ws_env() as (env, upstream):
        await login(env.browser)
        headers = {"Cookie": cookie_header(env)}
        if origin is not None:
            headers["Origin"] = origin
        status, body = await handshake_status(env, headers)
        assert status == 403 and error_of(body) == "csrf_failed"
        assert upstream.handshakes == []
        assert env.stats.refresh_calls == 0


async def test_allowed_origin_is_accepted() -> None:
    async with ws_env(session={"csrf": {"allowed_origins": ["https://app.example.com"]}}) as (
        env,
        upstream,
    ):
        await login(env.browser)
        async with connect(env, origin="https://app.example.com") as ws:
            await ws.send_str("ok")
            assert (await ws.receive()).data == "ok"
        assert len(upstream.handshakes) == 1


async def test_public_route_needs_no_origin_and_gets_no_token() -> None:
    def public(base: str) -> list[dict[str, Any]]:
        return [{"path": "/pub/", "upstream": f"{base}/"}]

    async with ws_env(extra_routes=public) as (env, upstream):
        async with connect(env, "/pub/rec", origin=None) as ws:
            await ws.send_str("open")
            assert (await ws.receive()).data == "open"
        assert "Authorization" not in upstream.handshakes[0]


async def test_public_route_forwarding_cookies_checks_origin() -> None:
    def public(base: str) -> list[dict[str, Any]]:
        return [{"path": "/pub/", "upstream": f"{base}/", "forward_cookies": True}]

    async with ws_env(extra_routes=public) as (env, upstream):
        status, body = await handshake_status(
            env, {"Origin": "https://evil.example", "Cookie": "theirs=1"}, path="/pub/rec"
        )
        assert status == 403 and error_of(body) == "csrf_failed"
        assert upstream.handshakes == []


# --------------------------------------------------------------------------- wss upstream


def tls_echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(f"scheme={request.scheme}")
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/echo", echo)
    return app


async def test_https_upstream_is_relayed_over_wss_with_the_routes_ca(
    ca: trustme.CA, ca_file: Path
) -> None:
    from tests.integration.test_upstream_tls import server_context

    async with running_app(tls_echo_app(), ssl_context=server_context(ca)) as base:
        assert base.startswith("https://")
        routes = [
            {"path": "/tls/", "upstream": f"{base}/", "tls": {"ca_file": str(ca_file)}},
            {"path": "/untrusted/", "upstream": f"{base}/"},
        ]
        async with (
            running_gateway(config_dict(routes)) as gateway,
            aiohttp.ClientSession() as http,
        ):
            async with http.ws_connect(gateway.url + "/tls/echo") as ws:
                assert (await ws.receive(timeout=10)).data == "scheme=https"
                await ws.send_str("over tls")
                assert (await ws.receive(timeout=10)).data == "over tls"
            # The system CAs never vouch for the local CA: the handshake fails as TLS.
            async with http.get(
                gateway.url + "/untrusted/echo",
                headers={
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                    "Sec-WebSocket-Version": "13",
                },
            ) as answer:
                assert answer.status == 502
                assert error_of(await answer.read()) == "upstream_unavailable"
            async with http.get(gateway.admin_url + "/metrics") as response:
                samples, _ = parse_metrics(await response.text())
            key = frozenset({("route", "/untrusted/"), ("kind", "tls")})
            assert samples[("bff_upstream_errors_total", key)] == 1


async def test_a_redirecting_upstream_is_not_followed() -> None:
    """The token and injected secrets must never follow a redirect to another server."""
    elsewhere: list[CIMultiDict[str]] = []

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(CIMultiDict(request.headers))
        return web.Response(status=404)

    other = web.Application()
    other.router.add_get("/{tail:.*}", record)
    async with running_app(other) as other_base:

        def routes(base: str) -> list[dict[str, Any]]:
            return [
                {
                    "path": "/redir/",
                    "upstream": f"{base}/",
                    "auth": "demo",
                    "inject_headers": {"X-Api-Key": "server-held-secret"},
                }
            ]

        async with ws_env(extra_routes=routes) as (env, upstream):
            upstream.redirect_to = f"{other_base}/stolen"
            await login(env.browser)
            status, body = await handshake_status(
                env, {"Cookie": cookie_header(env), "Origin": env.gateway.url}, path="/redir/moved"
            )
            assert status == 502 and error_of(body) == "upstream_unavailable"
    assert elsewhere == []
