"""Attacks on the oauth2 callback: forged or replayed flows, forged ID tokens,
token endpoint failures, open redirects; and no token or code in any response,
URL or log line.

ID tokens are signed here with keys made by ``cryptography`` (through PyJWT),
served by a small OpenID Connect provider in this module whose token endpoint
answers whatever ID token the test hands it. The code-replay test runs against
the real provider (oidc-provider-mock).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway import proxy
from gateway.auth import oidc
from gateway.auth.flow import Flow, FlowCookies
from gateway.config import OAuth2Provider, SessionConfig
from gateway.sessions.seal import KeyRing, decode_key
from tests.integration.test_redis import RedisServer, redis_server  # noqa: F401 - a fixture
from tests.leakcheck import REGISTRY
from tests.oauth_support import (
    ISSUED_TOKENS,
    authorize_at_provider,
    local,
    login_state,
    oidc_env,
    oidc_provider,
    query_of,
    start_login,
    until_expired,
)
from tests.session_support import Browser, Reply
from tests.support import (
    TEST_KEY,
    captured_json_logs,
    config_dict,
    error_of,
    free_port,
    running_app,
    running_gateway,
)

CLIENT = "attack-client"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(alg)
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


@dataclass
class FakeIdp:
    """Discovery, JWKS and a token endpoint whose answer the test decides."""

    url: str = ""
    keys: list[dict[str, Any]] = field(default_factory=list)
    answer: Callable[[dict[str, str]], tuple[int, Any]] = lambda form: (500, {})
    token_calls: list[dict[str, str]] = field(default_factory=list)
    jwks_fetches: int = 0
    discovery_fetches: int = 0
    discovery_down: bool = False
    discovery_over: dict[str, Any] = field(default_factory=dict)  # keys the document changes
    revocations: list[str] = field(default_factory=list)  # token_type_hint of each call
    revoke_release: asyncio.Event = field(default_factory=asyncio.Event)  # it hangs until set

    def claims(self, nonce: str, **over: Any) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": self.url,
            "sub": "mallory",
            "aud": CLIENT,
            "iat": now,
            "exp": now + 300,
            "nonce": nonce,
            **over,
        }


@contextlib.asynccontextmanager
async def fake_idp() -> AsyncIterator[FakeIdp]:
    idp = FakeIdp(keys=[public_jwk(RSA_KEY, "rsa1", "RS256")])

    async def discovery(request: web.Request) -> web.Response:
        idp.discovery_fetches += 1
        if idp.discovery_down:
            return web.json_response({"error": "down"}, status=503)
        return web.json_response(
            {
                "issuer": idp.url,
                "authorization_endpoint": f"{idp.url}/authorize",
                "token_endpoint": f"{idp.url}/token",
                "jwks_uri": f"{idp.url}/jwks",
                **idp.discovery_over,
            }
        )

    async def jwks(request: web.Request) -> web.Response:
        idp.jwks_fetches += 1
        return web.json_response({"keys": idp.keys})

    async def token(request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        idp.token_calls.append(form)
        status, body = idp.answer(form)
        if isinstance(body, dict):
            for kind in ISSUED_TOKENS:
                REGISTRY.record_secret(kind, body.get(kind))
        if isinstance(body, str):
            return web.Response(status=status, text=body, content_type="text/plain")
        return web.json_response(body, status=status)

    async def revoke(request: web.Request) -> web.Response:
        idp.revocations.append(str((await request.post()).get("token_type_hint")))
        await idp.revoke_release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_post("/revoke", revoke)
    app.router.add_get("/jwks", jwks)
    app.router.add_post("/token", token)
    async with running_app(app) as url:
        idp.url = url
        yield idp


@dataclass
class Env:
    idp: FakeIdp
    browser: Browser
    http: aiohttp.ClientSession
    gateway_url: str


@contextlib.asynccontextmanager
async def attack_env(routes: list[dict[str, Any]] | None = None, **over: Any) -> AsyncIterator[Env]:
    async with fake_idp() as idp:
        provider = {
            "type": "oauth2",
            "issuer": idp.url,
            "client_id": CLIENT,
            "client_secret": "attack-secret",
            **over,
        }
        data = config_dict(routes or [], providers={"oidc": provider})
        async with (
            running_gateway(data) as gateway,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        ):
            yield Env(idp, Browser(http, gateway.url), http, gateway.url)


def token_answer(
    id_token: str | None, access: str = "at-0123456789", **more: Any
) -> dict[str, Any]:
    answer: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": 300}
    if id_token is not None:
        answer["id_token"] = id_token
    return {**answer, **more}


async def login_with(env: Env, make_id_token: Callable[[str], str | None]) -> Reply:
    """Start a login, let the token endpoint answer ``make_id_token(nonce)``; the callback."""
    started = await start_login(env.browser, "/home")
    query = query_of(started.headers["Location"])
    id_token = make_id_token(query["nonce"])
    env.idp.answer = lambda form: (200, token_answer(id_token))
    return await env.browser.call(
        "GET", f"/auth/oidc/callback?code=c0de-1&state={query['state']}", follow=False
    )


def rs256(claims: dict[str, Any], key: Any = RSA_KEY, kid: str = "rsa1", alg: str = "RS256") -> str:
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def unsigned(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, None, algorithm="none")


def hmac_with_public_key(claims: dict[str, Any]) -> str:
    # The classic confusion: HS256 keyed with the provider's public key (PEM), which
    # anyone can fetch. Built by hand: PyJWT itself refuses a PEM as an HMAC key.
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = b64(json.dumps({"alg": "HS256", "kid": "rsa1", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def assert_failed(reply: Reply, code: str, return_to: str = "/home") -> None:
    assert reply.status == 302, reply.body
    assert reply.headers["Location"] == f"{return_to}?bff_error={code}"
    assert not [n for n in reply.set_cookies if n.startswith("bff-oidc=")]


# -- ID tokens -------------------------------------------------------------------


async def test_a_valid_id_token_signed_rs256_logs_in() -> None:
    async with attack_env() as env:
        reply = await login_with(env, lambda nonce: rs256(env.idp.claims(nonce)))
        assert reply.headers["Location"] == "/home"
        session = (await env.browser.call("GET", "/auth/oidc/session")).json()
        assert session["claims"]["sub"] == "mallory"


@pytest.mark.parametrize("alg", ["ES256", "PS256"])
async def test_es256_and_ps256_id_tokens_are_accepted(alg: str) -> None:
    key = EC_KEY if alg == "ES256" else RSA_KEY
    async with attack_env() as env:
        env.idp.keys = [public_jwk(key, "k-" + alg, alg)]
        reply = await login_with(
            env, lambda nonce: rs256(env.idp.claims(nonce), key, "k-" + alg, alg)
        )
        assert reply.headers["Location"] == "/home"


FORGERIES: dict[str, Callable[[FakeIdp, str], str | None]] = {
    "wrong_aud": lambda idp, n: rs256(idp.claims(n, aud="someone-else")),
    "wrong_iss": lambda idp, n: rs256(idp.claims(n, iss="https://evil.example")),
    "wrong_nonce": lambda idp, n: rs256(idp.claims("another-login")),
    "no_nonce": lambda idp, n: rs256({k: v for k, v in idp.claims(n).items() if k != "nonce"}),
    "expired": lambda idp, n: rs256(idp.claims(n, exp=int(time.time()) - 600)),
    "issued_in_the_future": lambda idp, n: rs256(idp.claims(n, iat=int(time.time()) + 3600)),
    "azp_of_another_client": lambda idp, n: rs256(idp.claims(n, aud=[CLIENT, "x"], azp="x")),
    "several_audiences_no_azp": lambda idp, n: rs256(idp.claims(n, aud=[CLIENT, "x"])),
    "bad_signature": lambda idp, n: rs256(idp.claims(n), key=OTHER_RSA_KEY),
    "tampered_payload": lambda idp, n: _tampered(rs256(idp.claims(n))),
    "alg_none": lambda idp, n: unsigned(idp.claims(n)),
    "hmac_with_the_public_key": lambda idp, n: hmac_with_public_key(idp.claims(n)),
    "unknown_kid": lambda idp, n: rs256(idp.claims(n), key=OTHER_RSA_KEY, kid="never-published"),
    "not_a_jwt": lambda idp, n: "not.a.jwt",
    "missing": lambda idp, n: None,
}


def _tampered(token: str) -> str:
    head, body, sig = token.split(".")
    import base64

    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["sub"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_a_forged_or_invalid_id_token_is_refused(forgery: str) -> None:
    async with attack_env() as env:
        reply = await login_with(env, lambda nonce: FORGERIES[forgery](env.idp, nonce))
        assert_failed(reply, "invalid_id_token")
        assert (await env.browser.call("GET", "/auth/oidc/session")).json() == {
            "authenticated": False
        }


async def test_an_unknown_kid_fetches_the_keys_again_once() -> None:
    async with attack_env() as env:
        assert (await login_with(env, lambda n: rs256(env.idp.claims(n)))).status == 302
        assert env.idp.jwks_fetches == 1
        # The provider rotates to a new key: the cached set lacks it, one refetch finds it.
        env.idp.keys = [public_jwk(OTHER_RSA_KEY, "rsa2", "RS256")]
        reply = await login_with(env, lambda n: rs256(env.idp.claims(n), OTHER_RSA_KEY, "rsa2"))
        assert reply.headers["Location"] == "/home"
        assert env.idp.jwks_fetches == 2
        # A kid nobody publishes: one refetch, then refused.
        reply = await login_with(env, lambda n: rs256(env.idp.claims(n), RSA_KEY, "ghost"))
        assert_failed(reply, "invalid_id_token")
        assert env.idp.jwks_fetches == 3


async def test_a_withdrawn_key_stops_verifying_once_the_key_set_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with attack_env() as env:
        assert (await login_with(env, lambda n: rs256(env.idp.claims(n)))).status == 302
        assert env.idp.jwks_fetches == 1
        # The provider withdraws the key (same kid): cached, it still verifies for now.
        env.idp.keys = [public_jwk(OTHER_RSA_KEY, "rsa1", "RS256")]
        assert (await login_with(env, lambda n: rs256(env.idp.claims(n)))).status == 302
        assert env.idp.jwks_fetches == 1
        # Once the set's lifetime (an hour) is over it is fetched again, and the
        # withdrawn key no longer verifies.
        monkeypatch.setattr(oidc, "KEYS_TTL", 0.0)
        reply = await login_with(env, lambda n: rs256(env.idp.claims(n)))
        assert_failed(reply, "invalid_id_token")
        assert env.idp.jwks_fetches == 2


# -- flows -----------------------------------------------------------------------


async def test_a_callback_without_state_or_flow_cookie_is_refused() -> None:
    async with attack_env() as env:
        env.idp.answer = lambda form: (200, token_answer(None))
        no_state = await env.browser.call("GET", "/auth/oidc/callback?code=x", follow=False)
        assert no_state.headers["Location"] == "/?bff_error=invalid_state"
        unknown = await env.browser.call(
            "GET", "/auth/oidc/callback?code=x&state=guessed", follow=False
        )
        assert unknown.headers["Location"] == "/?bff_error=invalid_state"
        assert env.idp.token_calls == []


async def test_a_state_that_is_not_the_flow_cookies_is_refused() -> None:
    async with attack_env() as env:
        started = await start_login(env.browser, "/home")
        (name,) = [n for n in env.browser.jar if n.startswith("bff~flow-")]
        state = query_of(started.headers["Location"])["state"]
        # Another login's state, the victim's flow cookie renamed to match it.
        other = await start_login(Browser(env.http, env.gateway_url), "/x")
        other_state = query_of(other.headers["Location"])["state"]
        other_name = next(iter(other.set_cookies)).split("=", 1)[0]
        forged = {other_name: env.browser.jar[name]}
        reply = await env.browser.call(
            "GET", f"/auth/oidc/callback?code=x&state={other_state}", cookies=forged, follow=False
        )
        assert reply.headers["Location"] == "/?bff_error=invalid_state"
        # And the right cookie with a wrong state value.
        reply = await env.browser.call(
            "GET", f"/auth/oidc/callback?code=x&state={state}x", follow=False
        )
        assert reply.headers["Location"] == "/?bff_error=invalid_state"
        assert env.idp.token_calls == []


async def test_a_reused_flow_cookie_is_refused_before_the_provider_sees_the_code() -> None:
    async with attack_env() as env:
        started = await start_login(env.browser, "/home")
        state = query_of(started.headers["Location"])["state"]
        nonce = query_of(started.headers["Location"])["nonce"]
        env.idp.answer = lambda form: (200, token_answer(rs256(env.idp.claims(nonce))))
        flow_jar = dict(env.browser.jar)
        callback = f"/auth/oidc/callback?code=c1&state={state}"
        first = await env.browser.call("GET", callback, follow=False)
        assert first.headers["Location"] == "/home"
        replay = await env.browser.call("GET", callback, cookies=flow_jar, follow=False)
        assert replay.headers["Location"] == "/home?bff_error=flow_reused"
        assert len(env.idp.token_calls) == 1


async def test_an_expired_flow_is_refused() -> None:
    async with attack_env() as env:
        state = await login_state(env.browser, "/home")
        session = SessionConfig.model_validate({"secure": False, "keys": []})
        cookies = FlowCookies(session, KeyRing([("k1", decode_key(TEST_KEY))]))
        old = Flow("oidc", state, "v" * 64, "n", "/home", time.time() - 1)
        line = cookies.set_cookie(old)
        name, value = line.split(";")[0].split("=", 1)
        reply = await env.browser.call(
            "GET", f"/auth/oidc/callback?code=x&state={state}", cookies={name: value}, follow=False
        )
        assert reply.headers["Location"] == "/home?bff_error=flow_expired"
        assert f"{name}=;" in " ".join(reply.set_cookies)  # cleared
        assert env.idp.token_calls == []


async def test_a_replayed_code_is_refused_by_the_real_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with oidc_provider(monkeypatch) as provider:
        async with oidc_env(provider) as env:
            started = await start_login(env.browser, "/app")
            callback = await authorize_at_provider(env.http, started.headers["Location"])
            assert (await env.browser.call("GET", local(callback), follow=False)).status == 302
            code = query_of(callback)["code"]
            # A fresh flow of the attacker's, fed the victim's used code.
            attacker = env.new_browser()
            fresh = await start_login(attacker, "/app")
            state = query_of(fresh.headers["Location"])["state"]
            reply = await attacker.call(
                "GET", f"/auth/oidc/callback?code={code}&state={state}", follow=False
            )
            assert reply.headers["Location"] == "/app?bff_error=token_exchange_failed"
            assert "bff-oidc" not in attacker.jar
            assert [g.status for g in provider.record.of("authorization_code")] == [200, 400]


# -- the token endpoint --------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (400, {"error": "invalid_grant"}, "token_exchange_failed"),
        (401, {"error": "invalid_client"}, "token_exchange_failed"),
        (200, {"error": "bad_verification_code"}, "token_exchange_failed"),
        (500, {"error": "server_error"}, "provider_unavailable"),
        (503, "busy", "provider_unavailable"),
        (200, "<html>not json</html>", "provider_unavailable"),
        (200, {"token_type": "Bearer"}, "invalid_token_response"),
    ],
)
async def test_token_endpoint_failures_end_in_a_redirect(status: int, body: Any, code: str) -> None:
    async with attack_env() as env:
        state = await login_state(env.browser, "/home")
        env.idp.answer = lambda form: (status, body)
        reply = await env.browser.call(
            "GET", f"/auth/oidc/callback?code=x&state={state}", follow=False
        )
        assert_failed(reply, code)
        assert not [n for n in env.browser.jar if n.startswith("bff~flow-")]


async def test_an_unreachable_provider_ends_in_a_redirect() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    explicit = {
        "type": "oauth2",
        "authorize_url": f"{dead}/authorize",
        "token_url": f"{dead}/token",
        "client_id": CLIENT,
        "client_secret": "attack-secret",
        "scopes": ["user"],
    }
    discovered = {**explicit, "issuer": dead, "scopes": ["openid"]}
    del discovered["authorize_url"], discovered["token_url"]
    data = config_dict([], providers={"oidc": explicit, "disc": discovered})
    async with (
        running_gateway(data) as gateway,
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
    ):
        browser = Browser(http, gateway.url)
        state = await login_state(browser, "/home")
        reply = await browser.call("GET", f"/auth/oidc/callback?code=x&state={state}", follow=False)
        assert_failed(reply, "provider_unavailable")
        # Discovery that fails: the login itself comes back with the error.
        login = await browser.call("GET", "/auth/disc/login?return_to=/home", follow=False)
        assert login.headers["Location"] == "/home?bff_error=provider_unavailable"
        assert login.set_cookies == []


# -- open redirects ------------------------------------------------------------------

EVIL_RETURN_TO = [
    "//evil.example",
    "/\\evil.example",
    "https:evil.example",
    "%09/evil.example",
    "/%2F/evil.example",
    "/%5Cevil.example",
    "https://evil.example/",
    "http://evil.example",
    "\t//evil.example",
    "/%0d%0aSet-Cookie:x=y",
    "javascript:alert(1)",
]


@pytest.mark.parametrize("return_to", EVIL_RETURN_TO)
async def test_a_return_to_off_this_site_becomes_the_root(return_to: str) -> None:
    async with attack_env() as env:
        started = await start_login(env.browser, return_to)
        query = query_of(started.headers["Location"])
        nonce, state = query["nonce"], query["state"]
        env.idp.answer = lambda form: (200, token_answer(rs256(env.idp.claims(nonce))))
        reply = await env.browser.call(
            "GET", f"/auth/oidc/callback?code=c&state={state}", follow=False
        )
        assert reply.headers["Location"] == "/"
        # The failure path too: a second use of the flow.
        env.browser.jar.update({n: v for n, v in started_flow(started).items()})
        again = await env.browser.call(
            "GET", f"/auth/oidc/callback?code=c&state={state}", follow=False
        )
        assert again.headers["Location"] == "/?bff_error=flow_reused"
        # The logout redirect follows the same rule.
        logout = await env.browser.call(
            "GET", f"/auth/oidc/logout?return_to={return_to}", follow=False
        )
        assert logout.headers["Location"] == "/"


def started_flow(started: Reply) -> dict[str, str]:
    return dict(line.split(";")[0].split("=", 1) for line in started.set_cookies)


# -- nothing secret in any URL, response or log line ------------------------------------


async def test_no_token_or_code_in_any_response_url_or_log_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with (
        oidc_provider(monkeypatch, access_ttl=2) as provider,
        captured_json_logs("bff", logging.INFO) as logs,
    ):
        async with oidc_env(provider, refresh_skew=1) as env:
            replies: list[Reply] = []
            started = await start_login(env.browser, "/app")
            replies.append(started)
            callback = await authorize_at_provider(env.http, started.headers["Location"])
            code = query_of(callback)["code"]
            replies.append(await env.browser.call("GET", local(callback), follow=False))
            replies.append(await env.browser.call("GET", "/auth/oidc/session"))
            session = replies[-1].json()
            await until_expired(session["expires_at"] - 1)
            replies.append(await env.browser.call("GET", "/api/refreshed"))
            # A failed callback with a real-looking code.
            replies.append(
                await env.browser.call(
                    "GET", f"/auth/oidc/callback?code={code}&state=nope", follow=False
                )
            )
            replies.append(await env.browser.call("POST", "/auth/oidc/logout"))
        grants = provider.record.grants
        secrets = [code]
        for grant in grants:
            secrets += [
                v
                for k, v in grant.answer.items()
                if k in ("access_token", "refresh_token", "id_token")
            ]
        assert len(secrets) >= 5
        text = logs.getvalue()
        # The gateway did log these requests (and the failed login), with no secret in them.
        assert "/auth/oidc/callback" in text and "login failed" in text
        for reply in replies:
            seen = reply.body.decode("latin-1") + json.dumps(dict(reply.headers))
            for secret in secrets:
                assert secret not in seen, "a token or code reached the browser"
        for secret in secrets:
            assert secret not in text, "a token or code reached a log line"


async def test_abandoned_logins_do_not_pile_up_in_the_cookie_header() -> None:
    async with attack_env() as env:
        starts = [await start_login(env.browser, f"/t{i}") for i in range(6)]
        flows = [n for n in env.browser.jar if n.startswith("bff~flow-")]
        assert len(flows) == 3  # the newest three
        # The newest still finishes; the oldest is gone.
        last = query_of(starts[-1].headers["Location"])
        env.idp.answer = lambda form: (200, token_answer(rs256(env.idp.claims(last["nonce"]))))
        done = await env.browser.call(
            "GET", f"/auth/oidc/callback?code=c&state={last['state']}", follow=False
        )
        assert done.headers["Location"] == "/t5"
        first = query_of(starts[0].headers["Location"])["state"]
        gone = await env.browser.call(
            "GET", f"/auth/oidc/callback?code=c&state={first}", follow=False
        )
        assert gone.headers["Location"] == "/?bff_error=invalid_state"


async def test_a_provider_slow_to_revoke_does_not_hold_the_logout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Revocation is best effort: past its own short limit (5 s; 0.3 here) the logout
    # answers and expires the cookies, where the read timeout (60 s) would hold it.
    monkeypatch.setattr(proxy, "REVOKE_TIMEOUT", 0.3)
    async with attack_env() as env:
        env.idp.discovery_over["revocation_endpoint"] = f"{env.idp.url}/revoke"
        assert (await login_with(env, lambda n: rs256(env.idp.claims(n)))).status == 302
        logout = await asyncio.wait_for(env.browser.call("POST", "/auth/oidc/logout"), 20)
        assert logout.status == 204
        assert env.idp.revocations == ["access_token"]  # asked (no refresh token), never answered
        assert (await env.browser.call("GET", "/auth/oidc/session")).json() == {
            "authenticated": False
        }
        env.idp.revoke_release.set()


async def test_a_cross_site_logout_link_does_not_log_out() -> None:
    async with attack_env() as env:
        assert (await login_with(env, lambda n: rs256(env.idp.claims(n)))).status == 302
        reply = await env.browser.call(
            "GET",
            "/auth/oidc/logout?return_to=/x",
            headers={"Sec-Fetch-Site": "cross-site"},
            follow=False,
        )
        assert reply.headers["Location"] == "/x?bff_error=csrf_failed"
        assert "bff-oidc" in env.browser.jar
        session = (await env.browser.call("GET", "/auth/oidc/session")).json()
        assert session["authenticated"] is True


async def test_methods_of_the_oauth2_endpoints() -> None:
    async with attack_env() as env:
        login = await env.browser.call("POST", "/auth/oidc/login", follow=False)
        assert login.status == 405 and login.headers["Allow"] == "GET"
        callback = await env.browser.call("POST", "/auth/oidc/callback", follow=False)
        assert callback.status == 405
        put = await env.browser.call("PUT", "/auth/oidc/logout", follow=False)
        assert put.status == 405


async def test_discovery_is_cached_and_fetched_again_after_a_failure() -> None:
    async with attack_env() as env:
        env.idp.discovery_down = True
        failed = await env.browser.call("GET", "/auth/oidc/login?return_to=/a", follow=False)
        assert failed.headers["Location"] == "/a?bff_error=provider_unavailable"
        env.idp.discovery_down = False
        for _ in range(2):
            reply = await login_with(env, lambda n: rs256(env.idp.claims(n)))
            assert reply.headers["Location"] == "/home"
        assert env.idp.discovery_fetches == 2  # the failure, then one fetch for both logins
        # A token endpoint that fails: what discovery said may be stale, so ask again.
        started = await start_login(env.browser, "/home")
        env.idp.answer = lambda form: (502, "bad gateway")
        state = query_of(started.headers["Location"])["state"]
        await env.browser.call("GET", f"/auth/oidc/callback?code=x&state={state}", follow=False)
        assert (await login_with(env, lambda n: rs256(env.idp.claims(n)))).status == 302
        assert env.idp.discovery_fetches == 3


# -- answers that arrive in parts -------------------------------------------------------


async def test_a_token_answer_or_jwks_sent_in_parts_is_read_whole() -> None:
    # Large enough that the socket delivers it in several reads (a TLS record is
    # 16 KiB): a reader that took the first part only would see broken JSON.
    async with attack_env() as env:
        padding = "x" * 400_000
        env.idp.keys = [*env.idp.keys, {**public_jwk(EC_KEY, "big", "ES256"), "x5c": [padding]}]
        started = await start_login(env.browser, "/home")
        query = query_of(started.headers["Location"])
        answer = {**token_answer(rs256(env.idp.claims(query["nonce"]))), "extra": padding}
        env.idp.answer = lambda form: (200, answer)
        reply = await env.browser.call(
            "GET", f"/auth/oidc/callback?code=c&state={query['state']}", follow=False
        )
        assert reply.headers["Location"] == "/home"
        # Over the limit (1 MiB) is still refused.
        state = await login_state(env.browser, "/home")
        env.idp.answer = lambda form: (200, {**answer, "extra": "x" * 1_100_000})
        reply = await env.browser.call(
            "GET", f"/auth/oidc/callback?code=c&state={state}", follow=False
        )
        assert_failed(reply, "provider_unavailable")


@pytest.mark.parametrize(
    ("token_type", "accepted"), [("DPoP", False), ("mac", False), ("bearer", True)]
)
async def test_only_bearer_access_tokens_are_accepted(token_type: str, accepted: bool) -> None:
    # RFC 6749 §7.1: a client must not use a token of a type it does not understand;
    # the gateway sends "Authorization: Bearer", so a DPoP-bound token is useless to it.
    async with attack_env() as env:
        started = await start_login(env.browser, "/home")
        query = query_of(started.headers["Location"])
        answer = {
            **token_answer(rs256(env.idp.claims(query["nonce"]))),
            "token_type": token_type,
        }
        env.idp.answer = lambda form: (200, answer)
        reply = await env.browser.call(
            "GET", f"/auth/oidc/callback?code=c&state={query['state']}", follow=False
        )
        if accepted:
            assert reply.headers["Location"] == "/home"
        else:
            assert_failed(reply, "invalid_token_response")


@pytest.mark.parametrize(
    ("return_to", "lands_on"),
    [
        ("/" + "a" * 2040, "/" + "a" * 2040),  # long, and kept
        ("/" + "é" * 1500, "/"),  # 1,501 characters, 9,001 once percent-encoded
        ("/" + "<" * 1500, "/"),
    ],
)
async def test_a_return_to_never_makes_the_flow_cookie_too_big_for_a_browser(
    return_to: str, lands_on: str
) -> None:
    # Browsers drop a cookie whose name and value pass 4096 bytes (RFC 6265 §6.1): the
    # login would then always end in invalid_state.
    async with attack_env() as env:
        started = await start_login(env.browser, return_to)
        ((name, value),) = started_flow(started).items()
        assert len(name) + len(value) <= 4096
        query = query_of(started.headers["Location"])
        env.idp.answer = lambda form: (200, token_answer(rs256(env.idp.claims(query["nonce"]))))
        reply = await env.browser.call(
            "GET", f"/auth/oidc/callback?code=c&state={query['state']}", follow=False
        )
        assert reply.headers["Location"] == lands_on


async def test_a_discovery_document_of_another_issuer_is_refused() -> None:
    # OIDC Discovery §4.3: its issuer must be the one configured, else its endpoints and
    # keys are not that issuer's.
    async with attack_env() as env:
        env.idp.discovery_over = {
            "issuer": "https://evil.example",
            "authorization_endpoint": "https://evil.example/authorize",
        }
        login = await env.browser.call("GET", "/auth/oidc/login?return_to=/a", follow=False)
        assert login.headers["Location"] == "/a?bff_error=provider_unavailable"
        assert login.set_cookies == []


async def test_discovery_over_https_takes_no_plain_http_endpoint(ca: trustme.CA) -> None:
    # A document fetched over TLS naming an http:// token endpoint would have the code
    # and the client's secret, then the tokens, cross the network in the clear.
    document: dict[str, str] = {}

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response(document)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(served)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with (
        running_app(app, ssl_context=served) as issuer,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusting)) as client,
    ):
        plain = issuer.replace("https://", "http://")
        document.update(
            issuer=issuer,
            authorization_endpoint=f"{issuer}/authorize",
            token_endpoint=f"{plain}/token",
            jwks_uri=f"{plain}/jwks",
            revocation_endpoint=f"{plain}/revoke",
            end_session_endpoint=f"{issuer}/logout",
        )
        config = OAuth2Provider(type="oauth2", issuer=issuer, client_id=CLIENT)
        found = oidc.Discovery(config, client, aiohttp.ClientTimeout(total=5))
        with pytest.raises(oidc.ProviderUnavailable, match="no authorization or token"):
            await found.endpoints()
        document["token_endpoint"] = f"{issuer}/token"
        found.forget()
        endpoints = await found.endpoints()
        assert (endpoints.token_url, endpoints.end_session_url) == (
            f"{issuer}/token",
            f"{issuer}/logout",
        )
        assert endpoints.jwks_url is None and endpoints.revocation_url is None


async def test_a_flow_started_for_one_provider_is_refused_by_anothers_callback() -> None:
    # Two providers at one authorization server (say two client ids of different
    # rights): a flow and code of one must not log in to the other.
    async with fake_idp() as idp:
        provider = {"type": "oauth2", "issuer": idp.url, "client_id": CLIENT, "client_secret": "s"}
        data = config_dict([], providers={"oidc": provider, "admin": provider})
        async with (
            running_gateway(data) as gateway,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        ):
            browser = Browser(http, gateway.url)
            started = await start_login(browser, "/home")
            query = query_of(started.headers["Location"])
            idp.answer = lambda form: (200, token_answer(rs256(idp.claims(query["nonce"]))))
            reply = await browser.call(
                "GET", f"/auth/admin/callback?code=c&state={query['state']}", follow=False
            )
            assert reply.headers["Location"] == "/?bff_error=invalid_state"
            assert idp.token_calls == []
            assert (await browser.call("GET", "/auth/admin/session")).json() == {
                "authenticated": False
            }


async def test_a_flow_used_on_one_replica_is_refused_on_another_sharing_redis(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    # The used-flow list lives in Redis: a flow cookie replayed to another replica (or
    # worker) is refused there too, before its code reaches the provider.
    async with fake_idp() as idp:
        provider = {"type": "oauth2", "issuer": idp.url, "client_id": CLIENT, "client_secret": "s"}
        data = config_dict(
            [], providers={"oidc": provider}, session={"redis_url": redis_server.url}
        )
        other_ports = {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
        }
        async with (
            running_gateway(data) as first,
            running_gateway({**data, "server": {**data["server"], **other_ports}}) as second,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        ):
            browser = Browser(http, first.url)
            started = await start_login(browser, "/home")
            query = query_of(started.headers["Location"])
            idp.answer = lambda form: (200, token_answer(rs256(idp.claims(query["nonce"]))))
            flow_jar = dict(browser.jar)
            callback = f"/auth/oidc/callback?code=c&state={query['state']}"
            assert (await browser.call("GET", callback, follow=False)).headers[
                "Location"
            ] == "/home"
            replay = await Browser(http, second.url).call(
                "GET", callback, cookies=flow_jar, follow=False
            )
            assert replay.headers["Location"] == "/home?bff_error=flow_reused"
            assert len(idp.token_calls) == 1


async def test_a_new_login_replaces_a_session_cookie_the_callback_did_not_see() -> None:
    # The callback is a navigation from the provider's site: the browser does not send
    # the SameSite=Strict session cookie there. A new session too big for one cookie
    # (written as chunks) must still replace the old unchunked one, which would
    # otherwise win and keep the previous user logged in.
    async with attack_env() as env:
        first = await login_with(env, lambda n: rs256(env.idp.claims(n, sub="alice")))
        assert first.headers["Location"] == "/home"
        assert "bff-oidc" in env.browser.jar
        started = await start_login(env.browser, "/home")
        query = query_of(started.headers["Location"])
        id_token = rs256(env.idp.claims(query["nonce"], sub="bob"))
        env.idp.answer = lambda form: (200, token_answer(id_token, access="at-" + "b" * 5000))
        flow_only = {n: v for n, v in env.browser.jar.items() if n.startswith("bff~flow-")}
        reply = await env.browser.call(
            "GET",
            f"/auth/oidc/callback?code=c&state={query['state']}",
            cookies=flow_only,
            follow=False,
        )
        assert reply.headers["Location"] == "/home"
        env.browser.absorb(reply)
        assert "bff-oidc.0" in env.browser.jar  # the new session is chunked
        session = (await env.browser.call("GET", "/auth/oidc/session")).json()
        assert session["claims"]["sub"] == "bob"


# -- refresh ------------------------------------------------------------------------


@pytest.mark.parametrize("refreshed_sub", ["alice", "bob"])
async def test_a_refreshed_id_token_must_name_the_same_end_user(refreshed_sub: str) -> None:
    # OIDC Core §12.2: a refresh answer's ID token must have the login's iss and sub. One
    # naming someone else (a confused or compromised provider, a refresh token of another
    # session) ends the session: the request is refused and its token never sent.
    seen: list[str] = []

    async def api(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/me", api)
    async with running_app(app) as upstream:
        routes = [{"path": "/api/", "upstream": f"{upstream}/", "auth": "oidc"}]
        async with attack_env(routes) as env:
            start = await start_login(env.browser, "/home")
            nonce, state = (query_of(start.headers["Location"])[k] for k in ("nonce", "state"))
            login = token_answer(
                rs256(env.idp.claims(nonce, sub="alice")),
                "at-login-0001",
                expires_in=1,
                refresh_token="rt-login-0001",
            )
            refreshed_claims = env.idp.claims("", sub=refreshed_sub)
            del refreshed_claims["nonce"]  # a refreshed ID token carries none (§12.2)
            refreshed = token_answer(rs256(refreshed_claims), "at-refreshed-01")
            env.idp.answer = lambda form: (
                200,
                login if form["grant_type"] == "authorization_code" else refreshed,
            )
            callback = await env.browser.call(
                "GET", f"/auth/oidc/callback?code=c0de&state={state}", follow=False
            )
            assert callback.headers["Location"] == "/home"
            # The access token is within refresh_skew of its expiry: this call refreshes.
            reply = await env.browser.call("GET", "/api/me")
            grants = [call["grant_type"] for call in env.idp.token_calls]
            assert grants == ["authorization_code", "refresh_token"]
            if refreshed_sub == "alice":
                assert reply.status == 200
                assert seen == ["Bearer at-refreshed-01"]
            else:
                assert reply.status == 401 and error_of(reply.body) == "session_expired"
                assert seen == []
                assert "bff-oidc" not in env.browser.jar  # the session cookie is cleared
                again = await env.browser.call("GET", "/api/me")
                assert again.status == 401 and error_of(again.body) == "login_required"
