"""Session cookies (SPEC §6, §4.3): bad values of every kind are "no session", key
rotation both ways, and chunked cookies for big tokens."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.demo.api import USERS
from gateway.sessions.model import Session
from gateway.sessions.seal import COOKIE_LIMIT, KeyRing, decode_key
from tests.session_support import (
    Env,
    demo_env,
    demo_provider,
    last_pair,
    login,
    parse_set_cookie,
    seal,
)
from tests.support import TEST_KEY, TEST_KEY_2, running_app_with

# --------------------------------------------------------------------------- tools of this file

TEST_KEY_3 = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI"  # 32 bytes of 0x02


def live_session(env: Env, provider: str = "demo") -> Session:
    now = time.time()
    return Session(
        provider=provider,
        access_token=env.authority.issue_access_token(USERS["demo"]),
        refresh_token=None,
        expires_at=now + 300,
        created_at=now,
        last_seen=now,
        claims={"sub": "1"},
    )


def flip(value: str, index: int) -> str:
    """Change one base64url character of a sealed value (payload part)."""
    char = value[index]
    return value[:index] + ("A" if char != "A" else "B") + value[index + 1 :]


BAD_VALUES: dict[str, Callable[[Env], str]] = {
    "tampered": lambda env: flip(seal(live_session(env)), 40),
    "tampered-tag": lambda env: flip(seal(live_session(env)), -3),
    "truncated": lambda env: seal(live_session(env))[:-10],
    "only-header": lambda env: "1.k1.",
    "garbage": lambda env: "hello-world",
    "empty": lambda env: "",
    "dots": lambda env: "1.k1.abc.def",
    "bad-base64": lambda env: "1.k1.@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@",
    "wrong-version": lambda env: "2" + seal(live_session(env))[1:],
    "unknown-key": lambda env: seal(live_session(env), key=("k9", TEST_KEY_3)),
    "relabelled-key-id": lambda env: seal(live_session(env), key=("k9", TEST_KEY_3)).replace(
        "1.k9.", "1.k1.", 1
    ),
    "renamed": lambda env: seal(live_session(env), name="bff-other"),
    "secure-name": lambda env: seal(live_session(env), name="__Host-bff-demo"),
    "other-provider": lambda env: seal(live_session(env, provider="other")),
    "not-a-session": lambda env: KeyRing([("k1", decode_key(TEST_KEY))]).seal(
        b'{"not": "a session"}', "bff-demo"
    ),
    "huge-garbage": lambda env: "x" * 3000,
}


def serve_big_headers(app: web.Application) -> contextlib.AbstractAsyncContextManager[str]:
    """Like running_app, but the upstream accepts a 64 KiB Authorization header."""
    return running_app_with(app, max_line_size=64 * 1024, max_field_size=64 * 1024)


def padding_for(size: int) -> int:
    """The demo's token_padding that makes an access token of at least ``size`` bytes
    (and at most a few dozen more)."""
    # Base64 of the padded payload grows by 4/3 per byte of padding; the rest is ~420 bytes.
    return max(0, (size - 400) * 3 // 4)


# --------------------------------------------------------------------------- bad cookies


@pytest.mark.parametrize("case", list(BAD_VALUES))
async def test_a_bad_cookie_is_login_required_and_cleared(case: str) -> None:
    async with demo_env() as env:
        value = BAD_VALUES[case](env)
        reply = await env.browser.call("GET", "/api/user", cookies={"bff-demo": value})
        assert reply.status == 401
        assert reply.error == "login_required"
        assert env.hits == 0
        [line] = reply.set_cookies
        name, cleared, attrs = parse_set_cookie(line)
        assert (name, cleared, attrs["max-age"]) == ("bff-demo", "", "0")
        assert attrs["path"] == "/"
        assert "httponly" in attrs

        unsafe = await env.browser.call("POST", "/api/echo", cookies={"bff-demo": value})
        assert unsafe.status == 401
        assert unsafe.error == "login_required"

        session = await env.browser.call("GET", "/auth/demo/session", cookies={"bff-demo": value})
        assert session.status == 200
        assert session.json() == {"authenticated": False}
        assert [parse_set_cookie(c)[:2] for c in session.set_cookies] == [("bff-demo", "")]
        assert env.hits == 0


async def test_the_control_value_is_accepted() -> None:
    """The bad values above are derived from this one, which works."""
    async with demo_env() as env:
        reply = await env.browser.call(
            "GET", "/api/user", cookies={"bff-demo": seal(live_session(env))}
        )
        assert reply.status == 200
        assert reply.set_cookies == []


async def test_a_cookie_under_another_providers_name_is_not_that_providers_session() -> None:
    def providers(upstream: str) -> dict[str, Any]:
        return {"demo": demo_provider(upstream), "other": demo_provider(upstream)}

    def routes(upstream: str) -> list[dict[str, Any]]:
        return [{"path": "/other/", "upstream": f"{upstream}/", "auth": "other"}]

    async with demo_env(providers=providers, routes=routes) as env:
        await login(env.browser)
        moved = {"bff-other": env.browser.jar["bff-demo"]}
        reply = await env.browser.call("GET", "/other/user", cookies=moved)
        assert reply.status == 401
        assert reply.error == "login_required"
        assert env.hits == 0


async def test_odd_cookie_headers_never_cause_a_500() -> None:
    async with demo_env() as env:
        for header in (
            'bff-demo="1.k1.abc"',
            "bff-demo=1.k1.abc; bff-demo=2.k1.def",
            "bff-demo",
            "bff-demo.0=2~abc",
            "bff-demo.0=999999999~abc; bff-demo.1=x",
            "bff-demo.0=abc; bff-demo.1=def",
            "=; ;;; bff-demo=%00%ff",
            "bff-demo=\u00e9t\u00e9",
        ):
            reply = await env.browser.call(
                "GET", "/api/user", cookies={}, headers={"Cookie": header}
            )
            assert reply.status == 401, header
            assert reply.error == "login_required"
        assert env.hits == 0


# --------------------------------------------------------------------------- key rotation


async def test_a_cookie_under_an_older_listed_key_is_accepted_and_resealed() -> None:
    keys = {"keys": [{"id": "k2", "secret": TEST_KEY_2}, {"id": "k1", "secret": TEST_KEY}]}
    async with demo_env(session=keys) as env:
        session = live_session(env)
        old = seal(session)  # under k1
        reply = await env.browser.call("GET", "/api/user", cookies={"bff-demo": old})
        assert reply.status == 200
        [line] = reply.set_cookies
        name, value, attrs = parse_set_cookie(line)
        assert name == "bff-demo"
        assert value.startswith("1.k2.")
        assert int(attrs["max-age"] or 0) > 0
        opened = KeyRing([("k2", decode_key(TEST_KEY_2))]).unseal(value, "bff-demo")
        assert opened is not None
        resealed = Session.from_bytes(opened.plaintext)
        assert resealed is not None
        assert resealed.access_token == session.access_token

        # The re-sealed cookie works and needs no further rewrite.
        again = await env.browser.call("GET", "/api/user", cookies={"bff-demo": value})
        assert again.status == 200
        assert again.set_cookies == []

        # Also through /auth/<p>/session.
        info = await env.browser.call("GET", "/auth/demo/session", cookies={"bff-demo": old})
        assert info.json()["authenticated"] is True
        assert [parse_set_cookie(c)[1][:5] for c in info.set_cookies] == ["1.k2."]


async def test_a_cookie_under_a_key_no_longer_listed_is_rejected() -> None:
    async with demo_env(session={"keys": [{"id": "k2", "secret": TEST_KEY_2}]}) as env:
        old = seal(live_session(env))  # k1 was retired
        reply = await env.browser.call("GET", "/api/user", cookies={"bff-demo": old})
        assert reply.status == 401
        assert reply.error == "login_required"
        assert [parse_set_cookie(c)[:2] for c in reply.set_cookies] == [("bff-demo", "")]
        assert env.hits == 0


async def test_same_key_id_with_a_new_secret_rejects_old_cookies() -> None:
    async with demo_env(session={"keys": [{"id": "k1", "secret": TEST_KEY_2}]}) as env:
        reply = await env.browser.call(
            "GET", "/api/user", cookies={"bff-demo": seal(live_session(env))}
        )
        assert reply.status == 401
        assert reply.error == "login_required"


# --------------------------------------------------------------------------- big sessions


async def test_a_12_kib_access_token_works_through_chunked_cookies_with_32_kib_headers() -> None:
    server = {"limits": {"max_header_size": "32KiB"}}
    async with demo_env(
        server=server, token_padding=padding_for(12 * 1024), serve=serve_big_headers
    ) as env:
        reply = await login(env.browser)
        access, _ = last_pair(env.stats)
        assert len(access) >= 12 * 1024

        names = [parse_set_cookie(line)[0] for line in reply.set_cookies]
        assert len(names) >= 4
        assert names == [f"bff-demo.{i}" for i in range(len(names))]
        for line in reply.set_cookies:
            name, value, attrs = parse_set_cookie(line)
            assert len(name) + len(value) <= COOKIE_LIMIT
            assert attrs["path"] == "/" and "httponly" in attrs and "domain" not in attrs
        assert len("; ".join(f"{k}={v}" for k, v in env.browser.jar.items())) > 16 * 1024

        user = await env.browser.call("GET", "/api/headers")
        assert user.status == 200
        assert env.stats.last_headers.getall("Authorization") == [f"Bearer {access}"]

        # A refresh rewrites every chunk.
        env.authority.expire_access_tokens()
        refreshed = await env.browser.call("GET", "/api/user")
        assert refreshed.status == 200
        assert env.stats.refresh_calls == 1
        assert {parse_set_cookie(c)[0] for c in refreshed.set_cookies} == set(names)

        logout = await env.browser.call("POST", "/auth/demo/logout")
        assert logout.status == 204
        cleared = [parse_set_cookie(c) for c in logout.set_cookies]
        assert sorted(name for name, _, _ in cleared) == sorted(names)
        assert all(value == "" and attrs["max-age"] == "0" for _, value, attrs in cleared)
        assert env.browser.jar == {}


async def test_a_12_kib_access_token_is_too_big_for_the_default_header_limit() -> None:
    """Documented limit (SPEC §6): the browser's Cookie line is over 16 KiB, so aiohttp's
    parser refuses the request before any handler runs; the upstream is not called."""
    async with demo_env(token_padding=padding_for(12 * 1024), serve=serve_big_headers) as env:
        await login(env.browser)
        reply = await env.browser.call("GET", "/api/user")
        assert reply.status in (400, 431)
        assert env.hits == 0


async def test_8_kib_of_tokens_work_with_the_default_header_limit() -> None:
    async with demo_env(token_padding=padding_for(8 * 1024 - 250), serve=serve_big_headers) as env:
        reply = await login(env.browser)
        access, refresh = last_pair(env.stats)
        assert 8 * 1024 <= len(access) + len(refresh) <= 8 * 1024 + 100
        assert len(reply.set_cookies) >= 2  # chunked
        for line in reply.set_cookies:
            name, value, _ = parse_set_cookie(line)
            assert len(name) + len(value) <= COOKIE_LIMIT

        user = await env.browser.call("GET", "/api/user")
        assert user.status == 200
        assert env.stats.last_headers.getall("Authorization") == [f"Bearer {access}"]


async def test_a_missing_chunk_means_no_session_and_every_chunk_is_cleared() -> None:
    server = {"limits": {"max_header_size": "32KiB"}}
    async with demo_env(
        server=server, token_padding=padding_for(12 * 1024), serve=serve_big_headers
    ) as env:
        await login(env.browser)
        jar = dict(env.browser.jar)
        assert len(jar) >= 3
        del jar["bff-demo.1"]
        reply = await env.browser.call("GET", "/api/user", cookies=jar)
        assert reply.status == 401
        assert reply.error == "login_required"
        assert env.hits == 0
        cleared = {parse_set_cookie(c)[0] for c in reply.set_cookies}
        assert cleared == set(jar)


async def test_a_rewritten_session_expires_leftover_chunks() -> None:
    async with demo_env() as env:
        # last_seen two minutes ago: the session is rewritten on this response (idle timer).
        session = dataclasses.replace(live_session(env), last_seen=time.time() - 120)
        # A stale chunk next to the bare cookie (left by an older, bigger session).
        jar = {"bff-demo": seal(session), "bff-demo.7": "leftover"}
        reply = await env.browser.call("GET", "/api/user", cookies=jar)
        assert reply.status == 200
        written = {
            name: (value, attrs) for name, value, attrs in map(parse_set_cookie, reply.set_cookies)
        }
        assert set(written) == {"bff-demo", "bff-demo.7"}
        assert written["bff-demo"][0].startswith("1.k1.")
        assert written["bff-demo.7"][0] == ""
        assert written["bff-demo.7"][1]["max-age"] == "0"
