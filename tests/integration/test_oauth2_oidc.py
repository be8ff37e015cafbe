"""type: oauth2 against a real OpenID Connect provider (oidc-provider-mock on Authlib,
started by the test; tests/oauth_support.py says what it lacks and what stands in).

Login redirect, authorization, callback, proxied calls checked by the provider
itself, proactive and reactive refresh over several short token lifetimes, one
refresh grant for 50 concurrent expired requests, rotation, logout with
revocation, RP-initiated logout.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.test_redis import RedisServer, redis_server  # noqa: F401 - a fixture
from tests.oauth_support import (
    CLIENT_ID,
    authorize_at_provider,
    local,
    login_state,
    oidc_env,
    oidc_login,
    oidc_provider,
    provider_refresh,
    provider_revoke_access,
    query_of,
    start_login,
    until_session_expires,
)
from tests.session_support import Browser, parse_set_cookie, unseal
from tests.support import free_port, running_gateway


def fresh_ports() -> dict[str, str]:
    return {"listen": f"127.0.0.1:{free_port()}", "admin_listen": f"127.0.0.1:{free_port()}"}


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
            assert provider.record.pkce_ok == [True]  # S256(code_verifier) == code_challenge
            assert env.seen[-1] == f"Bearer {grant.answer['access_token']}"
            # The ID token is in the sealed session for the logout hint, and nowhere else.
            stored = unseal(env.browser.jar["bff-oidc"], "bff-oidc")
            assert stored.id_token == grant.answer["id_token"]
            for token in (grant.answer["access_token"], grant.answer["id_token"]):
                assert token not in done.body.decode() and token not in str(done.headers)


async def test_proactive_refresh_over_several_short_lifetimes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tokens live 2 s; the gateway refreshes 1 s before expiry, so the upstream
    # never sees an expired token and never answers 401.
    with oidc_provider(monkeypatch, access_ttl=2) as provider:
        async with oidc_env(provider, refresh_skew=1) as env:
            assert (await oidc_login(env)).status == 302
            calls = 0
            for lifetime in range(1, 4):
                await until_session_expires(env, early=1)
                answer = await env.browser.call("GET", f"/api/n{lifetime}")
                calls += 1
                assert answer.status == 200, answer.body
                grants = provider.record.of("refresh_token")
                assert len(grants) == lifetime
                assert env.seen[-1] == f"Bearer {grants[-1].answer['access_token']}"
            assert len(env.seen) == calls  # no replay: no token was ever refused


async def test_reactive_refresh_when_the_upstream_refuses_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The provider invalidates each access token early: the upstream answers 401,
    # the gateway refreshes once and replays; the browser sees only the 200.
    with oidc_provider(monkeypatch) as provider:
        async with oidc_env(provider) as env:
            assert (await oidc_login(env)).status == 302
            access = provider.record.of("authorization_code")[0].answer["access_token"]
            for round_ in range(1, 4):
                await provider_revoke_access(env.http, provider, access)
                answer = await env.browser.call("POST", f"/api/r{round_}", json_body={"n": 1})
                assert answer.status == 200, answer.body
                grants = provider.record.of("refresh_token")
                assert len(grants) == round_
                access = grants[-1].answer["access_token"]
                assert env.seen[-2:] == [env.seen[-2], f"Bearer {access}"]
                assert env.seen[-2] != env.seen[-1]


async def test_fifty_concurrent_expired_requests_cause_one_refresh_grant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with oidc_provider(monkeypatch, access_ttl=2) as provider:
        async with oidc_env(provider, refresh_skew=0) as env:
            assert (await oidc_login(env)).status == 302
            await until_session_expires(env)
            jar = dict(env.browser.jar)
            answers = await asyncio.gather(
                *(env.new_browser().call("GET", f"/api/c{i}", cookies=jar) for i in range(50))
            )
            assert [a.status for a in answers] == [200] * 50
            grants = provider.record.of("refresh_token")
            assert len(grants) == 1
            new = f"Bearer {grants[0].answer['access_token']}"
            assert env.seen[-50:] == [new] * 50


async def test_rotating_refresh_tokens_are_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    with oidc_provider(monkeypatch, access_ttl=2, rotate=True) as provider:
        async with oidc_env(provider, refresh_skew=1) as env:
            assert (await oidc_login(env)).status == 302
            for _ in range(3):
                await until_session_expires(env, early=1)
                assert (await env.browser.call("GET", "/api/x")).status == 200
            first = provider.record.of("authorization_code")[0].answer["refresh_token"]
            grants = provider.record.of("refresh_token")
            assert len(grants) == 3
            # Each grant presents the refresh token the previous answer rotated in.
            presented = [g.form["refresh_token"] for g in grants]
            issued = [first] + [g.answer["refresh_token"] for g in grants[:-1]]
            assert presented == issued
            assert len(set(presented)) == 3


async def test_post_logout_revokes_the_refresh_token(monkeypatch: pytest.MonkeyPatch) -> None:
    with oidc_provider(monkeypatch) as provider:
        async with oidc_env(provider) as env:
            assert (await oidc_login(env)).status == 302
            refresh = provider.record.of("authorization_code")[0].answer["refresh_token"]
            old_jar = dict(env.browser.jar)
            reply = await env.browser.call("POST", "/auth/oidc/logout")
            assert reply.status == 204
            assert "bff-oidc" not in env.browser.jar
            assert provider.record.revoked == [
                {"token": refresh, "token_type_hint": "refresh_token"}
            ]
            # Revoked at the provider: the refresh token is dead there...
            assert await provider_refresh(env.http, provider, refresh) == 400
            # ...so a copy of the old cookie gets nothing either.
            replay = await env.new_browser().call("GET", "/api/x", cookies=old_jar)
            assert replay.status == 401 and replay.error == "session_expired"


async def test_rp_initiated_logout_goes_to_the_end_session_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with oidc_provider(monkeypatch) as provider:
        async with oidc_env(provider) as env:
            assert (await oidc_login(env)).status == 302
            login_grant = provider.record.of("authorization_code")[0].answer
            reply = await env.browser.call("GET", "/auth/oidc/logout?return_to=/bye", follow=False)
            assert reply.status == 302
            location = reply.headers["Location"]
            assert location.startswith(f"{provider.issuer}/oauth2/end_session?")
            assert query_of(location) == {
                "client_id": CLIENT_ID,
                "post_logout_redirect_uri": f"{env.gateway.url}/",
                "id_token_hint": login_grant["id_token"],
            }
            assert "bff-oidc" not in env.browser.jar
            assert [r["token"] for r in provider.record.revoked] == [login_grant["refresh_token"]]
            assert login_grant["access_token"] not in location
            # The provider's page confirms, then sends the browser back to the gateway.
            async with env.http.get(location) as page:
                assert page.status == 200
            async with env.http.post(
                f"{provider.issuer}/oauth2/end_session/confirm",
                data={"redirect_uri": f"{env.gateway.url}/"},
                allow_redirects=False,
            ) as confirmed:
                assert confirmed.headers["Location"] == f"{env.gateway.url}/"
            after = await env.browser.call("GET", "/auth/oidc/session")
            assert after.json() == {"authenticated": False}


async def test_the_user_denying_access_comes_back_with_bff_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with oidc_provider(monkeypatch) as provider:
        async with oidc_env(provider) as env:
            state = await login_state(env.browser, "/app")
            # RFC 6749 §4.1.2.1: the error comes back with the state.
            callback = f"/auth/oidc/callback?error=access_denied&state={state}"
            done = await env.browser.call("GET", callback, follow=False)
            assert done.status == 302
            assert done.headers["Location"] == "/app?bff_error=access_denied"
            assert env.browser.jar == {}  # flow cookie cleared, no session
            assert provider.record.of("authorization_code") == []


async def test_the_mocks_deny_button_without_state_is_an_invalid_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # oidc-provider-mock 0.3.4 leaves the state out of its access_denied redirect:
    # the gateway cannot tell which flow it was, so it is invalid_state, back to /.
    with oidc_provider(monkeypatch) as provider:
        async with oidc_env(provider) as env:
            started = await start_login(env.browser, "/app")
            callback = await authorize_at_provider(env.http, started.headers["Location"], deny=True)
            assert "state" not in query_of(callback)
            done = await env.browser.call("GET", local(callback), follow=False)
            assert done.headers["Location"] == "/?bff_error=invalid_state"
            assert "bff-oidc" not in env.browser.jar


async def test_parallel_logins_in_several_tabs_each_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with oidc_provider(monkeypatch) as provider:
        async with oidc_env(provider) as env:
            tab_a = await start_login(env.browser, "/a")
            tab_b = await start_login(env.browser, "/b")
            flows = [name for name in env.browser.jar if name.startswith("bff~flow-")]
            assert len(flows) == 2
            back_b = await authorize_at_provider(env.http, tab_b.headers["Location"], "bob")
            back_a = await authorize_at_provider(env.http, tab_a.headers["Location"], "ann")
            done_b = await env.browser.call("GET", local(back_b), follow=False)
            assert done_b.headers["Location"] == "/b"
            done_a = await env.browser.call("GET", local(back_a), follow=False)
            assert done_a.headers["Location"] == "/a"
            session = (await env.browser.call("GET", "/auth/oidc/session")).json()
            assert session["claims"]["sub"] == "ann"  # the last login wins
            assert not any(name.startswith("bff~flow-") for name in env.browser.jar)


async def test_two_gateways_sharing_redis_send_one_refresh_grant(
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    # Cluster-wide single flight (ClusterRefresher): 25 expired requests on each of
    # two gateways (as two replicas would get them) -> one grant at the provider.
    with oidc_provider(monkeypatch, access_ttl=2, rotate=True) as provider:
        session = {"redis_url": redis_server.url}
        async with (
            oidc_env(provider, session=session, refresh_skew=0) as env,
            running_gateway(
                {**env.gateway_data, "server": {**env.gateway_data["server"], **fresh_ports()}}
            ) as other,
        ):
            assert (await oidc_login(env)).status == 302
            await until_session_expires(env)
            jar = dict(env.browser.jar)
            second = Browser(env.http, other.url)
            answers = await asyncio.gather(
                *(env.new_browser().call("GET", f"/api/a{i}", cookies=jar) for i in range(25)),
                *(second.call("GET", f"/api/b{i}", cookies=jar) for i in range(25)),
            )
            assert [a.status for a in answers] == [200] * 50
            grants = provider.record.of("refresh_token")
            assert len(grants) == 1
            assert set(env.seen[-50:]) == {f"Bearer {grants[0].answer['access_token']}"}


async def test_logout_from_every_provider_revokes_the_oidc_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with oidc_provider(monkeypatch) as provider:
        async with oidc_env(provider) as env:
            assert (await oidc_login(env)).status == 302
            reply = await env.browser.call("POST", "/auth/logout")
            assert reply.status == 204
            assert len(provider.record.revoked) == 1
            assert (await env.browser.call("GET", "/api/x")).error == "login_required"
