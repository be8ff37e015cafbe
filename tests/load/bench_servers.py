"""Child processes of ``tests/load/bench.py`` (not a test module: pytest does not collect it).

Run as ``python tests/load/bench_servers.py ROLE ...``:

- ``upstream PORT``: the tiny API every target talks to. ``GET /hello`` answers
  a ~60-byte JSON body (any ``Authorization`` must be a Bearer);
  ``POST /login`` and ``POST /refresh`` answer JWT-looking tokens with a far
  expiry, so a session never needs a refresh during the benchmark.
- ``proxy PORT UPSTREAM_URL``: the baseline, a minimal aiohttp pass-through
  proxy (one ClientSession, streamed body, headers copied naively).
- ``hello PORT``: a low-level ``web.Server`` answering a fixed response (the
  server half of the gateway's ceiling, S).
- ``client URL SECONDS CONCURRENCY WARMUP``: an in-process aiohttp client loop
  (the client half of the ceiling, C); prints ``{"requests": n, "seconds": s}``
  as JSON. ``upstream-client`` does the same with the gateway's own upstream
  client (C').

Every role runs on uvloop when it is installed, like ``bff-gateway run``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HELLO_BODY = b'{"message":"hello, world","service":"bench","ok":true,"n":42}'
TOKEN_SIZE = 800
_FAR_FUTURE = 4_102_444_800  # 2100-01-01: no refresh ever happens in a run


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwt_like(kind: str, size: int = TOKEN_SIZE, serial: int = 0) -> str:
    """A JWT-shaped token of about ``size`` characters with a far ``exp``."""
    header = _b64(b'{"alg":"RS256","typ":"JWT","kid":"bench-key-1"}')
    claims: dict[str, Any] = {
        "sub": "user-0001",
        "name": "Bench User",
        "email": "bench@example.com",
        "preferred_username": "bench",
        "roles": ["reader", "writer"],
        "scope": "openid profile email api",
        "iss": "https://idp.example.com/",
        "aud": "bench-api",
        "typ": kind,
        "jti": f"{kind}-{serial:08d}",
        "iat": 1_700_000_000,
        "exp": _FAR_FUTURE,
    }
    signature = _b64(bytes(range(256)))  # 342 characters, like an RS256 signature
    base = len(header) + len(_b64(json.dumps(claims).encode())) + len(signature) + 2
    claims["pad"] = "x" * max(0, (size - base) * 3 // 4 - 10)
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{header}.{payload}.{signature}"


# -- upstream ----------------------------------------------------------------


def upstream_app() -> web.Application:
    serial = 0

    def tokens() -> dict[str, Any]:
        nonlocal serial
        serial += 1
        return {
            "token": jwt_like("access", serial=serial),
            "refresh_token": jwt_like("refresh", serial=serial),
            "user": {"id": 1, "name": "Bench User"},
        }

    async def hello(request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization")
        if authorization is not None and not authorization.startswith("Bearer "):
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.Response(body=HELLO_BODY, content_type="application/json")

    async def login(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(tokens())

    async def refresh(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(tokens())

    async def echo(request: web.Request) -> web.StreamResponse:
        """WebSocket echo (the WebSocket rows): every message straight back."""
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/ws", echo)
    app.router.add_post("/login", login)
    app.router.add_post("/refresh", refresh)
    return app


# -- baseline proxy ----------------------------------------------------------

_NAIVE_REQUEST_DROP = frozenset({"host", "connection", "keep-alive", "transfer-encoding"})
_NAIVE_RESPONSE_DROP = frozenset({"connection", "keep-alive", "transfer-encoding"})


def proxy_server(upstream: str) -> tuple[web.Server, Callable[[], Awaitable[None]]]:
    """A minimal streaming pass-through proxy: what 'aiohttp itself' costs."""
    state: dict[str, aiohttp.ClientSession] = {}

    def client() -> aiohttp.ClientSession:
        if "client" not in state:
            state["client"] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1024),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return state["client"]

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        headers = [
            (k, v) for k, v in request.headers.items() if k.lower() not in _NAIVE_REQUEST_DROP
        ]
        async with client().request(
            request.method,
            upstream + request.raw_path,
            headers=headers,
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as answer:
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for name, value in answer.headers.items():
                if name.lower() not in _NAIVE_RESPONSE_DROP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def close() -> None:
        if "client" in state:
            await state["client"].close()

    return web.Server(handle, access_log=None, auto_decompress=False), close


# -- hello-world server (S) --------------------------------------------------


def hello_server() -> web.Server:
    async def handle(request: web.BaseRequest) -> web.Response:
        return web.Response(body=HELLO_BODY, content_type="application/json")

    return web.Server(handle, access_log=None)


# -- client loop (C) ---------------------------------------------------------


class Window:
    """The measured window of a client loop: its workers count answers only between
    the warm-up and the end; then they are told to stop and are awaited."""

    def __init__(self) -> None:
        self.counting = False
        self.done = 0
        self.errors = 0
        self.stop = asyncio.Event()

    def count(self, ok: bool) -> None:
        if self.counting:
            if ok:
                self.done += 1
            else:
                self.errors += 1

    async def measure(
        self, tasks: list[asyncio.Task[None]], warmup: float, seconds: float
    ) -> dict[str, Any]:
        await asyncio.sleep(warmup)
        self.counting = True
        start = time.perf_counter()
        await asyncio.sleep(seconds)
        self.counting = False
        elapsed = time.perf_counter() - start
        self.stop.set()
        await asyncio.gather(*tasks)
        return {"requests": self.done, "errors": self.errors, "seconds": elapsed}


async def client_loop(
    url: str, seconds: float, concurrency: int, warmup: float, gateway_client: bool = False
) -> dict[str, Any]:
    """``concurrency`` tasks calling ``url`` with one client: aiohttp's ClientSession
    (set up as the gateway's auth client), or the gateway's own UpstreamClient."""
    from multidict import CIMultiDict
    from yarl import URL

    from gateway.proxy import client_session
    from gateway.upstream_client import CallTimeouts, Endpoint, UpstreamClient

    parsed = URL(url)
    assert parsed.raw_host is not None and parsed.port is not None
    endpoint = Endpoint(parsed.raw_host, parsed.port, None)
    timeouts = CallTimeouts(connect=5, read=60, total=None)
    session = client_session()
    upstream = UpstreamClient()
    window = Window()

    async def call() -> bool:
        if not gateway_client:
            async with session.get(url) as answer:
                await answer.read()
                return answer.status == 200
        headers = CIMultiDict({"Host": parsed.host_port_subcomponent or ""})
        answer = await upstream.request("GET", endpoint, parsed.raw_path, headers, None, timeouts)
        try:
            await answer.content.read()
            return answer.status == 200
        finally:
            answer.release()

    async def worker() -> None:
        while not window.stop.is_set():
            try:
                ok = await call()
            except (aiohttp.ClientError, OSError):
                ok = False
            window.count(ok)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        return await window.measure(tasks, warmup, seconds)
    finally:
        for task in tasks:
            task.cancel()
        await session.close()
        await upstream.close()


# -- WebSocket client loop (the w rows) ----------------------------------------


async def ws_client_loop(
    url: str, seconds: float, concurrency: int, warmup: float, headers: dict[str, str]
) -> dict[str, Any]:
    """``concurrency`` WebSockets, each sending a message and awaiting its echo in a
    loop; counts round trips (two relayed messages each) in the measured window."""
    session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    window = Window()
    payload = HELLO_BODY.decode()

    async def worker(ws: aiohttp.ClientWebSocketResponse) -> None:
        while not window.stop.is_set():
            try:
                await ws.send_str(payload)
                message = await ws.receive()
                ok = message.type is aiohttp.WSMsgType.TEXT and message.data == payload
            except (aiohttp.ClientError, OSError, RuntimeError):
                ok = False
            window.count(ok)
            if not ok:
                return

    sockets = [
        await session.ws_connect(url, headers=headers, compress=0) for _ in range(concurrency)
    ]
    tasks = [asyncio.create_task(worker(ws)) for ws in sockets]
    try:
        return await window.measure(tasks, warmup, seconds)
    finally:
        for task in tasks:
            task.cancel()
        for ws in sockets:
            await ws.close()
        await session.close()


# -- serving -----------------------------------------------------------------


Serving = tuple[web.BaseRunner, Callable[[], Awaitable[None]] | None]


async def _serve(make: Callable[[], Serving], port: int) -> None:
    runner, on_close = make()  # inside the loop: web.Server wants a running one
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await runner.cleanup()
    if on_close is not None:
        await on_close()


def _run(main: Awaitable[Any]) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    # A client that hangs up mid-request makes aiohttp log a traceback: not news here.
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
    role = argv[0]
    if role == "upstream":
        _run(_serve(lambda: (web.AppRunner(upstream_app(), access_log=None), None), int(argv[1])))
    elif role == "proxy":

        def make_proxy() -> Serving:
            server, close = proxy_server(argv[2].rstrip("/"))
            return web.ServerRunner(server), close

        _run(_serve(make_proxy, int(argv[1])))
    elif role == "hello":
        _run(_serve(lambda: (web.ServerRunner(hello_server()), None), int(argv[1])))
    elif role in ("client", "upstream-client"):
        result = _run(
            client_loop(
                argv[1], float(argv[2]), int(argv[3]), float(argv[4]), role == "upstream-client"
            )
        )
        print(json.dumps(result), flush=True)
    elif role == "ws-client":
        headers = json.loads(argv[5]) if len(argv) > 5 else {}
        result = _run(
            ws_client_loop(argv[1], float(argv[2]), int(argv[3]), float(argv[4]), headers)
        )
        print(json.dumps(result), flush=True)
    else:
        print(f"unknown role {role!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
