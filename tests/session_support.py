"""Helpers for session tests: the strict demo API behind a gateway, a cookie-keeping browser,
and sealing/unsealing session cookies with the test key."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.demo.api import AUTHORITY_KEY, DemoStats, TokenAuthority, create_demo_api
from gateway.sessions.model import Session
from gateway.sessions.seal import KeyRing, decode_key
from tests.leakcheck import REGISTRY
from tests.support import TEST_KEY, RunningGateway, config_dict, running_app, running_gateway

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
        follow: bool = True,
    ) -> Reply:
        """``cookies`` replaces the jar for this call (and the jar is then left alone);
        ``follow=False`` returns a redirect as it is."""
        sent: dict[str, str] = {}
        if csrf and method in UNSAFE:
            sent["X-CSRF"] = "1"
        jar = self.jar if cookies is None else cookies
        if jar:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
        sent.update(headers or {})
        async with self.http.request(
            method,
            self.base + path,
            json=json_body,
            data=data,
            headers=sent,
            allow_redirects=follow,
        ) as response:
            reply = Reply(response.status, response.headers, await response.read())
            for hop in response.history:  # the redirects followed: their Location too
                REGISTRY.record_response(str(hop.url), hop.status, hop.headers.items(), None)
            REGISTRY.record_response(
                str(response.url), reply.status, reply.headers.items(), reply.body
            )
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
