"""No token ever reaches the browser or the logs (SPEC §5.1, §5.3).

One run exercises everything that touches tokens: failed and successful logins, the session
endpoint, token injection, proactive and reactive refreshes, the grace cache, a body
replay, a rejected refresh, CSRF and cookie errors, and logouts. Every token the upstream
issued is then searched for, whole and as any 16-character piece, in every response header
and body the client received and in every log line the process wrote."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.demo.api import (
    AUTHORITY_KEY,
    DemoStats,
    TokenAuthority,
    create_demo_api,
)
from gateway.observability.logs import ACCESS, JsonFormatter
from gateway.sessions.model import Session
from gateway.sessions.seal import KeyRing, decode_key
from tests.support import TEST_KEY, RunningGateway, config_dict, running_app, running_gateway

# --------------------------------------------------------------------------- helpers
# (kept in this file on purpose: tests/support.py is shared and frozen)

UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def set_cookies(self) -> list[str]:
        return self.headers.getall("Set-Cookie", [])

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        data = self.json()
        assert set(data) == {"error", "message"}, data
        return str(data["error"])


def parse_set_cookie(line: str) -> tuple[str, str, dict[str, str | None]]:
    first, *rest = (part.strip() for part in line.split(";"))
    name, _, value = first.partition("=")
    attrs: dict[str, str | None] = {}
    for attr in rest:
        key, eq, val = attr.partition("=")
        attrs[key.lower()] = val if eq else None
    return name, value, attrs


class Browser:
    """Keeps the cookies the gateway sets and sends them back in one Cookie line."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base
        self.jar: dict[str, str] = {}

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        cookies: dict[str, str] | None = None,
        csrf: bool = True,
    ) -> Reply:
        """``cookies`` replaces the jar for this call (and the jar is then left alone)."""
        sent: dict[str, str] = {}
        if csrf and method in UNSAFE:
            sent["X-CSRF"] = "1"
        jar = self.jar if cookies is None else cookies
        if jar:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
        sent.update(headers or {})
        async with self.http.request(
            method, self.base + path, json=json_body, data=data, headers=sent
        ) as response:
            reply = Reply(response.status, response.headers, await response.read())
        if cookies is None:
            self.absorb(reply)
        return reply

    def absorb(self, reply: Reply) -> None:
        for line in reply.set_cookies:
            name, value, attrs = parse_set_cookie(line)
            if attrs.get("max-age") == "0":
                self.jar.pop(name, None)
            else:
                self.jar[name] = value


@dataclass
class Env:
    upstream: str
    stats: DemoStats
    authority: TokenAuthority
    gateway: RunningGateway
    browser: Browser
    http: aiohttp.ClientSession

    @property
    def hits(self) -> int:
        """Requests that reached a protected resource of the upstream."""
        return self.stats.authorized_requests + self.stats.unauthorized_requests

    def new_browser(self) -> Browser:
        return Browser(self.http, self.gateway.url)


def demo_provider(upstream: str, **over: Any) -> dict[str, Any]:
    return {
        "type": "password",
        "login_url": f"{upstream}/auth/login",
        "refresh_url": f"{upstream}/refresh-token",
        **over,
    }


@contextlib.asynccontextmanager
async def demo_env(
    *,
    access_ttl: float = 300.0,
    refresh_delay: float = 0.0,
    provider: dict[str, Any] | None = None,
    providers: Callable[[str], dict[str, Any]] | None = None,
    session: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    routes: Callable[[str], list[dict[str, Any]]] | None = None,
    setup: Callable[[web.Application], None] | None = None,
    token_padding: int = 0,
    serve: Callable[[web.Application], contextlib.AbstractAsyncContextManager[str]] = running_app,
) -> AsyncIterator[Env]:
    """The demo API as the strict upstream, a gateway with provider ``demo`` and route
    ``/api/`` -> upstream (``auth: demo``), and a browser. ``setup`` may add routes or
    middlewares to the demo app before it starts."""
    stats = DemoStats()
    app = create_demo_api(
        access_ttl=access_ttl,
        stats=stats,
        refresh_delay=refresh_delay,
        token_padding=token_padding,
    )
    authority = app[AUTHORITY_KEY]
    if setup is not None:
        setup(app)
    async with serve(app) as upstream:
        route_list = [{"path": "/api/", "upstream": f"{upstream}/", "auth": "demo"}]
        if routes is not None:
            route_list += routes(upstream)
        provider_map = (
            providers(upstream)
            if providers is not None
            else {"demo": demo_provider(upstream, **(provider or {}))}
        )
        data = config_dict(
            route_list, providers=provider_map, session=session or {}, server=server or {}
        )
        async with (
            running_gateway(data) as gateway,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        ):
            yield Env(upstream, stats, authority, gateway, Browser(http, gateway.url), http)


async def login(browser: Browser, user: str = "demo", provider: str = "demo") -> Reply:
    reply = await browser.call(
        "POST", f"/auth/{provider}/login", json_body={"username": user, "password": user}
    )
    assert reply.status == 200, reply.body
    return reply


def last_pair(stats: DemoStats) -> tuple[str, str]:
    """The (access, refresh) tokens of the latest login or refresh."""
    access, refresh = stats.issued_tokens[-2:]
    return access, refresh


def seal(session: Session, name: str = "bff-demo", key: tuple[str, str] = ("k1", TEST_KEY)) -> str:
    return KeyRing([(key[0], decode_key(key[1]))]).seal(session.to_bytes(), name)


def unseal(value: str, name: str = "bff-demo") -> Session:
    opened = KeyRing([("k1", decode_key(TEST_KEY))]).unseal(value, name)
    assert opened is not None
    session = Session.from_bytes(opened.plaintext)
    assert session is not None
    return session


def leaked(tokens: list[str], *texts: str | bytes) -> bool:
    for text in texts:
        s = text.decode("latin-1") if isinstance(text, bytes) else text
        if any(token in s for token in tokens):
            return True
    return False


def cookie_attrs_without_expiry(line: str) -> dict[str, str | None]:
    _, _, attrs = parse_set_cookie(line)
    return {k: v for k, v in attrs.items() if k not in ("max-age", "expires")}


def serve_json(status: int, payload: Any) -> contextlib.AbstractAsyncContextManager[str]:
    """A login API that always answers ``payload`` with ``status``."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(payload, status=status)

    app = web.Application()
    app.router.add_post("/login", answer)
    return running_app(app)


# --------------------------------------------------------------------------- tools of this file

WINDOW = 16


class RecordingBrowser(Browser):
    """A Browser that keeps every reply it received."""

    def __init__(self, http: aiohttp.ClientSession, base: str, replies: list[Reply]) -> None:
        super().__init__(http, base)
        self.replies = replies

    async def call(self, method: str, path: str, **kwargs: Any) -> Reply:
        reply = await super().call(method, path, **kwargs)
        self.replies.append(reply)
        return reply


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Every record of every logger, formatted by the gateway's JsonFormatter."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    level, access_disabled = root.level, ACCESS.disabled
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    ACCESS.disabled = False
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        ACCESS.disabled = access_disabled


def windows(text: str) -> set[str]:
    return {text[i : i + WINDOW] for i in range(len(text) - WINDOW + 1)}


def reply_text(reply: Reply) -> str:
    head = "\n".join(f"{name}: {value}" for name, value in reply.headers.items())
    return f"{reply.status}\n{head}\n\n{reply.body.decode('latin-1')}"


# --------------------------------------------------------------------------- the run


async def test_no_token_reaches_a_response_a_cookie_value_or_a_log_line() -> None:
    replies: list[Reply] = []

    def providers(upstream: str) -> dict[str, Any]:
        return {
            "demo": demo_provider(upstream),
            # refresh_skew over the token lifetime: every request refreshes proactively.
            "fast": demo_provider(upstream, refresh_skew=600),
        }

    def routes(upstream: str) -> list[dict[str, Any]]:
        return [{"path": "/fast/", "upstream": f"{upstream}/", "auth": "fast"}]

    with captured_logs() as logs:
        async with demo_env(providers=providers, routes=routes) as env:
            demo = RecordingBrowser(env.http, env.gateway.url, replies)
            alice = RecordingBrowser(env.http, env.gateway.url, replies)
            creds = {"username": "demo", "password": "demo"}

            # Logins: wrong, right (JSON), right (form) for the second provider.
            bad = await demo.call("POST", "/auth/demo/login", json_body={**creds, "password": "x"})
            assert bad.status == 401
            assert (await demo.call("POST", "/auth/demo/login", json_body=creds)).status == 200
            fast_login = await demo.call("POST", "/auth/fast/login", data=creds)
            assert fast_login.status == 200
            assert (await demo.call("GET", "/auth/demo/session")).status == 200
            assert (await demo.call("GET", "/auth/fast/session")).status == 200

            # Token injection, even when the browser sends its own Authorization.
            headers = await demo.call(
                "GET", "/api/headers", headers={"Authorization": "Bearer mine"}
            )
            assert headers.status == 200
            assert (await demo.call("GET", "/api/user")).status == 200

            # Proactive refreshes, three in a row.
            for _ in range(3):
                assert (await demo.call("GET", "/fast/user")).status == 200

            # Reactive refreshes with replays (a GET and a 10 KiB POST), then a request
            # carrying the pre-refresh cookie (grace cache).
            env.authority.expire_access_tokens()
            before = dict(demo.jar)
            assert (await demo.call("GET", "/api/items")).status == 200
            calls = env.stats.refresh_calls
            grace = await demo.call("GET", "/api/user", cookies=before)
            assert grace.status == 200
            assert env.stats.refresh_calls == calls
            env.authority.expire_access_tokens()
            body = os.urandom(10 * 1024)
            echo = await demo.call("POST", "/api/echo", data=body)
            assert echo.status == 200
            assert echo.json()["length"] == len(body)
            # A second refresh_on answer returned as it is.
            assert (await demo.call("GET", "/api/status/401")).status == 401

            # Errors: CSRF, a garbage cookie, a rejected refresh.
            assert (await demo.call("POST", "/api/echo", csrf=False)).status == 403
            garbage = await demo.call("GET", "/api/user", cookies={"bff-demo": "garbage"})
            assert garbage.status == 401
            await alice.call(
                "POST", "/auth/demo/login", json_body={"username": "alice", "password": "alice"}
            )
            family = env.authority.family_of(env.stats.issued_tokens[-2])
            assert family is not None
            env.authority.revoke_family(family)
            expired = await alice.call("GET", "/api/user")
            assert expired.error == "session_expired"

            # Logouts, and the stateless cookie replayed afterwards.
            last = dict(demo.jar)
            assert (await demo.call("POST", "/auth/demo/logout")).status == 204
            assert (await demo.call("POST", "/auth/logout")).status == 204
            assert (await demo.call("GET", "/api/user", cookies=last)).status == 200

            stats = env.stats
            tokens = list(stats.issued_tokens)

    # The run did what it claims.
    assert stats.refresh_calls >= 5
    assert stats.refresh_rejected >= 1
    assert stats.authorized_requests >= 8
    assert len(tokens) >= 2 * (3 + stats.refresh_calls - stats.refresh_rejected)
    log_text = logs.getvalue()
    log_lines = [json.loads(line) for line in log_text.splitlines()]
    assert sum(1 for entry in log_lines if entry.get("event") == "request") >= len(replies)
    cookie_values = [parse_set_cookie(line)[1] for reply in replies for line in reply.set_cookies]
    assert sum(1 for value in cookie_values if value) >= 8  # logins, refreshes

    # Whole tokens, then every 16-character piece of them.
    corpus = "\n".join([*map(reply_text, replies), log_text])
    for token in tokens:
        assert token not in corpus
    pieces = set().union(*(windows(token) for token in tokens))
    assert not pieces & windows(corpus), "a piece of a token reached the client or the logs"

    # Cookie values are never logged either.
    log_pieces = windows(log_text)
    for value in cookie_values:
        assert not windows(value) & log_pieces
