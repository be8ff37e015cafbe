"""The streaming proxy core on `auth: none` routes (SPEC §4, §4.1, §4.2, §4.4).

Every test runs the production wiring (`running_gateway`) in front of a real
aiohttp upstream on loopback that records what it received. Raw sockets are
used wherever the exact bytes on the wire matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.observability.logs import JsonFormatter, TextFormatter
from gateway.upstream_client import UpstreamClient
from tests.support import (
    RunningGateway,
    config_dict,
    free_port,
    raw_request,
    running_app_with,
    running_gateway,
)

SECRET = "s3cr3t-K3Y/with+odd=chars"
SECRET_QUERY = "q-S3CR3T/v+a=l"
# Every spelling that must never leave the gateway: plain, percent-encoded, distinctive part.
SECRETS = (SECRET, SECRET_QUERY, quote(SECRET, safe=""), quote(SECRET_QUERY, safe=""), "s3cr3t")


# -- a recording upstream ------------------------------------------------------


@dataclass
class Hit:
    method: str
    raw_path: str
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class Recorder:
    """An upstream that records every request; some paths have special answers."""

    name: str = "up"
    echo: bool = True  # answer with the raw path (tests about secrets turn this off)
    hits: list[Hit] = field(default_factory=list)
    special: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = field(
        default_factory=dict
    )

    def paths(self) -> list[str]:
        return [hit.raw_path for hit in self.hits]

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            self.hits.append(Hit(request.method, request.raw_path, request.headers, body))
            handler = self.special.get(request.path)
            if handler is not None:
                return await handler(request)
            if not self.echo:
                return web.json_response({"upstream": self.name})
            return web.json_response({"upstream": self.name, "raw_path": request.raw_path})

        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def serve(app: web.Application) -> contextlib.AbstractAsyncContextManager[str]:
    """Like tests.support.running_app, but the upstream never inflates gzip bodies."""
    return running_app_with(app, auto_decompress=False)


@contextlib.asynccontextmanager
async def proxied(
    recorder: Recorder, route: dict[str, Any] | None = None, **sections: Any
) -> AsyncIterator[tuple[str, int, str]]:
    """A gateway with route /api/ -> recorder's /base/; yields (gateway url, port, upstream)."""
    async with serve(recorder.app()) as upstream:
        routes = [{"path": "/api/", "upstream": f"{upstream}/base/", **(route or {})}]
        async with running_gateway(config_dict(routes, **sections)) as gateway:
            yield gateway.url, gateway.port, upstream


@contextlib.asynccontextmanager
async def fronted(app: web.Application, **route: Any) -> AsyncIterator[RunningGateway]:
    """A gateway with route /api/ (plus ``route``'s settings) -> ``app`` served at its root."""
    async with serve(app) as upstream:
        routes = [{"path": "/api/", "upstream": upstream + "/", **route}]
        async with running_gateway(config_dict(routes)) as gateway:
            yield gateway


async def raw_through_proxy(
    request: bytes, route: dict[str, Any] | None = None, **sections: Any
) -> tuple[bytes, Recorder, str]:
    """Send raw request bytes through ``proxied`` (a fresh Recorder) and read until close;
    return (the raw response, the recorder, the upstream's URL)."""
    recorder = Recorder()
    async with proxied(recorder, route, **sections) as (_url, port, upstream):
        data = await raw_request(port, request)
    return data, recorder, upstream


def client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(auto_decompress=False)


def split_response(data: bytes) -> tuple[int, CIMultiDict[str], bytes]:
    """Parse one raw HTTP/1.1 response read until close: (status, headers, body)."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return int(lines[0].split()[1]), headers, body


def assert_json_error(status: int, body: bytes, expected_status: int, code: str) -> None:
    assert status == expected_status
    payload = json.loads(body)
    assert payload["error"] == code
    assert isinstance(payload["message"], str) and payload["message"]
    assert set(payload) == {"error", "message"}


# -- paths and routing -----------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb",
        "/a%20b",
        "/caf%C3%A9",
        "/x?a=1&a=2&b=%2F",
        "/caf%c3%a9/%2F%2f/x%20y?q=%E2%9C%93&q=&empty&sp=a+b",
    ],
)
async def test_raw_path_and_query_reach_the_upstream_unchanged(target: str) -> None:
    data, recorder, _up = await raw_through_proxy(
        f"GET /api{target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode()
    )
    status, _, body = split_response(data)
    assert status == 200
    assert recorder.paths() == [f"/base{target}"]
    assert json.loads(body)["raw_path"] == f"/base{target}"


async def test_longest_prefix_wins_on_segment_boundaries() -> None:
    short, long_ = Recorder("short"), Recorder("long")
    async with serve(short.app()) as up_short, serve(long_.app()) as up_long:
        routes = [
            {"path": "/api/", "upstream": f"{up_short}/s/"},
            {"path": "/api/v2/", "upstream": f"{up_long}/l/"},
        ]
        async with running_gateway(config_dict(routes)) as gateway, client() as http:
            answers = {}
            for path in ("/api/v2/items", "/api/v2", "/api/v2x/items", "/api/other"):
                async with http.get(gateway.url + path) as response:
                    answers[path] = (response.status, (await response.json())["upstream"])
    assert answers == {
        "/api/v2/items": (200, "long"),
        "/api/v2": (200, "long"),
        "/api/v2x/items": (200, "short"),
        "/api/other": (200, "short"),
    }
    assert long_.paths() == ["/l/items", "/l/"]
    assert short.paths() == ["/s/v2x/items", "/s/other"]


async def test_no_route_is_404_json() -> None:
    recorder = Recorder()
    async with proxied(recorder) as (url, _port, _up), client() as http:
        async with http.get(url + "/nowhere/x") as response:
            assert_json_error(response.status, await response.read(), 404, "not_found")
            assert response.content_type == "application/json"
        async with http.get(url + "/apix") as response:  # not a segment boundary
            assert_json_error(response.status, await response.read(), 404, "not_found")
    assert recorder.hits == []


async def test_method_not_in_allow_list_is_405_json_with_allow() -> None:
    recorder = Recorder()
    async with (
        proxied(recorder, {"methods": ["GET", "POST"]}) as (url, _port, _up),
        client() as http,
    ):
        async with http.delete(url + "/api/x") as response:
            assert_json_error(response.status, await response.read(), 405, "method_not_allowed")
            allowed = {m.strip() for m in response.headers["Allow"].split(",")}
            assert allowed == {"GET", "POST"}
        async with http.post(url + "/api/x", data=b"ok") as response:
            assert response.status == 200
    assert [hit.method for hit in recorder.hits] == ["POST"]


# -- request headers -------------------------------------------------------------


async def test_connection_header_cannot_strip_an_injected_header() -> None:
    route = {"inject_headers": {"X-Api-Key": SECRET}}
    data, recorder, _up = await raw_through_proxy(
        b"GET /api/x HTTP/1.1\r\nHost: gw\r\n"
        b"Connection: close, X-Api-Key\r\n"
        b"X-Api-Key: from-the-client\r\nx-api-key: again\r\n\r\n",
        route,
    )
    assert split_response(data)[0] == 200
    (hit,) = recorder.hits
    assert hit.headers.getall("X-Api-Key") == [SECRET]
    assert SECRET.encode() not in data


async def test_client_api_key_is_replaced_by_the_injected_one() -> None:
    recorder = Recorder()
    route = {"inject_headers": {"X-Api-Key": SECRET}}
    async with (
        proxied(recorder, route) as (url, _port, _up),
        client() as http,
        http.get(url + "/api/x", headers={"X-Api-Key": "mine"}) as response,
    ):
        assert response.status == 200
        assert SECRET not in str(response.headers) and SECRET not in await response.text()
    assert recorder.hits[0].headers.getall("X-Api-Key") == [SECRET]


async def test_inject_query_replaces_the_clients_param_and_keeps_the_rest() -> None:
    route = {"inject_query": {"appid": SECRET_QUERY}}
    data, recorder, _up = await raw_through_proxy(
        b"GET /api/w?appid=client&q=%2F%20x&q=2&sp=a+b&appid=twice&flag&%61ppid=enc&z=%C3%A9"
        b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        route,
    )
    assert split_response(data)[0] == 200
    (hit,) = recorder.hits
    path, _, query = hit.raw_path.partition("?")
    assert path == "/base/w"
    pairs = query.split("&")
    # The client's own pairs, in order and byte for byte, minus every `appid` spelling.
    assert pairs[:-1] == ["q=%2F%20x", "q=2", "sp=a+b", "flag", "z=%C3%A9"]
    assert URL("/?" + pairs[-1]).query.getall("appid") == [SECRET_QUERY]
    assert SECRET_QUERY.encode() not in data


async def test_injected_secrets_reach_no_response_and_no_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    recorder = Recorder(echo=False)

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/base/elsewhere"})

    async def fail(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="upstream broke")

    recorder.special = {"/base/redirect": redirect, "/base/fail": fail}
    route = {"inject_headers": {"X-Api-Key": SECRET}, "inject_query": {"appid": SECRET_QUERY}}
    async with serve(recorder.app()) as upstream:
        dead = f"http://127.0.0.1:{free_port()}/"
        routes = [
            {"path": "/api/", "upstream": f"{upstream}/base/", **route},
            {"path": "/dead/", "upstream": dead, **route},
        ]
        seen: list[bytes] = []
        async with running_gateway(config_dict(routes)) as gateway, client() as http:
            for path in ("/api/x?appid=mine", "/api/redirect", "/api/fail", "/dead/x?a=1"):
                async with http.get(
                    gateway.url + path, allow_redirects=False, headers={"X-Request-Id": "rid-1"}
                ) as response:
                    seen.append(str(response.status).encode())
                    seen.append(repr(list(response.raw_headers)).encode())
                    seen.append(await response.read())
            bad = await raw_request(
                gateway.port, b"GET /api/../x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
            )
            seen.append(bad)
    assert seen[0:12:3] == [b"200", b"302", b"500", b"502"]
    assert split_response(bad)[0] == 400
    assert all(hit.headers["X-Api-Key"] == SECRET for hit in recorder.hits)
    assert all(URL(hit.raw_path).query.getall("appid") == [SECRET_QUERY] for hit in recorder.hits)
    for blob in seen:
        for secret in SECRETS:
            assert secret.encode() not in blob
            assert secret.lower().encode() not in blob.lower()

    access = [r for r in caplog.records if r.name == "bff.access"]
    assert len(access) >= 5, "the gateway's access log was not captured"
    for record in caplog.records:
        rendered = [
            record.getMessage(),
            repr(record.__dict__),
            JsonFormatter().format(record),
            TextFormatter().format(record),
        ]
        for text in rendered:
            for secret in SECRETS:
                assert secret.lower() not in text.lower(), f"secret in log record {record.name}"


async def test_hop_by_hop_request_headers_are_removed() -> None:
    data, recorder, _up = await raw_through_proxy(
        b"GET /api/x HTTP/1.1\r\nHost: gw\r\n"
        b"Connection: close, X-Named-Hop, x-other-hop\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"Trailer: X-Checksum\r\nUpgrade: h2c\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"Proxy-Authenticate: Basic\r\nX-Named-Hop: 1\r\nX-Other-Hop: 2\r\n"
        b"X-CSRF: token\r\nX-End-To-End: kept\r\n\r\n",
    )
    assert split_response(data)[0] == 200
    (hit,) = recorder.hits
    for name in (
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-Authenticate",
        "X-Named-Hop",
        "X-Other-Hop",
        "X-CSRF",
    ):
        assert name not in hit.headers, name
    assert "x-named-hop" not in hit.headers.get("Connection", "").lower()
    assert hit.headers["X-End-To-End"] == "kept"


async def through_raw_upstream(response: bytes) -> bytes:
    """What a client gets for ``GET /api/x`` through a gateway whose upstream answers
    every request with exactly ``response``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        routes = [{"path": "/api/", "upstream": f"http://127.0.0.1:{port}/"}]
        async with running_gateway(config_dict(routes)) as gateway:
            return await raw_request(
                gateway.port, b"GET /api/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
            )


async def test_hop_by_hop_response_headers_are_removed() -> None:
    data = await through_raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
        b"Connection: keep-alive, X-Named-Hop\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Authenticate: Basic\r\nTrailer: X-Checksum\r\nUpgrade: h2c\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"X-Named-Hop: gone\r\nX-End-To-End: kept\r\n"
        b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"Set-Cookie: bff-demo=evil; Path=/\r\nSet-Cookie: __Host-bff-demo=evil; Path=/\r\n"
        b"\r\nok"
    )
    status, headers, body = split_response(data)
    assert (status, body) == (200, b"ok")
    for name in ("Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade", "Proxy-Connection"):
        assert name not in headers, name
    assert "X-Named-Hop" not in headers
    assert headers["X-End-To-End"] == "kept"
    assert headers.getall("Set-Cookie") == ["a=1", "b=2"]


async def test_host_and_forwarded_headers_from_an_untrusted_client() -> None:
    data, recorder, upstream = await raw_through_proxy(
        b"GET /api/x HTTP/1.1\r\nHost: app.example:8443\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: evil.example\r\nForwarded: for=6.6.6.6\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert split_response(data)[0] == 200
    (hit,) = recorder.hits
    assert hit.headers.getall("Host") == [URL(upstream).raw_authority]
    assert hit.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert hit.headers.getall("X-Forwarded-Proto") == ["http"]
    assert hit.headers.getall("X-Forwarded-Host") == ["app.example:8443"]
    assert "Forwarded" not in hit.headers


async def test_forwarded_chain_is_kept_from_a_trusted_proxy() -> None:
    server = {"trusted_proxies": ["127.0.0.0/8"]}
    data, recorder, _up = await raw_through_proxy(
        b"GET /api/x HTTP/1.1\r\nHost: internal:8080\r\n"
        b"X-Forwarded-For: 203.0.113.7, 10.0.0.1\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: app.example\r\nConnection: close\r\n\r\n",
        server=server,
    )
    assert split_response(data)[0] == 200
    (hit,) = recorder.hits
    assert hit.headers.getall("X-Forwarded-For") == ["203.0.113.7, 10.0.0.1, 127.0.0.1"]
    assert hit.headers["X-Forwarded-Proto"] == "https"
    assert hit.headers["X-Forwarded-Host"] == "app.example"


async def test_request_id_is_passed_on_or_created_and_returned_on_errors() -> None:
    recorder = Recorder()
    async with proxied(recorder) as (url, _port, _up), client() as http:
        async with http.get(url + "/api/a", headers={"X-Request-Id": "abc-123.X:y_z"}) as r:
            assert r.status == 200
        async with http.get(url + "/api/b") as r:
            assert r.status == 200
        async with http.get(url + "/api/c", headers={"X-Request-Id": "bad id\twith spaces"}) as r:
            assert r.status == 200
        async with http.get(url + "/nowhere", headers={"X-Request-Id": "err-42"}) as r:
            assert r.status == 404
            assert r.headers["X-Request-Id"] == "err-42"
        async with http.get(url + "/nowhere") as r:
            assert r.status == 404
            created_on_error = r.headers["X-Request-Id"]
    first, second, third = (hit.headers.getall("X-Request-Id") for hit in recorder.hits)
    assert first == ["abc-123.X:y_z"]
    assert len(second) == 1 and len(second[0]) >= 16
    assert len(third) == 1 and third[0] != "bad id\twith spaces" and " " not in third[0]
    assert second[0] != third[0]
    assert created_on_error and created_on_error not in (second[0], third[0])


async def test_cookies_are_not_forwarded_by_default() -> None:
    _data, recorder, _up = await raw_through_proxy(
        b"GET /api/x HTTP/1.1\r\nHost: gw\r\nCookie: theme=dark; bff-demo=sealed\r\n"
        b"Cookie: lang=en\r\nConnection: close\r\n\r\n"
    )
    (hit,) = recorder.hits
    assert "Cookie" not in hit.headers


async def test_forward_cookies_passes_all_but_the_gateways_own() -> None:
    _data, recorder, _up = await raw_through_proxy(
        b"GET /api/x HTTP/1.1\r\nHost: gw\r\n"
        b"Cookie: theme=dark; bff-demo=sealed1; __Host-bff-other=sealed2; bff-demo-1=c1\r\n"
        b"Cookie: lang=en; bffish=keep\r\nConnection: close\r\n\r\n",
        {"forward_cookies": True},
    )
    (hit,) = recorder.hits
    cookie_lines = hit.headers.getall("Cookie")
    assert len(cookie_lines) == 1
    pairs = [pair.strip() for pair in cookie_lines[0].split(";")]
    assert pairs == ["theme=dark", "lang=en", "bffish=keep"]
    assert "sealed" not in cookie_lines[0]


# -- bodies ----------------------------------------------------------------------


async def test_gzip_bodies_pass_byte_exact_both_ways() -> None:
    recorder = Recorder()
    request_body = gzip.compress(b"request " * 5000)
    response_body = gzip.compress(b'{"answer": "' + b"x" * 20000 + b'"}')

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=response_body,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    recorder.special = {"/base/gz": gzipped}
    async with (
        proxied(recorder) as (url, _port, _up),
        client() as http,
        http.post(
            url + "/api/gz",
            data=request_body,
            headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
        assert await response.read() == response_body
    (hit,) = recorder.hits
    assert hit.headers["Content-Encoding"] == "gzip"
    assert hit.body == request_body
    assert hit.headers["Accept-Encoding"] == "gzip"


async def test_upload_with_content_length_keeps_it() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    head = (
        f"PUT /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    data, recorder, _up = await raw_through_proxy(head + body)
    assert split_response(data)[0] == 200
    (hit,) = recorder.hits
    assert hit.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in hit.headers
    assert hashlib.sha256(hit.body).hexdigest() == hashlib.sha256(body).hexdigest()


async def test_chunked_upload_is_streamed_chunked() -> None:
    """The upstream sees the first chunk before the client has sent the second."""
    first_seen = asyncio.Event()
    received: list[bytes] = []
    info: dict[str, Any] = {}

    async def upload(request: web.Request) -> web.StreamResponse:
        info["headers"] = request.headers
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            received.append(chunk)
            digest.update(chunk)
            first_seen.set()
        return web.json_response({"sha256": digest.hexdigest()})

    app = web.Application()
    app.router.add_post("/up", upload)
    parts = [b"A" * 70000, b"B" * 50000, b"C" * 3]

    async def body() -> AsyncIterator[bytes]:
        yield parts[0]
        await asyncio.wait_for(first_seen.wait(), 10)  # the gateway streamed the first part
        for part in parts[1:]:
            yield part

    async with (
        fronted(app) as gateway,
        client() as http,
        http.post(gateway.url + "/api/up", data=body()) as response,
    ):
        assert response.status == 200
        answer = await response.json()
    whole = b"".join(parts)
    assert answer["sha256"] == hashlib.sha256(whole).hexdigest()
    assert b"".join(received) == whole
    assert info["headers"]["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in info["headers"]


async def test_download_is_streamed_as_it_arrives() -> None:
    release = asyncio.Event()
    block = bytes(range(256)) * 256

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        await response.write(block)
        await asyncio.wait_for(release.wait(), 10)
        for _ in range(3):
            await response.write(block)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/dl", download)
    async with (
        fronted(app) as gateway,
        client() as http,
        http.get(gateway.url + "/api/dl") as response,
    ):
        assert response.status == 200
        head = await asyncio.wait_for(response.content.readexactly(len(block)), 10)
        release.set()
        rest = await response.read()
    assert head == block
    assert head + rest == block * 4


async def test_client_going_away_mid_download_cancels_the_upstream_call() -> None:
    upstream_cut = asyncio.Event()
    started = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:  # only a closed connection ends this
                await response.write(b"x" * 65536)
                started.set()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            upstream_cut.set()
        return response

    app = web.Application()
    app.router.add_get("/endless", endless)
    async with fronted(app) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"GET /api/endless HTTP/1.1\r\nHost: gw\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(200_000), 10)
        writer.transport.abort()
        await asyncio.wait_for(upstream_cut.wait(), 10)
        metrics = gateway.listeners.gateway.metrics.registry
    assert started.is_set()
    # A browser that leaves is not an upstream failure.
    for kind in ("reset", "protocol", "timeout", "connect"):
        labels = {"route": "/api/", "kind": kind}
        assert metrics.get_sample_value("bff_upstream_errors_total", labels) is None


async def test_sse_first_event_arrives_before_the_stream_ends() -> None:
    release = asyncio.Event()
    upstream_finished = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(b"id: 1\ndata: first\n\n")
        # Held open until the test has read the first event *through the gateway*.
        await asyncio.wait_for(release.wait(), 10)
        await response.write(b"id: 2\ndata: second\n\n")
        await response.write_eof()
        upstream_finished.set()
        return response

    app = web.Application()
    app.router.add_get("/events", events)
    async with (
        fronted(app) as gateway,
        client() as http,
        http.get(gateway.url + "/api/events") as response,
    ):
        assert response.headers["Content-Type"] == "text/event-stream"
        first = b""
        while not first.endswith(b"\n\n"):
            first += await asyncio.wait_for(response.content.readline(), 10)
        assert not upstream_finished.is_set()
        release.set()
        rest = await response.read()
    assert first == b"id: 1\ndata: first\n\n"
    assert rest == b"id: 2\ndata: second\n\n"


async def test_redirects_are_passed_on_never_followed() -> None:
    recorder = Recorder()

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=302, headers={"Location": "/base/target?x=%2F", "X-Upstream": "yes"}
        )

    async def absolute(request: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": "http://elsewhere.example/t"})

    recorder.special = {"/base/redirect": redirect, "/base/absolute": absolute}
    async with proxied(recorder) as (url, _port, _up), client() as http:
        async with http.post(url + "/api/redirect", allow_redirects=False, data=b"x") as r:
            assert r.status == 302
            assert r.headers["Location"] == "/base/target?x=%2F"
            assert r.headers["X-Upstream"] == "yes"
        async with http.get(url + "/api/absolute", allow_redirects=False) as r:
            assert r.status == 307
            assert r.headers["Location"] == "http://elsewhere.example/t"
    assert recorder.paths() == ["/base/redirect", "/base/absolute"]
    assert "/base/target" not in [p.partition("?")[0] for p in recorder.paths()]


async def test_body_over_max_body_size_by_content_length_is_413_and_not_forwarded() -> None:
    recorder = Recorder()
    async with proxied(recorder, {"max_body_size": 1000}) as (url, _port, _up), client() as http:
        async with http.post(url + "/api/x", data=b"z" * 1001) as response:
            assert_json_error(response.status, await response.read(), 413, "payload_too_large")
        async with http.post(url + "/api/x", data=b"z" * 1000) as response:
            assert response.status == 200
    assert [len(hit.body) for hit in recorder.hits] == [1000]


async def test_server_wide_body_limit_applies_without_route_override() -> None:
    recorder = Recorder()
    server = {"limits": {"max_body_size": "2KiB"}}
    async with (
        proxied(recorder, server=server) as (url, _port, _up),
        client() as http,
        http.put(url + "/api/x", data=b"z" * 2049) as response,
    ):
        assert_json_error(response.status, await response.read(), 413, "payload_too_large")
    assert recorder.hits == []


# -- upstream failures -------------------------------------------------------------


async def test_refused_upstream_is_502_json() -> None:
    routes = [{"path": "/api/", "upstream": f"http://127.0.0.1:{free_port()}/"}]
    async with (
        running_gateway(config_dict(routes)) as gateway,
        client() as http,
        http.get(gateway.url + "/api/x") as response,
    ):
        body = await response.read()
        assert_json_error(response.status, body, 502, "upstream_unavailable")
        assert response.content_type == "application/json"


async def test_silent_upstream_past_route_read_timeout_is_504_json() -> None:
    never = asyncio.Event()
    called = asyncio.Event()

    async def silent(request: web.Request) -> web.StreamResponse:
        called.set()
        await never.wait()
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_get("/slow", silent)
    try:
        async with fronted(app, timeouts={"read": 0.5}) as gateway, client() as http:
            async with http.get(gateway.url + "/api/slow") as response:
                body = await response.read()
                assert_json_error(response.status, body, 504, "upstream_timeout")
            assert called.is_set()
            never.set()
    finally:
        never.set()


async def test_a_shorter_read_timeout_holds_on_a_connection_a_longer_one_used() -> None:
    """Two routes share the upstream's pooled connection. Its read timer, armed for
    the first route's 60 s, must be re-armed for the second route's 0.3 s."""
    never = asyncio.Event()
    peers: list[object] = []

    async def fast(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.Response(text="fast")

    async def silent(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        await never.wait()
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_get("/fast", fast)
    app.router.add_get("/slow", silent)
    try:
        async with serve(app) as upstream:
            routes = [
                {"path": "/long/", "upstream": upstream + "/", "timeouts": {"read": 60}},
                {"path": "/short/", "upstream": upstream + "/", "timeouts": {"read": 0.3}},
            ]
            async with running_gateway(config_dict(routes)) as gateway, client() as http:
                async with http.get(gateway.url + "/long/fast") as response:
                    assert await response.text() == "fast"
                async with asyncio.timeout(10), http.get(gateway.url + "/short/slow") as response:
                    body = await response.read()  # in 0.3 s, not 60 s
                    assert_json_error(response.status, body, 504, "upstream_timeout")
    finally:
        never.set()
    assert len(peers) == 2 and peers[0] == peers[1]  # one upstream connection, reused


async def test_silent_upstream_mid_body_cuts_the_client_off() -> None:
    """A read timeout after the headers were relayed: truncated, never a clean end."""
    never = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"x" * 100)
        await never.wait()
        return response

    app = web.Application()
    app.router.add_get("/stall", stall)
    try:
        async with fronted(app, timeouts={"read": 0.5}) as gateway, client() as http:
            async with http.get(gateway.url + "/api/stall") as response:
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(response.read(), 10)
            never.set()
    finally:
        never.set()


@pytest.mark.parametrize(
    ("exception", "status", "code"),
    [
        (aiohttp.ClientOSError(104, "Connection reset by peer"), 502, "upstream_unavailable"),
        (aiohttp.ServerDisconnectedError(), 502, "upstream_unavailable"),
        (aiohttp.ClientPayloadError("broken"), 502, "upstream_unavailable"),
        (HttpProcessingError(message="bad status line"), 502, "upstream_unavailable"),
        (aiohttp.ConnectionTimeoutError(), 504, "upstream_timeout"),
        (TimeoutError(), 504, "upstream_timeout"),
    ],
)
async def test_client_side_failures_map_to_json_errors(
    exception: Exception, status: int, code: str
) -> None:
    # The upstream is real and reachable; the failure is injected where the
    # gateway's client exchanges a request for an answer on its connection.
    async def never_reached(request: web.Request) -> web.Response:
        raise AssertionError("the exchange is replaced")

    app = web.Application()
    app.router.add_get("/x", never_reached)
    with mock.patch.object(UpstreamClient, "_exchange", side_effect=exception) as exchange:
        async with (
            fronted(app, inject_headers={"X-K": SECRET}) as gateway,
            client() as http,
            http.get(gateway.url + "/api/x") as response,
        ):
            body = await response.read()
    assert exchange.call_count == 1  # a fresh connection: no retry
    assert_json_error(response.status, body, status, code)
    assert SECRET.encode() not in body
    assert "text/html" not in response.headers.get("Content-Type", "")


# -- static routes -----------------------------------------------------------------


@pytest.fixture
def spa(tmp_path: Path) -> Path:
    root = tmp_path / "spa"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>spa</title>")
    (root / "assets" / "app.js").write_text("console.log('app');")
    (tmp_path / "secret.txt").write_text("outside the root")
    return root


async def test_static_files_fallback_and_traversal(spa: Path) -> None:
    recorder = Recorder()
    async with serve(recorder.app()) as upstream:
        routes = [
            {"path": "/api/", "upstream": upstream + "/"},
            {"path": "/", "static": str(spa)},
        ]
        async with running_gateway(config_dict(routes)) as gateway, client() as http:
            async with http.get(gateway.url + "/assets/app.js") as r:
                assert (r.status, await r.text()) == (200, "console.log('app');")
            for path in ("/", "/some/client/route", "/assets/missing.js"):
                async with http.get(gateway.url + path) as r:
                    assert (r.status, await r.text()) == (200, "<!doctype html><title>spa</title>")
            async with http.post(gateway.url + "/assets/app.js", data=b"x") as r:
                assert_json_error(r.status, await r.read(), 405, "method_not_allowed")
            async with http.get(gateway.url + "/api/x") as r:
                assert (await r.json())["raw_path"] == "/x"
            for target in (
                b"/../secret.txt",
                b"/assets/../../secret.txt",
                b"/%2e%2e/secret.txt",
                b"/assets/%2E%2e%2fsecret.txt",
                b"/..%5csecret.txt",
            ):
                data = await raw_request(
                    gateway.port,
                    b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
                )
                status, _headers, body = split_response(data)
                assert_json_error(status, body, 400, "bad_request")
                assert b"outside the root" not in data
    assert recorder.paths() == ["/x"]


async def test_injected_secrets_are_scrubbed_from_redirects_and_echoed_headers() -> None:
    """An upstream that redirects keeps the query it got, injected key included."""
    recorder = Recorder(echo=False)

    async def canonical_redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=301,
            headers={
                "Location": f"/base/data/?{request.query_string}#top",
                "Content-Location": f"/base/data?{request.query_string}",
                "X-Echo-Key": request.headers.get("X-Api-Key", ""),
                "X-Kept": "ordinary",
            },
        )

    recorder.special = {"/base/data": canonical_redirect}
    route = {"inject_headers": {"X-Api-Key": SECRET}, "inject_query": {"appid": SECRET_QUERY}}
    async with (
        proxied(recorder, route) as (url, _port, _up),
        client() as http,
        http.get(url + "/api/data?q=paris&appid=mine", allow_redirects=False) as answer,
    ):
        assert answer.status == 301
        location = answer.headers["Location"]
        content_location = answer.headers["Content-Location"]
        raw = repr(list(answer.raw_headers)).encode()
        assert "X-Echo-Key" not in answer.headers
        assert answer.headers["X-Kept"] == "ordinary"
    (hit,) = recorder.hits
    assert URL(hit.raw_path).query.getall("appid") == [SECRET_QUERY]  # the upstream got it
    assert location == "/base/data/?q=paris#top"
    assert content_location == "/base/data?q=paris"
    for secret in SECRETS:
        assert secret.encode() not in raw


async def test_a_short_injected_query_value_is_scrubbed_from_a_redirect_too() -> None:
    """Echoed header values are matched only from 6 characters on (shorter ones would
    drop innocent headers), but an injected parameter is removed by its name."""
    recorder = Recorder(echo=False)

    async def canonical_redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": f"/base/p?{request.query_string}"})

    recorder.special = {"/base/p": canonical_redirect}
    async with (
        proxied(recorder, {"inject_query": {"k": "ab12"}}) as (url, _port, _up),
        client() as http,
        http.get(url + "/api/p?q=1", allow_redirects=False) as answer,
    ):
        assert answer.status == 302
        assert answer.headers["Location"] == "/base/p?q=1"
    (hit,) = recorder.hits
    assert URL(hit.raw_path).query.getall("k") == ["ab12"]  # the upstream got it


def test_route_reprs_hide_injected_secrets() -> None:
    from gateway.config import Route, Timeouts
    from gateway.proxy import Upstream

    route = Route(
        path="/x/",
        upstream="http://127.0.0.1:1/",
        inject_headers={"X-Api-Key": SECRET},
        inject_query={"appid": SECRET_QUERY},
    )
    text = repr(route) + repr(Upstream.from_route(route, Timeouts()))
    for secret in SECRETS:
        assert secret not in text


async def test_static_route_with_an_over_long_name_falls_back_to_index(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<p>app</p>")
    routes = [{"path": "/", "static": str(tmp_path)}]
    async with (
        running_gateway(config_dict(routes)) as gateway,
        client() as http,
        http.get(gateway.url + "/" + "a" * 300) as answer,
    ):
        assert answer.status == 200
        assert await answer.text() == "<p>app</p>"


async def test_login_flow_cookies_are_the_gateways_own_both_ways() -> None:
    # An oauth2 login in progress leaves <prefix>~flow-<hash> cookies in the browser.
    _data, recorder, _up = await raw_through_proxy(
        b"GET /api/x HTTP/1.1\r\nHost: gw\r\n"
        b"Cookie: theme=dark; bff~flow-0a1b2c=sealed1; __Host-bff~flow-3d4e5f=sealed2\r\n"
        b"Connection: close\r\n\r\n",
        {"forward_cookies": True},
    )
    (hit,) = recorder.hits
    assert hit.headers.getall("Cookie") == ["theme=dark"]

    data = await through_raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\n"
        b"Set-Cookie: bff~flow-0a1b2c=; Max-Age=0\r\n"
        b"Set-Cookie: __Host-bff~flow-3d4e5f=planted; Path=/; Secure\r\n\r\nok"
    )
    _status, headers, _body = split_response(data)
    assert headers.getall("Set-Cookie") == ["a=1"]
