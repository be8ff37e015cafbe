"""Framing on the wire: raw sockets against the gateway and raw upstreams (SPEC §4, §4.1, §4.2).

Request targets that must be refused, bodiless responses on a kept-alive
connection, `Expect: 100-continue`, body limits on chunked uploads, and
upstreams that break HTTP (garbage, truncated bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from tests.support import config_dict, raw_request, running_app, running_gateway

# -- helpers -------------------------------------------------------------------------


@dataclass
class Counter:
    """An aiohttp upstream that counts hits and records what it saw."""

    hits: list[tuple[str, str, CIMultiDictProxy[str], bytes]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            self.hits.append((request.method, request.raw_path, request.headers, body))
            path = request.path
            if path == "/s204":
                return web.Response(status=204)
            if path == "/s304":
                return web.Response(status=304, headers={"ETag": '"v1"'})
            if path == "/data":
                return web.Response(body=b"0123456789" * 10, content_type="text/plain")
            return web.json_response({"raw_path": request.raw_path, "length": len(body)})

        app = web.Application(client_max_size=1024**2)
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@contextlib.asynccontextmanager
async def gateway_for(upstream: str, **route: object) -> AsyncIterator[int]:
    routes = [{"path": "/api/", "upstream": upstream + "/", **route}]
    async with running_gateway(config_dict(routes)) as gateway:
        yield gateway.port


@contextlib.asynccontextmanager
async def raw_upstream(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A plain asyncio server that answers each connection with `answer`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


@dataclass
class Parsed:
    status: int
    headers: CIMultiDict[str]
    body: bytes


def parse_responses(data: bytes, methods: list[str]) -> tuple[list[Parsed], bytes]:
    """Parse consecutive HTTP/1.1 responses strictly; return them and any leftover bytes.

    Bodies are framed as RFC 9112 §6.3 says: none for HEAD, 1xx, 204 and 304;
    else chunked or Content-Length. A leftover or a short body means broken framing.
    """
    responses: list[Parsed] = []
    for method in methods:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete head: {head!r}"
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith(("HTTP/1.1 ", "HTTP/1.0 ")), lines[0]
        status = int(lines[0].split()[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                chunk, data = data[:size], data[size + 2 :]
                if size == 0:
                    break
                body += chunk
        else:
            length = int(headers.get("Content-Length", "0"))
            assert len(data) >= length, f"short body: {len(data)} < {length}"
            body, data = data[:length], data[length:]
        responses.append(Parsed(status, headers, body))
    return responses, data


async def read_one(reader: asyncio.StreamReader) -> Parsed:
    """Read exactly one response with a Content-Length body (the connection may stay open)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    (parsed,), _ = parse_responses(head + body, ["POST"])
    return parsed


def assert_json_error(parsed: Parsed, status: int, code: str) -> None:
    assert parsed.status == status
    assert parsed.headers["Content-Type"].startswith("application/json")
    payload = json.loads(parsed.body)
    assert payload["error"] == code and payload["message"]


# -- request targets -------------------------------------------------------------------


BAD_TARGETS = [
    b"/api/../etc/passwd",
    b"/api/x/..",
    b"/api/./x",
    b"/api/x/.",
    b"/api/%2e%2e/x",
    b"/api/%2E%2E/x",
    b"/api/.%2e/x",
    b"/api/%2e./x",
    b"/api/%2e/x",
    b"/api/a/%2E",
    b"/api/a%2f..%2fb",
    b"/api/a%2F%2e%2E%2Fb",
    b"/api/..%5cx",
    b"/api/a\\b",
    b"/api/a%5Cb",
    b"/api/a%5cb",
    b"/api/a%00b",
    b"/api/a%0d%0aX-Injected:%201",
    b"/api/a%7fb",
    b"http://evil/x",
    b"http://127.0.0.1/api/x",
    b"https://evil:443/api/x",
    b"//evil/api/x",
]


@pytest.mark.parametrize("target", BAD_TARGETS, ids=[t.decode() for t in BAD_TARGETS])
async def test_bad_targets_get_400_json_and_the_upstream_sees_nothing(target: bytes) -> None:
    counter = Counter()
    async with running_app(counter.app()) as upstream, gateway_for(upstream) as port:
        data = await raw_request(
            port, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        )
        # The connection and the gateway still work after the refusal.
        ok = await raw_request(
            port, b"GET /api/ok HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        )
    (parsed,), _ = parse_responses(data, ["GET"])
    assert_json_error(parsed, 400, "bad_request")
    assert parse_responses(ok, ["GET"])[0][0].status == 200
    assert [hit[1] for hit in counter.hits] == ["/ok"]


@pytest.mark.parametrize(
    "request_line",
    [b"CONNECT evil.example:443 HTTP/1.1", b"OPTIONS * HTTP/1.1"],
    ids=["authority-form", "asterisk-form"],
)
async def test_authority_and_asterisk_forms_are_refused(request_line: bytes) -> None:
    counter = Counter()
    async with running_app(counter.app()) as upstream, gateway_for(upstream) as port:
        data = await raw_request(port, request_line + b"\r\nHost: gw\r\nConnection: close\r\n\r\n")
    status = int(data.split(b" ", 2)[1])
    assert status == 400
    if b"application/json" in data:  # a handler answered: then it must be the JSON error
        (parsed,), _ = parse_responses(data, ["GET"])
        assert_json_error(parsed, 400, "bad_request")
    assert counter.hits == []


async def test_raw_nul_and_control_bytes_in_the_target_never_reach_the_upstream() -> None:
    counter = Counter()
    async with running_app(counter.app()) as upstream, gateway_for(upstream) as port:
        for target in (b"/api/a\x00b", b"/api/a\x01b", b"/api/a\x7fb"):
            data = await raw_request(
                port, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
            )
            # aiohttp's parser may refuse these before any handler runs (SPEC §4.4 allows
            # its plain 400); if the handler sees them, it must answer the JSON 400.
            assert data.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), data[:40]
            if b"application/json" in data:
                assert_json_error(parse_responses(data, ["GET"])[0][0], 400, "bad_request")
    assert counter.hits == []


async def test_content_length_with_transfer_encoding_is_not_smuggled() -> None:
    counter = Counter()
    smuggled = b"GET /api/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    async with running_app(counter.app()) as upstream, gateway_for(upstream) as port:
        data = await raw_request(
            port,
            b"POST /api/x HTTP/1.1\r\nHost: gw\r\n"
            + f"Content-Length: {len(body)}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + body,
        )
    assert data.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 "))  # aiohttp's parser refuses it
    assert "/api/smuggled" not in [hit[1] for hit in counter.hits]
    assert "/smuggled" not in [hit[1] for hit in counter.hits]


# -- bodiless responses ------------------------------------------------------------------


async def test_head_204_304_have_no_body_and_pipelined_responses_parse() -> None:
    counter = Counter()
    async with running_app(counter.app()) as upstream, gateway_for(upstream) as port:
        data = await raw_request(
            port,
            b"HEAD /api/data HTTP/1.1\r\nHost: gw\r\n\r\n"
            b"GET /api/s204 HTTP/1.1\r\nHost: gw\r\n\r\n"
            b'GET /api/s304 HTTP/1.1\r\nHost: gw\r\nIf-None-Match: "v1"\r\n\r\n'
            b"GET /api/data HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        )
    responses, leftover = parse_responses(data, ["HEAD", "GET", "GET", "GET"])
    assert [r.status for r in responses] == [200, 204, 304, 200]
    assert responses[0].headers.get("Content-Length") in (None, "100")
    assert responses[3].body == b"0123456789" * 10
    assert leftover == b""
    assert [(hit[0], hit[1]) for hit in counter.hits] == [
        ("HEAD", "/data"),
        ("GET", "/s204"),
        ("GET", "/s304"),
        ("GET", "/data"),
    ]


async def test_a_body_on_a_204_from_the_upstream_never_reaches_the_client() -> None:
    """A broken upstream sends bytes after a 204: the client's next response must still parse."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            if head.startswith(b"GET /s204"):
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\nGARBAGE-AFTER-204")
                await writer.drain()
                return  # and close: the stray bytes must not poison anything
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with raw_upstream(answer) as upstream, gateway_for(upstream) as port:
        data = await raw_request(
            port,
            b"GET /api/s204 HTTP/1.1\r\nHost: gw\r\n\r\n"
            b"GET /api/next HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        )
    responses, leftover = parse_responses(data, ["GET", "GET"])
    first, second = responses
    # Either the 204 alone, or a 502 for an upstream that broke framing; never its garbage.
    if first.status == 204:
        assert first.body == b""
    else:
        assert_json_error(first, 502, "upstream_unavailable")
    assert (second.status, second.body) == (200, b"ok")
    assert leftover == b""
    assert b"GARBAGE" not in data


# -- Expect: 100-continue ---------------------------------------------------------------


async def test_expect_100_continue_is_answered_by_the_gateway() -> None:
    counter = Counter()
    async with running_app(counter.app()) as upstream, gateway_for(upstream) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 11\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            assert counter.hits == []  # the 100 did not wait for the upstream
            writer.write(b"hello world")
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(-1), 10)
        finally:
            writer.close()
    (parsed,), leftover = parse_responses(rest, ["POST"])
    assert parsed.status == 200 and leftover == b""
    assert json.loads(parsed.body)["length"] == 11
    ((method, _path, headers, body),) = counter.hits
    assert (method, body) == ("POST", b"hello world")
    assert "Expect" not in headers


async def test_expect_with_too_large_content_length_is_413_without_100() -> None:
    counter = Counter()
    async with (
        running_app(counter.app()) as upstream,
        gateway_for(upstream, max_body_size=1000) as port,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 5000\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            await writer.drain()
            # The body is never sent: the answer must come without it, and be final.
            parsed = await read_one(reader)
        finally:
            writer.close()
    assert_json_error(parsed, 413, "payload_too_large")
    assert counter.hits == []


# -- body limits on chunked uploads -------------------------------------------------------


async def test_chunked_body_crossing_the_limit_is_413_and_the_upstream_gets_at_most_the_limit() -> (
    None
):
    limit = 1000
    received = [0]

    async def count(request: web.Request) -> web.StreamResponse:
        async for chunk in request.content.iter_any():
            received[0] += len(chunk)
        return web.json_response({"length": received[0]})

    app = web.Application()
    app.router.add_post("/up", count)
    chunk = b"x" * 600
    async with running_app(app) as upstream, gateway_for(upstream, max_body_size=limit) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /api/up HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(3):
                writer.write(b"258\r\n" + chunk + b"\r\n")  # 0x258 = 600
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            try:
                parsed: Parsed | None = await read_one(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                parsed = None  # the connection cut: also allowed (SPEC §4.1)
        finally:
            writer.close()
    if parsed is not None:
        assert_json_error(parsed, 413, "payload_too_large")
    assert received[0] <= limit


async def test_chunked_body_within_the_limit_passes() -> None:
    counter = Counter()
    async with (
        running_app(counter.app()) as upstream,
        gateway_for(upstream, max_body_size=1000) as port,
    ):
        data = await raw_request(
            port,
            b"POST /api/up HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + (b"1f4\r\n" + b"y" * 500 + b"\r\n") * 2 + b"0\r\n\r\n",
        )
    (parsed,), _ = parse_responses(data, ["POST"])
    assert parsed.status == 200
    ((_m, _p, headers, body),) = counter.hits
    assert body == b"y" * 1000
    assert headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in headers


# -- broken upstreams ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"THIS IS NOT HTTP\r\n\r\n",
        b"HTTP/1.1 abc Nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n",
        b"\x00\x01\x02\x03",
        b"",
    ],
    ids=["not-http", "bad-status", "double-length", "bad-header", "binary", "empty-close"],
)
async def test_malformed_upstream_response_is_502_json(garbage: bytes) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(garbage)
        await writer.drain()

    async with raw_upstream(answer) as upstream, gateway_for(upstream) as port:
        data = await raw_request(
            port, b"GET /api/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        )
    (parsed,), _ = parse_responses(data, ["GET"])
    assert_json_error(parsed, 502, "upstream_unavailable")
    assert b"<html" not in data.lower() and b"Traceback" not in data


async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Promise 1000 bytes, send 100, close."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n")
    writer.write(b"t" * 100)
    await writer.drain()


async def test_truncated_upstream_body_reaches_the_client_truncated_raw() -> None:
    async with raw_upstream(truncated) as upstream:
        routes = [{"path": "/api/", "upstream": upstream + "/"}]
        async with running_gateway(config_dict(routes)) as gateway:
            data = await raw_request(gateway.port, b"GET /api/x HTTP/1.1\r\nHost: gw\r\n\r\n")
            metrics = gateway.listeners.gateway.metrics.registry
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-length: 1000" in head.lower()
    assert body == b"t" * 100  # and then the connection was closed: not a complete response
    # /metrics tells the truth: the client got a 200 (cut short), and one upstream error.
    requests = {"route": "/api/", "method": "GET"}
    assert metrics.get_sample_value("bff_requests_total", {**requests, "status": "200"}) == 1
    assert metrics.get_sample_value("bff_requests_total", {**requests, "status": "502"}) is None
    errors = [
        sample.value
        for metric in metrics.collect()
        if metric.name == "bff_upstream_errors"
        for sample in metric.samples
        if sample.name == "bff_upstream_errors_total"
    ]
    assert errors == [1]


async def test_truncated_upstream_body_raises_payload_error_in_a_client() -> None:
    async with (
        raw_upstream(truncated) as upstream,
        gateway_for(upstream) as port,
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/api/x") as response,
    ):
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), 10)


async def test_truncated_chunked_upstream_body_is_not_ended_cleanly() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()  # and close without the last chunk

    async with raw_upstream(chunked) as upstream, gateway_for(upstream) as port:
        data = await raw_request(port, b"GET /api/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"hello" in body
    assert not body.endswith(b"0\r\n\r\n")  # no terminating chunk: the client knows it is cut


# -- a refused body is never read as a request ----------------------------------------


SMUGGLED = b"GET /api/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"


async def next_on_same_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Parsed | None:
    """Send a legitimate request after a refusal; its answer, or None if the gateway hung up."""
    try:
        writer.write(b"GET /api/next HTTP/1.1\r\nHost: gw\r\n\r\n")
        await writer.drain()
        return await read_one(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_refused_body_holding_a_request_is_never_parsed_as_one(framing: str) -> None:
    counter = Counter()
    payload = SMUGGLED * 4  # 160 bytes over a 50-byte limit, each a well-formed request
    if framing == "chunked":
        head = b"Transfer-Encoding: chunked\r\n"
        body = b"".join(b"%x\r\n%s\r\n" % (len(SMUGGLED), SMUGGLED) for _ in range(4))
        body += b"0\r\n\r\n"
    else:
        head = f"Content-Length: {len(payload)}\r\n".encode()
        body = payload
    async with (
        running_app(counter.app()) as upstream,
        gateway_for(upstream, max_body_size=50) as port,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /api/upload HTTP/1.1\r\nHost: gw\r\n" + head + b"\r\n" + body)
            await writer.drain()
            refused = await read_one(reader)
            follow = await next_on_same_connection(reader, writer)
        finally:
            writer.close()
    assert_json_error(refused, 413, "payload_too_large")
    if follow is not None:
        assert follow.status == 200
        assert json.loads(follow.body)["raw_path"] == "/next"
    assert "/smuggled" not in [hit[1] for hit in counter.hits]
    assert all(hit[1] == "/next" for hit in counter.hits)


@pytest.mark.parametrize(
    "cookie_line",
    [
        b"Cookie: bff-demo=1.k1.SEALEDVALUE" + b"A" * (20 * 1024),  # over max_header_size
        b"Cookie: bff-demo=1.k1.SEALEDVALUE\x01rest",  # a character the parser refuses
    ],
)
async def test_parser_errors_are_json_and_never_quote_the_cookie(cookie_line: bytes) -> None:
    counter = Counter()
    async with running_app(counter.app()) as upstream, gateway_for(upstream) as port:
        data = await raw_request(
            port, b"GET /api/x HTTP/1.1\r\nHost: gw\r\n" + cookie_line + b"\r\n\r\n"
        )
    status_line, _, _ = data.partition(b"\r\n")
    assert status_line.split()[1] in (b"400", b"431"), status_line
    assert b"SEALEDVALUE" not in data
    assert b"application/json" in data
    body = data.partition(b"\r\n\r\n")[2]
    assert json.loads(body)["error"] == "bad_request"
    assert counter.hits == []
