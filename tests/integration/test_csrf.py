"""CSRF (SPEC §5.4): unsafe methods to session routes and to /auth/* need the CSRF header
and an acceptable Origin; failures are 403 csrf_failed, decided before any session is
unsealed, and nothing reaches the upstream."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from gateway.demo.api import USERS
from gateway.sessions.model import Session
from tests.session_support import Env, Reply, demo_env, login, parse_set_cookie, seal
from tests.support import TEST_KEY, TEST_KEY_2

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


async def post_with_k1_cookie(env: Env, headers: dict[str, str]) -> Reply:
    """POST a payload to /api/echo with a k1-sealed session cookie, ``headers`` and no
    automatic X-CSRF header."""
    return await env.browser.call(
        "POST",
        "/api/echo",
        data=b"payload",
        headers=headers,
        cookies={"bff-demo": k1_session(env)},
        csrf=False,
    )


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
        reply = await post_with_k1_cookie(env, FAILING[case](env))
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
        reply = await post_with_k1_cookie(env, PASSING[case](env))
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


@pytest.mark.parametrize(
    ("forwarded", "status"),
    [
        ({"X-Forwarded-Proto": "https", "X-Forwarded-Host": "app.example"}, 200),
        # Named in Connection, X-Forwarded-Host is hop-by-hop, not the proxy's word: the
        # same rule as when the gateway forwards it (then Host decides, and differs).
        (
            {
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "app.example",
                "Connection": "X-Forwarded-Host",
            },
            403,
        ),
    ],
)
async def test_behind_a_trusted_proxy_the_origin_is_the_forwarded_one(
    forwarded: dict[str, str], status: int
) -> None:
    async with demo_env(session=ROTATED, server={"trusted_proxies": ["127.0.0.0/8"]}) as env:
        reply = await post_with_k1_cookie(
            env, {"X-CSRF": "1", "Origin": "https://app.example", **forwarded}
        )
        assert reply.status == status
