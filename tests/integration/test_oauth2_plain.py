"""type: oauth2 with a plain OAuth 2.0 provider shaped like GitHub's: explicit URLs
(no discovery), no ID token, no refresh token, a form-encoded token answer even
to ``Accept: application/json``, errors as 200 with ``error=...``; the client's
credentials sent as each ``client_auth`` says."""

from __future__ import annotations

import base64
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web

from tests.leakcheck import REGISTRY
from tests.oauth_support import login_state, query_of, start_login
from tests.session_support import Browser
from tests.support import config_dict, running_app, running_gateway


@dataclass
class GitHubLike:
    url: str = ""
    codes: dict[str, str] = field(default_factory=dict)  # code -> login
    tokens: dict[str, str] = field(default_factory=dict)  # access token -> login
    exchanges: list[tuple[dict[str, str], dict[str, str]]] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)

    def grant_code(self, login: str) -> str:
        code = secrets.token_hex(10)
        REGISTRY.record_secret("code", code)
        self.codes[code] = login
        return code


@contextlib.asynccontextmanager
async def github_like() -> AsyncIterator[GitHubLike]:
    hub = GitHubLike()

    async def access_token(request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        hub.exchanges.append((form, dict(request.headers)))
        login = hub.codes.pop(form.get("code", ""), None)
        if login is None:
            body = urlencode({"error": "bad_verification_code"})
        else:
            token = "gho_" + secrets.token_hex(16)
            hub.tokens[token] = login
            REGISTRY.record_secret("access_token", token)
            body = urlencode({"access_token": token, "scope": "read:user", "token_type": "bearer"})
        # Always 200 and form-encoded, whatever Accept says.
        return web.Response(text=body, content_type="application/x-www-form-urlencoded")

    async def user(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        hub.seen.append(auth)
        login = hub.tokens.get(auth.removeprefix("Bearer "))
        if login is None:
            return web.json_response({"message": "Bad credentials"}, status=401)
        return web.json_response({"login": login})

    app = web.Application()
    app.router.add_post("/login/oauth/access_token", access_token)
    app.router.add_get("/user", user)
    async with running_app(app) as url:
        hub.url = url
        yield hub


def github_provider(hub: GitHubLike, **over: Any) -> dict[str, Any]:
    return {
        "type": "oauth2",
        "authorize_url": f"{hub.url}/login/oauth/authorize",
        "token_url": f"{hub.url}/login/oauth/access_token",
        "client_id": "Iv1.github-client",
        "client_secret": "gh-secret",
        "client_auth": "client_secret_post",
        "scopes": ["read:user"],
        "authorize_params": {"allow_signup": "false"},
        **over,
    }


@contextlib.asynccontextmanager
async def github_env(**over: Any) -> AsyncIterator[tuple[GitHubLike, Browser, str]]:
    async with github_like() as hub:
        data = config_dict(
            [{"path": "/api/", "upstream": f"{hub.url}/", "auth": "oidc"}],
            providers={"oidc": github_provider(hub, **over)},
        )
        async with (
            running_gateway(data) as gateway,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        ):
            yield hub, Browser(http, gateway.url), gateway.admin_url


async def test_login_with_a_github_like_provider() -> None:
    async with github_env() as (hub, browser, admin):
        started = await start_login(browser, "/repos")
        location = started.headers["Location"]
        assert location.startswith(f"{hub.url}/login/oauth/authorize?")
        query = query_of(location)
        assert query["allow_signup"] == "false" and query["scope"] == "read:user"
        assert "nonce" not in query and query["code_challenge_method"] == "S256"
        code = hub.grant_code("octocat")
        done = await browser.call(
            "GET", f"/auth/oidc/callback?code={code}&state={query['state']}", follow=False
        )
        assert done.headers["Location"] == "/repos"
        ((form, headers),) = hub.exchanges
        assert headers["Accept"] == "application/json"
        assert form["client_id"] == "Iv1.github-client" and form["client_secret"] == "gh-secret"
        assert form["grant_type"] == "authorization_code" and "code_verifier" in form
        assert "Authorization" not in headers
        answer = await browser.call("GET", "/api/user")
        assert answer.status == 200 and answer.json() == {"login": "octocat"}
        (token,) = hub.tokens
        assert hub.seen == [f"Bearer {token}"]
        session = (await browser.call("GET", "/auth/oidc/session")).json()
        assert session["authenticated"] is True and session["expires_at"] is None
        _, metrics = await get_json_text(admin)
        assert 'bff_logins_total{provider="oidc",result="success"} 1.0' in metrics


async def get_json_text(admin: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"{admin}/metrics") as answer:
        return answer.status, await answer.text()


async def test_without_a_refresh_token_a_refused_token_is_passed_on() -> None:
    async with github_env() as (hub, browser, _):
        started = await start_login(browser, "/")
        code = hub.grant_code("octocat")
        state = query_of(started.headers["Location"])["state"]
        await browser.call("GET", f"/auth/oidc/callback?code={code}&state={state}", follow=False)
        hub.tokens.clear()  # the user revoked the app on the provider's side
        answer = await browser.call("GET", "/api/user")
        assert answer.status == 401 and answer.json() == {"message": "Bad credentials"}
        assert len(hub.exchanges) == 1  # no refresh attempted: there is nothing to refresh with


async def test_an_error_in_a_200_form_answer_is_a_failed_exchange() -> None:
    async with github_env() as (_, browser, _admin):
        state = await login_state(browser, "/x")
        done = await browser.call(
            "GET", f"/auth/oidc/callback?code=wrong&state={state}", follow=False
        )
        assert done.headers["Location"] == "/x?bff_error=token_exchange_failed"


@pytest.mark.parametrize("method", ["client_secret_basic", "none"])
async def test_client_authentication_on_the_wire(method: str) -> None:
    over: dict[str, Any] = {"client_auth": method}
    if method == "none":
        over["client_secret"] = None
    async with github_env(**over) as (hub, browser, _):
        state = await login_state(browser, "/")
        code = hub.grant_code("octocat")
        done = await browser.call(
            "GET", f"/auth/oidc/callback?code={code}&state={state}", follow=False
        )
        assert done.headers["Location"] == "/"
        ((form, headers),) = hub.exchanges
        assert "client_secret" not in form
        if method == "none":
            assert form["client_id"] == "Iv1.github-client"
            assert "Authorization" not in headers
        else:
            assert "client_id" not in form
            expected = base64.b64encode(b"Iv1.github-client:gh-secret").decode()
            assert headers["Authorization"] == f"Basic {expected}"
