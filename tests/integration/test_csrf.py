"""CSRF (SPEC §5.4): unsafe methods to session routes and to /auth/* need the CSRF header
and an acceptable Origin; failures are 403 csrf_failed, decided before any session is
unsealed, and nothing reaches the upstream."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.demo.api import (
    AUTHORITY_KEY,
    USERS,
    DemoStats,
    TokenAuthority,
    create_demo_api,
)
from gateway.sessions.model import Session
from gateway.sessions.seal import KeyRing, decode_key
from tests.support import (
    TEST_KEY,
    TEST_KEY_2,
    RunningGateway,
    config_dict,
    running_app,
    running_gateway,
)

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

ALLOWED = "https://app.example.com"
# k2 seals; k1 (the key of the helpers above) still unseals: a k1 cookie is re-sealed on
# any response that unsealed it, which makes "was the session unsealed?" observable.
ROTATED = {
    "keys": [{"id": "k2", "secret": TEST_KEY_2}, {"id": "k1", "secret": TEST_KEY}],
    "csrf": {"allowed_origins": [ALLOWED]},
}


def k1_session(env: Env) -> str:
    now = time.time()
    session = Session(
        provider="demo",
        access_token=env.authority.issue_access_token(USERS["demo"]),
        refresh_token=None,
        expires_at=now + 300,
        created_at=now,
        last_seen=now,
        claims={},
    )
    return seal(session)


def origin_of(env: Env) -> str:
    return env.gateway.url  # http://127.0.0.1:<port>, what the browser's Origin would be


FAILING: dict[str, Callable[[Env], dict[str, str]]] = {
    "missing-header": lambda env: {},
    "empty-header": lambda env: {"X-CSRF": ""},
    "blank-header": lambda env: {"X-CSRF": "   "},
    "foreign-origin": lambda env: {"X-CSRF": "1", "Origin": "https://evil.example"},
    "null-origin": lambda env: {"X-CSRF": "1", "Origin": "null"},
    "cross-site": lambda env: {"X-CSRF": "1", "Sec-Fetch-Site": "cross-site"},
    "cross-site-same-origin-header": lambda env: {
        "X-CSRF": "1",
        "Origin": origin_of(env),
        "Sec-Fetch-Site": "cross-site",
    },
    "other-port": lambda env: {"X-CSRF": "1", "Origin": "http://127.0.0.1:1"},
    "other-scheme": lambda env: {
        "X-CSRF": "1",
        "Origin": origin_of(env).replace("http://", "https://"),
    },
}

PASSING: dict[str, Callable[[Env], dict[str, str]]] = {
    "header-only": lambda env: {"X-CSRF": "1"},
    "same-origin": lambda env: {"X-CSRF": "1", "Origin": origin_of(env)},
    "allowed-origin": lambda env: {"X-CSRF": "1", "Origin": ALLOWED},
    "sec-fetch-same-origin": lambda env: {"X-CSRF": "1", "Sec-Fetch-Site": "same-origin"},
    "sec-fetch-none": lambda env: {"X-CSRF": "1", "Sec-Fetch-Site": "none"},
}


# --------------------------------------------------------------------------- session routes


@pytest.mark.parametrize("case", list(FAILING))
async def test_unsafe_request_failing_csrf_is_403_and_nothing_is_forwarded(case: str) -> None:
    async with demo_env(session=ROTATED) as env:
        cookie = k1_session(env)
        reply = await env.browser.call(
            "POST",
            "/api/echo",
            data=b"payload",
            headers=FAILING[case](env),
            cookies={"bff-demo": cookie},
            csrf=False,
        )
        assert reply.status == 403
        assert reply.error == "csrf_failed"
        assert env.hits == 0
        assert reply.set_cookies == []  # the k1 cookie was not unsealed (no re-seal)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_every_unsafe_method_needs_the_header(method: str) -> None:
    async with demo_env(session=ROTATED) as env:
        cookie = {"bff-demo": k1_session(env)}
        denied = await env.browser.call(method, "/api/echo", cookies=cookie, csrf=False)
        assert denied.status == 403
        assert denied.error == "csrf_failed"
        assert env.hits == 0
        allowed = await env.browser.call(method, "/api/echo", cookies=cookie, csrf=True)
        assert allowed.status == 200
        assert env.stats.last_method == method
        assert env.hits == 1


async def test_csrf_is_checked_before_the_cookie_is_looked_at() -> None:
    async with demo_env() as env:
        # A garbage cookie would be a 401 login_required (and a clearing Set-Cookie) had the
        # gateway looked at it; no cookie at all likewise.
        for cookies in ({"bff-demo": "garbage"}, {}):
            reply = await env.browser.call("POST", "/api/echo", cookies=cookies, csrf=False)
            assert reply.status == 403
            assert reply.error == "csrf_failed"
            assert reply.set_cookies == []
        # With the header, the same garbage cookie is a 401.
        reply = await env.browser.call("POST", "/api/echo", cookies={"bff-demo": "garbage"})
        assert reply.status == 401
        assert env.hits == 0


@pytest.mark.parametrize("case", list(PASSING))
async def test_acceptable_unsafe_requests_pass(case: str) -> None:
    async with demo_env(session=ROTATED) as env:
        cookie = k1_session(env)
        reply = await env.browser.call(
            "POST",
            "/api/echo",
            data=b"payload",
            headers=PASSING[case](env),
            cookies={"bff-demo": cookie},
            csrf=False,
        )
        assert reply.status == 200
        assert reply.json()["length"] == len(b"payload")
        assert env.hits == 1
        # The k1 cookie was unsealed and re-sealed under k2: the observable that the failing
        # cases above rely on to show that they unsealed nothing.
        assert [parse_set_cookie(c)[1][:5] for c in reply.set_cookies] == ["1.k2."]
        assert "X-CSRF" not in env.stats.last_headers


async def test_public_origin_is_the_expected_origin() -> None:
    server = {"public_origin": "https://bff.example"}
    async with demo_env(session=ROTATED, server=server) as env:
        cookie = {"bff-demo": k1_session(env)}
        ok = await env.browser.call(
            "POST", "/api/echo", cookies=cookie, headers={"Origin": "https://bff.example"}
        )
        assert ok.status == 200
        bad = await env.browser.call(
            "POST", "/api/echo", cookies=cookie, headers={"Origin": "https://other.example"}
        )
        assert bad.status == 403
        assert bad.error == "csrf_failed"
        assert env.hits == 1


async def test_safe_methods_need_no_csrf_header_even_cross_site() -> None:
    async with demo_env() as env:
        await login(env.browser)
        for method in ("GET", "HEAD"):
            reply = await env.browser.call(
                method,
                "/api/user",
                headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
            )
            assert reply.status == 200
        assert env.hits == 2


# --------------------------------------------------------------------------- /auth/*


@pytest.mark.parametrize("case", ["missing-header", "foreign-origin", "null-origin", "cross-site"])
async def test_login_is_csrf_checked(case: str) -> None:
    async with demo_env() as env:
        reply = await env.browser.call(
            "POST",
            "/auth/demo/login",
            json_body={"username": "demo", "password": "demo"},
            headers=FAILING[case](env),
            csrf=False,
        )
        assert reply.status == 403
        assert reply.error == "csrf_failed"
        assert reply.set_cookies == []
        assert env.stats.logins == env.stats.login_failures == 0  # never forwarded
        ok = await env.browser.call(
            "POST",
            "/auth/demo/login",
            json_body={"username": "demo", "password": "demo"},
            headers={"Origin": origin_of(env)},
        )
        assert ok.status == 200


@pytest.mark.parametrize("path", ["/auth/demo/logout", "/auth/logout"])
@pytest.mark.parametrize("case", ["missing-header", "foreign-origin", "null-origin", "cross-site"])
async def test_logout_is_csrf_checked(path: str, case: str) -> None:
    async with demo_env(session={"store": "memory"}) as env:
        await login(env.browser)
        reply = await env.browser.call("POST", path, headers=FAILING[case](env), csrf=False)
        assert reply.status == 403
        assert reply.error == "csrf_failed"
        assert reply.set_cookies == []
        # The server-side session survived the forged logout.
        assert (await env.browser.call("GET", "/api/user")).status == 200
        logout = await env.browser.call("POST", path)
        assert logout.status == 204
        assert env.browser.jar == {}
