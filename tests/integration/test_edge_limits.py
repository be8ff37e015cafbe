"""Edge deadlines and caps on raw sockets (issue 13): header_timeout, keepalive_timeout,
max_connections.

A deadline test measures how long the gateway held a connection; each bound is
the configured deadline plus a generous margin for two shared cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support import (
    async_gateway_process,
    config_dict,
    fetch,
    parse_metrics,
    running_app,
    running_gateway,
)

MARGIN = 2.0  # seconds on top of a deadline, for a loaded machine
GET = b"GET /api/x HTTP/1.1\r\nHost: gw\r\n\r\n"


class Upstream:
    """Counts hits; /slow answers after `release` is set."""

    def __init__(self) -> None:
        self.hits = 0
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            if request.path == "/slow":
                await self.release.wait()
            return web.json_response({"path": request.path})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@contextlib.asynccontextmanager
async def edge(upstream: Upstream, **limits: object) -> AsyncIterator[int]:
    async with running_app(upstream.app()) as url:
        data = config_dict([{"path": "/api/", "upstream": url + "/"}], server={"limits": limits})
        async with running_gateway(data) as gateway:
            yield gateway.port


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, await reader.readexactly(length)


async def held_for(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Seconds until the gateway closed the connection, and what it sent before."""
    start = time.monotonic()
    data = await asyncio.wait_for(reader.read(-1), timeout=limit)
    return time.monotonic() - start, data


def json_body(raw: bytes) -> dict[str, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"application/json" in head
    return dict(json.loads(body))


async def test_a_trickling_head_gets_408_within_header_timeout() -> None:
    upstream = Upstream()
    async with edge(upstream, header_timeout=1) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: gw\r\n")

        async def trickle() -> None:
            for n in range(100):  # one header line every 0.2 s: never a whole head
                await asyncio.sleep(0.2)
                writer.write(f"X-Slow-{n}: y\r\n".encode())

        trickling = asyncio.create_task(trickle())
        try:
            seconds, data = await held_for(reader, 1 + MARGIN)
        finally:
            trickling.cancel()
            writer.close()
        assert data.startswith(b"HTTP/1.1 408 ")
        assert json_body(data)["error"] == "request_timeout"
        assert seconds < 1 + MARGIN
        assert upstream.hits == 0


async def test_a_silent_connection_is_closed_after_header_timeout() -> None:
    async with edge(Upstream(), header_timeout=1) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        seconds, data = await held_for(reader, 1 + MARGIN)
        writer.close()
        assert data.startswith(b"HTTP/1.1 408 ")
        assert seconds >= 0.9


async def test_the_head_deadline_does_not_cut_a_slow_upstream() -> None:
    upstream = Upstream()
    async with edge(upstream, header_timeout=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/slow HTTP/1.1\r\nHost: gw\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1.5)  # three head deadlines pass while the upstream thinks
        upstream.release.set()
        status, body = await read_response(reader)
        writer.close()
        assert status == 200
        assert json.loads(body) == {"path": "/slow"}


async def test_kept_alive_idle_connection_lives_until_keepalive_timeout() -> None:
    """Idle time between requests is keepalive_timeout's, not header_timeout's; the next
    head, once begun, has header_timeout again."""
    upstream = Upstream()
    async with edge(upstream, header_timeout=0.5, keepalive_timeout=3) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GET)
        assert (await read_response(reader))[0] == 200
        await asyncio.sleep(1.2)  # idle past two head deadlines, well inside keep-alive
        writer.write(GET)
        assert (await read_response(reader))[0] == 200
        writer.write(b"GET /api/x HTTP/1.1\r\n")  # a head begins and stalls
        seconds, data = await held_for(reader, 0.5 + MARGIN)
        writer.close()
        assert data.startswith(b"HTTP/1.1 408 ")
        assert seconds < 0.5 + MARGIN
        assert upstream.hits == 2


async def test_idle_kept_alive_connection_closes_after_keepalive_timeout() -> None:
    async with edge(Upstream(), keepalive_timeout=1) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GET)
        assert (await read_response(reader))[0] == 200
        seconds, data = await held_for(reader, 1 + MARGIN)
        writer.close()
        assert data == b""  # closed quietly: no request was under way
        assert 0.9 <= seconds < 1 + MARGIN


async def metric(session: aiohttp.ClientSession, admin: str, name: str) -> float:
    async with session.get(admin + "/metrics") as answer:
        samples, _ = parse_metrics(await answer.text())
    return sum(value for (sample, _labels), value in samples.items() if sample == name)


async def test_connections_past_max_connections_are_closed_at_once() -> None:
    upstream = Upstream()
    async with running_app(upstream.app()) as url:
        data = config_dict(
            [{"path": "/api/", "upstream": url + "/"}],
            server={"limits": {"max_connections": 3}},
        )
        async with running_gateway(data) as gateway, aiohttp.ClientSession() as session:
            held = []
            for _ in range(3):  # each answered once, so each is surely registered
                reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                writer.write(GET)
                assert (await read_response(reader))[0] == 200
                held.append((reader, writer))
            assert await metric(session, gateway.admin_url, "bff_open_connections") == 3

            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(GET)
            assert await asyncio.wait_for(reader.read(-1), timeout=5) == b""
            writer.close()
            assert upstream.hits == 3
            rejected = await metric(session, gateway.admin_url, "bff_rejections_total")
            assert rejected == 1

            # One leaves: the next connection is served again.
            held.pop()[1].close()
            deadline = time.monotonic() + 5
            while await metric(session, gateway.admin_url, "bff_open_connections") > 2:
                assert time.monotonic() < deadline, "the closed connection was never counted"
                await asyncio.sleep(0.02)
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(GET)
            assert (await read_response(reader))[0] == 200
            writer.close()
            for _, w in held:
                w.close()


async def test_5000_slow_clients_do_not_starve_a_normal_one(tmp_path: Path) -> None:
    """5,000 connections trickling heads at a gateway process; a normal client's p99 stays
    under 100 ms meanwhile, and every slow client is closed by the head deadline."""
    upstream = Upstream()
    async with running_app(upstream.app()) as url:
        data = config_dict(
            [{"path": "/api/", "upstream": url + "/"}],
            server={"limits": {"header_timeout": 8}},
            logging={"access_log": False},
        )
        async with async_gateway_process(data, tmp_path) as gateway:
            port = gateway.config.server.listen.port
            slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
            for _ in range(50):
                batch = await asyncio.gather(
                    *(asyncio.open_connection("127.0.0.1", port) for _ in range(100))
                )
                for _, writer in batch:
                    writer.write(b"GET /api/x HTTP/1.1\r\nHost: gw\r\n")
                slow.extend(batch)
            started = time.monotonic()

            latencies = []
            async with aiohttp.ClientSession() as session:
                for n in range(300):
                    if n % 30 == 0:  # the slow clients keep trickling
                        for _, writer in slow:
                            writer.write(b"X-Slow: y\r\n")
                    sent = time.perf_counter()
                    async with session.get(f"http://127.0.0.1:{port}/api/x") as answer:
                        assert answer.status == 200
                        await answer.read()
                    latencies.append(time.perf_counter() - sent)
            assert time.monotonic() - started < 8, "the measurement outlived the deadline"
            latencies.sort()
            p99 = latencies[int(len(latencies) * 0.99) - 1]
            print(f"normal client p99 with 5,000 slow clients: {p99 * 1000:.1f} ms")
            assert p99 < 0.1

            closed = await asyncio.gather(
                *(asyncio.wait_for(reader.read(-1), timeout=8 + 20) for reader, _ in slow)
            )
            assert all(data.startswith(b"HTTP/1.1 408 ") for data in closed)
            for _, writer in slow:
                writer.close()


async def test_past_max_in_flight_requests_get_503_overloaded_then_recover() -> None:
    upstream = Upstream()
    async with edge(upstream, max_in_flight=2) as port, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/api/"

        async def slow() -> int:
            async with session.get(url + "slow") as answer:
                await answer.read()
                return answer.status

        held = [asyncio.create_task(slow()) for _ in range(2)]
        deadline = time.monotonic() + 10
        while upstream.hits < 2:  # both are with the upstream now
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

        async with session.get(url + "x") as answer:
            assert answer.status == 503
            assert answer.headers["Retry-After"] == "1"
            assert (await answer.json())["error"] == "overloaded"
        async with session.post(url + "x", data=b"z" * 100_000) as answer:
            assert answer.status == 503  # a body is refused unread, not waited for
        assert upstream.hits == 2

        upstream.release.set()
        assert await asyncio.gather(*held) == [200, 200]
        async with session.get(url + "x") as answer:  # load gone: served again
            assert answer.status == 200
        assert upstream.hits == 3


class BodyRecorder:
    """An upstream that reads each request body and records whether it arrived whole."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.done = asyncio.Event()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            try:
                body = await request.read()
                self.outcomes.append(f"whole:{len(body)}")
            except Exception as exc:  # the gateway cut the body off
                self.outcomes.append(f"broken:{type(exc).__name__}")
                raise
            finally:
                self.done.set()
            return web.json_response({"length": len(body)})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def stalled_body_case(head: bytes, first_part: bytes) -> tuple[float, bytes, list[str]]:
    recorder = BodyRecorder()
    async with running_app(recorder.app()) as url:
        data = config_dict(
            [{"path": "/api/", "upstream": url + "/"}], server={"limits": {"body_timeout": 1}}
        )
        async with running_gateway(data) as gateway:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(head + first_part)  # then silence
            seconds, answer = await held_for(reader, 1 + MARGIN + 5)
            writer.close()
            await asyncio.wait_for(recorder.done.wait(), timeout=10)
            async with aiohttp.ClientSession() as session:
                _, metrics = await fetch(session, gateway.admin_url + "/metrics")
            samples, _ = parse_metrics(metrics.decode())
            assert samples[("bff_rejections_total", frozenset({("reason", "body_timeout")}))] == 1
            return seconds, answer, recorder.outcomes


async def test_a_stalled_body_gets_408_and_the_upstream_never_sees_it_end() -> None:
    head = b"POST /api/up HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n"
    seconds, answer, outcomes = await stalled_body_case(head, b"x" * 100)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json_body(answer)["error"] == "request_timeout"
    assert seconds < 1 + MARGIN
    assert len(outcomes) == 1 and outcomes[0].startswith("broken:")


async def test_a_stalled_chunked_body_is_never_ended_cleanly_upstream() -> None:
    head = b"POST /api/up HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
    seconds, answer, outcomes = await stalled_body_case(head, b"5\r\nhello\r\n")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert seconds < 1 + MARGIN
    assert len(outcomes) == 1 and outcomes[0].startswith("broken:")


async def test_a_busy_upstream_gets_503_upstream_busy_and_spares_the_others() -> None:
    """upstream_connections is per upstream: one held at its limit refuses a queued
    request after upstream_queue_timeout, while another upstream is served."""
    busy, other = Upstream(), Upstream()

    async with running_app(busy.app()) as busy_url, running_app(other.app()) as other_url:
        data = config_dict(
            [
                {"path": "/busy/", "upstream": busy_url + "/"},
                {"path": "/other/", "upstream": other_url + "/"},
            ],
            server={"limits": {"upstream_connections": 1, "upstream_queue_timeout": 0.5}},
        )
        async with running_gateway(data) as gateway, aiohttp.ClientSession() as session:

            async def slow() -> int:
                async with session.get(gateway.url + "/busy/slow") as answer:
                    await answer.read()
                    return answer.status

            held = asyncio.create_task(slow())
            deadline = time.monotonic() + 10
            while busy.hits < 1:  # the one connection is with the upstream now
                assert time.monotonic() < deadline and not held.done()
                await asyncio.sleep(0.01)

            started = time.monotonic()
            async with session.get(gateway.url + "/busy/x") as answer:
                waited = time.monotonic() - started
                assert answer.status == 503
                assert answer.headers["Retry-After"] == "1"
                assert (await answer.json())["error"] == "upstream_busy"
            assert 0.5 <= waited < 0.5 + MARGIN  # it queued for the timeout, then gave up
            assert busy.hits == 1  # the refused request never reached the upstream

            async with session.get(gateway.url + "/other/y") as answer:
                assert answer.status == 200  # another upstream is not held up

            async with session.get(gateway.admin_url + "/metrics") as answer:
                samples, _ = parse_metrics(await answer.text())
            assert samples[("bff_rejections_total", frozenset({("reason", "upstream_busy")}))] == 1

            busy.release.set()
            assert await held == 200
            async with session.get(gateway.url + "/busy/z") as answer:  # a free slot again
                assert answer.status == 200
            assert busy.hits == 2
