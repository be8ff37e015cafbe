"""The demo in a real browser (SPEC §9): log in, call the API across several token
lifetimes, and prove that the browser never holds or sees a token.

The demo API runs in-process with a short access-token lifetime, the gateway runs
the production wiring with a config derived from the repository's ``config.yaml``,
and Debian's Chromium drives the single-page app through Playwright. Every
response the browser received (status, all headers, body where readable) and
every request it sent is recorded and searched for every token the demo API
issued. A screenshot of the signed-in page is written to
``test-output/screenshot-logged-in.png`` on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from gateway.demo.api import STATS_KEY, DemoStats, create_demo_api
from gateway.observability.logs import AccessRecord, JsonFormatter, TextFormatter
from tests.support import (
    REPO,
    TEST_KEY,
    RunningGateway,
    config_dict,
    running_app,
    running_gateway,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SPA_DIR = REPO / "gateway" / "demo" / "spa"
SCREENSHOT = REPO / "test-output" / "screenshot-logged-in.png"
DEMO_API_DEFAULT = "http://127.0.0.1:8081"

ACCESS_TTL = 4.0  # seconds: two lifetimes pass in about ten seconds
REFRESH_SKEW = 1.0
LIFETIMES = 2
WINDOW = 16  # no 16-character piece of a token may appear anywhere
VIEWPORT = {"width": 1280, "height": 900}
# The full-page picture at 0.8 device pixels per CSS pixel (1024 px wide) stays under
# 170 KB, small enough to commit as tests/e2e/screenshot-logged-in.png for the README.
SCALE = 0.8
API_PREFIX = "/api/demo/"


# --------------------------------------------------------------------------- config


def demo_gateway_config(api_url: str) -> dict[str, Any]:
    """The repository's config.yaml, pointed at the in-process demo API.

    Only what cannot stay as written changes: listen ports (free ones), the
    session key (the test key instead of ``${BFF_SESSION_KEY}``), the demo API's
    address, the static directory (absolute), a short refresh skew and quieter
    logs. Provider, routes and cookie settings are the demo's own.
    """
    demo = yaml.safe_load((REPO / "config.yaml").read_text())

    def repoint(url: str) -> str:
        assert url.startswith(DEMO_API_DEFAULT), url
        return api_url + url[len(DEMO_API_DEFAULT) :]

    providers = demo["providers"]
    provider = providers["demo"]
    for key in ("login_url", "refresh_url", "logout_url"):
        if key in provider:
            provider[key] = repoint(provider[key])
    provider["refresh_skew"] = REFRESH_SKEW

    routes = []
    for route in demo["routes"]:
        route = dict(route)
        if "upstream" in route:
            route["upstream"] = repoint(route["upstream"])
        if "static" in route:
            route["static"] = str((REPO / route["static"]).resolve())
        routes.append(route)
    paths = [r["path"] for r in routes]
    assert API_PREFIX in paths and "/" in paths, paths

    session = {k: v for k, v in demo["session"].items() if k != "keys"}
    session["keys"] = [{"id": "k1", "secret": TEST_KEY}]
    server = {k: v for k, v in demo["server"].items() if k not in ("listen", "admin_listen")}
    logging_section = {**demo.get("logging", {}), "level": "info"}
    return config_dict(
        routes, server=server, session=session, providers=providers, logging=logging_section
    )


# --------------------------------------------------------------------------- leak search


def token_windows(tokens: list[str]) -> set[str]:
    return {t[i : i + WINDOW] for t in tokens for i in range(len(t) - WINDOW + 1)}


def leaks_in(text: str, windows: set[str]) -> bool:
    """True when ``text`` contains any 16-character piece of any issued token."""
    return any(text[i : i + WINDOW] in windows for i in range(len(text) - WINDOW + 1))


@dataclass
class SeenResponse:
    url: str
    status: int
    phase: str  # "signed-in" until the logout click, then "signed-out"
    content_type: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    body_error: str = ""

    @property
    def path(self) -> str:
        return "/" + self.url.split("/", 3)[3] if self.url.count("/") >= 3 else self.url

    def text(self) -> str:
        lines = [self.url] + [f"{k}: {v}" for k, v in self.headers]
        if self.body is not None:
            lines.append(self.body.decode("latin-1"))
        return "\n".join(lines)


@dataclass
class SeenRequest:
    url: str
    method: str
    headers: dict[str, str]
    post_data: str


class BrowserRecorder:
    """Everything that crossed the wire between the page and the gateway."""

    def __init__(self) -> None:
        self.phase = "signed-in"
        self.responses: list[SeenResponse] = []
        self.requests: list[SeenRequest] = []
        self.page_errors: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    def attach(self, page: Any) -> None:
        page.on("response", self._on_response)
        page.on("request", self._on_request)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def _on_response(self, response: Any) -> None:
        seen = SeenResponse(response.url, response.status, self.phase)
        self.responses.append(seen)
        self._tasks.append(asyncio.ensure_future(self._read_response(response, seen)))

    def _on_request(self, request: Any) -> None:
        self._tasks.append(asyncio.ensure_future(self._read_request(request)))

    async def _read_request(self, request: Any) -> None:
        headers = await request.all_headers()
        post = request.post_data or ""
        self.requests.append(SeenRequest(request.url, request.method, headers, post))

    async def _read_response(self, response: Any, seen: SeenResponse) -> None:
        seen.headers = await _headers_array_pairs(response)
        seen.content_type = (await response.all_headers()).get("content-type", "")
        try:
            # A still-open event stream has no body yet; one the page closed has none
            # at all. Those are checked through the page instead (see the test).
            seen.body = await asyncio.wait_for(response.body(), timeout=5)
        except Exception as exc:  # playwright Error or TimeoutError
            seen.body_error = type(exc).__name__

    async def settle(self) -> None:
        """Wait for every recording; a failed one would leave a hole in the leak search."""
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert len(self.requests) >= len(self.responses) > 0
        assert all(seen.headers for seen in self.responses)


async def _headers_array_pairs(response: Any) -> list[tuple[str, str]]:
    return [(h["name"], h["value"]) for h in await response.headers_array()]


# --------------------------------------------------------------------------- test


async def wait_until(predicate: Any, timeout: float, what: str, step: Any) -> None:
    """Run ``step`` (which does one unit of work) until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await step()


@pytest.fixture
def chromium_path() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    pytest.importorskip("playwright.async_api")
    return CHROMIUM


@contextlib.asynccontextmanager
async def demo_in_chromium(
    api: web.Application, chromium_path: Path
) -> AsyncIterator[tuple[RunningGateway, Any]]:
    """The demo API behind a gateway configured as the demo is, and a headless
    Chromium (closed on the way out) to drive it."""
    from playwright.async_api import async_playwright

    async with (
        running_app(api) as api_url,
        running_gateway(demo_gateway_config(api_url)) as gw,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS)
        try:
            yield gw, browser
        finally:
            await browser.close()


async def test_demo_login_refresh_and_no_token_in_browser(
    chromium_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from playwright.async_api import expect

    caplog.set_level(logging.INFO, logger="bff")
    stats = DemoStats()
    api = create_demo_api(access_ttl=ACCESS_TTL, stats=stats)
    assert api[STATS_KEY] is stats

    async with demo_in_chromium(api, chromium_path) as (gw, browser):
        context = await browser.new_context(viewport=VIEWPORT, device_scale_factor=SCALE)
        page = await context.new_page()
        page.set_default_timeout(10_000)
        recorder = BrowserRecorder()
        recorder.attach(page)

        # ---- sign in through the form
        await page.goto(gw.url + "/")
        await expect(page.locator("#login-form")).to_be_visible()
        await page.fill("#username", "demo")
        await page.fill("#password", "demo")
        await page.click("#login-button")
        logged_in_at = time.monotonic()
        await expect(page.locator("#user-name")).to_have_text("Demo User")
        await expect(page.locator("#items li.item")).to_have_count(5)
        await expect(page.locator("#items li.item").first).to_contain_text("Apollo")
        assert stats.logins == 1
        first_expiry = await page.locator("#session-expires").get_attribute("data-expires-at")
        assert first_expiry is not None, "the session panel shows the token expiry"

        # ---- call the API across at least two token lifetimes
        await page.check("#auto-call")
        clicks = 0

        async def refreshed_twice() -> bool:
            lifetimes_passed = time.monotonic() - logged_in_at > LIFETIMES * ACCESS_TTL + 0.5
            shown = await page.locator("#refresh-log li.refresh").count()
            return lifetimes_passed and stats.refresh_calls >= LIFETIMES and shown >= LIFETIMES

        async def one_call() -> None:
            nonlocal clicks
            before = int(await page.locator("#call-count").inner_text())
            await page.click("#call-api")
            clicks += 1
            # The call is done when the counter moves (success) or failures move.
            await page.wait_for_function(
                "([before]) => Number(document.getElementById('call-count').textContent)"
                " > before || Number(document.getElementById('fail-count').textContent) > 0",
                arg=[before],
            )
            await asyncio.sleep(0.4)  # pacing of the user's clicks, not synchronisation

        await wait_until(refreshed_twice, 30, "two refreshes shown in the page", one_call)
        await expect(page.locator("#sse-log li.event").first).to_be_visible()

        # every call succeeded, the gateway refreshed (the browser never saw a 401)
        assert await page.locator("#fail-count").inner_text() == "0"
        call_count = int(await page.locator("#call-count").inner_text())
        assert call_count >= clicks > 0
        assert stats.refresh_calls >= LIFETIMES
        assert stats.refresh_rejected == 0
        assert await page.locator("#status").inner_text() == ""
        last_expiry = await page.locator("#session-expires").get_attribute("data-expires-at")
        assert last_expiry is not None
        assert float(last_expiry) >= float(first_expiry) + (LIFETIMES - 1) * ACCESS_TTL

        # what a script in the page can read
        readable = await page.evaluate(
            """() => {
                const dump = (s) => {
                    const out = {};
                    for (let i = 0; i < s.length; i += 1) out[s.key(i)] = s.getItem(s.key(i));
                    return out;
                };
                return {
                    cookie: document.cookie,
                    local: dump(window.localStorage),
                    session: dump(window.sessionStorage),
                };
            }"""
        )
        storage_panel = await page.locator("#browser-storage").inner_text()
        cookies = await context.cookies(gw.url)
        session_cookies = [c for c in cookies if c["name"].startswith("bff-demo")]
        assert session_cookies, [c["name"] for c in cookies]
        for cookie in session_cookies:
            assert cookie["httpOnly"] is True, cookie["name"]
            assert cookie["sameSite"] == "Strict", cookie["name"]
            assert cookie["name"] not in readable["cookie"]
            assert cookie["name"] not in storage_panel
        assert "(empty: the session cookie is HttpOnly)" in storage_panel

        # an event stream read to its end, so that its body can be searched too
        sse_text = await page.evaluate(
            "fetch('/api/demo/events?count=3&interval=0.05').then(r => r.text())"
        )
        assert sse_text.count("data:") == 3
        dom_html = await page.content()

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        await page.mouse.move(0, VIEWPORT["height"] - 1)  # no hover effect in the picture
        await page.screenshot(path=str(SCREENSHOT), type="png", full_page=True)

        # ---- log out: the API now wants a login
        recorder.phase = "signed-out"
        await page.click("#logout-button")
        await expect(page.locator("#login-form")).to_be_visible()
        await expect(page.locator("#user-name")).to_have_text("")
        after = await page.evaluate(
            "fetch('/api/demo/user').then(async r => ({status: r.status, body: await r.json()}))"
        )
        assert after["status"] == 401
        assert after["body"]["error"] == "login_required"
        assert isinstance(after["body"]["message"], str)
        left = [c["name"] for c in await context.cookies(gw.url)]
        assert not [n for n in left if n.startswith("bff-demo")], left

        await recorder.settle()

    # ---- what the browser received and sent
    responses = recorder.responses
    signed_in = [r for r in responses if r.phase == "signed-in"]
    assert [(r.status, r.path) for r in signed_in if r.status >= 400] == []  # never a 401
    signed_in_api = [r for r in signed_in if r.path.startswith(API_PREFIX)]
    items_ok = [r for r in signed_in_api if r.path == "/api/demo/items" and r.status == 200]
    assert len(items_ok) >= call_count
    new_cookies = [
        r
        for r in signed_in_api
        if any(k.lower() == "set-cookie" and v.startswith("bff-demo") for k, v in r.headers)
    ]
    assert len(new_cookies) >= LIFETIMES, "each refresh sends the browser a new sealed cookie"
    # Only event streams (closed by the page) and bodiless answers have no readable body.
    unreadable = [
        (r.path, r.status)
        for r in responses
        if r.body is None and r.status != 204 and "text/event-stream" not in r.content_type
    ]
    assert unreadable == [], unreadable
    assert any(
        r.body is not None and b"data:" in r.body for r in responses if "/events" in r.path
    ), "the fetched event stream's body was recorded"
    for request in recorder.requests:
        assert "authorization" not in request.headers, request.url

    # ---- no token anywhere the browser could see it
    tokens = list(stats.issued_tokens)
    assert len(tokens) >= 2 * (1 + LIFETIMES)  # login pair + one pair per refresh
    windows = token_windows(tokens)
    assert leaks_in("x" + tokens[-1][20 : 20 + WINDOW] + "x", windows)  # the search can fail
    places: dict[str, str] = {
        "document.cookie": readable["cookie"],
        "localStorage": json.dumps(readable["local"]),
        "sessionStorage": json.dumps(readable["session"]),
        "#browser-storage": storage_panel,
        "page DOM": dom_html,
        "event stream": sse_text,
    }
    for i, seen in enumerate(responses):
        places[f"response {i} {seen.status} {seen.path}"] = seen.text()
    for i, sent in enumerate(recorder.requests):
        sent_text = "\n".join([sent.url, *(f"{k}: {v}" for k, v in sent.headers.items())])
        places[f"request {i} {sent.method} {sent.url}"] = sent_text + "\n" + sent.post_data
    leaking = [where for where, text in places.items() if leaks_in(text, windows)]
    assert leaking == [], f"token material found in: {leaking}"
    assert recorder.page_errors == []

    # ---- the gateway did the refreshing, and logged no token
    access = [getattr(r, "access", None) for r in caplog.records]
    refreshed = [a for a in access if isinstance(a, AccessRecord) and a.refreshed]
    assert len(refreshed) >= LIFETIMES
    assert all(a.path.startswith(API_PREFIX) for a in refreshed)
    for formatter in (JsonFormatter(), TextFormatter()):
        lines = [formatter.format(r) for r in caplog.records]
        assert lines
        assert not [line for line in lines if leaks_in(line, windows)]
