"""Capacity of one real gateway process (`python -m gateway run`, ``workers: 1``).

1. Peak RSS stays under 100 MiB while a 1 GiB download and a 1 GiB upload stream
   through at the same time as a steady load of small requests.
2. 1,000 keep-alive client connections held open at once, with traffic on each;
   once they are closed, the gateway's file descriptors return exactly to the
   baseline and its RSS to near it.

The gateway runs as a subprocess so that psutil can measure it alone; the
upstream and the clients run in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
import psutil
import pytest
from aiohttp import web

from tests.support import (
    GatewayProcess,
    RssSampler,
    config_dict,
    gateway_process,
    pid_of,
    running_app_with,
)

MiB = 1024 * 1024
RSS_CEILING = 100 * MiB
CHUNK = 64 * 1024
BIG_CHUNKS = 1024 * MiB // CHUNK  # 1 GiB in 64 KiB chunks
SMALL_CLIENTS = 20
SMALL_BODY = b'{"ok": true, "padding": "' + b"x" * 200 + b'"}'
_T = TypeVar("_T")
_BASE = hashlib.shake_256(b"bff-gateway capacity test").digest(CHUNK)


def chunk(index: int) -> bytes:
    """64 KiB that differ per index: a lost, doubled or reordered chunk changes the digest."""
    return index.to_bytes(8, "big") + _BASE[8:]


# -- the upstream -----------------------------------------------------------------


@dataclass
class Upstream:
    download_sha256: str = ""
    download_sent: int = 0
    upload_sha256: str = ""
    upload_received: int = 0
    small_served: int = 0

    def app(self) -> web.Application:
        async def big(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.content_length = BIG_CHUNKS * CHUNK
            await response.prepare(request)
            digest = hashlib.sha256()
            for index in range(BIG_CHUNKS):
                data = chunk(index)
                digest.update(data)
                await response.write(data)
                self.download_sent += len(data)
            self.download_sha256 = digest.hexdigest()
            await response.write_eof()
            return response

        async def sink(request: web.Request) -> web.Response:
            digest = hashlib.sha256()
            async for data in request.content.iter_any():
                digest.update(data)
                self.upload_received += len(data)
            self.upload_sha256 = digest.hexdigest()
            return web.json_response({"size": self.upload_received, "sha256": self.upload_sha256})

        async def small(request: web.Request) -> web.Response:
            self.small_served += 1
            return web.Response(body=SMALL_BODY, content_type="application/json")

        app = web.Application()
        app.router.add_get("/big", big)
        app.router.add_post("/sink", sink)
        app.router.add_get("/small", small)
        return app


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


def gateway_config(upstream_url: str) -> dict[str, object]:
    routes = [{"path": "/api/", "upstream": upstream_url + "/", "max_body_size": "2GiB"}]
    # The production defaults otherwise, access log included (to a file under tmp_path).
    return config_dict(routes, server={"workers": 1})


@pytest.fixture
async def gateway(upstream: Upstream, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    async with running_app_with(upstream.app()) as url:
        with gateway_process(gateway_config(url), tmp_path) as process:
            yield process


# -- 1. big transfers with small traffic alongside ---------------------------------


@dataclass
class Span:
    """When a big transfer ran, in time.monotonic() seconds."""

    start: float = 0.0
    end: float = 0.0

    @property
    def seconds(self) -> float:
        return self.end - self.start


async def download(url: str, http: aiohttp.ClientSession) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    async with http.get(url) as response:
        assert response.status == 200
        assert response.content_length == BIG_CHUNKS * CHUNK
        async for data in response.content.iter_chunked(CHUNK):
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest()


async def upload(url: str, http: aiohttp.ClientSession) -> tuple[object, str]:
    """POST 1 GiB chunked; the upstream's answer and the sha256 of what was sent."""
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for index in range(BIG_CHUNKS):
            data = chunk(index)
            digest.update(data)
            yield data

    async with http.post(url, data=body()) as response:
        assert response.status == 200
        answer = await response.json()
    return answer, digest.hexdigest()


async def test_1_gib_download_and_upload_with_small_traffic_under_100_mib(
    gateway: GatewayProcess, upstream: Upstream
) -> None:
    big_done = asyncio.Event()  # both big transfers over: the small clients stop
    one_big_done = asyncio.Event()  # the first of them over
    spans = {"download": Span(), "upload": Span()}
    small_ok = 0
    small_ok_while_both_ran = 0
    small_failures: list[str] = []

    async def small_client(http: aiohttp.ClientSession) -> None:
        nonlocal small_ok, small_ok_while_both_ran
        while not big_done.is_set():
            try:
                async with http.get(gateway.url + "/api/small") as response:
                    body = await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                small_failures.append(repr(exc))
                continue
            if response.status != 200 or body != SMALL_BODY:
                small_failures.append(f"{response.status} {body[:200]!r}")
                continue
            small_ok += 1
            if not one_big_done.is_set():
                small_ok_while_both_ran += 1

    async def timed(name: str, transfer: Awaitable[_T]) -> _T:
        spans[name].start = time.monotonic()
        try:
            return await transfer
        finally:
            spans[name].end = time.monotonic()
            one_big_done.set()

    big_timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    small_timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(auto_decompress=False, timeout=big_timeout) as big_http,
        aiohttp.ClientSession(
            auto_decompress=False,
            timeout=small_timeout,
            connector=aiohttp.TCPConnector(limit=SMALL_CLIENTS),
        ) as small_http,
    ):
        with RssSampler(pid_of(gateway)) as sampler:
            idle = sampler.rss()
            started = time.monotonic()
            smalls = [asyncio.create_task(small_client(small_http)) for _ in range(SMALL_CLIENTS)]
            try:
                (size, received_sha), (answer, sent_sha) = await asyncio.wait_for(
                    asyncio.gather(
                        timed("download", download(gateway.url + "/api/big", big_http)),
                        timed("upload", upload(gateway.url + "/api/sink", big_http)),
                    ),
                    timeout=300,
                )
            finally:
                big_done.set()
                await asyncio.gather(*smalls)
            elapsed = time.monotonic() - started
    report = (
        f"peak RSS {sampler.peak / MiB:.1f} MiB (idle {idle / MiB:.1f} MiB, "
        f"{len(sampler.samples)} samples); {elapsed:.1f} s in all (download "
        f"{spans['download'].seconds:.1f} s, upload {spans['upload'].seconds:.1f} s); "
        f"{small_ok} small requests, {small_ok_while_both_ran} while both transfers ran"
    )
    print(report)
    # Every byte arrived, in order, both ways.
    assert size == BIG_CHUNKS * CHUNK == upstream.download_sent
    assert received_sha == upstream.download_sha256
    assert answer == {"size": BIG_CHUNKS * CHUNK, "sha256": sent_sha}
    assert upstream.upload_received == BIG_CHUNKS * CHUNK
    assert upstream.upload_sha256 == sent_sha
    # The transfers overlapped, and the small traffic was served alongside them.
    assert spans["download"].start < spans["upload"].end
    assert spans["upload"].start < spans["download"].end
    assert small_failures == [], (
        f"{len(small_failures)} small requests failed: {small_failures[:5]}"
    )
    assert small_ok_while_both_ran >= SMALL_CLIENTS, report
    assert upstream.small_served == small_ok
    # Memory stayed flat, sampled all along.
    assert len(sampler.samples) >= 20, report
    assert sampler.peak < RSS_CEILING, report


# -- 2. a thousand keep-alive connections ------------------------------------------

CONNECTIONS = 1000
ROUNDS = 3
CYCLES = 2
RSS_RETAINED = 40 * MiB  # the allocator keeps what 1,000 connections' objects needed
RSS_GROWTH = 10 * MiB  # what a second, identical cycle may add: under 10 KiB a connection
SMALL_REQUEST = b"GET /api/small HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def open_files_limit() -> Iterator[None]:
    """Room for 1,000 connections in this process and in the gateway (which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Here: the clients' sockets and the upstream's; in the gateway: both sides too.
    wanted = 2 * CONNECTIONS + 1024
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {wanted} this test needs")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
async def wide_gateway(
    open_files_limit: None, upstream: Upstream, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    # A short upstream keep-alive: the gateway's idle pooled connections are closed
    # by the upstream soon after the traffic stops, so its fds can be counted exactly
    # (the pool's size is not configurable).
    async with running_app_with(upstream.app(), keepalive_timeout=2.0) as url:
        with gateway_process(gateway_config(url), tmp_path) as process:
            yield process


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def exchange(self) -> tuple[int, dict[str, str], bytes]:
        """One request on this connection; the full response (Content-Length framed)."""
        self.writer.write(SMALL_REQUEST)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers["content-length"]))
        return int(status_line.split(" ", 2)[1]), headers, body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def tcp_connections(process: psutil.Process) -> list[psutil._common.pconn]:
    return [c for c in process.net_connections(kind="tcp") if c.status != psutil.CONN_LISTEN]


async def settle(process: psutil.Process, fds: int | None, timeout: float) -> tuple[int, list[str]]:
    """Poll until the process has no TCP connection left and, if given, exactly ``fds``
    open files; return its fd count and the connections still open at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        open_fds = process.num_fds()
        connections = tcp_connections(process)
        if not connections and (fds is None or open_fds == fds):
            return open_fds, []
        if time.monotonic() > deadline:
            return open_fds, [f"{c.laddr} -> {c.raddr} {c.status}" for c in connections]
        await asyncio.sleep(0.1)


@dataclass
class Cycle:
    opened: float  # seconds to open every connection
    served: float  # seconds until every round was answered
    held: int  # connections the gateway had open at once
    peak_fds: int
    peak_rss: int
    end_fds: int
    end_rss: int
    settled: float  # seconds from closing to the fds' return
    left: list[str]

    def __str__(self) -> str:
        return (
            f"opened in {self.opened:.2f} s, {ROUNDS} rounds in {self.served:.2f} s, "
            f"{self.held} held at once; fds peak {self.peak_fds}, end {self.end_fds} "
            f"(settled in {self.settled:.2f} s); RSS peak {self.peak_rss / MiB:.1f} MiB, "
            f"end {self.end_rss / MiB:.1f} MiB"
        )


async def thousand_connections(
    process: psutil.Process, port: int, upstream: Upstream, base_fds: int
) -> Cycle:
    """Open CONNECTIONS keep-alive connections, send ROUNDS requests on each, close them."""
    started = time.monotonic()
    connections = await asyncio.gather(*(Connection.open(port) for _ in range(CONNECTIONS)))
    opened = time.monotonic() - started
    served_before = upstream.small_served
    held = peak_fds = peak_rss = 0
    try:
        for round_ in range(ROUNDS):
            answers = await asyncio.wait_for(
                asyncio.gather(*(c.exchange() for c in connections)), timeout=60
            )
            bad = [a for a in answers if a[0] != 200 or a[2] != SMALL_BODY]
            assert bad == [], f"round {round_}: {len(bad)} bad answers, e.g. {bad[:3]}"
            closing = [h for _, h, _ in answers if "close" in h.get("connection", "").lower()]
            assert closing == [], f"round {round_}: {len(closing)} connections not kept alive"
            peak_fds = max(peak_fds, process.num_fds())
            peak_rss = max(peak_rss, process.memory_info().rss)
            if round_ == 0:
                held = sum(
                    1
                    for c in tcp_connections(process)
                    if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
                )
        served = time.monotonic() - started
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    assert upstream.small_served - served_before == CONNECTIONS * ROUNDS
    closed = time.monotonic()
    end_fds, left = await settle(process, base_fds, timeout=20)
    return Cycle(
        opened=opened,
        served=served,
        held=held,
        peak_fds=peak_fds,
        peak_rss=peak_rss,
        end_fds=end_fds,
        end_rss=process.memory_info().rss,
        settled=time.monotonic() - closed,
        left=left,
    )


async def test_1000_keepalive_connections_then_fds_and_rss_return_to_baseline(
    wide_gateway: GatewayProcess, upstream: Upstream
) -> None:
    process = psutil.Process(pid_of(wide_gateway))
    port = wide_gateway.config.server.listen.port

    # Warm-up: the first proxied requests open the upstream pool, fill caches, etc.
    warm = await Connection.open(port)
    for _ in range(3):
        status, _, body = await warm.exchange()
        assert (status, body) == (200, SMALL_BODY)
    await warm.close()
    # The upstream closes idle keep-alive connections after 2 s: wait for the pool to empty.
    base_fds, left = await settle(process, None, timeout=15)
    assert left == [], f"connections still open before the test: {left}"
    base_rss = process.memory_info().rss

    cycles: list[Cycle] = []
    for _ in range(CYCLES):
        cycle = await thousand_connections(process, port, upstream, base_fds)
        cycles.append(cycle)
        report = f"fds baseline {base_fds}, RSS baseline {base_rss / MiB:.1f} MiB; " + "; ".join(
            f"cycle {n}: {c}" for n, c in enumerate(cycles, 1)
        )
        # All 1,000 were open at the gateway at once, each with its own descriptor...
        assert cycle.held == CONNECTIONS, report
        assert cycle.peak_fds >= base_fds + CONNECTIONS, report
        # ...and every descriptor (client side and upstream pool) was released after.
        assert cycle.left == [], f"connections still open: {cycle.left[:5]}; {report}"
        assert cycle.end_fds == base_fds, report
    print(report)
    # Memory returns near the baseline: the allocator may keep what the first cycle's
    # objects needed, but an identical second cycle must not add to it (no leak).
    assert cycles[0].end_rss <= base_rss + RSS_RETAINED, report
    assert cycles[-1].end_rss <= cycles[0].end_rss + RSS_GROWTH, report
