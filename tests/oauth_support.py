"""Helpers for the oauth2 provider tests: a real OpenID Connect provider
(``oidc-provider-mock``, Authlib underneath) on a thread, an upstream that checks
every access token at that provider, and the browser's walk through a login.

What oidc-provider-mock 0.3.4 (the newest release for Python 3.11) lacks, and
what stands in, each with Authlib's own implementation rather than ours:

- an RFC 7009 revocation endpoint and the token lifetime after a refresh:
  added by gateway/demo/oidc.py (the demo's provider, reused here); the
  revocation endpoint is not in the discovery document, so the gateway is given
  ``revocation_url`` explicitly;
- rotating refresh tokens: Authlib's ``INCLUDE_NEW_REFRESH_TOKEN`` switched on
  for the mock's refresh grant when asked;
- PKCE: the mock does not register Authlib's CodeChallenge extension, so it
  ignores code_challenge; the recorder below checks S256(code_verifier) ==
  code_challenge for every exchange instead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest
from aiohttp import web
from oidc_provider_mock import _app as mock_app

from gateway.demo.oidc import provider_app, serve_in_thread
from tests.leakcheck import REGISTRY
from tests.session_support import Browser, Reply
from tests.support import RunningGateway, config_dict, running_app, running_gateway

CLIENT_ID = "bff-test"
CLIENT_SECRET = "s3cret-of-the-client"
ISSUED_TOKENS = ("access_token", "refresh_token", "id_token")  # searched for by tests/leakcheck.py


@dataclass
class Grant:
    grant_type: str
    form: dict[str, str]
    status: int = 0
    answer: dict[str, Any] = field(default_factory=dict)


@dataclass
class Record:
    """What reached the provider, as seen on the wire."""

    authorize: list[dict[str, str]] = field(default_factory=list)
    grants: list[Grant] = field(default_factory=list)
    revoked: list[dict[str, str]] = field(default_factory=list)
    pkce_ok: list[bool] = field(default_factory=list)  # per code exchange: S256 matched
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, grant_type: str) -> list[Grant]:
        with self.lock:
            return [g for g in self.grants if g.grant_type == grant_type]


class _Recorder:
    """WSGI middleware: records authorization requests, grants (with their answers)
    and revocations, and checks PKCE on every code exchange."""

    def __init__(self, app: Any, record: Record) -> None:
        self.app = app
        self.record = record

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "")
        if path == "/oauth2/authorize" and method == "POST":
            query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
            with self.record.lock:
                self.record.authorize.append(query)
            return self.app(environ, self._recording_code(start_response))
        if method == "POST" and path in ("/oauth2/token", "/oauth2/revoke"):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(body)
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            if path == "/oauth2/revoke":
                with self.record.lock:
                    self.record.revoked.append(form)
                return self.app(environ, start_response)
            grant = Grant(form.get("grant_type", ""), form)
            if grant.grant_type == "authorization_code":
                self._check_pkce(form)
            status: list[int] = []

            def capture(status_line: str, headers: Any, *rest: Any) -> Any:
                status.append(int(status_line.split()[0]))
                return start_response(status_line, headers, *rest)

            chunks = list(self.app(environ, capture))
            grant.status = status[0]
            with contextlib.suppress(ValueError):
                grant.answer = json.loads(b"".join(chunks))
            for kind in ISSUED_TOKENS:
                REGISTRY.record_secret(kind, grant.answer.get(kind))
            with self.record.lock:
                self.record.grants.append(grant)
            return chunks
        return self.app(environ, start_response)

    @staticmethod
    def _recording_code(start_response: Any) -> Any:
        """The provider's redirect back to the callback carries the code: record it."""

        def start(status_line: str, headers: Any, *rest: Any) -> Any:
            for name, value in headers:
                if name.lower() == "location":
                    REGISTRY.record_secret("code", query_of(value).get("code"))
            return start_response(status_line, headers, *rest)

        return start

    def _check_pkce(self, form: dict[str, str]) -> None:
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        with self.record.lock:
            sent = {a.get("code_challenge") for a in self.record.authorize}
            self.record.pkce_ok.append(challenge.rstrip(b"=").decode() in sent)


@dataclass
class OidcProvider:
    issuer: str
    record: Record

    @property
    def revocation_url(self) -> str:
        return f"{self.issuer}/oauth2/revoke"


@contextlib.contextmanager
def oidc_provider(
    monkeypatch: pytest.MonkeyPatch,
    *,
    access_ttl: float = 3600,
    rotate: bool = False,
    refresh_tokens: bool = True,
) -> Iterator[OidcProvider]:
    """The demo's provider (gateway/demo/oidc.py) on a thread, on 127.0.0.1 (its issuer
    is the URL it is called by), behind the recorder."""
    monkeypatch.setattr(mock_app.RefreshTokenGrant, "INCLUDE_NEW_REFRESH_TOKEN", rotate)
    app = provider_app(max(1, int(access_ttl)), refresh_tokens=refresh_tokens)
    record = Record()
    with serve_in_thread(_Recorder(app, record), "127.0.0.1", 0) as port:
        issuer = f"http://127.0.0.1:{port}"
        REGISTRY.record_end_session(f"{issuer}/oauth2/end_session")
        yield OidcProvider(issuer, record)


def userinfo_upstream(issuer: str, seen: list[str]) -> web.Application:
    """A resource server that accepts a request only if the provider's userinfo endpoint
    accepts its bearer token (so expiry and revocation are the provider's)."""

    async def resource(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        seen.append(auth)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{issuer}/userinfo", headers={"Authorization": auth}) as answer,
        ):
            if answer.status != 200:
                return web.json_response({"error": "invalid_token"}, status=401)
            claims = await answer.json()
        return web.json_response({"sub": claims.get("sub"), "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", resource)
    return app


@dataclass
class OidcEnv:
    provider: OidcProvider
    gateway: RunningGateway
    browser: Browser
    http: aiohttp.ClientSession
    seen: list[str]  # Authorization headers the upstream received
    gateway_data: dict[str, Any]  # the gateway's config, for a second replica

    def new_browser(self) -> Browser:
        return Browser(self.http, self.gateway.url)


def oidc_provider_config(provider: OidcProvider, **over: Any) -> dict[str, Any]:
    return {
        "type": "oauth2",
        "issuer": provider.issuer,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "revocation_url": provider.revocation_url,
        "scopes": ["openid", "profile", "email"],
        **over,
    }


@contextlib.asynccontextmanager
async def oidc_env(
    provider: OidcProvider, *, session: dict[str, Any] | None = None, **over: Any
) -> AsyncIterator[OidcEnv]:
    seen: list[str] = []
    async with running_app(userinfo_upstream(provider.issuer, seen)) as upstream:
        data = config_dict(
            [{"path": "/api/", "upstream": f"{upstream}/", "auth": "oidc"}],
            providers={"oidc": oidc_provider_config(provider, **over)},
            session=session or {},
        )
        async with (
            running_gateway(data) as gateway,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        ):
            yield OidcEnv(provider, gateway, Browser(http, gateway.url), http, seen, data)


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def authorize_at_provider(
    http: aiohttp.ClientSession, authorize_url: str, sub: str = "alice", deny: bool = False
) -> str:
    """The user at the provider's page: signs in as ``sub`` (or denies); returns where
    the provider sends the browser back (the gateway's callback URL)."""
    form = {"action": "deny"} if deny else {"sub": sub}
    async with http.post(authorize_url, data=form, allow_redirects=False) as answer:
        assert answer.status == 302, await answer.text()
        return answer.headers["Location"]


def local(url: str) -> str:
    """The path and query of a URL on the gateway."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


async def start_login(browser: Browser, return_to: str = "/app") -> Reply:
    reply = await browser.call(
        "GET", f"/auth/oidc/login?return_to={quote(return_to)}", follow=False
    )
    assert reply.status == 302, reply.body
    return reply


async def login_state(browser: Browser, return_to: str = "/app") -> str:
    """Start a login (as start_login) and return the state it sends to the provider."""
    started = await start_login(browser, return_to)
    return query_of(started.headers["Location"])["state"]


async def oidc_login(
    env: OidcEnv, browser: Browser | None = None, sub: str = "alice", return_to: str = "/app"
) -> Reply:
    """Gateway login -> provider -> gateway callback; returns the callback's reply."""
    browser = browser or env.browser
    started = await start_login(browser, return_to)
    callback = await authorize_at_provider(env.http, started.headers["Location"], sub)
    return await browser.call("GET", local(callback), follow=False)


CLIENT_AUTHORIZATION = {"Authorization": aiohttp.encode_basic_auth(CLIENT_ID, CLIENT_SECRET)}


async def provider_refresh(
    http: aiohttp.ClientSession, provider: OidcProvider, refresh_token: str
) -> int:
    """A refresh grant sent straight to the provider (as an attacker holding the token would)."""
    async with http.post(
        f"{provider.issuer}/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        headers=CLIENT_AUTHORIZATION,
    ) as answer:
        return answer.status


async def provider_revoke_access(
    http: aiohttp.ClientSession, provider: OidcProvider, access_token: str
) -> None:
    """Invalidate one access token at the provider, so its next use is refused."""
    async with http.post(
        provider.revocation_url,
        data={"token": access_token, "token_type_hint": "access_token"},
        headers=CLIENT_AUTHORIZATION,
    ) as answer:
        assert answer.status == 200
    with provider.record.lock:
        provider.record.revoked.pop()  # the test's own call, not the gateway's


async def until_expired(expires_at: float, margin: float = 0.3) -> None:
    """Wait out an access token's lifetime (the clock is the condition here)."""
    await asyncio.sleep(max(0.0, expires_at - time.time() + margin))


async def until_session_expires(env: OidcEnv, early: float = 0.0) -> None:
    """Wait until ``early`` seconds before the access token of ``env.browser``'s
    session expires (the expiry the gateway's session endpoint tells)."""
    session = (await env.browser.call("GET", "/auth/oidc/session")).json()
    await until_expired(session["expires_at"] - early)
