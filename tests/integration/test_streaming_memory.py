"""Memory stays flat while large bodies stream through (SPEC §4.1, §4.2).

The gateway runs as a real `python -m gateway run` subprocess; the upstream
and the client run in this process. A thread samples the gateway's RSS every
50 ms while 200 MiB go down and 100 MiB go up; the peak must stay under
150 MiB, which is impossible if either body were buffered.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support import (
    GatewayProcess,
    RssSampler,
    config_dict,
    gateway_process,
    pid_of,
    running_app,
)

MiB = 1024 * 1024
CEILING = 150 * MiB
DOWNLOAD_BLOCKS = 200  # x 1 MiB
UPLOAD_BLOCKS = 100  # x 1 MiB
_BASE = hashlib.shake_256(b"bff-gateway streaming test").digest(MiB)


def block(index: int) -> bytes:
    """1 MiB that differs per index, so a lost, doubled or reordered block changes the hash."""
    return index.to_bytes(8, "big") + _BASE[8:]


def upstream_app(upload_result: dict[str, object]) -> web.Application:
    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = DOWNLOAD_BLOCKS * MiB
        await response.prepare(request)
        for index in range(DOWNLOAD_BLOCKS):
            await response.write(block(index))
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        upload_result.update(
            size=size,
            sha256=digest.hexdigest(),
            chunked=request.headers.get("Transfer-Encoding") == "chunked",
        )
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    app = web.Application()
    app.router.add_get("/download", download)
    app.router.add_post("/upload", upload)
    return app


@pytest.fixture
def upload_result() -> dict[str, object]:
    return {}


@pytest.fixture
async def upstream(upload_result: dict[str, object]) -> AsyncIterator[str]:
    async with running_app(upstream_app(upload_result)) as url:
        yield url


@pytest.fixture
def gateway(upstream: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    routes = [{"path": "/api/", "upstream": upstream + "/", "max_body_size": "1GiB"}]
    data = config_dict(routes, logging={"level": "WARNING"})
    with gateway_process(data, tmp_path) as process:
        yield process


async def test_200_mib_download_streams_with_flat_memory(gateway: GatewayProcess) -> None:
    expected = hashlib.sha256()
    for index in range(DOWNLOAD_BLOCKS):
        expected.update(block(index))
    received = hashlib.sha256()
    size = 0
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        with RssSampler(pid_of(gateway)) as sampler:
            idle = sampler.rss()

            async def fetch() -> int:
                nonlocal size
                async with http.get(gateway.url + "/api/download") as response:
                    assert response.status == 200
                    assert response.content_length == DOWNLOAD_BLOCKS * MiB
                    async for chunk in response.content.iter_any():
                        received.update(chunk)
                        size += len(chunk)
                return size

            await asyncio.wait_for(fetch(), 60)
    assert size == DOWNLOAD_BLOCKS * MiB
    assert received.hexdigest() == expected.hexdigest()
    assert len(sampler.samples) >= 3, "RSS was not sampled while the body streamed"
    assert sampler.peak < CEILING, (
        f"peak RSS {sampler.peak / MiB:.1f} MiB (idle {idle / MiB:.1f} MiB) for a "
        f"{DOWNLOAD_BLOCKS} MiB download"
    )


async def test_100_mib_chunked_upload_streams_with_flat_memory(
    gateway: GatewayProcess, upload_result: dict[str, object]
) -> None:
    expected = hashlib.sha256()
    for index in range(UPLOAD_BLOCKS):
        expected.update(block(index))

    async def body() -> AsyncIterator[bytes]:
        for index in range(UPLOAD_BLOCKS):
            yield block(index)

    async with aiohttp.ClientSession(auto_decompress=False) as http:
        with RssSampler(pid_of(gateway)) as sampler:
            idle = sampler.rss()

            async def send() -> dict[str, object]:
                # An async generator has no length: aiohttp sends it chunked.
                async with http.post(gateway.url + "/api/upload", data=body()) as response:
                    assert response.status == 200
                    answer: dict[str, object] = await response.json()
                    return answer

            answer = await asyncio.wait_for(send(), 60)
    assert answer == {"size": UPLOAD_BLOCKS * MiB, "sha256": expected.hexdigest()}
    assert upload_result["chunked"] is True
    assert len(sampler.samples) >= 3, "RSS was not sampled while the body streamed"
    assert sampler.peak < CEILING, (
        f"peak RSS {sampler.peak / MiB:.1f} MiB (idle {idle / MiB:.1f} MiB) for a "
        f"{UPLOAD_BLOCKS} MiB upload"
    )
