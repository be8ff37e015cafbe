"""Property tests over the whole request path on raw sockets (issue 13, SPEC §4).

A real gateway sits in front of a recording upstream: a plain asyncio server
that parses every request strictly itself and records exactly what arrived
(request line, header lines, body, any byte after the message). Hypothesis
writes hostile requests byte by byte — request targets with dot segments in
every spelling, controls, backslashes, ``%00``, absolute and authority forms,
long paths and odd queries; header sets with hop-by-hop and Connection-named
headers, duplicate and obfuscated framing, ``X-Forwarded-*``, Cookie lines
with the gateway's cookie names, the CSRF header and ``Authorization``; and
bodies that hide a second request — and checks, for every one:

- the gateway answers with one well-formed HTTP response (or closes), and a
  response it made itself is the JSON of SPEC §4.4, never a 500;
- the upstream sees at most one request, never a smuggled one, never a path
  that escapes the route's base, never a gateway cookie, the CSRF header, the
  client's Authorization on an auth route, a hop-by-hop header or a foreign
  Host; and what it sees is what SPEC §4.1 says: the raw path and query byte
  for byte, the headers rewritten exactly so, the body whole.

A second property makes the upstream hostile: its response headers carry
hop-by-hop headers, Connection-named headers, Set-Cookie lines for the
gateway's cookie names and echoes of the injected secrets, and the browser
must get them rewritten as SPEC §4.2 and the README say.

Each test starts one gateway and one upstream and runs all its examples
against them; after each example a barrier connection to the upstream waits
until every connection the gateway opened is closed, so nothing late is
blamed on the next example.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus, unquote_plus, unquote_to_bytes

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from gateway.sessions.model import Session
from tests.session_support import seal
from tests.support import config_dict, fuzz_settings, running_gateway

# -- the recording upstream -------------------------------------------------------------

BARRIER = b"BARRIER\r\n\r\n"
MARKER = "X-Upstream-Answer"  # on every upstream answer: what lacks it, the gateway made


@dataclass
class Seen:
    """One request as it arrived at the upstream."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool  # the whole message arrived, framed as its headers say

    def values(self, name: str) -> list[bytes]:
        lower = name.lower().encode()
        return [value for key, value in self.headers if key.lower() == lower]

    def names(self) -> set[str]:
        return {key.decode("latin-1").lower() for key, _ in self.headers}


@dataclass
class Answer:
    """What the upstream answers (a test sets it before each example)."""

    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b"upstream body"

    def encode(self, head_only: bool = False) -> bytes:
        lines = [f"HTTP/1.1 {self.status} Whatever".encode(), f"{MARKER}: 1".encode()]
        lines += [name + b": " + value for name, value in self.headers]
        lines += [b"Content-Type: text/plain", f"Content-Length: {len(self.body)}".encode()]
        lines += [b"Connection: close"]
        return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else self.body)


class RecordingUpstream:
    """A loopback server that parses requests strictly, records them, answers ``answer``
    with ``Connection: close`` and records whatever else arrives on the connection."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.stray: list[bytes] = []  # bytes that were not one well-formed request
        self.answer = Answer()
        self._open = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.port = 0

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=2**20)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield f"http://127.0.0.1:{self.port}"

    def reset(self, answer: Answer | None = None) -> None:
        self.seen.clear()
        self.stray.clear()
        self.answer = answer or Answer()

    async def settle(self) -> None:
        """Return once every connection opened before this call has closed.

        Connections are accepted in order, so when the barrier's own is
        served every earlier one has been counted; the server answers the
        barrier once they have all closed.
        """
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(BARRIER)
            done = await asyncio.wait_for(reader.read(), timeout=15)
        finally:
            writer.close()
        assert done == b"settled", "a gateway connection to the upstream stayed open"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        self._idle.clear()
        try:
            await self._one_connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            self._open -= 1
            if self._open == 0:
                self._idle.set()

    async def _one_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as partial:
            if partial.partial:
                self.stray.append(partial.partial)
            return
        if head == BARRIER:
            self._open -= 1  # the barrier does not wait for itself
            if self._open == 0:
                self._idle.set()
            await self._idle.wait()
            self._open += 1
            writer.write(b"settled")
            return
        seen = await self._read_request(head, reader)
        if seen is None:
            self.stray.append(head)
            return
        self.seen.append(seen)
        if not seen.complete:
            return
        writer.write(self.answer.encode(head_only=seen.method == b"HEAD"))
        await writer.drain()
        writer.write_eof()
        # Anything after the message is a second request the gateway let through.
        rest = await asyncio.wait_for(reader.read(), timeout=15)
        if rest:
            self.stray.append(rest)

    @staticmethod
    async def _read_request(head: bytes, reader: asyncio.StreamReader) -> Seen | None:
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            return None
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not re.fullmatch(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                return None
            headers.append((name, value.strip(b" \t")))
        seen = Seen(parts[0], parts[1], parts[2], headers, b"", complete=False)
        te, cl = seen.values("Transfer-Encoding"), seen.values("Content-Length")
        try:
            if te:
                if te != [b"chunked"] or cl:
                    return None
                seen.body = await _read_chunked(reader)
            elif cl:
                if len(cl) != 1 or not cl[0].isdigit():
                    return None
                seen.body = await reader.readexactly(int(cl[0]))
        except asyncio.IncompleteReadError:
            return seen  # cut off mid-body: recorded as incomplete
        seen.complete = True
        return seen


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line[:-2].split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailer fields
            return body
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"


# -- the gateway under test --------------------------------------------------------------

INJECTED_HEADER = "inj-header-secret-value"
INJECTED_QUERY = "inj-query-secret+v/1"  # needs encoding: '+' and '/'
ACCESS_TOKEN = "AT-fuzz-access-token-0001"
CLIENT_TOKEN = "client-token-9f3e"
NOW = time.time()
SESSION_COOKIE = seal(Session("demo", ACCESS_TOKEN, None, None, NOW, NOW, {"sub": "u"}))
MAX_BODY = 4096


@dataclass(frozen=True)
class RouteSpec:
    prefix: bytes  # the route's path without its trailing '/'
    base: bytes  # the upstream's base path
    auth: bool
    forward_cookies: bool
    inject_headers: dict[str, str]
    inject_query: dict[str, str]


ROUTES = [
    RouteSpec(b"/api/open", b"/open-base/", False, True, {"X-Api-Key": INJECTED_HEADER}, {}),
    RouteSpec(b"/api/auth", b"/auth-base/", True, False, {}, {}),
    RouteSpec(b"/api/q", b"/q-base/", False, False, {}, {"appid": INJECTED_QUERY}),
]


def gateway_config(upstream: str) -> dict[str, object]:
    routes = [
        {
            "path": spec.prefix.decode() + "/",
            "upstream": upstream + spec.base.decode(),
            "auth": "demo" if spec.auth else "none",
            "forward_cookies": spec.forward_cookies,
            "inject_headers": spec.inject_headers,
            "inject_query": spec.inject_query,
        }
        for spec in ROUTES
    ]
    return config_dict(
        routes,
        providers={"demo": {"type": "password", "login_url": f"{upstream}/login"}},
        server={
            "limits": {"max_body_size": MAX_BODY, "body_timeout": 2, "header_timeout": 5},
            "timeouts": {"read": 10},
        },
        logging={"access_log": False},
    )


@dataclass
class Harness:
    upstream: RecordingUpstream
    port: int


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    upstream = RecordingUpstream()
    async with upstream.serving() as url, running_gateway(gateway_config(url)) as gateway:
        yield Harness(upstream, gateway.port)


# -- talking to the gateway ---------------------------------------------------------------


@dataclass
class Reply:
    interim: list[int]
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


async def read_reply(reader: asyncio.StreamReader, method: bytes) -> Reply | None:
    """Exactly one response, parsed strictly (RFC 9112 §6.3); None if the gateway
    closed without a byte. Anything malformed fails the test."""
    interim: list[int] = []
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as partial:
            assert not partial.partial and not interim, f"a cut head: {partial.partial!r}"
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/1\.[01] (\d{3}) [^\r\n]*", lines[0])
        assert match, f"not a status line: {lines[0]!r}"
        status = int(match.group(1))
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon and re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name), line
            headers.append((name, value.strip(" \t")))
        if 100 <= status < 200:
            assert not headers or status != 100, headers
            interim.append(status)
            continue
        break
    reply = Reply(interim, status, headers, b"")
    te, cl = reply.values("Transfer-Encoding"), reply.values("Content-Length")
    if method == b"HEAD" or status in (204, 304):
        return reply
    if te:
        assert te == ["chunked"] and not cl, (te, cl)
        reply.body = await _read_chunked(reader)
    elif cl:
        assert len(cl) == 1 and cl[0].isdigit(), cl
        reply.body = await reader.readexactly(int(cl[0]))
    else:
        reply.body = await reader.read()
    return reply


async def exchange(harness: Harness, data: bytes, method: bytes) -> Reply | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port, limit=2**20)
    try:
        writer.write(data)
        reply = await asyncio.wait_for(read_reply(reader, method), timeout=20)
        if reply is not None and "close" in (v.lower() for v in reply.values("Connection")):
            # Nothing may follow a closing answer (say, one to a smuggled request).
            extra = await asyncio.wait_for(reader.read(), timeout=20)
            assert extra == b"", f"bytes after the last answer: {extra[:200]!r}"
        return reply
    finally:
        writer.close()
        await harness.upstream.settle()


# SPEC §4.4 and the README's additions; a status the parser refused keeps its code.
ERROR_CODES = {
    400: {"bad_request"},
    401: {"login_required", "session_expired"},
    403: {"csrf_failed"},
    404: {"not_found"},
    405: {"method_not_allowed"},
    408: {"request_timeout"},
    413: {"payload_too_large", "bad_request"},
    414: {"bad_request"},
    417: {"bad_request"},
    431: {"bad_request"},
    501: {"bad_request"},
    502: {"upstream_unavailable", "upstream_invalid_response"},
    503: {"refresh_unavailable", "overloaded", "store_unavailable"},
    504: {"upstream_timeout"},
}


def assert_gateway_error(reply: Reply, method: bytes) -> str:
    """A response the gateway made: the JSON of SPEC §4.4. Returns its code
    ('' for a HEAD request, whose answer has no body)."""
    assert reply.status in ERROR_CODES, (reply.status, reply.body)
    assert reply.values("Content-Type")[0].startswith("application/json"), reply.headers
    if method == b"HEAD":
        assert reply.body == b""
        return ""
    payload = json.loads(reply.body)
    assert set(payload) == {"error", "message"}, payload
    assert payload["error"] in ERROR_CODES[reply.status], (reply.status, payload)
    assert isinstance(payload["message"], str) and payload["message"]
    return str(payload["error"])


# -- hostile requests ---------------------------------------------------------------------

PCHAR = "abcXYZ019-._~!$&'()*+,;=:@"
DOT_FORMS = [
    b".", b"..", b"%2e", b"%2E", b"%2e%2e", b"%2E%2e", b".%2e", b"%2E.", b"%252e%252e",
    b"%25252e%25252E", b"..;", b"..;x=1", b".;", b"%2e%2e;", b"..%2f", b"..%2F..", b"..%5c",
    b"..%255c", b"%2e%2e%2f", b"..%252f", b"%c0%ae%c0%ae", b"%u002e%u002e",
    "\uff0e\uff0e".encode(), b"%ef%bc%8e%ef%bc%8e", b"...", b".a", b"a.", b"..a",
]  # fmt: skip
ODD_BITS = [
    b"\\", b"%5c", b"%5C", b"%00", b"%0a", b"%0D", b"%7f", b"%1f", b"%09", b"%", b"%zz",
    b"%2", b"%%", b"%2f", b"%2F", b"%3F", b"%23", b";", b"@", b":", b" ", b"\t", b"\x00",
    b"\x01", b"\x0b", b"\x7f", "\u00e9".encode(), b"\xff", b"%ff", b"%C3%A9", b"*", b"",
]  # fmt: skip
PREFIXES = [spec.prefix for spec in ROUTES] * 3 + [
    b"/api/openx", b"/api", b"/", b"/nothing", b"/API/open", b"/api//open", b"/api/open%2f",
    b"/auth/demo/session", b"/auth/nobody/session",
]  # fmt: skip
QUERY_CHARS = PCHAR + '/?%#\\"<>^`{|} &=' + "\u00e9"

safe_segment = st.text(alphabet=PCHAR, min_size=1, max_size=10).map(str.encode)
# Mostly plain segments, so that many requests get through and the upstream side
# of the properties is exercised too; one in three is hostile.
segment = st.one_of(
    safe_segment,
    safe_segment,
    st.sampled_from(DOT_FORMS),
    st.sampled_from(ODD_BITS),
    st.builds(lambda a, b: a + b, st.sampled_from(DOT_FORMS + ODD_BITS), st.sampled_from(ODD_BITS)),
    safe_segment,
)
query = st.one_of(
    st.just(b""),
    st.text(alphabet=QUERY_CHARS, max_size=30).map(lambda q: b"?" + q.encode()),
    st.lists(
        st.sampled_from(
            [
                b"appid=evil",
                b"app%69d=evil",
                b"APPID=x",
                b"appid",
                b"a=1",
                b"b=%2F",
                b"=",
                b"",
                b"appid=" + quote(INJECTED_QUERY, safe="").encode(),
                b"x=..%2f",
                b"c=\xff",
            ]
        ),
        min_size=1,
        max_size=4,
    ).map(lambda pairs: b"?" + b"&".join(pairs)),
)


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` draws (``integers(0, n - 1) == 0`` would be far more
    often: hypothesis favours small integers)."""
    return st.sampled_from([True] + [False] * (n - 1))


@st.composite
def origin_target(draw: st.DrawFn) -> bytes:
    path = draw(st.sampled_from(PREFIXES))
    hostile = draw(one_in(3))
    for part in draw(st.lists(segment if hostile else safe_segment, max_size=5)):
        path += draw(st.sampled_from([b"/"] * 6 + [b"//", b"\\"] if hostile else [b"/"])) + part
    if draw(st.booleans()):
        path += b"/"
    if draw(one_in(12)):
        path += b"/" + b"a" * draw(st.integers(1000, 20000))
    fragment = b"#frag" if draw(one_in(12)) else b""
    return path + draw(query) + fragment


target = st.one_of(
    *[origin_target()] * 8,
    st.builds(
        lambda origin, form: form + origin,
        origin_target(),
        st.sampled_from([b"http://evil.example", b"HTTP://gw", b"https://127.0.0.1:1", b"//evil"]),
    ),
    st.sampled_from([b"evil.example:443", b"*", b"", b"api/open/x", b"%2fapi/open/x"]),
)

HOP_NAMES = ["Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Upgrade",
             "Proxy-Authorization", "Proxy-Authenticate"]  # fmt: skip
OTHER_NAMES = [
    "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded", "X-Request-Id",
    "Cookie", "X-CSRF", "Authorization", "X-Api-Key", "Host", "Expect", "Origin",
    "Sec-Fetch-Site", "Accept", "X-Custom", "Content-Type", "If-None-Match", "Range",
]  # fmt: skip
known_name = st.sampled_from(HOP_NAMES + OTHER_NAMES).flatmap(
    lambda name: st.sampled_from([name, name.lower(), name.upper()])
)
header_name = st.one_of(
    known_name,
    known_name,
    known_name,
    known_name,
    known_name,
    st.from_regex(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,15}", fullmatch=True),
    st.sampled_from(["X Bad", "X-Bad ", "", "X\x00", "X-\xe9"]),
)
printable = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.just("\t"), max_size=30
)
generic_value = st.one_of(
    printable.map(str.encode),
    printable.map(str.encode),
    printable.map(str.encode),
    st.sampled_from(["caf\u00e9", "\u2603"]).map(str.encode),
    st.binary(max_size=12).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b"")),
)
cookie_pair = st.sampled_from(
    [b"bff-demo=" + SESSION_COOKIE.encode(), b"bff-demo=garbage", b"__Host-bff-demo=x",
     b"bff-other=1", b"BFF-demo=2", b"__HOST-bff-demo=3", b"bff-demo.0=2~a", b"other=1",
     b"theme=dark", b"bff-x", b"=v", b" spaced = 1 "]
)  # fmt: skip


SPECIAL = {
    "connection", "cookie", "authorization", "x-forwarded-for", "x-forwarded-proto",
    "x-forwarded-host", "forwarded", "x-request-id", "expect", "upgrade", "host",
}  # fmt: skip


def special_value(name: str) -> st.SearchStrategy[bytes]:
    lower = name.lower()
    if lower == "connection":
        names = st.sampled_from(HOP_NAMES + OTHER_NAMES + ["close", "keep-alive", "x-custom"])
        return st.lists(names, min_size=1, max_size=4).map(lambda ns: ", ".join(ns).encode())
    if lower == "cookie":
        return st.lists(cookie_pair, min_size=1, max_size=4).map(b"; ".join)
    if lower == "authorization":
        return st.sampled_from([f"Bearer {CLIENT_TOKEN}".encode(), b"Basic dXNlcjpwYXNz"])
    if lower.startswith("x-forwarded") or lower == "forwarded":
        return st.sampled_from([b"6.6.6.6", b"evil.example", b"https", b"for=1.2.3.4", b""])
    if lower == "x-request-id":
        return st.sampled_from([b"client-id-1", b"bad id", b"a" * 200, b"ok:1.2_3-4"])
    if lower == "expect":
        return st.sampled_from([b"100-continue", b"100-Continue", b"nothing"])
    if lower == "upgrade":
        return st.sampled_from([b"websocket", b"h2c"])
    if lower == "host":
        return st.sampled_from([b"gw.example", b"evil.example", b"", b"127.0.0.1:1"])
    return generic_value


header = header_name.flatmap(lambda name: st.tuples(st.just(name), special_value(name)))
tame_header = st.one_of(
    known_name, st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True)
).flatmap(
    lambda name: st.tuples(
        st.just(name),
        special_value(name) if name.lower() in SPECIAL else printable.map(str.encode),
    )
)
SMUGGLED = b"GET /api/open/SMUGGLED HTTP/1.1\r\nHost: gw\r\n\r\n"
body = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    st.just(SMUGGLED),
    st.builds(lambda a, b: a + SMUGGLED + b, st.binary(max_size=20), st.binary(max_size=20)),
    st.builds(lambda n: b"x" * n, st.integers(MAX_BODY - 2, MAX_BODY + 2)),
)
TE_SPELLINGS = [
    b"chunked", b"Chunked", b"CHUNKED", b"chunked ", b" chunked", b"chunked, chunked",
    b"gzip, chunked", b"chunked, gzip", b"xchunked", b"chunked;q=1", b"identity, chunked",
    b"\tchunked", b"chu\x00nked", b"chunk",
]  # fmt: skip


def chunked(data: bytes, cuts: list[int], extension: bytes) -> bytes:
    out, start = b"", 0
    for cut in sorted({min(c, len(data)) for c in cuts} | {len(data)}):
        if cut > start:
            out += f"{cut - start:x}".encode() + extension + b"\r\n" + data[start:cut] + b"\r\n"
            start = cut
    return out + b"0\r\n\r\n"


@dataclass
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # as sent, framing included
    body: bytes  # the payload the framing carries (if the gateway honours it)
    framing: str

    def head(self) -> bytes:
        head = b"".join(name + b": " + value + b"\r\n" for name, value in self.headers)
        return self.method + b" " + self.target + b" " + self.version + b"\r\n" + head + b"\r\n"

    def values(self, name: str) -> list[bytes]:
        return [v.strip(b" \t") for k, v in self.headers if k.lower() == name.lower().encode()]


@st.composite
def hostile_request(draw: st.DrawFn) -> tuple[Request, bytes]:
    # A third of the requests are hostile everywhere at once (most die in the
    # parser); the others keep a valid request line, header syntax and framing, so that
    # hostile targets, header sets and bodies reach the upstream side too.
    wild = draw(one_in(3))
    methods = [b"GET"] * 4 + [b"POST"] * 3 + [b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"]
    if wild:
        methods += [b"get", b"FOO", b"CONNECT", b"TRACE"]
    method = draw(st.sampled_from(methods))
    versions = [b"HTTP/1.1"] * 6 + [b"HTTP/1.0"]
    version = draw(st.sampled_from([*versions, b"HTTP/2.0", b"HTTP/1.2"] if wild else versions))
    headers: list[tuple[bytes, bytes]] = []
    if not draw(one_in(10)):
        headers.append((b"Host", b"gw.example"))
    for name, value in draw(st.lists(header if wild else tame_header, max_size=8)):
        headers.append((name.encode("utf-8"), value))
    if draw(st.booleans()):
        headers.append((b"Cookie", b"bff-demo=" + SESSION_COOKIE.encode()))
    if draw(st.booleans()):
        headers.append((b"X-CSRF", b"1"))
    headers = [h for h in headers if h[0].lower() not in (b"content-length", b"transfer-encoding")]
    payload = draw(body)
    framings = ["none"] * 4 + ["length"] * 4 + ["chunked"] * 3
    if wild:
        framings += ["te-spelling", "te-and-length", "two-lengths", "length-list", "signed-length"]
    framing = draw(st.sampled_from(framings))
    if framing == "none":
        payload, sent = b"", b""
    elif framing == "length":
        headers.append((b"Content-Length", str(len(payload)).encode()))
        sent = payload
    elif framing in ("chunked", "te-spelling", "te-and-length"):
        cuts = draw(st.lists(st.integers(0, len(payload)), max_size=3))
        extension = draw(st.sampled_from([b"", b"", b";a=b", b";x", b" ;y"]))
        sent = chunked(payload, cuts, extension)
        spelling = b"chunked" if framing != "te-spelling" else draw(st.sampled_from(TE_SPELLINGS))
        headers.append((b"Transfer-Encoding", spelling))
        if framing == "te-and-length":
            headers.append(
                (b"Content-Length", str(len(draw(st.sampled_from([sent, payload])))).encode())
            )
    elif framing == "two-lengths":
        other = draw(st.sampled_from([len(payload), len(payload) + 1, 0]))
        headers += [(b"Content-Length", str(len(payload)).encode()),
                    (b"Content-Length", str(other).encode())]  # fmt: skip
        sent = payload
    elif framing == "length-list":
        headers.append((b"Content-Length", f"{len(payload)}, {len(payload)}".encode()))
        sent = payload
    else:
        headers.append((b"Content-Length", f"+{len(payload)}".encode()))
        sent = payload
    # Shuffle so that framing and Host are not always where a parser expects them.
    order = draw(st.permutations(range(len(headers))))
    headers = [headers[i] for i in order]
    request = Request(
        method, draw(target if wild else origin_target()), version, headers, payload, framing
    )
    return request, request.head() + sent


# -- the oracle: SPEC §4 -------------------------------------------------------------------

HOP_BY_HOP = {name.lower() for name in HOP_NAMES} | {"transfer-encoding"}
SET_BY_GATEWAY = {"host", "expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                  "forwarded", "x-request-id", "cookie", "content-length"}  # fmt: skip
# Names the gateway sets (``bff-<provider>``, ``__Host-bff-<provider>`` when secure) and
# the lower-case prefix spelling; cookie names are otherwise case-sensitive.
GATEWAY_COOKIE = re.compile(rb"^(__Host-|__host-)?bff-")


def must_refuse(target: bytes) -> bool:
    """SPEC §4's list of targets that get 400 before any upstream call."""
    if not target.startswith(b"/") or target.startswith(b"//") or b"#" in target:
        return True
    if re.search(rb"[\x00-\x1f\x7f]", target):
        return True
    path = target.partition(b"?")[0]
    once = unquote_to_bytes(path)
    if b"\\" in once or re.search(rb"[\x00-\x1f\x7f]", once):
        return True
    return any(seg.lower() in (b".", b"..") for seg in re.split(rb"[/\\]", once))


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 §5.2.4, on '/'-separated segments."""
    out: list[bytes] = []
    for seg in path.split(b"/"):
        if seg == b"..":
            if len(out) > 1:
                out.pop()
        elif seg != b".":
            out.append(seg)
    return b"/".join(out)


def resolved(path: bytes) -> bytes:
    """The path as the most credulous upstream reads it: decoded three times,
    backslashes as slashes, `;params` dropped, dot segments resolved."""
    for _ in range(3):
        path = unquote_to_bytes(path)
    path = path.replace(b"\\", b"/")
    path = b"/".join(seg.split(b";", 1)[0] for seg in path.split(b"/"))
    return remove_dot_segments(path)


def route_for(path: bytes) -> RouteSpec | None:
    for spec in ROUTES:
        if path == spec.prefix or path.startswith(spec.prefix + b"/"):
            return spec
    return None


def expected_target(spec: RouteSpec, path: bytes, raw_query: bytes) -> bytes:
    remainder = path[len(spec.prefix) :]
    upstream = spec.base.rstrip(b"/") + remainder if remainder else spec.base
    if spec.inject_query:
        names = {name for name in spec.inject_query}
        pairs = [
            pair
            for pair in raw_query.split(b"&")
            if pair and unquote_plus(pair.split(b"=", 1)[0].decode("latin-1")) not in names
        ]
        pairs += [
            f"{quote(n, safe='')}={quote(v, safe='')}".encode()
            for n, v in spec.inject_query.items()
        ]
        raw_query = b"&".join(pairs)
    return upstream + (b"?" + raw_query if raw_query else b"")


def utf8(value: bytes) -> bool:
    """Whether the gateway passes the value on: a value that is not UTF-8 would lose
    bytes in aiohttp's header writer, so it is dropped instead (README)."""
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def connection_named(headers: list[tuple[bytes, bytes]]) -> set[str]:
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named |= {t.strip().lower() for t in value.decode("latin-1").split(",") if t.strip()}
    return named


def expected_headers(
    request: Request, spec: RouteSpec, upstream_host: bytes
) -> dict[str, list[bytes]]:
    """Every header the upstream must get, by lower-case name, values in order
    (framing aside: the body is checked on its own)."""
    named = connection_named(request.headers)
    dropped = HOP_BY_HOP | SET_BY_GATEWAY | named | {"x-csrf"}
    dropped |= {name.lower() for name in spec.inject_headers}
    if spec.auth:
        dropped.add("authorization")
    out: dict[str, list[bytes]] = {}
    for name, value in request.headers:
        lower = name.decode("latin-1").lower()
        if lower not in dropped and utf8(value):
            out.setdefault(lower, []).append(value.strip(b" \t"))
    if spec.forward_cookies and "cookie" not in named:
        kept = [
            pair.strip()
            for line in request.values("Cookie")
            for pair in line.split(b";")
            if pair.split(b"=", 1)[0].strip()
            and not GATEWAY_COOKIE.match(pair.split(b"=", 1)[0].strip())
            and utf8(pair)
        ]
        if kept:
            out["cookie"] = [b"; ".join(kept)]
    hosts = request.values("Host")
    out["x-forwarded-for"] = [b"127.0.0.1"]
    out["x-forwarded-proto"] = [b"http"]
    out["x-forwarded-host"] = [hosts[0] if hosts and utf8(hosts[0]) else b""]
    client_ids = request.values("X-Request-Id")
    if client_ids and re.fullmatch(rb"[A-Za-z0-9._:-]{1,128}", client_ids[0]):
        out["x-request-id"] = [client_ids[0]]
    for name, value in spec.inject_headers.items():
        out[name.lower()] = [value.encode()]
    if spec.auth:
        out["authorization"] = [f"Bearer {ACCESS_TOKEN}".encode()]
    out["host"] = [upstream_host]
    return out


def check_forwarded(request: Request, seen: Seen, reply: Reply, upstream_host: bytes) -> None:
    """What reached the upstream is exactly what SPEC §4.1 makes of ``request``."""
    assert not must_refuse(request.target), request.target
    path, _, raw_query = request.target.partition(b"?")
    spec = route_for(path)
    assert spec is not None, f"forwarded a request no route matches: {request.target!r}"
    assert seen.method == request.method and seen.version == b"HTTP/1.1"
    assert seen.method not in (b"CONNECT", b"TRACE"), "a tunnel or an echo of our credentials"
    assert seen.target == expected_target(spec, path, raw_query), (seen.target, request.target)
    up_path = seen.target.partition(b"?")[0]
    assert resolved(up_path).startswith(spec.base), f"escapes {spec.base!r}: {seen.target!r}"
    assert b"SMUGGLED" not in seen.target
    got: dict[str, list[bytes]] = {}
    for name, value in seen.headers:
        lower = name.decode("latin-1").lower()
        if lower not in ("content-length", "transfer-encoding"):
            got.setdefault(lower, []).append(value)
    want = expected_headers(request, spec, upstream_host)
    if "x-request-id" not in want:  # a fresh one: 32 hex digits
        assert re.fullmatch(rb"[0-9a-f]{32}", got.get("x-request-id", [b""])[0]), got
        want["x-request-id"] = got["x-request-id"]
    assert got == want, (request.headers, seen.headers)
    # Only the gateway's own framing, and the body whole.
    assert seen.values("Transfer-Encoding") in ([], [b"chunked"])
    lengths = seen.values("Content-Length")
    assert len(lengths) <= 1 and not (lengths and seen.values("Transfer-Encoding"))
    if lengths:
        assert int(lengths[0]) == len(seen.body)
    if seen.body or request.body:
        assert seen.body == request.body, (request.framing, request.headers)
    if spec.auth:
        cookies = b"; ".join(request.values("Cookie"))
        assert SESSION_COOKIE.encode() in cookies, "a session route forwarded without a session"
        if request.method in (b"POST", b"PUT", b"PATCH", b"DELETE"):
            assert any(v.strip() for v in request.values("X-CSRF"))


# -- the properties ------------------------------------------------------------------------

SECRETS = [ACCESS_TOKEN, SESSION_COOKIE, INJECTED_HEADER, INJECTED_QUERY,
           quote(INJECTED_QUERY, safe=""), quote_plus(INJECTED_QUERY)]  # fmt: skip


@fuzz_settings(500)
@given(hostile_request())
async def test_hostile_requests_reach_the_upstream_only_as_spec_4_1_says(
    harness: Harness, case: tuple[Request, bytes]
) -> None:
    request, wire = case
    upstream = harness.upstream
    upstream.reset()
    reply = await exchange(harness, wire, request.method)
    outcome = (
        "closed"
        if reply is None
        else f"{reply.status} from the " + ("upstream" if reply.values(MARKER) else "gateway")
    )
    event(outcome)
    assert not upstream.stray, (
        f"the upstream got bytes that were not one request: {upstream.stray!r}"
    )
    assert len(upstream.seen) <= 1, [seen.target for seen in upstream.seen]
    if reply is None:  # the gateway closed without answering: nothing may have gone through
        assert not upstream.seen
        return
    raw = repr(reply.headers).encode() + reply.body
    for secret in SECRETS:
        assert secret.encode() not in raw, f"{secret!r} reached the browser"
    if reply.interim:
        assert reply.interim == [100], reply.interim
        assert any(v.lower() == b"100-continue" for v in request.values("Expect"))
    if reply.values(MARKER):  # the upstream's answer, relayed
        (seen,) = upstream.seen
        assert seen.complete
        assert reply.status == 200
        assert reply.body == (b"" if request.method == b"HEAD" else upstream.answer.body)
        check_forwarded(request, seen, reply, f"127.0.0.1:{upstream.port}".encode())
        return
    if reply.status < 400 and request.target.startswith(b"/auth/"):
        assert reply.values("Content-Type")[0].startswith("application/json")
        assert not upstream.seen  # /auth/P/session and logout answer themselves
        return
    code = assert_gateway_error(reply, request.method)
    if request.method in (b"CONNECT", b"TRACE"):
        assert reply.status in (400, 405, 414, 431) and not upstream.seen
    elif must_refuse(request.target):
        assert code in ("bad_request", "") and reply.status in (400, 414, 431), (reply.status, code)
        assert not upstream.seen
    # An error after the upstream was called is the upstream's fault, or a body the
    # gateway stopped streaming: whatever arrived must never look complete.
    for seen in upstream.seen:
        if seen.complete:
            check_forwarded(request, seen, reply, f"127.0.0.1:{upstream.port}".encode())


# -- hostile upstream responses: SPEC §4.2 -------------------------------------------------

NAMED_BY_CONNECTION = ["X-Named", "X-Named-Too", "Location", "Set-Cookie", "X-Echo"]
SET_COOKIE_NAMES = [
    "bff-demo", "__Host-bff-demo", "__HOST-BFF-demo", "__host-bff-x", "BFF-demo", "bff-",
    "bffx", "other", "__Host-other", " bff-demo", "bff-demo.0",
]  # fmt: skip
SECRET_FORMS = {
    "open": [INJECTED_HEADER],
    "q": [INJECTED_QUERY, quote(INJECTED_QUERY, safe=""), quote_plus(INJECTED_QUERY)],
}
response_value = st.one_of(
    printable.map(str.encode),
    printable.map(str.encode),
    st.sampled_from(["caf\u00e9".encode(), b"caf\xe9", b"\x80", b"a\xff\xfeb"]),
)


@st.composite
def response_header(draw: st.DrawFn, route: str) -> tuple[bytes, bytes]:
    kind = draw(st.sampled_from(["hop", "connection", "set-cookie", "location", "echo", "plain"]))
    if kind == "hop":
        name = draw(st.sampled_from([n for n in HOP_NAMES if n != "Connection"]))
        return draw(st.sampled_from([name, name.lower(), name.upper()])).encode(), draw(
            response_value
        )
    if kind == "connection":
        names = draw(st.lists(st.sampled_from(NAMED_BY_CONNECTION), min_size=1, max_size=3))
        return b"Connection", ", ".join(names).encode()
    if kind == "set-cookie":
        name = draw(st.sampled_from(SET_COOKIE_NAMES))
        return b"Set-Cookie", f"{name}=v{draw(st.integers(0, 9))}; Path=/; HttpOnly".encode()
    if kind == "location":
        pairs = draw(
            st.lists(
                st.sampled_from(
                    [
                        "a=1",
                        "appid=" + quote(INJECTED_QUERY, safe=""),
                        "appid=short",
                        "APPID=x",
                        "app%69d=y",
                        "b=" + quote_plus(INJECTED_QUERY),
                        "c",
                    ]
                ),
                max_size=4,
            )
        )
        fragment = draw(st.sampled_from(["", "#top", "#appid=x"]))
        name = draw(st.sampled_from([b"Location", b"Content-Location", b"location"]))
        query = ("?" + "&".join(pairs)) if pairs else ""
        return name, f"/next/path{query}{fragment}".encode()
    if kind == "echo":
        secret = draw(st.sampled_from(SECRET_FORMS[route]))
        return draw(st.sampled_from([b"X-Echo", b"WWW-Authenticate", b"Link"])), (
            f"seen {secret} here".encode()
        )
    name = draw(st.sampled_from(["X-Named", "X-Named-Too", "X-Plain", "Cache-Control", "ETag"]))
    return name.encode(), draw(response_value)


def expected_response_headers(
    upstream: list[tuple[bytes, bytes]], route: str
) -> dict[str, list[str]]:
    """What SPEC §4.2 and the README leave of the upstream's headers, by name."""
    named = connection_named(upstream)
    kept: list[tuple[str, str]] = []
    for raw_name, raw_value in upstream:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1").strip(" \t")
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or not utf8(raw_value):
            continue
        if lower == "set-cookie" and GATEWAY_SET_COOKIE.match(value.split("=", 1)[0].strip()):
            continue
        if route == "q" and lower in ("location", "content-location") and "?" in value:
            base, _, rest = value.partition("?")
            query, mark, fragment = rest.partition("#")
            pairs = [
                p for p in query.split("&") if p and unquote_plus(p.split("=", 1)[0]) != "appid"
            ]
            value = base + ("?" + "&".join(pairs) if pairs else "") + mark + fragment
        kept.append((lower, value))
    leaking = {n for n, v in kept if any(secret in v for secret in SECRET_FORMS[route])}
    out: dict[str, list[str]] = {}
    for lower, value in kept:
        if lower not in leaking:
            out.setdefault(lower, []).append(value)
    return out


# Browsers compare the __Host- prefix without regard to case, so the gateway does too.
GATEWAY_SET_COOKIE = re.compile(r"^(__host-)?bff-", re.IGNORECASE)
ADDED_BY_THE_SERVER = {"date", "server", "content-length", "connection", "transfer-encoding"}


@fuzz_settings(150)
@given(st.sampled_from(["open", "q"]).flatmap(
    lambda route: st.tuples(st.just(route), st.lists(response_header(route), max_size=8))
))  # fmt: skip
async def test_hostile_upstream_headers_are_rewritten_as_spec_4_2_says(
    harness: Harness, case: tuple[str, list[tuple[bytes, bytes]]]
) -> None:
    route, headers = case
    upstream = harness.upstream
    upstream.reset(Answer(headers=headers, body=b"the body"))
    request = f"GET /api/{route}/x?a=1 HTTP/1.1\r\nHost: gw.example\r\n\r\n".encode()
    reply = await exchange(harness, request, b"GET")
    assert reply is not None and reply.values(MARKER), reply
    assert reply.status == 200 and reply.body == b"the body"
    got: dict[str, list[str]] = {}
    for name, value in reply.headers:
        if name.lower() not in ADDED_BY_THE_SERVER:
            got.setdefault(name.lower(), []).append(value)
    framing = [(b"X-Upstream-Answer", b"1"), *headers, (b"Content-Type", b"text/plain")]
    assert got == expected_response_headers(framing, route), headers
    assert reply.values("Connection") in ([], ["keep-alive"], ["close"])
    everything = repr(reply.headers)
    for secret in SECRET_FORMS[route]:
        assert secret not in everything


# -- what the fuzz runs found (each failed before the fix) -----------------------------------


@pytest.mark.parametrize(
    "request_line",
    [
        b"CONNECT /api/open/x HTTP/1.1",
        b"CONNECT /api/auth/x HTTP/1.1",
        b"TRACE /api/auth/x HTTP/1.1",
    ],
)
async def test_connect_and_trace_are_never_forwarded(harness: Harness, request_line: bytes) -> None:
    # Before: CONNECT with an origin-form target went upstream with the rest of the
    # client's stream as a chunked body and came back as an unframed tunnel answer;
    # TRACE went upstream with the injected Authorization for it to echo.
    cookie = b"Cookie: bff-demo=" + SESSION_COOKIE.encode() + b"\r\n"
    harness.upstream.reset()
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    try:
        writer.write(request_line + b"\r\nHost: gw.example\r\n" + cookie + b"X-CSRF: 1\r\n\r\n")
        reply = await asyncio.wait_for(read_reply(reader, b"GET"), timeout=10)
        assert reply is not None
        assert assert_gateway_error(reply, b"GET") == "method_not_allowed"
        assert reply.status == 405 and "GET" in reply.values("Allow")[0]
        if request_line.startswith(b"CONNECT"):  # its "body" is the rest of the stream
            assert await asyncio.wait_for(reader.read(), timeout=10) == b""
    finally:
        writer.close()
        await harness.upstream.settle()
    assert harness.upstream.seen == []


@pytest.mark.parametrize(
    ("version", "answer"),
    [
        (b"HTTP/2.0", b"HTTP/1.1 200 "),
        (b"HTTP/1.2", b"HTTP/1.0 400 "),
        (b"HTTP/9.9", b"HTTP/1.0 400 "),
    ],
)  # llhttp itself refuses 1.2 and 9.9; it takes 2.0
async def test_an_answer_never_claims_another_http_version(
    harness: Harness, version: bytes, answer: bytes
) -> None:
    # Before: aiohttp echoed the request's version ("HTTP/2.0 200") on an HTTP/1 connection.
    harness.upstream.reset()
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    try:
        writer.write(b"GET /api/open/x " + version + b"\r\nHost: gw.example\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert head.startswith(answer), head
        await asyncio.wait_for(reader.read(), timeout=10)  # and the connection closes
    finally:
        writer.close()
        await harness.upstream.settle()


async def test_every_location_line_loses_the_injected_query(harness: Harness) -> None:
    # Before: only the first Location line was rewritten, and assigning it replaced
    # the others; a second line kept `appid=` (a short key is never caught by value).
    harness.upstream.reset(
        Answer(
            headers=[
                (b"Location", b"/next?a=1"),
                (b"Location", b"/other?appid=abc&b=2"),
                (b"Content-Location", b"/c"),
                (b"Content-Location", b"/d?appid=x#f"),
            ]
        )
    )
    reply = await exchange(harness, b"GET /api/q/x HTTP/1.1\r\nHost: gw.example\r\n\r\n", b"GET")
    assert reply is not None and reply.status == 200
    assert reply.values("Location") == ["/next?a=1", "/other?b=2"]
    assert reply.values("Content-Location") == ["/c", "/d#f"]


async def test_header_values_that_are_not_utf8_are_not_passed_on(harness: Harness) -> None:
    # Before: aiohttp's header writer skipped their non-UTF-8 bytes, so `caf\xe9`
    # reached the upstream as `caf`, and a cookie named `\x80bff-demo` as `bff-demo`
    # (the gateway's own name); the same in responses.
    harness.upstream.reset(
        Answer(headers=[(b"X-Obs", b"caf\xe9"), (b"X-Ok", "caf\u00e9".encode())])
    )
    request = (
        b"GET /api/open/x HTTP/1.1\r\nHost: gw.example\r\nX-Obs: caf\xe9\r\n"
        b"X-Ok: caf\xc3\xa9\r\nCookie: \x80bff-demo=sealed; theme=dark\r\n\r\n"
    )
    reply = await exchange(harness, request, b"GET")
    assert reply is not None and reply.status == 200
    (seen,) = harness.upstream.seen
    assert seen.values("X-Obs") == [] and seen.values("X-Ok") == ["caf\u00e9".encode()]
    assert seen.values("Cookie") == [b"theme=dark"]
    assert reply.values("X-Obs") == [] and reply.values("X-Ok") == [
        "caf\u00e9".encode().decode("latin-1")
    ]
