"""The demo's OpenID Connect sign-in in a real browser: click "Sign in with OpenID
Connect", sign in at the provider (oidc-provider-mock, the demo's own provider),
land back signed in, call the API across token refreshes, find no token in
``document.cookie`` or storage, then log out through the provider's end-session
page (RP-initiated logout).

Same harness as test_browser.py: Debian's Chromium through Playwright, the
gateway with the repository's config.yaml (provider ``oidc`` pointed at the
provider started here, tokens living 4 s).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gateway.demo.api import STATS_KEY, DemoStats, create_demo_api
from tests.e2e.test_browser import (
    CHROMIUM_ARGS,
    VIEWPORT,
    BrowserRecorder,
    chromium_path,  # noqa: F401 - a fixture
    demo_gateway_config,
    leaks_in,
    token_windows,
    wait_until,
)
from tests.leakcheck import REGISTRY
from tests.oauth_support import oidc_provider
from tests.support import running_app, running_gateway

ACCESS_TTL = 4
LIFETIMES = 2


async def test_oidc_sign_in_refresh_and_no_token_in_browser(
    chromium_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from playwright.async_api import async_playwright, expect

    with oidc_provider(monkeypatch, access_ttl=ACCESS_TTL) as provider:
        stats = DemoStats()
        api = create_demo_api(stats=stats, oidc_userinfo=f"{provider.issuer}/userinfo")
        assert api[STATS_KEY] is stats
        async with running_app(api) as api_url:
            config = demo_gateway_config(api_url)
            oidc = config["providers"]["oidc"]
            oidc["issuer"] = provider.issuer
            oidc["revocation_url"] = provider.revocation_url
            oidc["refresh_skew"] = 1
            async with running_gateway(config) as gw, async_playwright() as pw:
                browser = await pw.chromium.launch(
                    executable_path=str(chromium_path), args=CHROMIUM_ARGS
                )
                try:
                    context = await browser.new_context(viewport=VIEWPORT)
                    # The provider's pages link a CDN stylesheet: no network here.
                    await context.route("https://**", lambda route: route.abort())
                    page = await context.new_page()
                    page.set_default_timeout(10_000)
                    recorder = BrowserRecorder()
                    recorder.attach(page)

                    # ---- sign in at the provider
                    await page.goto(gw.url + "/")
                    await page.click("#oidc-login")
                    await page.wait_for_url(f"{provider.issuer}/oauth2/authorize?**")
                    await page.fill("input[name=sub]", "alice@example.com")
                    await page.click("button:has-text('Authorize')")
                    await page.wait_for_url(gw.url + "/")
                    signed_in_at = time.monotonic()
                    await expect(page.locator("#user-name")).to_have_text("alice@example.com")
                    await expect(page.locator("#items li.item")).to_have_count(5)
                    # The live socket panel, through /api/oidc/ws with this provider's token.
                    await expect(page.locator("#ws-log li.tick").first).to_contain_text(
                        "carried a valid token for alice@example.com", timeout=20_000
                    )

                    # ---- the API across token lifetimes: the gateway refreshes
                    async def refreshed() -> bool:
                        passed = time.monotonic() - signed_in_at > LIFETIMES * ACCESS_TTL
                        return passed and len(provider.record.of("refresh_token")) >= LIFETIMES

                    async def one_call() -> None:
                        await page.click("#call-api")
                        await page.wait_for_timeout(400)  # the user's pace

                    await wait_until(refreshed, 30, "two refreshes", one_call)
                    assert await page.locator("#fail-count").inner_text() == "0"
                    assert await page.locator("#status").inner_text() == ""

                    readable = await page.evaluate(
                        """() => ({
                            cookie: document.cookie,
                            local: JSON.stringify(window.localStorage),
                            session: JSON.stringify(window.sessionStorage),
                        })"""
                    )
                    dom_html = await page.content()
                    cookies = await context.cookies(gw.url)
                    session_cookies = [c for c in cookies if c["name"].startswith("bff-oidc")]
                    assert session_cookies and all(c["httpOnly"] for c in session_cookies)
                    assert not [c for c in cookies if "~flow-" in c["name"]]
                    await recorder.settle()
                    signed_in = list(recorder.responses)

                    # ---- log out: through the provider's end-session page and back
                    await page.click("#logout-button")
                    await page.wait_for_url(f"{provider.issuer}/oauth2/end_session?**")
                    await page.click("button:has-text('End session')")
                    await page.wait_for_url(gw.url + "/")
                    await expect(page.locator("#login-form")).to_be_visible()
                    left = [c["name"] for c in await context.cookies(gw.url)]
                    assert not [n for n in left if n.startswith("bff-oidc")], left
                    assert len(provider.record.revoked) == 1
                    await recorder.settle()
                finally:
                    await browser.close()
                # The session-wide leak check (tests/leakcheck.py) searches all of them,
                # those after the logout click included.
                for seen in recorder.responses:
                    if seen.url.startswith(gw.url):
                        REGISTRY.record_response(seen.url, seen.status, seen.headers, seen.body)

    # ---- no token anywhere the page could see it
    tokens = [
        value
        for grant in provider.record.grants
        for key, value in grant.answer.items()
        if key in ("access_token", "refresh_token", "id_token")
    ]
    assert len(tokens) >= 3 + LIFETIMES
    windows = token_windows(tokens)
    places = {
        "document.cookie": readable["cookie"],
        "localStorage": readable["local"],
        "sessionStorage": readable["session"],
        "page DOM": dom_html,
    }
    for i, seen in enumerate(signed_in):
        places[f"response {i} {seen.status} {seen.path}"] = seen.text()
    leaking = [where for where, text in places.items() if leaks_in(text, windows)]
    assert leaking == [], f"token material found in: {leaking}"
    assert recorder.page_errors == []
    assert json.loads(readable["local"]) == {} and json.loads(readable["session"]) == {}
