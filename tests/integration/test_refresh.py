"""Token refresh end to end (SPEC §4.3): proactive and reactive refresh, single flight and
the grace cache against the strict demo API (rotating refresh tokens, family revocation on
reuse), body replay, and how refresh failures reach the browser."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aioresponses import aioresponses

from gateway.demo.api import AUTHORITY_KEY, USERS, InvalidToken, TokenAuthority
from gateway.sessions.model import Session
from tests.integration.test_redis import redis_server  # noqa: F401 - a fixture
from tests.session_support import (
    Env,
    Reply,
    cookie_attrs_without_expiry,
    demo_env,
    last_pair,
    login,
    parse_set_cookie,
    seal,
    unseal,
)
from tests.support import free_port, running_app

# --------------------------------------------------------------------------- tools of this file


class RefreshGate:
    """Holds every call to the demo's /refresh-token until ``release()``."""

    def __init__(self) -> None:
        self._open = asyncio.Event()

    def install(self, app: web.Application) -> None:
        @web.middleware
        async def gate(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.path == "/refresh-token":
                await self._open.wait()
            return await handler(request)

        app.middlewares.append(gate)

    def release(self) -> None:
        self._open.set()


def refresh_count(env: Env, result: str) -> float:
    registry = env.gateway.listeners.gateway.metrics.registry
    value = registry.get_sample_value(
        "bff_token_refresh_total", {"provider": "demo", "result": result}
    )
    return value or 0.0


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition that other tasks make true (polling a counter)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@dataclass
class Slurp:
    """``POST /slurp`` on the demo app: reads the WHOLE body first, then checks the token.

    Unlike the demo's /echo (which answers 401 before reading), this makes sure the gateway
    has streamed the entire body before it learns that a refresh is needed."""

    calls: list[tuple[int, str]] = field(default_factory=list)  # (length, sha256) per call

    def install(self, app: web.Application) -> None:
        authority = app[AUTHORITY_KEY]

        async def slurp(request: web.Request) -> web.Response:
            body = await request.read()
            digest = hashlib.sha256(body).hexdigest()
            self.calls.append((len(body), digest))
            _, _, token = request.headers.get("Authorization", "").partition(" ")
            try:
                authority.verify_access_token(token)
            except InvalidToken:
                return web.json_response({"error": "invalid_token"}, status=401)
            return web.json_response({"sha256": digest, "length": len(body)})

        app.router.add_post("/slurp", slurp)


def session_of(reply: Reply) -> Session:
    [line] = [c for c in reply.set_cookies if parse_set_cookie(c)[0] == "bff-demo"]
    return unseal(parse_set_cookie(line)[1])


def assert_cleared(reply: Reply, login_line: str) -> None:
    [line] = reply.set_cookies
    name, value, attrs = parse_set_cookie(line)
    assert (name, value, attrs["max-age"]) == ("bff-demo", "", "0")
    assert cookie_attrs_without_expiry(line) == cookie_attrs_without_expiry(login_line)


# --------------------------------------------------------------------------- proactive


async def test_proactive_refresh_before_forwarding() -> None:
    # Tokens live 10 s and refresh_skew is 30 s: every request is within the skew.
    async with demo_env(access_ttl=10) as env:
        await login(env.browser)
        old_access, _ = last_pair(env.stats)
        reply = await env.browser.call("GET", "/api/headers")
        assert reply.status == 200
        assert env.stats.refresh_calls == 1
        assert env.stats.unauthorized_requests == 0
        new_access, new_refresh = last_pair(env.stats)
        assert new_access != old_access
        fingerprint = hashlib.sha256(new_access.encode()).hexdigest()
        assert reply.json()["authorization_sha256"] == [fingerprint]
        renewed = session_of(reply)
        assert (renewed.access_token, renewed.refresh_token) == (new_access, new_refresh)
        assert refresh_count(env, "success") == 1


async def test_a_refreshed_session_is_set_even_when_the_upstream_then_fails() -> None:
    """The refresh rotated the refresh token: a response without the new cookie would leave
    the browser with a spent token, and its next refresh after the grace period would
    revoke the whole family. So even a gateway error carries the new session."""
    dead = f"http://127.0.0.1:{free_port()}/"

    def routes(upstream: str) -> list[dict[str, Any]]:
        return [{"path": "/dead/", "upstream": dead, "auth": "demo"}]

    async with demo_env(access_ttl=10, routes=routes) as env:
        await login(env.browser)
        reply = await env.browser.call("GET", "/dead/user")
        assert reply.status == 502
        assert reply.error == "upstream_unavailable"
        assert env.stats.refresh_calls == 1
        renewed = session_of(reply)
        assert (renewed.access_token, renewed.refresh_token) == last_pair(env.stats)


async def test_no_refresh_while_the_token_is_outside_the_skew() -> None:
    async with demo_env(access_ttl=300, provider={"refresh_skew": 30}) as env:
        await login(env.browser)
        for _ in range(3):
            assert (await env.browser.call("GET", "/api/user")).status == 200
        assert env.stats.refresh_calls == 0


async def test_50_concurrent_requests_refresh_once_then_the_old_cookie_gets_the_grace_tokens() -> (
    None
):
    gate = RefreshGate()
    async with demo_env(access_ttl=10, setup=gate.install) as env:
        await login(env.browser)
        old_jar = dict(env.browser.jar)

        async def get(jar: dict[str, str]) -> Reply:
            return await env.browser.call("GET", "/api/user", cookies=jar)

        first = [asyncio.create_task(get(old_jar)) for _ in range(50)]
        # Every request is waiting on the one refresh before it is let through.
        await until(lambda: refresh_count(env, "coalesced") == 49)
        gate.release()
        replies = await asyncio.gather(*first)

        assert [r.status for r in replies] == [200] * 50
        assert env.stats.refresh_calls == 1
        assert env.stats.refresh_rejected == 0
        new_access, new_refresh = last_pair(env.stats)
        assert {session_of(r).access_token for r in replies} == {new_access}

        # Requests still carrying the pre-refresh cookie (sent before the browser stored the
        # new one) get the same new tokens from the grace cache: no second refresh.
        late = await asyncio.gather(*(get(old_jar) for _ in range(50)))
        assert [r.status for r in late] == [200] * 50
        assert env.stats.refresh_calls == 1
        assert {session_of(r).access_token for r in late} == {new_access}
        assert env.stats.unauthorized_requests == 0
        assert env.stats.authorized_requests == 100

        # The rotating family was never revoked: the new refresh token still works.
        assert env.stats.revoked_families == 0
        new_jar = {"bff-demo": parse_set_cookie(late[0].set_cookies[0])[1]}
        again = await get(new_jar)
        assert again.status == 200
        assert env.stats.refresh_calls == 2
        assert env.stats.refresh_rejected == 0
        assert session_of(again).refresh_token not in (None, new_refresh)


# --------------------------------------------------------------------------- reactive


@pytest.mark.parametrize("store", ["cookie", "memory"])
async def test_50_concurrent_401s_cause_one_refresh_and_every_request_is_replayed(
    store: str,
) -> None:
    gate = RefreshGate()
    async with demo_env(setup=gate.install, session={"store": store}) as env:
        await login(env.browser)
        env.authority.expire_access_tokens()  # the upstream now rejects the session's token

        tasks = [asyncio.create_task(env.browser.call("GET", "/api/user")) for _ in range(50)]
        await until(lambda: refresh_count(env, "coalesced") == 49)
        gate.release()
        replies = await asyncio.gather(*tasks)

        assert [r.status for r in replies] == [200] * 50
        assert {r.json()["username"] for r in replies} == {"demo"}
        assert env.stats.refresh_calls == 1
        assert env.stats.unauthorized_requests == 50  # each first attempt
        assert env.stats.authorized_requests == 50  # each replay
        assert all(r.set_cookies for r in replies)
        if store == "cookie":
            new_access, _ = last_pair(env.stats)
            assert {session_of(r).access_token for r in replies} == {new_access}
        assert env.stats.revoked_families == 0

        # The session the browser now holds works without another refresh.
        assert (await env.browser.call("GET", "/api/user")).status == 200
        assert env.stats.refresh_calls == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("endpoint", ["echo", "slurp"])
async def test_a_10_kib_body_is_replayed_byte_for_byte(framing: str, endpoint: str) -> None:
    slurp = Slurp()
    body = os.urandom(10 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    async with demo_env(setup=slurp.install) as env:
        await login(env.browser)
        env.authority.expire_access_tokens()
        data: Any = body if framing == "content-length" else chunks()
        reply = await env.browser.call("POST", f"/api/{endpoint}", data=data)
        assert reply.status == 200, reply.body
        assert reply.json() == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}
        assert env.stats.refresh_calls == 1
        assert session_of(reply).access_token == last_pair(env.stats)[0]
        if endpoint == "slurp":
            assert len(slurp.calls) == 2  # first attempt and replay both saw the whole body
            assert slurp.calls[0] == slurp.calls[1]


async def test_a_body_over_retry_buffer_size_is_not_replayed_but_the_cookie_is_refreshed() -> None:
    slurp = Slurp()
    server = {"limits": {"retry_buffer_size": 4096}}
    async with demo_env(server=server, setup=slurp.install) as env:
        await login(env.browser)
        old_cookie = env.browser.jar["bff-demo"]
        env.authority.expire_access_tokens()

        big = os.urandom(10 * 1024)
        reply = await env.browser.call("POST", "/api/slurp", data=big)
        assert reply.status == 401  # the upstream's own answer, not a gateway error
        assert reply.json() == {"error": "invalid_token"}
        assert len(slurp.calls) == 1  # no replay
        assert env.stats.refresh_calls == 1
        assert session_of(reply).access_token == last_pair(env.stats)[0]
        assert env.browser.jar["bff-demo"] != old_cookie

        # The next request already carries the refreshed session: no second refresh.
        after = await env.browser.call("POST", "/api/slurp", data=big)
        assert after.status == 200
        assert after.json()["sha256"] == hashlib.sha256(big).hexdigest()
        assert env.stats.refresh_calls == 1

        # A body that fits the buffer is replayed on the same gateway.
        env.authority.expire_access_tokens()
        small = os.urandom(4096)
        fits = await env.browser.call("POST", "/api/slurp", data=small)
        assert fits.status == 200
        assert fits.json()["sha256"] == hashlib.sha256(small).hexdigest()
        assert env.stats.refresh_calls == 2
        assert len(slurp.calls) == 4


async def test_a_second_refresh_on_status_is_returned_as_it_is() -> None:
    async with demo_env() as env:
        await login(env.browser)
        reply = await env.browser.call("GET", "/api/status/401")
        assert reply.status == 401
        assert reply.json() == {"status": 401}
        assert env.stats.refresh_calls == 1  # one refresh, one replay, no loop
        assert env.stats.authorized_requests == 2
        assert session_of(reply).access_token == last_pair(env.stats)[0]


@dataclass
class StaticRefreshProvider:
    """A provider that does NOT rotate: /refresh returns only a new (opaque) access token,
    the refresh token stays the same for the whole session (e.g. simplejwt's default)."""

    refresh_token: str = "static-refresh-token-0123456789"
    valid: set[str] = field(default_factory=set)
    refresh_calls: int = 0
    counter: int = 0

    def _access(self) -> str:
        self.counter += 1
        token = f"opaque-access-{self.counter}-{os.urandom(8).hex()}"
        self.valid.add(token)
        return token

    def app(self) -> web.Application:
        async def login_(request: web.Request) -> web.Response:
            return web.json_response({"token": self._access(), "refresh_token": self.refresh_token})

        async def refresh(request: web.Request) -> web.Response:
            self.refresh_calls += 1
            if (await request.json()).get("refresh_token") != self.refresh_token:
                return web.json_response({"error": "invalid_grant"}, status=400)
            return web.json_response({"token": self._access()})

        async def user(request: web.Request) -> web.Response:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if token not in self.valid:
                return web.json_response({"error": "invalid_token"}, status=401)
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/login", login_)
        app.router.add_post("/refresh", refresh)
        app.router.add_get("/user", user)
        return app


async def test_a_provider_that_does_not_rotate_can_refresh_again_within_the_grace_period() -> None:
    provider = StaticRefreshProvider()
    async with running_app(provider.app()) as base:
        env_cm = demo_env(
            provider={"login_url": f"{base}/login", "refresh_url": f"{base}/refresh"},
            routes=lambda _: [{"path": "/np/", "upstream": f"{base}/", "auth": "demo"}],
        )
        async with env_cm as env:
            await login(env.browser)
            for expected_calls in (1, 2, 3):
                provider.valid.clear()  # the provider expires every access token
                reply = await env.browser.call("GET", "/np/user")
                assert reply.status == 200, reply.body
                assert provider.refresh_calls == expected_calls
                session = session_of(reply)
                assert session.access_token in provider.valid
                assert session.refresh_token == provider.refresh_token


# --------------------------------------------------------------------------- refresh failures


@pytest.mark.parametrize("when", ["proactive", "reactive"])
async def test_a_revoked_family_ends_the_session(when: str) -> None:
    async with demo_env(access_ttl=10 if when == "proactive" else 300) as env:
        login_reply = await login(env.browser)
        access, _ = last_pair(env.stats)
        family = env.authority.family_of(access)
        assert family is not None
        env.authority.revoke_family(family)
        hits = env.hits

        reply = await env.browser.call("GET", "/api/user")
        assert reply.status == 401
        assert reply.error == "session_expired"
        assert env.stats.refresh_calls == 1
        assert env.stats.refresh_rejected == 1
        assert_cleared(reply, login_reply.set_cookies[0])
        assert env.browser.jar == {}
        assert env.hits == hits + (1 if when == "reactive" else 0)
        assert refresh_count(env, "rejected") == 1


@dataclass
class TokenService:
    """A refresh endpoint whose behaviour the test switches; ``ok`` rotates via the demo's
    own authority, so the demo API accepts what it hands out."""

    mode: str = "ok"
    authority: TokenAuthority | None = None
    calls: int = 0
    hang: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        async def refresh(request: web.Request) -> web.StreamResponse:
            self.calls += 1
            fields = await request.json()
            if self.mode == "hang":
                await self.hang.wait()
            if self.mode in ("500", "503", "429", "408", "400"):
                return web.json_response({"error": "x"}, status=int(self.mode))
            if self.mode == "garbage":
                return web.Response(text="<html>oops</html>", content_type="text/html")
            if self.mode == "no-token":
                return web.json_response({"refresh_token": "r"})
            assert self.authority is not None
            try:
                access, refresh = self.authority.refresh(fields["refresh_token"])
            except InvalidToken:
                return web.json_response({"error": "invalid_grant"}, status=401)
            return web.json_response({"token": access, "refresh_token": refresh})

        app = web.Application()
        app.router.add_post("/refresh", refresh)
        return app


@contextlib.asynccontextmanager
async def with_token_service(
    service: TokenService, **env_kwargs: Any
) -> AsyncIterator[tuple[Env, str]]:
    async with running_app(service.app()) as base:
        try:
            async with demo_env(provider={"refresh_url": f"{base}/refresh"}, **env_kwargs) as env:
                service.authority = env.authority
                yield env, base
        finally:
            service.hang.set()


async def test_a_refresh_rejected_with_400_invalid_grant_ends_the_session() -> None:
    service = TokenService(mode="400")
    async with with_token_service(service) as (env, _):
        login_reply = await login(env.browser)
        env.authority.expire_access_tokens()
        reply = await env.browser.call("GET", "/api/user")
        assert reply.status == 401
        assert reply.error == "session_expired"
        assert service.calls == 1
        assert_cleared(reply, login_reply.set_cookies[0])


@pytest.mark.parametrize("mode", ["500", "503", "429", "408", "garbage", "hang"])
async def test_a_failing_refresh_endpoint_is_503_and_keeps_the_session(mode: str) -> None:
    service = TokenService()
    server = {"timeouts": {"read": 0.3}}
    async with with_token_service(service, server=server) as (env, _):
        await login(env.browser)
        cookie = env.browser.jar["bff-demo"]
        env.authority.expire_access_tokens()

        service.mode = mode
        reply = await env.browser.call("GET", "/api/user")
        assert reply.status == 503
        assert reply.error == "refresh_unavailable"
        assert reply.set_cookies == []  # cookies kept
        assert env.browser.jar == {"bff-demo": cookie}
        assert service.calls == 1
        assert refresh_count(env, "error") == 1

        # The same session works once the token service is back.
        service.mode = "ok"
        again = await env.browser.call("GET", "/api/user")
        assert again.status == 200
        assert again.json()["username"] == "demo"
        assert service.calls == 2
        assert session_of(again).access_token == last_pair(env.stats)[0]


async def test_a_refused_refresh_endpoint_is_503_and_keeps_the_session() -> None:
    refused = f"http://127.0.0.1:{free_port()}/refresh"
    async with demo_env(provider={"refresh_url": refused}) as env:
        await login(env.browser)
        env.authority.expire_access_tokens()
        reply = await env.browser.call("GET", "/api/user")
        assert reply.status == 503
        assert reply.error == "refresh_unavailable"
        assert reply.set_cookies == []
        assert "bff-demo" in env.browser.jar


@pytest.mark.parametrize(
    "exception",
    [
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("broken"),
        aiohttp.ConnectionTimeoutError(),
    ],
)
async def test_client_side_failures_of_the_refresh_call_are_503_and_keep_the_session(
    exception: Exception,
) -> None:
    # aioresponses injects the failure into the gateway's auth client (the
    # refresh call); everything else passes through to the real servers.
    refresh_url = f"http://127.0.0.1:{free_port()}/refresh"
    async with demo_env(provider={"refresh_url": refresh_url}) as env:
        await login(env.browser)
        env.authority.expire_access_tokens()
        with aioresponses(passthrough=[env.gateway.url]) as mocked:
            mocked.post(refresh_url, exception=exception)
            reply = await env.browser.call("GET", "/api/user")
        assert reply.status == 503
        assert reply.error == "refresh_unavailable"
        assert reply.set_cookies == []
        assert "bff-demo" in env.browser.jar
        assert refresh_count(env, "error") == 1


async def test_a_refresh_answer_without_a_token_is_502_and_keeps_the_session() -> None:
    service = TokenService(mode="no-token")
    async with with_token_service(service) as (env, _):
        await login(env.browser)
        env.authority.expire_access_tokens()
        reply = await env.browser.call("GET", "/api/user")
        assert reply.status == 502
        assert reply.error == "upstream_invalid_response"
        assert reply.set_cookies == []


# --------------------------------------------------------------------------- no refresh possible


def expired_session(env: Env, *, refresh_token: str | None) -> Session:
    now = time.time()
    return Session(
        provider="demo",
        access_token=env.authority.issue_access_token(USERS["demo"]),
        refresh_token=refresh_token,
        expires_at=now - 5,
        created_at=now - 60,
        last_seen=now - 1,
        claims={},
    )


async def test_without_refresh_url_an_expired_session_ends_and_the_upstream_is_not_called() -> None:
    async with demo_env(provider={"refresh_url": None}) as env:
        cookie = seal(expired_session(env, refresh_token="some-refresh-token"))
        reply = await env.browser.call("GET", "/api/user", cookies={"bff-demo": cookie})
        assert reply.status == 401
        assert reply.error == "session_expired"
        assert env.hits == 0
        assert env.stats.refresh_calls == 0
        [line] = reply.set_cookies
        assert parse_set_cookie(line)[:2] == ("bff-demo", "")


async def test_without_a_refresh_token_an_expired_session_ends() -> None:
    async with demo_env() as env:
        cookie = seal(expired_session(env, refresh_token=None))
        reply = await env.browser.call("GET", "/api/user", cookies={"bff-demo": cookie})
        assert reply.status == 401
        assert reply.error == "session_expired"
        assert env.hits == 0
        assert env.stats.refresh_calls == 0


async def test_without_refresh_url_a_refresh_on_status_is_returned_as_it_is() -> None:
    async with demo_env(provider={"refresh_url": None}) as env:
        await login(env.browser)
        env.authority.expire_access_tokens()
        reply = await env.browser.call("GET", "/api/user")
        assert reply.status == 401
        assert reply.json()["error"] == "invalid_token"  # the upstream's answer
        assert "WWW-Authenticate" in reply.headers
        assert env.stats.refresh_calls == 0
        assert reply.set_cookies == []
        assert env.stats.unauthorized_requests == 1


# -- a request that outlives a refresh --------------------------------------------------


def _session_config(store: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    # idle_timeout 10 s: a session is touched (last_seen saved) at most once a second.
    config: dict[str, Any] = {"store": store, "idle_timeout": 10}
    if store == "redis":
        config["redis_url"] = request.getfixturevalue("redis_server").url
    return config


class HeldEndpoint:
    """An upstream endpoint ``/held`` that answers once released (a long poll)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.released = asyncio.Event()
        self.request: asyncio.Task[Reply] | None = None

    def setup(self, app: web.Application) -> None:
        async def held(request: web.Request) -> web.Response:
            self.entered.set()
            await self.released.wait()
            return web.json_response({"held": True})

        app.router.add_get("/held", held)

    async def start(self, env: Env) -> None:
        """Send the long request; return once the upstream holds it."""
        self.request = asyncio.create_task(env.browser.call("GET", "/api/held"))
        await self.entered.wait()

    async def finish(self) -> Reply:
        assert self.request is not None
        self.released.set()
        return await self.request


@contextlib.asynccontextmanager
async def _logged_in(
    held: HeldEndpoint, store: str, request: pytest.FixtureRequest, grace: float
) -> AsyncIterator[Env]:
    """A session with 2 s tokens (refreshed only once expired), logged in."""
    async with demo_env(
        access_ttl=2,
        provider={"refresh_skew": 0, "refresh_grace": grace},
        session=_session_config(store, request),
        setup=held.setup,
    ) as env:
        await login(env.browser)
        yield env


async def _past_the_touch_interval() -> None:
    await asyncio.sleep(1.2)  # the clock is the condition


async def _until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.time() + 0.3))  # the clock is the condition


async def _session_expiry(env: Env) -> float:
    return float((await env.browser.call("GET", "/auth/demo/session")).json()["expires_at"])


@pytest.mark.parametrize(("store", "grace"), [("memory", 0), ("redis", 0), ("cookie", 5)])
async def test_a_request_that_began_before_a_refresh_does_not_write_back_the_old_tokens(
    store: str, grace: float, request: pytest.FixtureRequest
) -> None:
    # A long request A reads the session (and touches it: last_seen is due) with the
    # old tokens; meanwhile B refreshes (the demo API rotates refresh tokens and
    # revokes the family when one is presented twice). When A ends, it must not save
    # its copy over B's: the next refresh would present the spent token and end the
    # session. Server-side stores refuse to write a touched session over a newer one
    # (refresh_grace 0 here, so nothing else can help); with the cookie store the
    # browser keeps whichever cookie came last, so A's answer carries B's tokens.
    held = HeldEndpoint()
    async with _logged_in(held, store, request, grace) as env:
        old_expiry = await _session_expiry(env)
        await _past_the_touch_interval()
        await held.start(env)
        await _until(old_expiry)
        refreshed = await env.browser.call("GET", "/api/user")
        assert refreshed.status == 200 and env.stats.refresh_calls == 1
        new_expiry = await _session_expiry(env)
        assert new_expiry > old_expiry
        assert (await held.finish()).status == 200
        assert await _session_expiry(env) == new_expiry
        after = await env.browser.call("GET", "/api/user")
        assert after.status == 200, after.body
        assert (env.stats.refresh_calls, env.stats.refresh_rejected) == (1, 0)
        assert env.stats.revoked_families == 0


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_request_that_outlived_two_refreshes_does_not_set_the_session_back_to_the_first(
    store: str, request: pytest.FixtureRequest
) -> None:
    # While A is held, the session is refreshed twice (RT0 -> RT1 -> RT2). A still
    # remembers RT0's refresh (RT1's tokens, within refresh_grace): it must not save
    # those over RT2's, whose refresh spent RT1.
    held = HeldEndpoint()
    async with _logged_in(held, store, request, 30) as env:
        await _past_the_touch_interval()
        await held.start(env)
        for _ in range(2):
            await _until(await _session_expiry(env))
            assert (await env.browser.call("GET", "/api/user")).status == 200
        assert env.stats.refresh_calls == 2
        latest = await _session_expiry(env)
        assert (await held.finish()).status == 200
        assert await _session_expiry(env) == latest
        assert env.stats.refresh_rejected == 0


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_refresh_is_saved_before_the_request_that_made_it_ends(
    store: str, request: pytest.FixtureRequest
) -> None:
    # A refreshes, then waits on a long poll. B, sent meanwhile with the same cookie,
    # must find the new tokens in the store: with the old ones it would refresh
    # again with a spent refresh token (refresh_grace 0: no remembered result).
    held = HeldEndpoint()
    async with _logged_in(held, store, request, 0) as env:
        old_expiry = await _session_expiry(env)
        await _until(old_expiry)
        await held.start(env)
        assert env.stats.refresh_calls == 1
        assert await _session_expiry(env) > old_expiry  # the store has the new tokens
        meanwhile = await env.browser.call("GET", "/api/user")
        assert meanwhile.status == 200, meanwhile.body
        assert (await held.finish()).status == 200
        assert (env.stats.refresh_calls, env.stats.refresh_rejected) == (1, 0)


async def test_a_request_that_outlives_a_logout_does_not_bring_the_session_back() -> None:
    # Memory store (Redis already updates only existing entries): a long request that
    # touched its session must not write it back after a logout deleted it.
    held = HeldEndpoint()
    async with demo_env(session={"store": "memory", "idle_timeout": 10}, setup=held.setup) as env:
        await login(env.browser)
        cookie = dict(env.browser.jar)
        await _past_the_touch_interval()
        await held.start(env)
        assert (await env.browser.call("POST", "/auth/demo/logout")).status == 204
        assert (await held.finish()).status == 200
        replay = await env.browser.call("GET", "/api/user", cookies=cookie)
        assert replay.status == 401 and replay.error == "login_required"


async def test_a_refresh_that_outlives_a_logout_does_not_bring_the_session_back() -> None:
    # The logout lands while the refresh call is at the provider: the refreshed
    # session must not be saved back into the memory store (Redis: SET XX).
    refreshing = asyncio.Event()

    @web.middleware
    async def note_refresh(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/refresh-token":
            refreshing.set()
        response: web.StreamResponse = await handler(request)
        return response

    def setup(app: web.Application) -> None:
        app.middlewares.append(note_refresh)

    async with demo_env(
        access_ttl=2,
        refresh_delay=0.5,
        provider={"refresh_skew": 0},
        session={"store": "memory"},
        setup=setup,
    ) as env:
        await login(env.browser)
        cookie = dict(env.browser.jar)
        await _until(await _session_expiry(env))
        refreshed = asyncio.create_task(env.browser.call("GET", "/api/user"))
        await refreshing.wait()
        assert (await env.browser.call("POST", "/auth/demo/logout")).status == 204
        assert (await refreshed).status == 200  # this request still had its session
        replay = await env.browser.call("GET", "/api/user", cookies=cookie)
        assert replay.status == 401 and replay.error == "login_required"
