"""type: oauth2 against a real OpenID Connect provider (oidc-provider-mock on Authlib,
started by the test; tests/oauth_support.py says what it lacks and what stands in).

Login redirect, authorization, callback, proxied calls checked by the provider
itself, proactive and reactive refresh over several short token lifetimes, one
refresh grant for 50 concurrent expired requests, rotation, logout with
revocation, RP-initiated logout.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.oauth_support import (
    CLIENT_ID,
    authorize_at_provider,
    local,
    oidc_env,
    oidc_login,
    oidc_provider,
    query_of,
    start_login,
)
from tests.session_support import parse_set_cookie, unseal


async def test_login_redirects_to_the_provider_with_state_pkce_and_nonce(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with oidc_provider(monkeypatch) as provider:
        async with oidc_env(provider) as env:
            reply = await start_login(env.browser, "/dashboard?tab=1")
            location = reply.headers["Location"]
            assert location.startswith(f"{provider.issuer}/oauth2/authorize?")
            query = query_of(location)
            assert query["response_type"] == "code"
            assert query["client_id"] == CLIENT_ID
            assert query["redirect_uri"] == f"{env.gateway.url}/auth/oidc/callback"
            assert query["scope"] == "openid profile email"
            assert query["code_challenge_method"] == "S256"
            assert len(query["code_challenge"]) == 43
            assert len(query["state"]) >= 43 and len(query["nonce"]) >= 43
            (flow_cookie,) = reply.set_cookies
            name, value, attrs = parse_set_cookie(flow_cookie)
            assert name.startswith("bff~flow-")
            assert attrs["samesite"] == "Lax" and "httponly" in attrs
            assert attrs["max-age"] == "600" and attrs["path"] == "/"
            # The flow is sealed: neither state, verifier nor nonce can be read from it.
            assert query["state"] not in value and query["nonce"] not in value
            assert reply.headers["Cache-Control"] == "no-store"


async def test_a_full_login_starts_a_session_and_the_upstream_sees_a_valid_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with oidc_provider(monkeypatch) as provider:
        async with oidc_env(provider) as env:
            before = await env.browser.call("GET", "/api/me")
            assert before.status == 401 and before.error == "login_required"
            done = await oidc_login(env, sub="alice@example.com", return_to="/dashboard?tab=1")
            assert done.status == 302
            assert done.headers["Location"] == "/dashboard?tab=1"
            # The flow cookie is cleared, the session cookie set.
            assert not any(name.startswith("bff~flow-") for name in env.browser.jar)
            assert "bff-oidc" in env.browser.jar
            session = await env.browser.call("GET", "/auth/oidc/session")
            body = session.json()
            assert body["authenticated"] is True and body["provider"] == "oidc"
            assert body["claims"]["sub"] == "alice@example.com"
            assert body["claims"]["email"] == "alice@example.com"
            answer = await env.browser.call("GET", "/api/me")
            assert answer.status == 200, answer.body
            assert answer.json() == {"sub": "alice@example.com", "path": "/me"}
            (grant,) = provider.record.of("authorization_code")
            assert env.seen[-1] == f"Bearer {grant.answer['access_token']}"
            # The ID token is in the sealed session for the logout hint, and nowhere else.
            stored = unseal(env.browser.jar["bff-oidc"], "bff-oidc")
            assert stored.id_token == grant.answer["id_token"]
            for token in (grant.answer["access_token"], grant.answer["id_token"]):
                assert token not in done.body.decode() and token not in str(done.headers)
