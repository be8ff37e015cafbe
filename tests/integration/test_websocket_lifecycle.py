"""How WebSocket relays end (issue 14): logout (memory, cookie and Redis stores, the latter
on another replica), the absolute timeout, the idle timeout, max_message_size, the
per-worker limit and the drain; and what they leave in metrics and the access log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from tests.integration.test_redis import RedisServer, redis_server  # noqa: F401 (fixture)
from tests.integration.test_websocket import (
    MIB,
    connect,
    cookie_header,
    handshake_status,
    ws_env,
)
from tests.session_support import Browser, Env, login
from tests.support import (
    captured_json_logs,
    error_of,
    json_lines,
    parse_metrics,
    running_gateway,
)

pytestmark = pytest.mark.asyncio

CSRF = {"X-CSRF": "1"}


async def echo_once(ws: Any, text: str = "x") -> None:
    await ws.send_str(text)
    assert (await ws.receive(timeout=10)).data == text


async def closed_with(ws: Any) -> tuple[int | None, str]:
    """Wait for the gateway's close frame; answer it; return (code, reason)."""
    msg = await ws.receive(timeout=20)
    assert msg.type is WSMsgType.CLOSE, msg
    await ws.close()
    return msg.data, msg.extra


async def metrics_of(env: Env) -> Any:
    async with env.http.get(env.gateway.admin_url + "/metrics") as response:
        samples, _ = parse_metrics(await response.text())
    return samples


# --------------------------------------------------------------------------- session end


@pytest.mark.parametrize("store", ["memory", "cookie"])
async def test_logout_closes_the_sessions_sockets_with_1008(store: str) -> None:
    async with ws_env(session={"store": store}) as (env, upstream):
        await login(env.browser)
        other = env.new_browser()
        await login(other, "alice")
        async with connect(env) as mine, connect(env) as mine_too:
            theirs_cm = env.http.ws_connect(
                env.gateway.url + "/ws/rec",
                headers={
                    "Cookie": "; ".join(f"{k}={v}" for k, v in other.jar.items()),
                    "Origin": env.gateway.url,
                },
            )
            async with theirs_cm as theirs:
                for ws in (mine, mine_too, theirs):
                    await echo_once(ws)
                reply = await env.browser.call("POST", "/auth/logout", headers=CSRF)
                assert reply.status == 204
                assert await closed_with(mine) == (1008, "session ended")
                assert await closed_with(mine_too) == (1008, "session ended")
                await echo_once(theirs)  # another session's socket stays open
        closes = [code for code, _ in upstream.closes]
        assert closes.count(1008) == 2


async def test_absolute_timeout_closes_the_socket_with_1008() -> None:
    async with ws_env(session={"absolute_timeout": 2}) as (env, _):
        await login(env.browser)
        async with connect(env) as ws:
            await echo_once(ws)
            assert await closed_with(ws) == (1008, "session ended")


async def test_redis_logout_on_another_replica_closes_the_socket(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    session = {"store": "redis", "redis_url": redis_server.url}
    async with ws_env(session=session, websocket={"session_check_interval": 0.5}) as (env, _):
        await login(env.browser)
        async with running_gateway(_replica_data(env)) as replica, connect(env) as ws:
            await echo_once(ws)
            elsewhere = Browser(env.http, replica.url)
            elsewhere.jar = dict(env.browser.jar)
            reply = await elsewhere.call("POST", "/auth/logout", headers=CSRF)
            assert reply.status == 204
            assert await closed_with(ws) == (1008, "session ended")


@contextlib.asynccontextmanager
async def _logged_in_with_idle_timeout(
    store: str, request: pytest.FixtureRequest
) -> AsyncIterator[Env]:
    """A session that idles out after 2 s; its sockets re-check it every 0.3 s."""
    session: dict[str, Any] = {"store": store, "idle_timeout": 2}
    if store == "redis":
        session["redis_url"] = request.getfixturevalue("redis_server").url
    watch = {"session_check_interval": 0.3}
    async with ws_env(session=session, websocket=watch) as (env, _):
        await login(env.browser)
        yield env


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_messages_from_the_browser_keep_the_session_alive(
    store: str, request: pytest.FixtureRequest
) -> None:
    # A page used over its socket alone (chat) is active: twice the session's idle
    # timeout later, the socket is still open and the session still valid.
    async with _logged_in_with_idle_timeout(store, request) as env:
        async with connect(env) as ws:
            until = asyncio.get_running_loop().time() + 4
            while asyncio.get_running_loop().time() < until:
                await echo_once(ws)  # fails on the close frame if the session ended
                await asyncio.sleep(0.2)  # the user's pace: the clock is the condition
        session = await env.browser.call("GET", "/auth/demo/session")
        assert session.json()["authenticated"] is True


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_quiet_socket_does_not_keep_the_session_alive(
    store: str, request: pytest.FixtureRequest
) -> None:
    # Only the browser's own messages count: a socket it does not use (the upstream
    # pushes, or nothing happens) ends with its session at the idle timeout.
    async with _logged_in_with_idle_timeout(store, request) as env:
        async with connect(env) as ws:
            assert await closed_with(ws) == (1008, "session ended")
        session = await env.browser.call("GET", "/auth/demo/session")
        assert session.json()["authenticated"] is False


def _replica_data(env: Env) -> dict[str, Any]:
    """The same configuration on other ports: a second replica sharing the Redis store."""
    from tests.support import free_port

    data = env.gateway.config.model_dump(mode="json", exclude_none=True)
    data["server"]["listen"] = f"127.0.0.1:{free_port()}"
    data["server"]["admin_listen"] = f"127.0.0.1:{free_port()}"
    assert data["session"]["redis_url"] and data["session"]["keys"][0]["secret"]
    return data


# --------------------------------------------------------------------------- limits


async def test_idle_timeout_closes_both_sides_with_1001() -> None:
    async with ws_env(websocket={"idle_timeout": 1}) as (env, upstream):
        await login(env.browser)
        async with connect(env) as ws:
            await echo_once(ws)
            assert await closed_with(ws) == (1001, "idle timeout")
        await asyncio.wait_for(upstream.closed.wait(), 10)
        assert upstream.closes == [(1001, "idle timeout")]


async def test_message_over_max_message_size_closes_with_1009() -> None:
    async with ws_env(websocket={"max_message_size": "64KiB"}) as (env, upstream):
        await login(env.browser)
        async with connect(env) as ws:
            await ws.send_bytes(b"a" * 64 * 1024)  # exactly the limit passes
            assert len((await ws.receive(timeout=10)).data) == 64 * 1024
            await ws.send_bytes(b"a" * (64 * 1024 + 1))
            msg = await ws.receive(timeout=10)
            assert msg.type is WSMsgType.CLOSE and msg.data == 1009
        await asyncio.wait_for(upstream.closed.wait(), 10)
        assert upstream.closes == [(1001, "client went away")]
        samples = await metrics_of(env)
        key = frozenset({("route", "/ws/"), ("reason", "message_too_big")})
        assert samples[("bff_websocket_closes_total", key)] == 1


async def test_per_worker_limit_refuses_with_503_overloaded() -> None:
    async with ws_env(server={"limits": {"max_websockets": 2}}) as (env, upstream):
        await login(env.browser)
        async with connect(env) as first, connect(env) as second:
            await echo_once(first)
            await echo_once(second)
            status, body = await handshake_status(
                env, {"Cookie": cookie_header(env), "Origin": env.gateway.url}
            )
            assert status == 503 and error_of(body) == "overloaded"
            assert len(upstream.handshakes) == 2
            # Plain requests are not held back by open sockets.
            assert (await env.browser.call("GET", "/api/user")).status == 200
        async with connect(env) as third:  # a freed slot is reusable
            await echo_once(third)
        samples = await metrics_of(env)
        assert samples[("bff_rejections_total", frozenset({("reason", "max_websockets")}))] == 1


# --------------------------------------------------------------------------- drain


async def test_drain_closes_open_sockets_with_1001_without_waiting_out_the_timeout() -> None:
    environment = ws_env(server={"shutdown_timeout": 120})
    env, upstream = await environment.__aenter__()
    closing: asyncio.Task[Any] | None = None
    # A client of its own: the environment's closes with it.
    async with aiohttp.ClientSession() as http:
        try:
            await login(env.browser)
            headers = {"Cookie": cookie_header(env), "Origin": env.gateway.url}
            async with http.ws_connect(env.gateway.url + "/ws/rec", headers=headers) as ws:
                await echo_once(ws)
                closing = asyncio.create_task(environment.__aexit__(None, None, None))
                msg = await ws.receive(timeout=30)
                assert msg.type is WSMsgType.CLOSE
                assert (msg.data, msg.extra) == (1001, "gateway shutting down")
                await ws.close()
                # Well under shutdown_timeout (120 s): open sockets did not hold the drain.
                await asyncio.wait_for(closing, 60)
            assert (1001, "gateway shutting down") in upstream.closes
        finally:
            if closing is None:
                await environment.__aexit__(None, None, None)


# --------------------------------------------------------------------------- observability


async def test_metrics_count_messages_bytes_and_open_sockets_per_direction() -> None:
    async with ws_env() as (env, _):
        await login(env.browser)
        async with connect(env) as ws:
            await echo_once(ws, "12345")
            await ws.send_bytes(b"\x00" * 1000)
            await ws.receive(timeout=10)
            samples = await metrics_of(env)
            assert samples[("bff_open_websockets", frozenset())] == 1
            for direction in ("to_upstream", "to_client"):
                labels = frozenset({("route", "/ws/"), ("direction", direction)})
                assert samples[("bff_websocket_messages_total", labels)] == 2
                assert samples[("bff_websocket_bytes_total", labels)] == 1005
            await ws.close()
        samples = await metrics_of(env)
        assert samples[("bff_open_websockets", frozenset())] == 0
        key = frozenset({("route", "/ws/"), ("reason", "client_closed")})
        assert samples[("bff_websocket_closes_total", key)] == 1


async def test_access_log_has_one_line_for_the_upgrade_without_secrets() -> None:
    async with ws_env() as (env, upstream):
        await login(env.browser)
        with captured_json_logs("bff.access", logging.INFO) as stream:
            async with connect(env, headers={"X-Request-Id": "ws-log-1"}) as ws:
                await echo_once(ws, "abc")
                await ws.close()
            await asyncio.wait_for(upstream.closed.wait(), 10)
            for _ in range(50):  # the line is written when the handler returns
                if "ws-log-1" in stream.getvalue():
                    break
                await asyncio.sleep(0.05)
        lines = [e for e in json_lines(stream.getvalue()) if e.get("request_id") == "ws-log-1"]
        assert len(lines) == 1, stream.getvalue()
        entry = lines[0]
        assert entry["status"] == 101 and entry["route"] == "/ws/"
        assert entry["bytes_in"] == 3 and entry["bytes_out"] == 3
        text = stream.getvalue()
        assert upstream.handshakes[0]["Authorization"].removeprefix("Bearer ") not in text
        for value in env.browser.jar.values():
            assert value not in text


async def test_big_message_uses_no_more_than_the_limit() -> None:
    """1 MiB (the default limit) passes; one byte more is refused."""
    async with ws_env() as (env, _):
        await login(env.browser)
        async with connect(env) as ws:
            await ws.send_bytes(b"z" * (MIB + 1))
            msg = await ws.receive(timeout=10)
            assert msg.type is WSMsgType.CLOSE and msg.data == 1009


async def test_a_bug_in_the_relay_closes_with_1011_and_is_logged_not_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the 101 is out, an error answer would be written into the WebSocket stream."""
    from gateway.websocket import Relay

    async def broken(self: Relay, from_browser: bool, pump: Any) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Relay, "_finish", broken)
    async with ws_env() as (env, _):
        await login(env.browser)
        with captured_json_logs("bff.gateway", logging.ERROR) as stream:
            async with connect(env) as ws:
                await echo_once(ws)
                await ws.send_str("close:4000:bye")  # the upstream closes: _finish runs
                msg = await ws.receive(timeout=10)
                assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1011, "gateway error")
        events = json_lines(stream.getvalue())
        assert [e["event"] for e in events] == ["websocket relay failed"]
        samples = await metrics_of(env)
        assert samples[("bff_open_websockets", frozenset())] == 0
        key = frozenset({("route", "/ws/"), ("reason", "error")})
        assert samples[("bff_websocket_closes_total", key)] == 1
