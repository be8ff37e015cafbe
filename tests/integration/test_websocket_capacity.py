"""1,000 concurrent WebSocket relays through a real gateway subprocess (issue 14): memory per
open socket is small, holding them (idle, then with a round of traffic) does not grow the
gateway's RSS, and a second identical cycle reuses what the first one took."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.demo.api import create_demo_api
from tests.integration.test_capacity import open_files_limit  # noqa: F401 (fixture)
from tests.session_support import demo_provider
from tests.support import (
    GatewayProcess,
    RssSampler,
    async_gateway_process,
    config_dict,
    parse_metrics,
    pid_of,
    running_app,
)

pytestmark = pytest.mark.asyncio

MiB = 1024 * 1024
SOCKETS = 1000
PER_SOCKET_CEILING = 64 * 1024  # what one open relay may cost the gateway, both sides included
HOLD_GROWTH = 4 * MiB  # what holding them through a round of traffic may add
CYCLE_GROWTH = 10 * MiB  # what a second identical cycle may add


async def open_sockets(
    http: aiohttp.ClientSession, gateway: GatewayProcess, cookie: str, count: int
) -> list[aiohttp.ClientWebSocketResponse]:
    headers = {"Cookie": cookie, "Origin": gateway.url}
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    for start in range(0, count, 100):  # a hundred handshakes at a time
        batch = await asyncio.gather(
            *(
                http.ws_connect(gateway.url + "/api/ws", headers=headers, autoping=False)
                for _ in range(start, min(count, start + 100))
            )
        )
        sockets.extend(batch)
    return sockets


async def round_trip(sockets: list[aiohttp.ClientWebSocketResponse], text: str) -> None:
    async def one(ws: aiohttp.ClientWebSocketResponse) -> None:
        await ws.send_str(text)
        msg = await ws.receive(timeout=60)
        assert msg.data == text

    await asyncio.gather(*(one(ws) for ws in sockets))


async def open_count(http: aiohttp.ClientSession, gateway: GatewayProcess) -> float:
    async with http.get(gateway.admin_url + "/metrics") as response:
        samples, _ = parse_metrics(await response.text())
    return samples[("bff_open_websockets", frozenset())]


async def until_none_open(http: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    for _ in range(600):
        if await open_count(http, gateway) == 0:
            return
        await asyncio.sleep(0.1)
    pytest.fail("relays stayed open after their browsers closed")


async def login_cookie(http: aiohttp.ClientSession, gateway: GatewayProcess) -> str:
    async with http.post(
        gateway.url + "/auth/demo/login",
        json={"username": "demo", "password": "demo"},
        headers={"X-CSRF": "1"},
    ) as answer:
        assert answer.status == 200
        return "; ".join(line.split(";")[0] for line in answer.headers.getall("Set-Cookie"))


@pytest.fixture
async def ws_gateway(
    open_files_limit: None,  # noqa: F811
    tmp_path: Path,
) -> AsyncIterator[GatewayProcess]:
    app = create_demo_api(access_ttl=3600)
    async with running_app(app) as upstream:
        data = config_dict(
            [{"path": "/api/", "upstream": f"{upstream}/", "auth": "demo"}],
            providers={"demo": demo_provider(upstream)},
            logging={"access_log": False},
        )
        async with async_gateway_process(data, tmp_path) as process:
            yield process


async def test_1000_idle_websockets_keep_the_gateways_memory_flat(
    ws_gateway: GatewayProcess,
) -> None:
    gateway = ws_gateway
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        cookie = await login_cookie(http, gateway)
        warm = await open_sockets(http, gateway, cookie, 20)  # code paths and pools warmed
        await round_trip(warm, "warm")
        await asyncio.gather(*(ws.close() for ws in warm))
        await until_none_open(http, gateway)

        sampler = RssSampler(pid_of(gateway))
        report: list[str] = []
        base = sampler.rss()
        held_rss: list[int] = []
        for cycle in range(2):
            sockets = await open_sockets(http, gateway, cookie, SOCKETS)
            await round_trip(sockets, f"hello {cycle}")
            assert await open_count(http, gateway) == SOCKETS
            held = sampler.rss()
            await round_trip(sockets, "still here")  # every socket used once more
            after_traffic = sampler.rss()
            held_rss.append(held)
            report.append(
                f"cycle {cycle}: {SOCKETS} open {held / MiB:.1f} MiB, "
                f"after a round of traffic {after_traffic / MiB:.1f} MiB"
            )
            assert after_traffic <= held + HOLD_GROWTH, report
            await asyncio.gather(*(ws.close() for ws in sockets))
            await until_none_open(http, gateway)
        summary = f"base {base / MiB:.1f} MiB; " + "; ".join(report)
        print(summary)
        assert held_rss[0] - base <= SOCKETS * PER_SOCKET_CEILING, summary
        assert held_rss[1] <= held_rss[0] + CYCLE_GROWTH, summary


MESSAGES = 256  # 1 MiB each: far more than every buffer on the path can hold
BUFFERED_CEILING = 64 * MiB  # what the gateway may hold while the pipe is full


async def stalled(progress: Callable[[], int], task: asyncio.Task[None]) -> bool:
    """True once ``progress()`` stops moving for a second while ``task`` runs; False if
    the task finishes first. (Absence of progress has no event to await: polled.)"""
    last, still = progress(), 0
    for _ in range(240):
        await asyncio.sleep(0.25)
        if task.done():
            return False
        now = progress()
        still = still + 1 if now == last else 0
        last = now
        if still >= 4:
            return True
    return False


async def test_a_browser_that_stops_reading_stalls_the_sender_not_the_gateways_memory(
    ws_gateway: GatewayProcess,
) -> None:
    """The demo API echoes every message; the browser sends 256 MiB and reads nothing. With
    backpressure both ways the echoes fill the path back, the upstream stops reading,
    and the browser's own sends stall, while the gateway holds a few messages at most.
    Then the browser reads: every echo arrives, in order, and the sender finishes."""
    gateway = ws_gateway
    async with aiohttp.ClientSession() as http:
        cookie = await login_cookie(http, gateway)
        ws = await http.ws_connect(
            gateway.url + "/api/ws", headers={"Cookie": cookie, "Origin": gateway.url}
        )
        sent = 0

        async def sender() -> None:
            nonlocal sent
            for index in range(MESSAGES):
                await ws.send_bytes(index.to_bytes(4, "big") * (MiB // 4))
                sent += 1

        with RssSampler(pid_of(gateway)) as sampler:
            base = sampler.rss()
            task = asyncio.create_task(sender())
            try:
                assert await stalled(lambda: sent, task), f"all {sent} messages went through"
                at_stall = sent
                assert at_stall < MESSAGES
                held = max(sampler.samples) - base
                for index in range(MESSAGES):
                    msg = await ws.receive(timeout=60)
                    assert msg.type is aiohttp.WSMsgType.BINARY, msg
                    assert len(msg.data) == MiB and msg.data[:4] == index.to_bytes(4, "big")
                await asyncio.wait_for(task, 60)
            finally:
                task.cancel()
                await ws.close()
        print(f"stalled after {at_stall} of {MESSAGES} MiB sent; gateway held {held / MiB:.1f} MiB")
        assert held <= BUFFERED_CEILING, f"{held / MiB:.1f} MiB held by the gateway"


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_closes_open_websockets_with_1001_and_exits_long_before_the_timeout(
    tmp_path: Path, workers: str
) -> None:
    """`bff-gateway run` with shutdown_timeout 60: SIGTERM closes every open socket with
    1001 (both sides) and the process exits 0 without waiting the 60 s out."""
    app = create_demo_api(access_ttl=3600)
    async with running_app(app) as upstream:
        data = config_dict(
            [{"path": "/api/", "upstream": f"{upstream}/", "auth": "demo"}],
            providers={"demo": demo_provider(upstream)},
            server={"shutdown_timeout": 60},
            session={"store": "cookie"},
        )
        async with (
            async_gateway_process(data, tmp_path, "--workers", workers) as gateway,
            aiohttp.ClientSession() as http,
        ):
            cookie = await login_cookie(http, gateway)
            sockets = await open_sockets(http, gateway, cookie, 20)
            await round_trip(sockets, "before the drain")
            assert gateway.proc is not None
            gateway.proc.send_signal(signal.SIGTERM)
            closes = await asyncio.gather(*(ws.receive(timeout=30) for ws in sockets))
            assert {(m.type, m.data, m.extra) for m in closes} == {
                (aiohttp.WSMsgType.CLOSE, 1001, "gateway shutting down")
            }
            await asyncio.gather(*(ws.close() for ws in sockets))
            code = await asyncio.to_thread(gateway.proc.wait, 40)  # well under 60 s
            assert code == 0
