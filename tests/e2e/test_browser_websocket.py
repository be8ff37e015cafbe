"""Headless Chromium uses the demo page's live WebSocket panel through the gateway (issue 14):
the handshake carries only the sealed cookie, the API receives a valid token (its ticks say
whose), echoes pass, no token reaches the page, and after logout the socket is closed with
1008 and a new one is refused."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.api import DemoStats, create_demo_api
from tests.e2e.test_browser import (
    VIEWPORT,
    chromium_path,  # noqa: F401 (fixture)
    demo_in_chromium,
    leaks_in,
    token_windows,
)

pytestmark = pytest.mark.asyncio


async def test_live_websocket_panel_through_the_gateway(
    chromium_path: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    from playwright.async_api import expect

    caplog.set_level(logging.INFO, logger="bff")
    stats = DemoStats()
    api = create_demo_api(access_ttl=300, stats=stats)
    async with demo_in_chromium(api, chromium_path) as (gw, browser):
        context = await browser.new_context(viewport=VIEWPORT)
        page = await context.new_page()
        page.set_default_timeout(15_000)
        frames: list[str] = []
        handshakes: list[dict[str, str]] = []
        closed_codes: list[Any] = []

        def on_websocket(ws: Any) -> None:
            ws.on("framereceived", lambda payload: frames.append(str(payload)))
            ws.on("framesent", lambda payload: frames.append(str(payload)))

        page.on("websocket", on_websocket)

        # Playwright does not report handshakes as requests: ask Chromium itself.
        cdp = await context.new_cdp_session(page)
        await cdp.send("Network.enable")
        cdp.on(
            "Network.webSocketWillSendHandshakeRequest",
            lambda event: handshakes.append(
                {k.lower(): v for k, v in event["request"]["headers"].items()}
            ),
        )
        page.on("console", lambda message: closed_codes.append(message.text))

        await page.goto(gw.url + "/")
        await page.fill("#username", "demo")
        await page.fill("#password", "demo")
        await page.click("#login-button")
        await expect(page.locator("#user-name")).to_have_text("Demo User")

        # The panel connects by itself once signed in; a click disconnects, another
        # connects again.
        await expect(page.locator("#ws-toggle")).to_have_text("Disconnect")
        await page.click("#ws-toggle")
        await expect(page.locator("#ws-toggle")).to_have_text("Connect")
        await expect(page.locator("#ws-log li.closed").first).to_contain_text("closed: 1000")
        await page.click("#ws-toggle")
        await expect(page.locator("#ws-toggle")).to_have_text("Disconnect")
        await page.fill("#ws-input", "hello through the gateway")
        await page.click("#ws-send")
        echo = page.locator("#ws-log li.echo")
        await expect(echo.first).to_contain_text("echo: hello through the gateway")
        tick = page.locator("#ws-log li.tick")
        await expect(tick.first).to_contain_text("carried a valid token for demo", timeout=20_000)

        # A socket the test opens itself, to read the code the server closes it with.
        await page.evaluate(
            """() => new Promise((resolve) => {
                const ws = new WebSocket(`ws://${location.host}/api/demo/ws`);
                window.__probeClosed = new Promise((closed) => {
                    ws.onclose = (e) => closed({code: e.code, reason: e.reason});
                });
                ws.onopen = () => resolve();
            })"""
        )
        page_html = await page.content()

        # ---- logout: the gateway closes the session's sockets with 1008
        await page.click("#logout-button")
        await expect(page.locator("#login-form")).to_be_visible()
        closed = await asyncio.wait_for(page.evaluate("() => window.__probeClosed"), 30)
        assert closed == {"code": 1008, "reason": "session ended"}

        # ---- and a new handshake without a session is refused (1006 to the page)
        refused = await asyncio.wait_for(
            page.evaluate(
                """() => new Promise((resolve) => {
                const ws = new WebSocket(`ws://${location.host}/api/demo/ws`);
                ws.onclose = (e) => resolve(e.code);
            })""",
            ),
            30,
        )
        assert refused == 1006

    # The handshake carried the sealed cookie and the page's Origin, no token.
    assert handshakes, "the page's WebSocket handshake was seen"
    first = handshakes[0]
    assert first["origin"] == gw.url
    assert "authorization" not in first
    assert all("authorization" not in h for h in handshakes)
    assert any("hello through the gateway" in f for f in frames)

    tokens = list(stats.issued_tokens)
    assert tokens
    windows = token_windows(tokens)
    places = {"frames": "\n".join(frames), "page": page_html, "console": "\n".join(closed_codes)}
    places.update({f"handshake {i}": repr(h) for i, h in enumerate(handshakes)})
    assert [where for where, text in places.items() if leaks_in(text, windows)] == []
