"""Logs (SPEC §8) and what they must never hold (SPEC §5.3).

The in-process tests capture the gateway's loggers with the production JSON
formatter; the subprocess tests read a real `bff-gateway run`'s stdout, where
every line must be one JSON object.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.demo.api import STATS_KEY, create_demo_api
from tests.session_support import demo_provider
from tests.support import (
    TEST_KEY,
    GatewayProcess,
    async_gateway_process,
    captured_json_logs,
    config_dict,
    free_port,
    json_lines,
    running_app,
    running_gateway,
)

TIMEOUT = aiohttp.ClientTimeout(total=30)  # a misbehaving gateway fails a test, never hangs it

SPEC_FIELDS = {
    "time",
    "request_id",
    "method",
    "path",
    "route",
    "status",
    "duration_ms",
    "upstream_ms",
    "bytes_in",
    "bytes_out",
    "refreshed",
    "client",
}
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HEADER_SECRET = "hdr-secret-5f1c9e7a"
QUERY_SECRET = "qry-secret-83b2d4c6"
CLIENT_BEARER = "sekrit-client-bearer-0c4d"
BODY = b"ok-body:" + b"z" * 992  # 1000 bytes


# -- helpers -----------------------------------------------------------------


def captured_logs() -> AbstractContextManager[io.StringIO]:
    """The gateway's loggers, formatted by the production JSON formatter."""
    return captured_json_logs("bff", logging.INFO)


def requests_of(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["event"] == "request"]


def plain_upstream() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=BODY)

    app = web.Application()
    app.router.add_route("*", "/ok", ok)
    return app


def cookies_of(answer: aiohttp.ClientResponse) -> dict[str, str]:
    return {name: morsel.value for name, morsel in answer.cookies.items()}


def cookie_header(cookies: dict[str, str]) -> str:
    return "; ".join(f"{name}={value}" for name, value in cookies.items() if value)


async def stop(process: GatewayProcess) -> int:
    return await asyncio.to_thread(process.stop)


@asynccontextmanager
async def plain_gateway_process(tmp_path: Path, **sections: Any) -> AsyncIterator[GatewayProcess]:
    async with running_app(plain_upstream()) as up:
        data = config_dict([{"path": "/api/", "upstream": up + "/", "auth": "none"}], **sections)
        async with async_gateway_process(data, tmp_path) as process:
            yield process


# -- in process: the access record --------------------------------------------


async def test_one_access_line_per_request_with_every_spec_field() -> None:
    dead = f"http://127.0.0.1:{free_port()}/"
    async with running_app(plain_upstream()) as up:
        data = config_dict(
            [
                {"path": "/api/", "upstream": up + "/", "auth": "none"},
                {"path": "/dead/", "upstream": dead, "auth": "none"},
            ]
        )
        with captured_logs() as stream:
            async with (
                running_gateway(data) as gateway,
                aiohttp.ClientSession(timeout=TIMEOUT) as client,
            ):
                url = gateway.url
                async with client.get(
                    url + "/api/ok?q=1", headers={"X-Request-Id": "trace-0001"}
                ) as answer:
                    assert await answer.read() == BODY
                async with client.post(url + "/api/ok", data=b"x" * 500) as answer:
                    assert answer.status == 200
                    post_id = answer.headers.get("X-Request-Id")
                async with client.get(url + "/dead/thing") as answer:
                    assert answer.status == 502
                async with client.get(url + "/missing") as answer:
                    assert answer.status == 404
        lines = requests_of(json_lines(stream.getvalue()))

    assert len(lines) == 4
    for line in lines:
        assert line.keys() >= SPEC_FIELDS, line
        assert TIME_RE.match(line["time"]), line["time"]
        assert line["client"] == "127.0.0.1"
        assert line["refreshed"] is False
        assert line["duration_ms"] >= 0
        assert line["level"] == "info"
    get, post, dead_line, missing = lines
    assert (get["method"], get["path"], get["route"], get["status"]) == (
        "GET",
        "/api/ok",
        "/api/",
        200,
    )
    assert get["request_id"] == "trace-0001"  # passed on from the client
    assert get["upstream_ms"] is not None and 0 <= get["upstream_ms"] <= get["duration_ms"]
    assert get["bytes_in"] == 0
    assert get["bytes_out"] >= len(BODY)
    assert (post["method"], post["status"], post["bytes_in"]) == ("POST", 200, 500)
    if post_id is not None:
        assert post["request_id"] == post_id
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", post["request_id"])
    assert (dead_line["route"], dead_line["status"], dead_line["upstream_ms"]) == (
        "/dead/",
        502,
        None,
    )
    assert (missing["route"], missing["status"], missing["path"]) == ("unmatched", 404, "/missing")


async def test_bytes_out_counts_error_answers_too() -> None:
    with captured_logs() as stream:
        async with (
            running_gateway(config_dict([])) as gateway,
            aiohttp.ClientSession(timeout=TIMEOUT) as client,
            client.get(gateway.url + "/missing") as answer,
        ):
            body = await answer.read()
            assert answer.status == 404
    (line,) = requests_of(json_lines(stream.getvalue()))
    assert line["bytes_out"] >= len(body) > 0


async def test_an_unhandled_error_is_one_json_event_without_its_message() -> None:
    secret = "sekrit-in-exception-message-77"

    async def boom(*_: Any) -> web.StreamResponse:
        raise RuntimeError(f"failed with {secret}")

    with captured_logs() as stream:
        async with (
            running_gateway(config_dict([])) as gateway,
            aiohttp.ClientSession(timeout=TIMEOUT) as client,
        ):
            gateway.listeners.gateway.auth.handle = boom  # type: ignore[method-assign]
            async with client.get(gateway.url + "/auth/x/session") as answer:
                assert answer.status == 500
                assert (await answer.json())["error"] == "internal_error"
                request_id = answer.headers["X-Request-Id"]
    text = stream.getvalue()
    assert secret not in text
    entries = json_lines(text)
    (error,) = [e for e in entries if e["event"] == "unhandled error"]
    assert error["level"] == "error"
    assert error["error"] == "RuntimeError"
    assert error["request_id"] == request_id
    assert any("boom" in frame for frame in error["where"])  # where, not what
    (line,) = requests_of(entries)
    assert line["status"] == 500


# -- a real process: stdout is JSON, and it holds no secret ------------------------


async def test_process_logs_are_json_lines_and_hold_no_secret(tmp_path: Path) -> None:
    demo = create_demo_api(access_ttl=5)  # refresh_skew 30 > 5: every call refreshes first
    stats = demo[STATS_KEY]
    async with running_app(demo) as demo_url:
        data = config_dict(
            [
                {"path": "/demo/", "upstream": demo_url + "/", "auth": "demo"},
                {
                    "path": "/inject/",
                    "upstream": demo_url + "/public/",
                    "auth": "none",
                    "inject_headers": {"X-Api-Key": HEADER_SECRET},
                    "inject_query": {"appid": QUERY_SECRET},
                },
            ],
            providers={"demo": demo_provider(demo_url, refresh_skew=30)},
        )
        async with async_gateway_process(data, tmp_path) as process:
            sent, cookie_values = await _secret_laden_traffic(process.url, stats)
            assert await stop(process) == 0
    text = process.log()
    entries = json_lines(text)  # every line of stdout (and stderr) is a JSON object

    events = [e["event"] for e in entries]
    assert events[0] == "listening"
    assert "draining" in events and events[-1] == "stopped"
    lines = requests_of(entries)
    assert [(e["method"], e["path"], e["status"]) for e in lines] == sent
    for line in lines:
        assert line.keys() >= SPEC_FIELDS
        assert "?" not in line["path"]
    refreshed = [e["path"] for e in lines if e["refreshed"]]
    assert refreshed == ["/demo/user", "/demo/user"]

    # The secrets really travelled through this gateway...
    assert stats.refresh_calls >= 2
    assert len(stats.issued_tokens) >= 6
    assert cookie_values
    # ...and none of them reached its log.
    secrets = [
        *stats.issued_tokens,
        *cookie_values,
        TEST_KEY,
        HEADER_SECRET,
        QUERY_SECRET,
        CLIENT_BEARER,
        "sekrit",
        "hunter2",
    ]
    for secret in secrets:
        assert secret not in text
    # Not even a fragment long enough to matter.
    for token in stats.issued_tokens:
        for part in token.split("."):
            if len(part) >= 24:
                assert part not in text


async def _secret_laden_traffic(
    url: str, stats: Any
) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Log in, refresh, call injected routes with client-held secrets; return what was sent."""
    sent: list[tuple[str, str, int]] = []
    cookie_values: list[str] = []
    csrf = {"X-CSRF": "1"}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as client:

        async def call(method: str, path: str, **kw: Any) -> aiohttp.ClientResponse:
            async with client.request(method, url + path, **kw) as answer:
                await answer.read()
                sent.append((method, path.partition("?")[0], answer.status))
                cookie_values.extend(v for v in cookies_of(answer).values() if v)
                return answer

        bad = await call(
            "POST",
            "/auth/demo/login",
            json={"username": "demo", "password": "hunter2-sekrit"},
            headers=csrf,
        )
        assert bad.status == 401
        good = await call(
            "POST", "/auth/demo/login", json={"username": "demo", "password": "demo"}, headers=csrf
        )
        assert good.status == 200
        cookies = cookies_of(good)
        first = await call("GET", "/demo/user", headers={"Cookie": cookie_header(cookies)})
        assert first.status == 200
        cookies.update(cookies_of(first))
        second = await call("GET", "/demo/user", headers={"Cookie": cookie_header(cookies)})
        assert second.status == 200
        cookies.update(cookies_of(second))

        injected = await call(
            "GET",
            "/inject/headers?appid=client-sekrit-appid&q=1",
            headers={"Authorization": f"Bearer {CLIENT_BEARER}"},
        )
        assert injected.status == 200
        assert stats.last_headers.get("X-Api-Key") == HEADER_SECRET
        assert f"appid={QUERY_SECRET}" in stats.last_raw_path
        echoed = await call("GET", f"/inject/echo?access_token=sekrit-query-{CLIENT_BEARER}")
        assert echoed.status == 200
        anonymous = await call(
            "GET", "/demo/user", headers={"Authorization": f"Bearer {CLIENT_BEARER}"}
        )
        assert anonymous.status == 401
        session = await call(
            "GET", "/auth/demo/session", headers={"Cookie": cookie_header(cookies)}
        )
        assert session.status == 200
        logout = await call(
            "POST", "/auth/demo/logout", headers={"Cookie": cookie_header(cookies), **csrf}
        )
        assert logout.status == 204
        missing = await call("GET", "/nowhere?password=sekrit-404")
        assert missing.status == 404
    return sent, cookie_values


# -- logging.format and logging.level -------------------------------------------


async def test_text_format_prints_readable_lines(tmp_path: Path) -> None:
    async with plain_gateway_process(tmp_path, logging={"format": "text"}) as process:
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as client,
            client.get(process.url + "/api/ok?secret=sekrit-text") as answer,
        ):
            assert answer.status == 200
        assert await stop(process) == 0
    text = process.log()
    lines = text.splitlines()
    assert lines
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    (request,) = [line for line in lines if " GET /api/ok " in line]
    assert re.search(r"^\d\d:\d\d:\d\d 200 GET /api/ok route=/api/ [\d.]+ms", request)
    assert "client=127.0.0.1" in request
    assert "sekrit" not in text
    assert any(" listening " in line for line in lines)


@pytest.mark.parametrize(
    ("settings", "expect_events", "expect_requests"),
    [
        ({"level": "WARNING"}, False, False),  # nothing below WARNING: not even startup
        ({"level": "debug"}, True, True),
        ({"access_log": False}, True, False),  # events without the per-request lines
    ],
)
async def test_level_and_access_log_settings(
    tmp_path: Path, settings: dict[str, Any], expect_events: bool, expect_requests: bool
) -> None:
    async with plain_gateway_process(tmp_path, logging=settings) as process:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            for _ in range(3):
                async with client.get(process.url + "/api/ok") as answer:
                    assert answer.status == 200
        assert await stop(process) == 0
    entries = json_lines(process.log())
    events = {e["event"] for e in entries}
    assert ("listening" in events) is expect_events
    assert len(requests_of(entries)) == (3 if expect_requests else 0)
