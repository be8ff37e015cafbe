"""A raw-socket regression corpus for request smuggling and desync (issue 13).

Each case hides a request to ``/api/smuggled`` behind ambiguous framing (CL.TE,
TE.CL, TE.TE obfuscations, CL.0, bad chunk sizes, LF in chunk extensions,
duplicate headers, absolute/authority forms, pipelining after a parser error)
and ends with a sentinel request that closes the connection. The recording
upstream must never see the hidden request, never a Host but its own, and
whatever the gateway answers must be well-framed HTTP (or the connection
closed) — never two interpretations of one byte stream.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.test_framing import Counter, gateway_for
from tests.support import running_app

SMUGGLED = b"GET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
SENTINEL = b"GET /api/sentinel HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def chunked_smuggle(size_line: bytes) -> bytes:
    return size_line + b"\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"


def post(headers: bytes, body: bytes) -> bytes:
    return b"POST /api/a HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body


CORPUS: dict[str, bytes] = {
    "CL.TE": post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
    "TE.CL": post(
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        chunked_smuggle(f"{len(SMUGGLED):x}".encode()),
    ),
    "TE.TE xchunked": post(b"Transfer-Encoding: xchunked\r\n", chunked_smuggle(b"28")),
    "TE.TE space before colon": post(
        b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED
    ),
    "TE.TE tab value": post(b"Transfer-Encoding:\tchunked\r\n", chunked_smuggle(b"28")),
    "TE.TE chunked then identity": post(
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", chunked_smuggle(b"28")
    ),
    "TE.TE chunked, identity": post(
        b"Transfer-Encoding: chunked, identity\r\n", chunked_smuggle(b"28")
    ),
    "TE.TE obs-fold": post(
        b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED
    ),
    "TE.TE vertical tab": post(b"Transfer-Encoding:\x0bchunked\r\n", chunked_smuggle(b"28")),
    "TE on HTTP/1.0": b"POST /api/a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    + chunked_smuggle(b"28"),
    "CL.0 on GET": b"GET /api/a HTTP/1.1\r\nHost: x\r\nContent-Length: "
    + str(len(SMUGGLED)).encode()
    + b"\r\n\r\n"
    + SMUGGLED,
    "two Content-Lengths": post(b"Content-Length: 0\r\nContent-Length: 40\r\n", SMUGGLED),
    "Content-Length list": post(b"Content-Length: 0, 40\r\n", SMUGGLED),
    "Content-Length plus sign": post(b"Content-Length: +40\r\n", SMUGGLED),
    "negative chunk size": post(b"Transfer-Encoding: chunked\r\n", chunked_smuggle(b"-28")),
    "0x chunk size": post(b"Transfer-Encoding: chunked\r\n", chunked_smuggle(b"0x28")),
    "chunk size with space": post(b"Transfer-Encoding: chunked\r\n", chunked_smuggle(b"28 ")),
    "huge chunk size": post(
        b"Transfer-Encoding: chunked\r\n", chunked_smuggle(b"ffffffffffffffffffff")
    ),
    "LF in chunk extension": post(
        b"Transfer-Encoding: chunked\r\n", b"2;a=b\nx\r\nxx\r\n0\r\n\r\n" + SMUGGLED
    ),
    "bare LF line ends": b"POST /api/a HTTP/1.1\nHost: x\nContent-Length: 5\n\n0\r\n\r\n"
    + SMUGGLED,
    "bare CR in a header": post(b"X-A: a\rGET /api/smuggled HTTP/1.1\r\n", b""),
    "NUL in a header": post(b"X-A: a\x00b\r\nContent-Length: 0\r\n", b"") + SMUGGLED,
    "duplicate Host": b"GET /api/a HTTP/1.1\r\nHost: x\r\nHost: evil.example\r\n\r\n",
    "absolute form": b"GET http://evil.example/api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "authority form": b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    "pipelined after a parser error": b"GET /api/a HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: abc\r\n\r\n" + SMUGGLED,
    "pipelined after a bad target": b"GET /api/%2e%2e/a HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 40\r\n\r\n" + SMUGGLED,
}


def statuses(data: bytes) -> list[int]:
    """The status of every response head in what the gateway sent."""
    found = []
    for line in data.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and line[8:9] == b" ":
            found.append(int(line[9:12]))
    return found


@pytest.mark.parametrize("case", CORPUS.values(), ids=CORPUS.keys())
async def test_nothing_smuggled_reaches_the_upstream(case: bytes) -> None:
    counter = Counter()
    async with running_app(counter.app()) as upstream, gateway_for(upstream) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(case + SENTINEL)
        try:
            data = await asyncio.wait_for(reader.read(-1), timeout=20)
        finally:
            writer.close()
    paths = [raw_path for _method, raw_path, _headers, _body in counter.hits]
    assert not any(b"smuggled" in path.encode() for path in paths), paths
    for _method, _path, headers, _body in counter.hits:
        assert headers.getall("Host") == [upstream.removeprefix("http://")]
    # Every answer is a real response; the gateway never answered more requests
    # than the upstream saw plus its own refusals.
    codes = statuses(data)
    assert codes, "the gateway answered nothing"
    assert all(code in (200, 400, 404, 405, 408, 413, 431, 501, 502) for code in codes), codes
    assert len([c for c in codes if c == 200]) <= len(counter.hits)
