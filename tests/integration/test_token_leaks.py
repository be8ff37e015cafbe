"""No token ever reaches the browser or the logs (SPEC §5.1, §5.3).

One run exercises everything that touches tokens: failed and successful logins, the session
endpoint, token injection, proactive and reactive refreshes, the grace cache, a body
replay, a rejected refresh, CSRF and cookie errors, and logouts. Every token the upstream
issued is then searched for, whole and as any 16-character piece, in every response header
and body the client received and in every log line the process wrote."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import aiohttp

from gateway.observability.logs import ACCESS
from tests.session_support import Browser, Reply, demo_env, demo_provider, parse_set_cookie
from tests.support import captured_json_logs

# --------------------------------------------------------------------------- tools of this file

WINDOW = 16


class RecordingBrowser(Browser):
    """A Browser that keeps every reply it received."""

    def __init__(self, http: aiohttp.ClientSession, base: str, replies: list[Reply]) -> None:
        super().__init__(http, base)
        self.replies = replies

    async def call(self, method: str, path: str, **kwargs: Any) -> Reply:
        reply = await super().call(method, path, **kwargs)
        self.replies.append(reply)
        return reply


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Every record of every logger, formatted by the gateway's JsonFormatter."""
    access_disabled = ACCESS.disabled
    ACCESS.disabled = False
    try:
        with captured_json_logs(level=logging.DEBUG) as out:
            yield out
    finally:
        ACCESS.disabled = access_disabled


def windows(text: str) -> set[str]:
    return {text[i : i + WINDOW] for i in range(len(text) - WINDOW + 1)}


def reply_text(reply: Reply) -> str:
    head = "\n".join(f"{name}: {value}" for name, value in reply.headers.items())
    return f"{reply.status}\n{head}\n\n{reply.body.decode('latin-1')}"


# --------------------------------------------------------------------------- the run


async def test_no_token_reaches_a_response_a_cookie_value_or_a_log_line() -> None:
    replies: list[Reply] = []

    def providers(upstream: str) -> dict[str, Any]:
        return {
            "demo": demo_provider(upstream),
            # refresh_skew over the token lifetime: every request refreshes proactively.
            "fast": demo_provider(upstream, refresh_skew=600),
        }

    def routes(upstream: str) -> list[dict[str, Any]]:
        return [{"path": "/fast/", "upstream": f"{upstream}/", "auth": "fast"}]

    with captured_logs() as logs:
        async with demo_env(providers=providers, routes=routes) as env:
            demo = RecordingBrowser(env.http, env.gateway.url, replies)
            alice = RecordingBrowser(env.http, env.gateway.url, replies)
            creds = {"username": "demo", "password": "demo"}

            # Logins: wrong, right (JSON), right (form) for the second provider.
            bad = await demo.call("POST", "/auth/demo/login", json_body={**creds, "password": "x"})
            assert bad.status == 401
            assert (await demo.call("POST", "/auth/demo/login", json_body=creds)).status == 200
            fast_login = await demo.call("POST", "/auth/fast/login", data=creds)
            assert fast_login.status == 200
            assert (await demo.call("GET", "/auth/demo/session")).status == 200
            assert (await demo.call("GET", "/auth/fast/session")).status == 200

            # Token injection, even when the browser sends its own Authorization.
            headers = await demo.call(
                "GET", "/api/headers", headers={"Authorization": "Bearer mine"}
            )
            assert headers.status == 200
            assert (await demo.call("GET", "/api/user")).status == 200

            # Proactive refreshes, three in a row.
            for _ in range(3):
                assert (await demo.call("GET", "/fast/user")).status == 200

            # Reactive refreshes with replays (a GET and a 10 KiB POST), then a request
            # carrying the pre-refresh cookie (grace cache).
            env.authority.expire_access_tokens()
            before = dict(demo.jar)
            assert (await demo.call("GET", "/api/items")).status == 200
            calls = env.stats.refresh_calls
            grace = await demo.call("GET", "/api/user", cookies=before)
            assert grace.status == 200
            assert env.stats.refresh_calls == calls
            env.authority.expire_access_tokens()
            body = os.urandom(10 * 1024)
            echo = await demo.call("POST", "/api/echo", data=body)
            assert echo.status == 200
            assert echo.json()["length"] == len(body)
            # A second refresh_on answer returned as it is.
            assert (await demo.call("GET", "/api/status/401")).status == 401

            # Errors: CSRF, a garbage cookie, a rejected refresh.
            assert (await demo.call("POST", "/api/echo", csrf=False)).status == 403
            garbage = await demo.call("GET", "/api/user", cookies={"bff-demo": "garbage"})
            assert garbage.status == 401
            await alice.call(
                "POST", "/auth/demo/login", json_body={"username": "alice", "password": "alice"}
            )
            family = env.authority.family_of(env.stats.issued_tokens[-2])
            assert family is not None
            env.authority.revoke_family(family)
            expired = await alice.call("GET", "/api/user")
            assert expired.error == "session_expired"

            # Logouts, and the stateless cookie replayed afterwards.
            last = dict(demo.jar)
            assert (await demo.call("POST", "/auth/demo/logout")).status == 204
            assert (await demo.call("POST", "/auth/logout")).status == 204
            assert (await demo.call("GET", "/api/user", cookies=last)).status == 200

            stats = env.stats
            tokens = list(stats.issued_tokens)

    # The run did what it claims.
    assert stats.refresh_calls >= 5
    assert stats.refresh_rejected >= 1
    assert stats.authorized_requests >= 8
    assert len(tokens) >= 2 * (3 + stats.refresh_calls - stats.refresh_rejected)
    log_text = logs.getvalue()
    log_lines = [json.loads(line) for line in log_text.splitlines()]
    assert sum(1 for entry in log_lines if entry.get("event") == "request") >= len(replies)
    cookie_values = [parse_set_cookie(line)[1] for reply in replies for line in reply.set_cookies]
    assert sum(1 for value in cookie_values if value) >= 8  # logins, refreshes

    # Whole tokens, then every 16-character piece of them.
    corpus = "\n".join([*map(reply_text, replies), log_text])
    for token in tokens:
        assert token not in corpus
    pieces = set().union(*(windows(token) for token in tokens))
    assert not pieces & windows(corpus), "a piece of a token reached the client or the logs"

    # Cookie values are never logged either.
    log_pieces = windows(log_text)
    for value in cookie_values:
        assert not windows(value) & log_pieces
