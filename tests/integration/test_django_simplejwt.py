"""The gateway in front of a real Django REST framework + SimpleJWT server.

SimpleJWT runs with access tokens of a few seconds, rotating refresh tokens and
blacklisting after rotation: presenting a refresh token twice gets 401 from
Django, which the gateway must turn into ``session_expired``. So the test shows,
against a real strict identity provider, that a session survives several token
lifetimes, that a burst of concurrent calls after expiry causes exactly one
refresh, and that no token Django issued reaches the client or the logs.

Django's clock drives expiry, so the test waits real time (about 15 s in all);
the sleeps let tokens age, they do not synchronise anything.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.observability.logs import JsonFormatter
from tests.support import REPO, config_dict, free_port, handler_attached, running_gateway

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("django") is None,
    reason="django is not installed (it is in the test extras: pip install -e '.[test]')",
)

ACCESS_SECONDS = 3  # SIMPLE_JWT ACCESS_TOKEN_LIFETIME
SKEW = 1  # the provider's refresh_skew
USER, PASSWORD = "alice", "wonderland-7f3a"
BURST = 20
CSRF = {"X-CSRF": "1"}


# -- the Django server ----------------------------------------------------------


@dataclass
class DjangoServer:
    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        """Everything the recording middleware wrote, in completion order."""
        path = self.data_dir / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def db_count(self, sql: str, *args: Any) -> int:
        with contextlib.closing(sqlite3.connect(self.data_dir / "db.sqlite3", timeout=30)) as db:
            return int(db.execute(sql, args).fetchone()[0])


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"django server exited {proc.returncode}: {log.read_text()}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"django server not listening after {timeout}s: {log.read_text()}")


@pytest.fixture
def django_server(tmp_path: Path) -> Iterator[DjangoServer]:
    data_dir = tmp_path / "django"
    data_dir.mkdir()
    port = free_port()
    log = tmp_path / "django.log"
    env = {
        **os.environ,
        "BFF_DJANGO_DIR": str(data_dir),
        "BFF_DJANGO_ACCESS_SECONDS": str(ACCESS_SECONDS),
        "BFF_DJANGO_USER": USER,
        "BFF_DJANGO_PASSWORD": PASSWORD,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.django_app.serve", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    try:
        _wait_for_port(proc, port, log, timeout=30)
        yield DjangoServer(port, data_dir, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the gateway's logs -----------------------------------------------------------


class _Capture(logging.Handler):
    """Every log record, rendered the way production renders it, plus raw text."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.json = JsonFormatter()
        self.lines: list[str] = []
        self.access_records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.json.format(record))
        self.lines.append(record.getMessage())
        self.lines.append(repr(record.__dict__))
        if record.exc_info and record.exc_info[1] is not None:
            self.lines.append("".join(traceback.format_exception(record.exc_info[1])))
        if record.name == "bff.access":
            self.access_records += 1


@contextlib.contextmanager
def captured_logs() -> Iterator[_Capture]:
    capture = _Capture()
    with handler_attached(capture, level=logging.DEBUG):
        yield capture


# -- a browser that keeps its cookies by hand -------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def set_cookies(self) -> list[str]:
        return [v for k, v in self.headers if k.lower() == "set-cookie"]


@dataclass
class Browser:
    """Sends the gateway's cookies as a browser would; keeps every answer."""

    http: aiohttp.ClientSession
    base: str
    cookies: dict[str, str] = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)

    async def call(
        self, method: str, path: str, *, cookies: dict[str, str] | None = None, **kw: Any
    ) -> Answer:
        jar = self.cookies if cookies is None else cookies
        headers = dict(kw.pop("headers", {}))
        if jar:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
        async with self.http.request(method, self.base + path, headers=headers, **kw) as resp:
            raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
            answer = Answer(resp.status, raw, await resp.read())
        self.answers.append(answer)
        self.keep(answer)
        return answer

    def keep(self, answer: Answer) -> None:
        for line in answer.set_cookies():
            pair, _, attributes = line.partition(";")
            name, _, value = pair.strip().partition("=")
            if "max-age=0" in attributes.lower().replace(" ", ""):
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value


# -- reading tokens and the Django record ---------------------------------------------


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def leaks(issued: list[dict[str, str]], haystack: str) -> list[str]:
    """Which issued tokens show up in ``haystack``, whole or as a piece of signature.

    The header and payload segments are predictable (and shared); the signature
    is not, so any 16 of its characters found are a leak.
    """
    found = []
    for number, pair in enumerate(issued):
        for kind, token in pair.items():
            signature = token.rsplit(".", 1)[1]
            pieces = [token] + [signature[i : i + 16] for i in range(len(signature) - 15)]
            if any(piece in haystack for piece in pieces):
                found.append(f"{kind} token #{number}")
    return found


def refreshes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["path"].startswith("/api/token/refresh")]


def api_calls(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["path"] in ("/api/me/", "/api/echo/")]


def bearer(event: dict[str, Any]) -> str:
    header = event["authorization"]
    assert header is not None and re.fullmatch(r"Bearer [A-Za-z0-9_.-]+", header), (
        "the gateway must send exactly one Authorization: Bearer <token> "
        f"(got {'none' if header is None else 'a malformed or repeated header'})"
    )
    return str(header[len("Bearer ") :])


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{"):
            got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if got == wanted:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def scrape(http: aiohttp.ClientSession, admin_url: str) -> str:
    async with http.get(admin_url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def gateway_config(django: DjangoServer) -> dict[str, Any]:
    return config_dict(
        routes=[{"path": "/dj/", "upstream": f"{django.base}/api/", "auth": "dj"}],
        providers={
            "dj": {
                "type": "password",
                "login_url": f"{django.base}/api/token/",
                "refresh_url": f"{django.base}/api/token/refresh/",
                "access_token_field": "access",
                "refresh_token_field": "refresh",
                "refresh_body": {"refresh": "{refresh_token}"},
                "refresh_on": [401],
                "refresh_skew": SKEW,
            }
        },
    )


# -- the test ------------------------------------------------------------------------


async def test_simplejwt_session_survives_lifetimes_and_a_burst_without_leaking(
    django_server: DjangoServer,
) -> None:
    django = django_server
    with captured_logs() as logs:
        async with (
            running_gateway(gateway_config(django)) as gw,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        ):
            browser = Browser(http, gw.url)
            await _scenario(browser, django, http, gw.admin_url)
            calls_made = len(browser.answers)

    events = django.events()
    issued = [e["issued"] for e in events if e["issued"]]
    secrets = {t for pair in issued for t in pair.values()}
    # Every issued token was recorded: 1 login pair + 1 pair per refresh.
    assert len(issued) == 1 + len(refreshes(events))
    assert len(secrets) == 2 * len(issued)

    # 5.1 / 5.3: no token Django issued, nor any 16 characters of its signature,
    # reached the client (every header and body byte) or a gateway log record.
    seen_by_client = "\n".join(
        "\n".join(f"{k}: {v}" for k, v in a.headers) + "\n" + a.body.decode("latin-1")
        for a in browser.answers
    )
    to_client = leaks(issued, seen_by_client)
    assert not to_client, "tokens in responses to the client"
    to_logs = leaks(issued, "\n".join(logs.lines))
    assert not to_logs, "tokens in the gateway's logs"
    # The capture saw the gateway's access log, so "nothing leaked there" means something.
    assert logs.access_records >= calls_made


async def _scenario(
    browser: Browser, django: DjangoServer, http: aiohttp.ClientSession, admin_url: str
) -> None:
    # -- login: 200, the tokens stay at the edge -------------------------------
    login = await browser.call(
        "POST", "/auth/dj/login", json={"username": USER, "password": PASSWORD}, headers=CSRF
    )
    assert login.status == 200, login.body
    assert login.json() == {}  # SimpleJWT answers {access, refresh} only: both scrubbed
    assert set(browser.cookies) == {"bff-dj"}
    assert all("HttpOnly" in line for line in login.set_cookies())
    (login_event,) = [e for e in django.events() if e["path"] == "/api/token/"]
    assert login_event["status"] == 200
    first_access = login_event["issued"]["access"]

    session = await browser.call("GET", "/auth/dj/session")
    assert session.status == 200
    assert session.json()["authenticated"] is True
    assert session.json()["expires_at"] == jwt_claims(first_access)["exp"]

    # -- sequential calls across at least three access lifetimes ---------------
    started = time.time()
    calls = 0
    while time.time() < started + 3 * ACCESS_SECONDS + 0.5:
        me = await browser.call("GET", "/dj/me/")
        assert me.status == 200, (calls, me.body)
        assert me.json()["username"] == USER
        if calls % 3 == 0:
            body = os.urandom(1000 + calls)
            echo = await browser.call("POST", "/dj/echo/", data=body, headers=CSRF)
            assert echo.status == 200, (calls, echo.body)
            assert echo.json()["sha256"] == hashlib.sha256(body).hexdigest()
        calls += 1
        await asyncio.sleep(0.25)  # lets the token age: Django's clock drives expiry

    events = django.events()
    sequential_refreshes = refreshes(events)
    assert len(sequential_refreshes) >= 3, "three lifetimes should need three refreshes"
    used = [bearer(e) for e in api_calls(events)]
    order = [e["issued"]["access"] for e in events if e["issued"]]
    assert len(set(used)) >= 4  # the login's token and at least three refreshed ones
    indexes = [order.index(t) for t in used]  # ValueError: a token Django never issued
    assert indexes == sorted(indexes), "the gateway went back to an older access token"

    # -- a burst of concurrent calls with one cookie, after expiry -------------
    current = order[-1]
    await asyncio.sleep(max(0.0, jwt_claims(current)["exp"] - time.time() + 0.3))
    assert time.time() > jwt_claims(current)["exp"]  # the cookie's token is dead at Django
    before = await scrape(http, admin_url)
    frozen = dict(browser.cookies)
    bodies = [os.urandom(2000 + i) if i % 4 == 0 else None for i in range(BURST)]

    async def one(body: bytes | None) -> Answer:
        if body is None:
            return await browser.call("GET", "/dj/me/", cookies=frozen)
        return await browser.call("POST", "/dj/echo/", cookies=frozen, data=body, headers=CSRF)

    burst_start = time.time()
    burst = await asyncio.gather(*(one(b) for b in bodies))
    burst_end = time.time()
    after = await scrape(http, admin_url)

    statuses = [a.status for a in burst]
    assert statuses == [200] * BURST, [a.body for a in burst if a.status != 200]
    for body, answer in zip(bodies, burst, strict=True):
        if body is None:
            assert answer.json()["username"] == USER
        else:
            assert answer.json()["sha256"] == hashlib.sha256(body).hexdigest()
        # Every response after the refresh carries the new session cookie.
        assert any(line.startswith("bff-dj=") for line in answer.set_cookies())

    events = django.events()
    in_burst = [e for e in events if burst_start <= e["t"] <= burst_end]
    burst_refreshes = refreshes(in_burst)
    assert len(burst_refreshes) == 1, f"{len(burst_refreshes)} refresh calls for one expiry"
    assert burst_refreshes[0]["status"] == 200
    new_access = burst_refreshes[0]["issued"]["access"]
    burst_api = api_calls(in_burst)
    assert len(burst_api) == BURST  # no replay was needed: the refresh came first
    assert {bearer(e) for e in burst_api} == {new_access}
    assert all(e["status"] == 200 for e in burst_api)
    coalesced = metric(after, "bff_token_refresh_total", provider="dj", result="coalesced") - (
        metric(before, "bff_token_refresh_total", provider="dj", result="coalesced")
    )
    assert coalesced == BURST - 1

    # -- the refreshed cookie keeps working ------------------------------------
    me = await browser.call("GET", "/dj/me/")
    assert me.status == 200, me.body

    # -- what Django saw over the whole session --------------------------------
    events = django.events()
    all_refreshes = refreshes(events)
    assert all(e["status"] == 200 for e in all_refreshes), "Django rejected a refresh"
    # Rotation + blacklisting: each refresh presented the newest refresh token,
    # and no refresh token was ever presented twice.
    pairs = [e["issued"] for e in events if e["issued"]]
    presented = [e["presented_refresh"] for e in all_refreshes]
    assert presented == [p["refresh"] for p in pairs[:-1]]
    assert len(set(presented)) == len(presented)
    # One refresh per expiry: each happened only once the access token it
    # replaced was within refresh_skew of its exp (none early, none doubled).
    for previous, refresh in zip(pairs, all_refreshes, strict=False):
        assert refresh["t"] >= jwt_claims(previous["access"])["exp"] - SKEW
    # Django never rejected a token the gateway sent unless it had expired
    # (a reactive 401 -> refresh -> replay is allowed; a revoked session is not).
    for e in api_calls(events):
        if e["status"] != 200:
            assert e["status"] == 401
            assert jwt_claims(bearer(e))["exp"] <= e["done"]
    final = await scrape(http, admin_url)
    successes = metric(final, "bff_token_refresh_total", provider="dj", result="success")
    assert successes == len(all_refreshes)
    assert metric(final, "bff_token_refresh_total", provider="dj", result="rejected") == 0

    # Django's own tables agree: one outstanding token per issued refresh, each
    # rotated one blacklisted, and the session's current one still good.
    outstanding = django.db_count("SELECT COUNT(*) FROM token_blacklist_outstandingtoken")
    blacklisted = django.db_count("SELECT COUNT(*) FROM token_blacklist_blacklistedtoken")
    assert outstanding == len(pairs)
    assert blacklisted == len(all_refreshes)
    current_jti = jwt_claims(pairs[-1]["refresh"])["jti"]
    assert (
        django.db_count(
            "SELECT COUNT(*) FROM token_blacklist_blacklistedtoken b "
            "JOIN token_blacklist_outstandingtoken o ON b.token_id = o.id WHERE o.jti = ?",
            current_jti,
        )
        == 0
    )
