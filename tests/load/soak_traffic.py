"""The traffic of `make soak` (driven by soak.py; not a pytest module).

Virtual users, each an endless loop over a weighted mix of scenarios until the
run ends, plus the fault upstream the gateway's ``/faults/`` route points at.
Every answer is judged against what that scenario must get, and counted in a
:class:`Tally`:

* ``api``: session calls (GET and POST, sometimes four at once with one cookie)
  across access-token expiry, so the gateway refreshes (rotating refresh tokens,
  reuse detection at the demo API); now and then a logout and a new login;
* ``sse``: a server-sent-events stream, sometimes dropped after the first event;
* ``upload`` / ``download``: streamed bodies checked by SHA-256 and length;
  downloads sometimes read slowly or dropped midway;
* ``slow_head`` / ``slow_body``: raw sockets trickling a head, or going silent
  mid-body: the gateway's header_timeout / body_timeout must answer 408
  ``request_timeout`` and close; ``trickle_ok`` sends a body slowly but within
  body_timeout and must get its 200;
* ``upstream_5xx``: the demo API answers 500/502/503/504 itself; the gateway
  must pass each through unchanged (the upstream's body, not the gateway's JSON);
* ``fault``: the upstream resets, closes, hangs, answers garbage, cuts a body,
  or refuses the connection: the gateway answers 502 ``upstream_unavailable`` /
  504 ``upstream_timeout`` (or, once the body has started, ends the response).

A 5xx carrying the gateway's own error JSON (SPEC §4.4) that its scenario does
not expect is counted as the gateway's own 5xx: 500 ``internal_error``, 503
``overloaded``/``store_unavailable``/``refresh_unavailable`` while the provider
is healthy, or a 502/504 on a route whose upstream is healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

CSRF = {"X-CSRF": "1"}
LOGIN = {"username": "demo", "password": "demo"}
# What the gateway may answer for an upstream fault (SPEC §4.4): these 5xx are the
# upstream's failure told apart, not the gateway's own.
FAULT_ERRORS = frozenset({(502, "upstream_unavailable"), (504, "upstream_timeout")})
PASSTHROUGH_STATUSES = (500, 502, 503, 504)
KEEP_EXAMPLES = 20  # descriptions kept per failure kind (the counts are complete)

# Scenario weights: mostly ordinary API traffic, a steady trickle of everything else.
WEIGHTS: dict[str, int] = {
    "api": 40,
    "relogin": 3,
    "sse": 8,
    "upload": 6,
    "download": 6,
    "slow_head": 3,
    "slow_body": 3,
    "trickle_ok": 2,
    "upstream_5xx": 5,
    "fault": 7,
}
FAULTS = ("reset", "close", "garbage", "hang", "cut", "refused", "ok")


# -- judging answers -------------------------------------------------------------------


def gateway_error(body: bytes) -> str | None:
    """The code of the gateway's own error JSON (SPEC §4.4), or None for any other body."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(data, dict) and set(data) == {"error", "message"}:
        code = data["error"]
        return code if isinstance(code, str) else None
    return None


@dataclass
class Tally:
    """Every outcome of the run, plus what the current sampling interval saw."""

    outcomes: Counter[str] = field(default_factory=Counter)
    gateway_5xx: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    requests: int = 0
    latencies: list[float] = field(default_factory=list)  # every quick API call (s)
    # Reset at every sample: requests answered and quick-API-call latencies (s).
    interval_requests: int = 0
    interval_latencies: list[float] = field(default_factory=list)

    def _example(self, kind: str, text: str) -> None:
        kept = self.examples.setdefault(kind, [])
        if len(kept) < KEEP_EXAMPLES:
            kept.append(text)

    def answered(self) -> None:
        self.requests += 1
        self.interval_requests += 1

    def ok(self, what: str) -> None:
        self.outcomes[what] += 1

    def bad(self, scenario: str, what: str) -> None:
        """An outcome its scenario must never get (a wrong status, body, a broken stream)."""
        self.unexpected[scenario] += 1
        self._example("unexpected", f"{scenario}: {what}")

    def judge(
        self,
        scenario: str,
        status: int,
        body: bytes,
        expected: bool,
        label: str,
        faults: frozenset[tuple[int, str]] = frozenset(),
    ) -> bool:
        """Count one HTTP answer; True when it is what ``scenario`` must get.

        ``faults`` are the gateway error answers this scenario's upstream failure
        explains; any other 5xx with the gateway's error JSON is its own."""
        self.answered()
        code = gateway_error(body) if status >= 400 else None
        if status >= 500 and code is not None and (status, code) not in faults:
            self.gateway_5xx[f"{status} {code}"] += 1
            self._example("gateway_5xx", f"{scenario}: {status} {code}")
            return False
        if not expected:
            detail = f"{status} {code}" if code else f"{status} {body[:80]!r}"
            self.bad(scenario, f"{label}: {detail}")
            return False
        self.ok(label)
        return True

    def latency(self, seconds: float) -> None:
        self.latencies.append(seconds)
        self.interval_latencies.append(seconds)

    def take_interval(self) -> tuple[int, list[float]]:
        taken = (self.interval_requests, self.interval_latencies)
        self.interval_requests, self.interval_latencies = 0, []
        return taken


# -- the fault upstream ------------------------------------------------------------------

CUT_DECLARED = 1024 * 1024
CUT_SENT = 64 * 1024


class FaultUpstream:
    """A raw HTTP/1.1 server whose paths misbehave on purpose (``/reset`` ...)."""

    def __init__(self, sock: socket.socket, hang_limit: float = 30) -> None:
        self.sock = sock
        self.hang_limit = hang_limit
        self.server: asyncio.Server | None = None
        self.seen: Counter[str] = Counter()
        self._connections: dict[asyncio.StreamWriter, asyncio.Task[None] | None] = {}

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, sock=self.sock)

    async def close(self) -> None:
        """Stop listening and hang up on the gateway's pooled connections."""
        if self.server is not None:
            self.server.close()
        for writer in self._connections:
            writer.transport.abort()
        handlers = [task for task in self._connections.values() if task is not None]
        await asyncio.wait(handlers, timeout=5) if handlers else None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections[writer] = asyncio.current_task()
        try:
            while await self._one(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.transport.abort()
            del self._connections[writer]

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is done."""
        head = await reader.readuntil(b"\r\n\r\n")
        target = head.split(b"\r\n", 1)[0].split(b" ")[1]
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                await reader.readexactly(int(value))
        action = target.split(b"?", 1)[0].rsplit(b"/", 1)[-1].decode("ascii", "replace")
        self.seen[action] += 1
        if action == "ok":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
            )
            await writer.drain()
            return True
        if action == "reset":
            _linger_zero(writer)  # close with RST, not FIN
        elif action == "garbage":
            writer.write(b"HTTP/1.1 2OO FINE\r\nContent-Length: nope\r\n\r\n")
            await writer.drain()
        elif action == "hang":
            # Until the gateway gives up (its read timeout) and closes its end.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(), self.hang_limit)
        elif action == "cut":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                + f"Content-Length: {CUT_DECLARED}\r\n\r\n".encode()
                + bytes(CUT_SENT)
            )
            await writer.drain()
            _linger_zero(writer)
        # "close" and anything else: hang up without an answer.
        return False


def _linger_zero(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- raw-socket clients -------------------------------------------------------------------


class _Raw(asyncio.Protocol):
    """Keeps every byte the gateway sent, even if the connection then resets
    (a StreamReader would raise the reset instead of handing over its buffer)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = asyncio.Event()
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def parse_raw(data: bytes) -> tuple[int, bytes]:
    """(status, body) of the first response in ``data``; (0, b"") if there is none."""
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        return 0, b""
    return int(parts[1]), body


# -- the users ------------------------------------------------------------------------------


class Rotation:
    """Which fault and which upstream status come next, shared by all users: taken in
    turn rather than at random, so that even a short run meets every one of them."""

    def __init__(self) -> None:
        self._faults = itertools.cycle(FAULTS)
        self._statuses = itertools.cycle(PASSTHROUGH_STATUSES)

    def fault(self) -> str:
        return next(self._faults)

    def status(self) -> int:
        return next(self._statuses)


@dataclass(frozen=True)
class Setup:
    host: str
    port: int  # the gateway's public port
    header_timeout: float
    body_timeout: float
    margin: float = 10.0  # on top of a deadline before a slow client calls it a hang

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"


class User:
    """One browser: its own cookie jar and connections, one action at a time."""

    def __init__(self, setup: Setup, tally: Tally, rng: random.Random, rotation: Rotation) -> None:
        self.setup = setup
        self.tally = tally
        self.rng = rng
        self.rotation = rotation
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # cookies for 127.0.0.1
            timeout=aiohttp.ClientTimeout(total=60),
        )
        self.logged_in = False
        self.scenarios: dict[str, Callable[[], Awaitable[None]]] = {
            "api": self.api,
            "relogin": self.relogin,
            "sse": self.sse,
            "upload": self.upload,
            "download": self.download,
            "slow_head": self.slow_head,
            "slow_body": self.slow_body,
            "trickle_ok": self.trickle_ok,
            "upstream_5xx": self.upstream_5xx,
            "fault": self.fault,
        }

    async def close(self) -> None:
        await self.http.close()

    async def run(self, stop: asyncio.Event) -> None:
        names, weights = list(WEIGHTS), list(WEIGHTS.values())
        while not stop.is_set():
            name = self.rng.choices(names, weights)[0]
            try:
                if name not in ("slow_head", "slow_body", "trickle_ok") and not self.logged_in:
                    await self.login()
                await self.scenarios[name]()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.tally.answered()
                self.tally.bad(name, f"{type(exc).__name__}: {exc}"[:200])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(0.05, 0.25))

    # -- sessions

    async def login(self) -> None:
        async with self.http.post(
            f"{self.setup.base}/auth/demo/login", json=LOGIN, headers=CSRF
        ) as answer:
            body = await answer.read()
        # The login answer must never carry a token to the browser.
        ok = answer.status == 200 and b"token" not in body
        self.logged_in = self.tally.judge("login", answer.status, body, ok, "login")

    async def relogin(self) -> None:
        async with self.http.post(f"{self.setup.base}/auth/demo/logout", headers=CSRF) as answer:
            body = await answer.read()
        self.tally.judge("relogin", answer.status, body, answer.status == 204, "logout")
        self.logged_in = False
        await self.login()

    async def _call(self, method: str, path: str, **kw: Any) -> None:
        started = time.perf_counter()
        async with self.http.request(method, f"{self.setup.base}{path}", **kw) as answer:
            body = await answer.read()
        self.tally.latency(time.perf_counter() - started)
        want = 201 if method == "POST" else 200
        ok = answer.status == want and body[:1] in (b"{", b"[")
        if not self.tally.judge("api", answer.status, body, ok, "api call"):
            self.logged_in = answer.status != 401

    async def api(self) -> None:
        """Session calls; the access token expires every few seconds, so some of
        them need a refresh, and a burst of four shares one expiry."""
        pick = self.rng.random()
        if pick < 0.2:
            paths = ("/api/demo/items", "/api/demo/user", "/api/demo/items/1", "/api/demo/user")
            await asyncio.gather(*(self._call("GET", path) for path in paths))
        elif pick < 0.35:
            item = {"name": "soak", "status": "new"}
            await self._call("POST", "/api/demo/items", json=item, headers=CSRF)
        else:
            await self._call("GET", self.rng.choice(("/api/demo/items", "/api/demo/user")))

    # -- streams and bodies

    async def sse(self) -> None:
        count = 4
        drop_early = self.rng.random() < 0.25
        url = f"{self.setup.base}/api/demo/events?count={count}&interval=0.25"
        async with self.http.get(url) as answer:
            if answer.status != 200:
                self.tally.judge("sse", answer.status, await answer.read(), False, "stream")
                return
            events = 0
            while events < count:
                line = await answer.content.readline()
                if not line:
                    break
                if line.startswith(b"data: "):
                    events += 1
                    if drop_early:
                        break  # leaving the block mid-stream closes the connection
        self.tally.answered()
        if drop_early and events == 1:
            self.tally.ok("sse dropped by the client after one event")
        elif not drop_early and events == count:
            self.tally.ok("sse stream complete")
        else:
            self.tally.bad("sse", f"{events} of {count} events")

    async def upload(self) -> None:
        size = self.rng.randint(64 * 1024, 1024 * 1024)
        data = self.rng.randbytes(size)

        async def chunks() -> AsyncIterator[bytes]:  # a streamed (chunked) upload
            for start in range(0, size, 64 * 1024):
                yield data[start : start + 64 * 1024]

        headers = {**CSRF, "Content-Type": "application/octet-stream"}
        url = f"{self.setup.base}/api/demo/echo"
        async with self.http.post(url, data=chunks(), headers=headers) as answer:
            body = await answer.read()
        want = {"sha256": hashlib.sha256(data).hexdigest(), "length": size}
        ok = answer.status == 200 and _json_or_none(body) == want
        self.tally.judge("upload", answer.status, body, ok, "upload echoed intact")

    async def download(self) -> None:
        size = self.rng.randint(256 * 1024, 2 * 1024 * 1024)
        style = self.rng.choice(("whole", "whole", "slow", "drop"))
        url = f"{self.setup.base}/api/demo/download?size={size}"
        received = 0
        async with self.http.get(url) as answer:
            if answer.status != 200:
                self.tally.judge("download", answer.status, await answer.read(), False, "download")
                return
            async for chunk in answer.content.iter_chunked(64 * 1024):
                received += len(chunk)
                if style == "slow":
                    await asyncio.sleep(0.01)  # a slow reader: back-pressure through the gateway
                if style == "drop" and received >= 128 * 1024:
                    break  # leaving the block mid-body closes the connection
        self.tally.answered()
        if style == "drop" and received < size:
            self.tally.ok("download dropped by the client midway")
        elif style != "drop" and received == size:
            self.tally.ok(f"download complete ({style})")
        else:
            self.tally.bad("download", f"{style}: {received} of {size} bytes")

    # -- slow clients (raw sockets)

    async def _raw(self) -> _Raw:
        loop = asyncio.get_running_loop()
        _, raw = await loop.create_connection(_Raw, self.setup.host, self.setup.port)
        return raw

    async def _expect_408(self, scenario: str, raw: _Raw, deadline: float, trickle: bytes) -> None:
        """Wait for the gateway to answer and close, trickling ``trickle`` meanwhile."""
        started = time.monotonic()
        limit = deadline + self.setup.margin
        try:
            while not raw.closed.is_set() and time.monotonic() - started < limit:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(raw.closed.wait(), 0.7)
                if not raw.data:
                    raw.send(trickle)
        finally:
            raw.abort()
        if not raw.closed.is_set() or time.monotonic() - started >= limit:
            self.tally.answered()
            self.tally.bad(scenario, f"not cut within {limit:g} s")
            return
        status, body = parse_raw(raw.data)
        ok = status == 408 and gateway_error(body) == "request_timeout"
        self.tally.judge(scenario, status, body, ok, f"{scenario}: 408 request_timeout")

    async def slow_head(self) -> None:
        raw = await self._raw()
        raw.send(b"GET /api/demo/items HTTP/1.1\r\nHost: soak\r\n")
        await self._expect_408("slow_head", raw, self.setup.header_timeout, b"X-Trickle: 1\r\n")

    async def slow_body(self) -> None:
        raw = await self._raw()
        raw.send(
            b"POST /open/echo HTTP/1.1\r\nHost: soak\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 100000\r\n\r\n" + bytes(10_000)
        )
        await self._expect_408("slow_body", raw, self.setup.body_timeout, b"")

    async def trickle_ok(self) -> None:
        """A slow but live upload: every gap is under body_timeout, so it must succeed."""
        pieces = [self.rng.randbytes(1024) for _ in range(4)]
        raw = await self._raw()
        try:
            raw.send(
                b"POST /open/echo HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Length: 4096\r\n\r\n"
            )
            gap = min(0.4, self.setup.body_timeout / 4)
            for piece in pieces:
                await asyncio.sleep(gap)
                raw.send(piece)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(raw.closed.wait(), 30)
        finally:
            raw.abort()
        status, body = parse_raw(raw.data)
        want = {"sha256": hashlib.sha256(b"".join(pieces)).hexdigest(), "length": 4096}
        ok = status == 200 and _json_or_none(body) == want
        self.tally.judge("trickle_ok", status, body, ok, "trickled upload within body_timeout")

    # -- upstream errors

    async def upstream_5xx(self) -> None:
        code = self.rotation.status()
        async with self.http.get(f"{self.setup.base}/api/demo/status/{code}") as answer:
            body = await answer.read()
        ok = answer.status == code and _json_or_none(body) == {"status": code}
        self.tally.judge("upstream_5xx", answer.status, body, ok, f"upstream {code} passed through")

    async def fault(self) -> None:
        action = self.rotation.fault()
        path = "/refused/x" if action == "refused" else f"/faults/{action}"
        async with self.http.get(f"{self.setup.base}{path}") as answer:
            if action == "cut":
                # The body had started: the gateway can only end the response early.
                try:
                    await answer.read()
                except aiohttp.ClientPayloadError:
                    self.tally.answered()
                    self.tally.ok("fault cut: response ended early")
                    return
                self.tally.answered()
                self.tally.bad("fault", "cut: a truncated body ended cleanly")
                return
            body = await answer.read()
        code = gateway_error(body)
        if action == "ok":
            ok, label = answer.status == 200 and body == b"ok", "fault upstream ok"
        elif action == "hang":
            ok, label = (answer.status, code) == (504, "upstream_timeout"), "fault hang: 504"
        else:
            ok = (answer.status, code) == (502, "upstream_unavailable")
            label = f"fault {action}: 502"
        self.tally.judge("fault", answer.status, body, ok, label, FAULT_ERRORS)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
