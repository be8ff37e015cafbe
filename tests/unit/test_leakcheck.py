"""The suite-wide leak check (tests/leakcheck.py) can fail: its search finds a leaked
piece of a secret, its capture sees log records, access sink lines and Browser
responses, and a run whose gateway logs a recorded token ends with exit status 1."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.observability import logs
from tests.leakcheck import (
    REGISTRY,
    WINDOW,
    Captured,
    LeakRegistry,
    _LogRecorder,
    fingerprint,
)
from tests.session_support import Browser
from tests.support import running_app

REPO = Path(__file__).resolve().parents[2]
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLW9mLWEtdGVzdA"
END_SESSION = "http://127.0.0.1:9/oauth2/end_session"


def registry_with(kind: str = "access_token", value: str = TOKEN) -> LeakRegistry:
    registry = LeakRegistry(test="t::issuer")
    registry.record_secret(kind, value)
    return registry


def test_a_window_of_a_secret_in_a_log_line_is_a_leak_named_by_hash_only() -> None:
    registry = registry_with()
    registry.test = "t::leaker"
    registry.record_text("log record of bff.gateway", f'{{"x":"..{TOKEN[20 : 20 + WINDOW]}.."}}')
    (leak,) = registry.leaks()
    assert (leak.test, leak.where, leak.kind, leak.issued_in) == (
        "t::leaker",
        "log record of bff.gateway",
        "access_token",
        "t::issuer",
    )
    assert leak.hash == fingerprint(TOKEN) and TOKEN[:WINDOW] not in str(leak)


def test_text_without_a_whole_window_is_no_leak() -> None:
    registry = registry_with()
    registry.record_text("response 200 to /", "a" + TOKEN[5 : 5 + WINDOW - 1] + "b")
    registry.record_text("response 200 to /", TOKEN[::-1])
    assert registry.leaks() == []


def test_short_and_too_short_secrets() -> None:
    registry = registry_with(value="at-0123456789")  # 13 characters: searched whole
    registry.record_secret("code", "c")  # a fixture, not searched
    registry.record_text("response 200 to /", "c at-012345678")
    assert registry.leaks() == [] and registry.too_short == 1
    registry.record_text("response 200 to /", "x at-0123456789 y")
    assert [leak.kind for leak in registry.leaks()] == ["access_token"]


def test_the_request_query_is_not_part_of_a_response_but_its_body_is() -> None:
    registry = registry_with("code", "code-1234567890abcdef")
    registry.record_response(f"http://gw/cb?code={'code-1234567890abcdef'}", 302, [], None)
    assert registry.leaks() == []
    registry.record_response("http://gw/cb", 200, [], b"<p>code-1234567890abcdef</p>")
    assert [leak.where for leak in registry.leaks()] == ["response 200 to /cb"]


def test_only_an_id_token_hint_to_an_end_session_endpoint_is_allowed() -> None:
    registry = registry_with("id_token", TOKEN)
    registry.record_secret("access_token", "access-token-abcdef0123456789")
    registry.record_end_session(END_SESSION)
    hint = f"{END_SESSION}?id_token_hint={TOKEN}&post_logout_redirect_uri=http://gw/"
    registry.record_response("http://gw/auth/p/logout", 302, [("Location", hint)], None)
    assert registry.leaks() == [] and registry.allowed_hints == 1
    # The same hint anywhere else, an access token as the hint, or the ID token in the body.
    elsewhere = hint.replace("end_session", "elsewhere")
    registry.record_response("http://gw/a", 302, [("Location", elsewhere)], None)
    wrong = f"{END_SESSION}?id_token_hint=access-token-abcdef0123456789"
    registry.record_response("http://gw/b", 302, [("Location", wrong)], None)
    registry.record_response("http://gw/c", 302, [("Location", hint)], TOKEN.encode())
    registry.record_response("http://gw/d", 302, [("X-Debug", hint)], None)
    assert sorted(leak.where for leak in registry.leaks()) == [
        "response 302 to /a",
        "response 302 to /b",
        "response 302 to /c",
        "response 302 to /d",
    ]


def captured_since(start: int) -> list[Captured]:
    return REGISTRY.captured[start:]


def test_records_of_the_gateway_loggers_are_captured() -> None:
    start = len(REGISTRY.captured)
    events = logging.getLogger("bff.gateway")
    level = events.level
    events.setLevel(logging.INFO)
    try:
        logs.event("a deliberately leaking line", secret="not-a-real-token-0123456789")
    finally:
        events.setLevel(level)
    (item,) = captured_since(start)
    assert item.where == "log record of bff.gateway"
    fresh = registry_with(value="not-a-real-token-0123456789")
    fresh.captured.append(item)
    assert len(fresh.leaks()) == 1


def test_lines_of_the_access_sink_are_captured() -> None:
    handler = logs._OrderedStreamHandler(io.StringIO())
    sink = logs._AccessSink(handler, logs.JsonFormatter())
    start = len(REGISTRY.captured)
    path = "/not-a-real-token-0123456789"
    sink.write(logs.AccessRecord("r1", "GET", path, "/", 200, 1.0, None, 0, 0, False, "c"))
    (item,) = captured_since(start)
    assert item.where == "access sink line" and path in item.text
    assert path in handler.stream.getvalue()  # and the sink still wrote it


async def test_browser_responses_and_the_redirects_they_followed_are_captured() -> None:
    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/end?leak=not-a-real-token-0123456789")

    async def end(request: web.Request) -> web.Response:
        return web.Response(text="body-not-a-real-token-9876543210")

    app = web.Application()
    app.router.add_get("/hop", hop)
    app.router.add_get("/end", end)
    start = len(REGISTRY.captured)
    async with running_app(app) as url, aiohttp.ClientSession() as http:
        await Browser(http, url).call("GET", "/hop")
    first, last = captured_since(start)
    assert "Location: /end?leak=not-a-real-token-0123456789" in first.text
    assert last.where == "response 200 to /end" and "body-not-a-real-token" in last.text


def test_a_run_whose_gateway_logs_a_token_fails(tmp_path: Path) -> None:
    """The whole plugin in a pytest run of its own: a recorded token in a log line."""
    secret = "fake-token-for-the-leak-check-0123456789"
    (tmp_path / "test_leaking.py").write_text(
        textwrap.dedent(
            f"""
            import logging
            from gateway.observability.logs import event
            from tests.leakcheck import REGISTRY

            def test_leaks():
                REGISTRY.record_secret("access_token", {secret!r})
                logging.getLogger("bff").setLevel(logging.INFO)
                event("refresh failed", detail="token " + {secret!r})
            """
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.leakcheck", str(tmp_path)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "1 passed" in out and "LEAK CHECK FAILED" in out
    assert f"access_token {fingerprint(secret)}" in out
    assert "found in log record of bff.gateway during test_leaking.py::test_leaks" in out
    assert secret not in out and secret[8:24] not in out
    assert "the capture is broken" not in out


def test_a_log_record_that_cannot_be_formatted_fails_the_check_without_breaking_logging() -> None:
    registry = LeakRegistry()
    recorder = _LogRecorder(registry)
    record = logging.LogRecord("bff.gateway", logging.INFO, "f", 1, "%d", ("x",), None)
    assert recorder.filter(record) is True
    assert registry.capture_errors == ["bff.gateway: TypeError"] and registry.captured == []
