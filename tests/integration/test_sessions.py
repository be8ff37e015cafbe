"""Sessions end to end (SPEC §3, §4.1, §4.3, §6): login, /session, logout, token injection,
idle and absolute timeouts, against the strict demo API on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from typing import Any

import pytest
from aiohttp import web

from gateway import proxy
from gateway.demo.api import USERS, decode_jwt
from gateway.sessions.model import Session
from tests.session_support import (
    Env,
    Reply,
    cookie_attrs_without_expiry,
    demo_env,
    demo_provider,
    last_pair,
    leaked,
    login,
    parse_set_cookie,
    seal,
    serve_json,
    unseal,
)
from tests.support import free_port, running_app

# --------------------------------------------------------------------------- login


async def login_at(
    login_url: str,
    *,
    user: str = "demo",
    provider: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
) -> Reply:
    """One login as ``user`` (password: the same) through a gateway whose provider logs in
    at ``login_url``; the gateway is stopped again before this returns."""
    provider = {"login_url": login_url, **(provider or {})}
    async with demo_env(provider=provider, server=server) as env:
        return await env.browser.call(
            "POST", "/auth/demo/login", json_body={"username": user, "password": user}
        )


@pytest.mark.parametrize(
    ("secure", "name"), [(False, "bff-demo"), (True, "__Host-bff-demo")], ids=["plain", "secure"]
)
async def test_login_answers_scrubbed_json_and_sets_the_session_cookie(
    secure: bool, name: str
) -> None:
    async with demo_env(session={"secure": secure, "same_site": "Lax"}) as env:
        reply = await login(env.browser)
        access, refresh = last_pair(env.stats)

        assert reply.json() == {"user": USERS["demo"].public()}
        assert reply.headers["Content-Type"].startswith("application/json")
        assert not leaked([access, refresh], reply.body, *reply.headers.values())

        [line] = reply.set_cookies
        cookie_name, value, attrs = parse_set_cookie(line)
        assert cookie_name == name
        assert value.startswith("1.k1.")
        assert "domain" not in attrs
        assert attrs["path"] == "/"
        assert "httponly" in attrs
        assert attrs["samesite"] == "Lax"
        assert ("secure" in attrs) is secure
        assert int(attrs["max-age"] or 0) > 0
        assert unseal(value, name).access_token == access

        # The cookie is the session: the upstream answers for the logged-in user.
        user = await env.browser.call("GET", "/api/user")
        assert user.status == 200
        assert user.json()["username"] == "demo"


async def test_login_accepts_a_form_body() -> None:
    async with demo_env() as env:
        reply = await env.browser.call(
            "POST", "/auth/demo/login", data={"username": "alice", "password": "alice"}
        )
        assert reply.status == 200
        assert reply.json() == {"user": USERS["alice"].public()}
        assert (await env.browser.call("GET", "/api/user")).json()["username"] == "alice"


async def test_wrong_password_is_the_upstream_status_without_a_cookie() -> None:
    async with demo_env() as env:
        reply = await env.browser.call(
            "POST", "/auth/demo/login", json_body={"username": "demo", "password": "nope"}
        )
        assert reply.status == 401
        assert reply.json()["error"] == "invalid_credentials"
        assert reply.set_cookies == []
        assert env.stats.login_failures == 1
        assert env.stats.issued_tokens == []


async def test_login_error_bodies_are_scrubbed() -> None:
    payload = {
        "error": "locked",
        "token": "tok-AAAAAAAAAAAAAAAAAAAAAAAA",
        "refresh_token": "ref-BBBBBBBBBBBBBBBBBBBBBBBB",
        "detail": {"id_token": "idt-CCCCCCCCCCCCCCCCCCCCCCCC", "access_token": "x" * 20},
    }
    async with serve_json(423, payload) as upstream:
        reply = await login_at(f"{upstream}/login")
    assert reply.status == 423
    assert reply.json() == {"error": "locked", "detail": {}}
    assert reply.set_cookies == []


async def test_login_success_scrubs_every_string_equal_to_or_holding_a_token() -> None:
    access = "acc-" + "a" * 40
    refresh = "ref-" + "r" * 40
    id_token = "idt-" + "i" * 40
    payload = {
        "data": {"access": access, "refresh": refresh},
        "id_token": id_token,
        "profile": {"name": "Zoe", "copy": access, "raw_id": id_token},
        "links": [f"https://x.example/cb?t={refresh}", "https://x.example/help"],
    }
    async with serve_json(200, payload) as upstream:
        provider = {"access_token_field": "data.access", "refresh_token_field": "data.refresh"}
        reply = await login_at(f"{upstream}/login", provider=provider)
    assert reply.status == 200
    assert not leaked([access, refresh, id_token], reply.body)
    assert reply.json() == {
        "data": {},
        "profile": {"name": "Zoe"},
        "links": ["https://x.example/help"],
    }
    [line] = reply.set_cookies
    assert unseal(parse_set_cookie(line)[1]).access_token == access


@pytest.mark.parametrize(
    "payload",
    [{"user": {"name": "x"}}, {"token": ""}, {"token": 12345}, ["token"]],
    ids=["no-token", "empty", "not-a-string", "not-an-object"],
)
async def test_a_2xx_login_answer_without_a_token_is_502(payload: Any) -> None:
    async with serve_json(200, payload) as upstream:
        reply = await login_at(f"{upstream}/login")
    assert reply.status == 502
    assert reply.error == "upstream_invalid_response"
    assert reply.set_cookies == []


async def test_a_login_redirect_is_not_relayed() -> None:
    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "https://idp.example/login"})

    app = web.Application()
    app.router.add_post("/login", redirect)
    async with running_app(app) as upstream:
        reply = await login_at(f"{upstream}/login")
    assert reply.status == 502
    assert reply.error == "upstream_invalid_response"
    assert "Location" not in reply.headers
    assert reply.set_cookies == []


async def test_an_unreachable_or_slow_login_service() -> None:
    hang = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await hang.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/login", slow)
    async with running_app(app) as upstream:
        try:
            reply = await login_at(
                f"{upstream}/login", user="d", server={"timeouts": {"read": 0.3}}
            )
            assert reply.status == 504
            assert reply.error == "upstream_timeout"
            assert reply.set_cookies == []
        finally:
            hang.set()
    refused = f"http://127.0.0.1:{free_port()}/login"
    reply = await login_at(refused, user="d")
    assert reply.status == 502
    assert reply.error == "upstream_unavailable"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("text/plain", b"username=demo"), ("application/json", b"x" * (64 * 1024 + 1))],
    ids=["wrong-type", "too-big"],
)
async def test_login_bodies_the_gateway_refuses(content_type: str, body: bytes) -> None:
    async with demo_env() as env:
        reply = await env.browser.call(
            "POST", "/auth/demo/login", data=body, headers={"Content-Type": content_type}
        )
        assert reply.status in (400, 413)
        assert reply.error in ("bad_request", "payload_too_large")
        assert env.stats.logins == env.stats.login_failures == 0


async def test_session_endpoint_before_and_after_login() -> None:
    async with demo_env(session={"absolute_timeout": 3600}) as env:
        before = await env.browser.call("GET", "/auth/demo/session")
        assert before.status == 200
        assert before.json() == {"authenticated": False}
        assert before.set_cookies == []

        started = time.time()
        await login(env.browser)
        access, refresh = last_pair(env.stats)
        claims = decode_jwt(access, env.authority._secret)

        after = await env.browser.call("GET", "/auth/demo/session")
        assert after.status == 200
        body = after.json()
        assert set(body) == {
            "authenticated",
            "provider",
            "expires_at",
            "session_expires_at",
            "claims",
        }
        assert body["authenticated"] is True
        assert body["provider"] == "demo"
        assert body["expires_at"] == claims["exp"]
        assert started + 3600 - 1 <= body["session_expires_at"] <= time.time() + 3600
        assert body["claims"] == {
            name: claims[name]
            for name in ("sub", "name", "email", "preferred_username", "roles", "scope")
        }
        assert not leaked([access, refresh], after.body, *after.headers.values())


async def test_session_endpoint_reports_an_expired_unrefreshable_session_as_over() -> None:
    async with demo_env(provider={"refresh_url": None}) as env:
        now = time.time()
        session = Session(
            provider="demo",
            access_token=env.authority.issue_access_token(USERS["demo"]),
            refresh_token="r",
            expires_at=now - 1,
            created_at=now - 10,
            last_seen=now - 1,
            claims={"sub": "1"},
        )
        reply = await env.browser.call(
            "GET", "/auth/demo/session", cookies={"bff-demo": seal(session)}
        )
        assert reply.json() == {"authenticated": False}
        assert [parse_set_cookie(c)[:2] for c in reply.set_cookies] == [("bff-demo", "")]


async def test_session_endpoint_reports_an_expired_refreshable_session_as_live() -> None:
    async with demo_env() as env:
        await login(env.browser)
        access, _ = last_pair(env.stats)
        now = time.time()
        session = dataclasses.replace(unseal(env.browser.jar["bff-demo"]), expires_at=now - 1)
        reply = await env.browser.call(
            "GET", "/auth/demo/session", cookies={"bff-demo": seal(session)}
        )
        assert reply.json()["authenticated"] is True
        assert reply.json()["expires_at"] == now - 1
        assert not leaked([access], reply.body)


# --------------------------------------------------------------------------- logout


@pytest.mark.parametrize(
    ("secure", "same_site", "name"),
    [(False, "Strict", "bff-demo"), (True, "None", "__Host-bff-demo")],
    ids=["plain", "secure"],
)
async def test_logout_with_a_server_side_store_kills_the_old_cookie(
    secure: bool, same_site: str, name: str
) -> None:
    session_config = {"store": "memory", "secure": secure, "same_site": same_site}
    async with demo_env(session=session_config) as env:
        login_reply = await login(env.browser)
        [login_line] = login_reply.set_cookies
        old_jar = dict(env.browser.jar)
        assert list(old_jar) == [name]
        assert ("secure" in parse_set_cookie(login_line)[2]) is secure

        reply = await env.browser.call("POST", "/auth/demo/logout")
        assert reply.status == 204
        assert reply.body == b""
        [line] = reply.set_cookies
        cleared_name, value, attrs = parse_set_cookie(line)
        assert (cleared_name, value) == (name, "")
        assert attrs["samesite"] == same_site
        assert attrs["max-age"] == "0"
        assert cookie_attrs_without_expiry(line) == cookie_attrs_without_expiry(login_line)
        assert env.browser.jar == {}

        hits = env.hits
        replay = await env.browser.call("GET", "/api/user", cookies=old_jar)
        assert replay.status == 401
        assert replay.error == "login_required"
        assert env.hits == hits  # the upstream was not called
        assert [parse_set_cookie(c)[:2] for c in replay.set_cookies] == [(name, "")]
        session = await env.browser.call("GET", "/auth/demo/session", cookies=old_jar)
        assert session.json() == {"authenticated": False}


async def test_logout_with_the_cookie_store_without_logout_url() -> None:
    """Documented behaviour: a stateless cookie cannot be revoked by the gateway. Without a
    provider ``logout_url`` a copy of the old cookie keeps working until it expires (idle or
    absolute timeout); the browser's own copy is expired by the logout response."""
    async with demo_env() as env:
        await login(env.browser)
        old_jar = dict(env.browser.jar)
        reply = await env.browser.call("POST", "/auth/demo/logout")
        assert reply.status == 204
        assert env.browser.jar == {}
        assert env.stats.logouts == 0  # no logout_url: the provider is not told

        replay = await env.browser.call("GET", "/api/user", cookies=old_jar)
        assert replay.status == 200
        assert replay.json()["username"] == "demo"


async def test_logout_url_is_called_and_replayed_cookie_ends_the_session() -> None:
    """With ``logout_url`` the provider revokes the token family, so a replayed stateless
    cookie fails at the upstream, its refresh is rejected and the session ends."""

    def providers(upstream: str) -> dict[str, Any]:
        return {"demo": demo_provider(upstream, logout_url=f"{upstream}/auth/logout")}

    async with demo_env(providers=providers) as env:
        await login(env.browser)
        old_jar = dict(env.browser.jar)
        reply = await env.browser.call("POST", "/auth/demo/logout")
        assert reply.status == 204
        assert env.stats.logouts == 1
        assert env.stats.revoked_families == 1

        replay = await env.browser.call("GET", "/api/user", cookies=old_jar)
        assert replay.status == 401
        assert replay.error == "session_expired"
        assert env.stats.refresh_rejected == 1
        assert [parse_set_cookie(c)[:2] for c in replay.set_cookies] == [("bff-demo", "")]


async def test_a_logout_url_slow_to_answer_does_not_hold_the_logout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Telling the provider is best effort: past its own short limit (5 s; 0.3 here)
    # the logout answers and expires the cookie, where the route's read timeout
    # (60 s) would hold it and a browser that gives up would keep its cookie.
    monkeypatch.setattr(proxy, "REVOKE_TIMEOUT", 0.3)
    asked = asyncio.Event()
    release = asyncio.Event()

    async def slow_logout(request: web.Request) -> web.Response:
        asked.set()
        await release.wait()
        return web.Response(status=204)

    def providers(upstream: str) -> dict[str, Any]:
        return {"demo": demo_provider(upstream, logout_url=f"{upstream}/slow-logout")}

    def setup(app: web.Application) -> None:
        app.router.add_post("/slow-logout", slow_logout)

    async with demo_env(providers=providers, setup=setup) as env:
        await login(env.browser)
        reply = await asyncio.wait_for(env.browser.call("POST", "/auth/demo/logout"), 20)
        assert reply.status == 204 and asked.is_set()
        assert [parse_set_cookie(c)[:2] for c in reply.set_cookies] == [("bff-demo", "")]
        assert (await env.browser.call("GET", "/api/user")).error == "login_required"
        release.set()


async def test_logout_of_all_providers_clears_every_cookie() -> None:
    def providers(upstream: str) -> dict[str, Any]:
        return {"demo": demo_provider(upstream), "other": demo_provider(upstream)}

    async with demo_env(providers=providers, session={"store": "memory"}) as env:
        await login(env.browser, "demo", "demo")
        await login(env.browser, "alice", "other")
        assert set(env.browser.jar) == {"bff-demo", "bff-other"}
        old_jar = dict(env.browser.jar)

        reply = await env.browser.call("POST", "/auth/logout")
        assert reply.status == 204
        cleared = {parse_set_cookie(c)[0] for c in reply.set_cookies}
        assert cleared == {"bff-demo", "bff-other"}
        assert env.browser.jar == {}
        for provider in ("demo", "other"):
            session = await env.browser.call("GET", f"/auth/{provider}/session", cookies=old_jar)
            assert session.json() == {"authenticated": False}


# --------------------------------------------------------------------------- token injection


async def test_upstream_sees_exactly_one_bearer_and_no_gateway_cookie_or_csrf_header() -> None:
    async with demo_env() as env:
        await login(env.browser)
        access, _ = last_pair(env.stats)
        session_cookie = env.browser.jar["bff-demo"]

        reply = await env.browser.call(
            "GET",
            "/api/headers",
            headers={
                "Authorization": "Bearer the-browser-made-this-up",
                "X-CSRF": "1",
                "Cookie": f"bff-demo={session_cookie}; theme=dark",
            },
        )
        assert reply.status == 200
        seen = env.stats.last_headers
        assert seen.getall("Authorization") == [f"Bearer {access}"]
        assert reply.json()["authorization_sha256"] == [hashlib.sha256(access.encode()).hexdigest()]
        assert "Cookie" not in seen
        assert "X-CSRF" not in seen

        # An unsafe method, where the CSRF header is mandatory, does not forward it either.
        posted = await env.browser.call(
            "POST", "/api/echo", data=b"abc", headers={"Authorization": "Basic eDp5"}
        )
        assert posted.status == 200
        assert env.stats.last_headers.getall("Authorization") == [f"Bearer {access}"]
        assert "X-CSRF" not in env.stats.last_headers
        assert "Cookie" not in env.stats.last_headers


async def test_forward_cookies_passes_other_cookies_but_never_the_gateways() -> None:
    def routes(upstream: str) -> list[dict[str, Any]]:
        return [
            {"path": "/fwd/", "upstream": f"{upstream}/", "auth": "demo", "forward_cookies": True}
        ]

    async with demo_env(routes=routes) as env:
        await login(env.browser)
        env.browser.jar["theme"] = "dark"
        reply = await env.browser.call("GET", "/fwd/headers")
        assert reply.status == 200
        assert env.stats.last_headers.getall("Cookie") == ["theme=dark"]


async def test_each_browser_gets_its_own_token() -> None:
    async with demo_env() as env:
        demo, alice = env.browser, env.new_browser()
        await login(demo, "demo")
        await login(alice, "alice")
        for _ in range(3):
            assert (await alice.call("GET", "/api/user")).json()["username"] == "alice"
            assert (await demo.call("GET", "/api/user")).json()["username"] == "demo"


# --------------------------------------------------------------------------- timeouts


def crafted(env: Env, *, created_ago: float, seen_ago: float) -> Session:
    now = time.time()
    access = env.authority.issue_access_token(USERS["demo"])
    return Session(
        provider="demo",
        access_token=access,
        refresh_token=None,
        expires_at=now + 300,
        created_at=now - created_ago,
        last_seen=now - seen_ago,
        claims={"sub": "1"},
    )


TIMEOUTS = {"idle_timeout": 60, "absolute_timeout": 3600}


@pytest.mark.parametrize(
    ("created_ago", "seen_ago"),
    [(100, 61), (3601, 1)],
    ids=["idle", "absolute"],
)
async def test_idle_and_absolute_timeouts_end_the_session(
    created_ago: float, seen_ago: float
) -> None:
    async with demo_env(session=TIMEOUTS) as env:
        cookie = seal(crafted(env, created_ago=created_ago, seen_ago=seen_ago))
        hits = env.hits
        reply = await env.browser.call("GET", "/api/user", cookies={"bff-demo": cookie})
        assert reply.status == 401
        assert reply.error == "session_expired"
        assert env.hits == hits
        [line] = reply.set_cookies
        assert parse_set_cookie(line)[:2] == ("bff-demo", "")
        assert parse_set_cookie(line)[2]["max-age"] == "0"

        session = await env.browser.call("GET", "/auth/demo/session", cookies={"bff-demo": cookie})
        assert session.json() == {"authenticated": False}


async def test_sessions_within_the_timeouts_work_and_slide_the_idle_deadline() -> None:
    async with demo_env(session=TIMEOUTS) as env:
        cookie = seal(crafted(env, created_ago=3500, seen_ago=50))
        before = time.time()
        reply = await env.browser.call("GET", "/api/user", cookies={"bff-demo": cookie})
        assert reply.status == 200
        [line] = reply.set_cookies  # last_seen moved: the cookie is rewritten
        name, value, attrs = parse_set_cookie(line)
        assert name == "bff-demo"
        renewed = unseal(value)
        assert renewed.last_seen >= before
        # The cookie lives no longer than the absolute deadline (about 100 s away).
        assert 90 <= int(attrs["max-age"] or 0) <= 101
