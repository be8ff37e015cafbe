"""Scale-out through a shared Redis (SPEC §2 `session.store: redis`, `redis_url`; §4.3; §6; §7).

A real `redis-server` runs as a subprocess on a free port; the gateways are
real `bff-gateway run` subprocesses (replicas, or one process with workers)
sharing it; the strict demo API (rotating refresh tokens, family revocation on
reuse) is the upstream, served in this process so the tests read its
`DemoStats` and expire its access tokens without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web
from redis.exceptions import RedisError

from gateway.auth import cluster
from gateway.auth.cluster import LEASE_SECONDS, ClusterRefresher
from gateway.auth.refresh import RefreshUnavailable
from gateway.demo.api import AUTHORITY_KEY, DemoStats, TokenAuthority, create_demo_api
from gateway.sessions.model import Session, Tokens
from gateway.sessions.redis_store import RedisStore
from gateway.sessions.seal import KeyRing, decode_key
from tests.support import (
    REPO,
    TEST_KEY,
    GatewayProcess,
    config_dict,
    free_port,
    running_app,
    running_app_with,
)

COOKIE = "bff-demo"  # secure: false in config_dict, so no __Host- prefix
CREDENTIALS = {"username": "demo", "password": "demo"}
CSRF = {"X-CSRF": "1"}
# Far from refresh_skew: only TokenAuthority.expire_access_tokens() makes a refresh happen.
ACCESS_TTL = 3600.0
KEYRING = KeyRing([("k1", decode_key(TEST_KEY))])


# -- a real redis-server -----------------------------------------------------------


class RedisServer:
    """`redis-server` on a loopback port, no persistence: a restart forgets everything."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self._wait_pong(timeout=10)

    def _wait_pong(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited: {(self.workdir / 'redis.log').read_text()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if binary is None:
        pytest.skip("redis-server is not installed")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(binary, workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def redis_dump(client: aioredis.Redis) -> dict[str, bytes]:
    """Every key and its value (all of the gateway's keys are plain strings)."""
    dump: dict[str, bytes] = {}
    async for key in client.scan_iter(count=1000):
        name = key.decode()
        assert await client.type(key) == b"string", name
        value = await client.get(key)
        if value is not None:  # expired between SCAN and GET
            dump[name] = value
    return dump


# -- the strict upstream ---------------------------------------------------------------


@dataclass
class DemoUpstream:
    url: str
    stats: DemoStats
    authority: TokenAuthority
    refresh_started: asyncio.Event  # set when /refresh-token is first entered


@contextlib.asynccontextmanager
async def demo_upstream(
    refresh_delay: float = 0.0, *, abort_on_disconnect: bool = False
) -> AsyncIterator[DemoUpstream]:
    stats = DemoStats()
    app = create_demo_api(access_ttl=ACCESS_TTL, stats=stats, refresh_delay=refresh_delay)
    started = asyncio.Event()

    @web.middleware
    async def watch(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/refresh-token":
            started.set()
        return await handler(request)

    app.middlewares.append(watch)
    # handler_cancellation: a handler is cancelled when its client goes away.
    serve = (
        running_app_with(app, handler_cancellation=True)
        if abort_on_disconnect
        else running_app(app)
    )
    async with serve as url:
        yield DemoUpstream(url, stats, app[AUTHORITY_KEY], started)


# -- gateways as real processes ----------------------------------------------------------


def gateway_config(
    upstream: str, redis_url: str | None, store: str, **server: Any
) -> dict[str, Any]:
    return config_dict(
        [
            {"path": "/api/", "upstream": f"{upstream}/", "auth": "demo"},
            {"path": "/pub/", "upstream": f"{upstream}/public/", "auth": "none"},
        ],
        server={"shutdown_timeout": 1, **server},
        session={"store": store, "redis_url": redis_url},
        providers={
            "demo": {
                "type": "password",
                "login_url": f"{upstream}/auth/login",
                "refresh_url": f"{upstream}/refresh-token",
            }
        },
    )


def kill_tree(process: GatewayProcess) -> None:
    """SIGKILL a gateway and any workers it started (they would keep the port)."""
    proc = process.proc
    if proc is None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(children, timeout=10)
    log = getattr(process, "_log", None)
    if log is not None:
        log.close()


@contextlib.asynccontextmanager
async def gateways(tmp_path: Path, *configs: dict[str, Any]) -> AsyncIterator[list[GatewayProcess]]:
    """Start one `bff-gateway run` per config (in parallel); SIGKILL them all at the end."""
    processes = []
    for index, data in enumerate(configs):
        directory = tmp_path / f"gateway{index}"
        directory.mkdir()
        processes.append(GatewayProcess(data, directory))
    try:
        started = await asyncio.gather(
            *(asyncio.to_thread(p.start) for p in processes), return_exceptions=True
        )
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        yield processes
    finally:
        for process in processes:
            kill_tree(process)


def listening_workers(process: GatewayProcess, count: int, timeout: float = 20) -> list[int]:
    """Wait until `count` worker processes listen on the public port; return their pids."""
    assert process.proc is not None
    port = process.config.server.listen.port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = []
        for child in psutil.Process(process.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if any(
                    c.status == psutil.CONN_LISTEN and c.laddr.port == port
                    for c in child.net_connections("tcp")
                ):
                    pids.append(child.pid)
        if len(pids) >= count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"{count} workers did not start listening: {process.log()}")


def established_on(pids: list[int], port: int) -> dict[int, int]:
    """Accepted client connections on the public port, per worker process."""
    counts = {}
    for pid in pids:
        counts[pid] = sum(
            1
            for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
        )
    return counts


# -- HTTP helpers --------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: Any
    set_cookies: list[str]

    @property
    def cookie(self) -> str | None:
        """The value this answer sets for the session cookie (None: not set or cleared)."""
        for line in self.set_cookies:
            name, _, rest = line.partition("=")
            if name == COOKIE and "Max-Age=0" not in line:
                return rest.split(";", 1)[0]
        return None

    @property
    def clears_cookie(self) -> bool:
        return any(
            line.startswith(f"{COOKIE}=;") and "Max-Age=0" in line for line in self.set_cookies
        )


def client(*, force_close: bool = False) -> aiohttp.ClientSession:
    """No cookie jar (cookies are sent by hand, to the replica we choose); no pool limit."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=0, force_close=force_close),
        timeout=aiohttp.ClientTimeout(total=60),
    )


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    cookie: str | None = None,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> Answer:
    headers = dict(headers or {})
    if cookie is not None:
        headers["Cookie"] = f"{COOKIE}={cookie}"
    async with http.request(method, url, headers=headers, **kw) as response:
        raw = await response.read()
        return Answer(
            response.status,
            json.loads(raw) if raw else None,
            response.headers.getall("Set-Cookie", []),
        )


async def login(http: aiohttp.ClientSession, base: str) -> str:
    answer = await call(http, "POST", f"{base}/auth/demo/login", json=CREDENTIALS, headers=CSRF)
    assert answer.status == 200, answer.body
    assert answer.cookie is not None
    return answer.cookie


def assert_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer.body
    assert isinstance(answer.body, dict) and set(answer.body) == {"error", "message"}
    assert answer.body["error"] == code
    assert isinstance(answer.body["message"], str) and answer.body["message"]


def unseal_cookie(value: str) -> bytes:
    unsealed = KEYRING.unseal(value, COOKIE)
    assert unsealed is not None
    return unsealed.plaintext


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def secret_fragments(tokens: list[str]) -> set[str]:
    """Each token whole, and its payload and signature parts (the JWT header is public)."""
    fragments = set(tokens)
    for token in tokens:
        fragments.update(part for part in token.split(".")[1:] if len(part) >= 16)
    return fragments


async def refresh_metrics(http: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    """bff_token_refresh_total{provider="demo"} by result, from one admin listener."""
    async with http.get(f"{admin_url}/metrics") as response:
        text = await response.text()
    found: dict[str, float] = {}
    pattern = re.compile(r"^bff_token_refresh_total\{(.*)\} (\S+)$", re.MULTILINE)
    for labels, value in pattern.findall(text):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if fields.get("provider") == "demo":
            found[fields["result"]] = found.get(fields["result"], 0.0) + float(value)
    return found


# -- one refresh across replicas and workers ---------------------------------------------


@pytest.mark.parametrize(
    ("store", "grace"), [("redis", 60), ("cookie", 60), ("cookie", 0)], ids=str
)
async def test_two_replicas_refresh_once_for_forty_concurrent_requests(
    store: str, grace: float, redis_server: RedisServer, tmp_path: Path
) -> None:
    """SPEC §4.3 single flight across replicas: `store: redis`, and stateless cookies
    with `redis_url` for coordination only; also with `refresh_grace: 0` (no reuse of
    a result later on, but the requests waiting for it now must still get it)."""
    async with demo_upstream() as up:
        configs = [gateway_config(up.url, redis_server.url, store) for _ in range(2)]
        for data in configs:
            data["providers"]["demo"]["refresh_grace"] = grace
        async with gateways(tmp_path, *configs) as (a, b), client() as http:
            cookie = await login(http, a.url)
            # The session logged in on A works on B as it is.
            first = await call(http, "GET", f"{b.url}/api/user", cookie)
            assert first.status == 200 and first.body["username"] == "demo"
            assert up.stats.refresh_calls == 0 and len(up.stats.issued_tokens) == 2

            up.authority.expire_access_tokens()
            replicas = (a, b)
            answers = await asyncio.gather(
                *(
                    call(http, "GET", f"{replicas[i % 2].url}/api/headers", cookie)
                    for i in range(40)
                )
            )

            assert [answer.status for answer in answers] == [200] * 40
            assert up.stats.refresh_calls == 1
            assert up.stats.refresh_rejected == 0 and up.stats.revoked_families == 0
            assert len(up.stats.issued_tokens) == 4  # the login pair and one refreshed pair
            new_access = up.stats.issued_tokens[2]
            # Every replay, on either replica, carried the one new access token.
            assert {tuple(answer.body["authorization_sha256"]) for answer in answers} == {
                (sha256(new_access),)
            }

            if store == "cookie":
                # Each request came with the pre-refresh cookie: each answer carries
                # the new session, sealed (fresh nonce) around the same new tokens.
                sessions = [
                    Session.from_bytes(unseal_cookie(answer.cookie or "")) for answer in answers
                ]
                assert {s.access_token for s in sessions if s is not None} == {new_access}
                assert all(s is not None for s in sessions)
                next_cookie = answers[0].cookie
            else:
                # The cookie names the server-side session; any re-sent cookie names the same.
                handle = unseal_cookie(cookie)
                assert all(
                    unseal_cookie(answer.cookie) == handle
                    for answer in answers
                    if answer.cookie is not None
                )
                next_cookie = cookie
            for replica in replicas:
                again = await call(http, "GET", f"{replica.url}/api/user", next_cookie)
                assert again.status == 200
            assert up.stats.refresh_calls == 1


async def test_result_shared_from_another_replica_is_counted_as_coalesced(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """SPEC §7: one refresh is one `success`; a replica reusing it counts `coalesced`."""
    async with demo_upstream() as up:
        configs = [gateway_config(up.url, redis_server.url, "cookie") for _ in range(2)]
        async with gateways(tmp_path, *configs) as (a, b), client() as http:
            cookie = await login(http, a.url)
            up.authority.expire_access_tokens()
            assert (await call(http, "GET", f"{a.url}/api/user", cookie)).status == 200
            # B still gets the pre-refresh cookie: it reuses A's result from Redis.
            assert (await call(http, "GET", f"{b.url}/api/user", cookie)).status == 200
            assert up.stats.refresh_calls == 1
            on_a = await refresh_metrics(http, a.admin_url)
            on_b = await refresh_metrics(http, b.admin_url)
            assert on_a.get("success") == 1
            assert on_b.get("success", 0) == 0
            assert on_b.get("coalesced") == 1


@pytest.mark.parametrize("store", ["redis", "cookie"])
async def test_two_workers_refresh_once_for_forty_fresh_connections(
    store: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """SPEC §4.3 single flight across the workers of one process (SO_REUSEPORT)."""
    async with demo_upstream(refresh_delay=1.0) as up:
        data = gateway_config(up.url, redis_server.url, store, workers=2)
        async with gateways(tmp_path, data) as (gateway,):
            port = gateway.config.server.listen.port
            workers = await asyncio.to_thread(listening_workers, gateway, 2)
            async with client(force_close=True) as http:
                cookie = await login(http, gateway.url)
                up.authority.expire_access_tokens()
                burst = asyncio.gather(
                    *(call(http, "GET", f"{gateway.url}/api/headers", cookie) for _ in range(40))
                )
                # While the one (slow) refresh runs, both workers hold some of the 40.
                await asyncio.wait_for(up.refresh_started.wait(), timeout=20)
                busy = await asyncio.to_thread(established_on, workers, port)
                answers = await burst

            assert [answer.status for answer in answers] == [200] * 40
            assert all(count > 0 for count in busy.values()), busy
            assert up.stats.refresh_calls == 1
            assert up.stats.refresh_rejected == 0 and up.stats.revoked_families == 0
            new_access = up.stats.issued_tokens[2]
            assert {tuple(answer.body["authorization_sha256"]) for answer in answers} == {
                (sha256(new_access),)
            }


# -- server-side sessions: logout, what the cookie and Redis hold ---------------------------


async def test_logout_on_one_replica_ends_the_session_on_the_other(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """SPEC §6: the cookie holds only a sealed id, Redis holds no plaintext token, and
    logout deletes the session so a replayed cookie gets 401 everywhere."""
    async with demo_upstream() as up:
        configs = [gateway_config(up.url, redis_server.url, "redis") for _ in range(2)]
        async with (
            gateways(tmp_path, *configs) as (a, b),
            client() as http,
            redis_client(redis_server.url) as store,
        ):
            cookie = await login(http, a.url)
            up.authority.expire_access_tokens()
            # A refresh on B: Redis now also holds the shared refresh result.
            assert (await call(http, "GET", f"{b.url}/api/user", cookie)).status == 200
            assert up.stats.refresh_calls == 1
            tokens = list(up.stats.issued_tokens)
            assert len(tokens) == 4

            # The cookie: a sealed random id, nothing else.
            session_id = unseal_cookie(cookie)
            assert re.fullmatch(rb"[A-Za-z0-9_-]{43}", session_id), session_id
            assert not any(fragment.encode() in session_id for fragment in secret_fragments(tokens))

            # Redis: entries keyed by a hash of the id, values sealed; no token, no id.
            dump = await redis_dump(store)
            session_key = "bff:session:" + hashlib.sha256(session_id).hexdigest()
            assert session_key in dump
            assert any(key.startswith("bff:refresh:result:demo:") for key in dump)
            everything = "\n".join(dump).encode() + b"\n" + b"\n".join(dump.values())
            for fragment in secret_fragments(tokens) | {session_id.decode()}:
                assert fragment.encode() not in everything
            assert all(
                value.startswith(b"1.k1.") for key, value in dump.items() if "lock" not in key
            )

            logout = await call(http, "POST", f"{a.url}/auth/demo/logout", cookie, headers=CSRF)
            assert logout.status == 204
            assert logout.clears_cookie
            assert session_key not in await redis_dump(store)

            seen = up.stats.authorized_requests + up.stats.unauthorized_requests
            replay = await call(http, "GET", f"{b.url}/api/user", cookie)
            assert_error(replay, 401, "login_required")
            assert replay.clears_cookie
            assert up.stats.authorized_requests + up.stats.unauthorized_requests == seen
            state = await call(http, "GET", f"{b.url}/auth/demo/session", cookie)
            assert state.status == 200 and state.body == {"authenticated": False}

        logs = a.log() + b.log()
        assert "GET" in logs  # the access log was written
        for fragment in secret_fragments(tokens) | {cookie}:
            assert fragment not in logs


async def test_logout_during_a_refresh_on_another_replica_stays_logged_out(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A refresh that lands after the logout must not write the deleted session back."""
    async with demo_upstream(refresh_delay=1.0) as up:
        configs = [gateway_config(up.url, redis_server.url, "redis") for _ in range(2)]
        async with gateways(tmp_path, *configs) as (a, b), client() as http:
            cookie = await login(http, a.url)
            up.authority.expire_access_tokens()
            in_flight = asyncio.ensure_future(call(http, "GET", f"{b.url}/api/user", cookie))
            await asyncio.wait_for(up.refresh_started.wait(), timeout=20)
            logout = await call(http, "POST", f"{a.url}/auth/demo/logout", cookie, headers=CSRF)
            assert logout.status == 204
            late = await in_flight
            assert late.status in (200, 401), late.body  # that request was already under way

            for replica in (a, b):
                for value in {cookie, late.cookie or cookie}:
                    replay = await call(http, "GET", f"{replica.url}/api/user", value)
                    assert_error(replay, 401, "login_required")


# -- a lock holder that dies ---------------------------------------------------------------


@pytest.mark.parametrize(
    "upstream_completes", [True, False], ids=["upstream-rotates", "upstream-aborts"]
)
async def test_killed_lock_holder_does_not_block_the_other_replica(
    upstream_completes: bool, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Replica A takes the refresh lock and dies mid-refresh; B must answer, cleanly,
    once A's lease has run out.

    What B answers depends on what the upstream did with A's orphaned call:
    - upstream-rotates (the demo API finishes a request whose client went away,
      as most servers do): the old refresh token is already rotated, so B's
      refresh with it is a reuse; the strict provider revokes the family and
      B answers 401 `session_expired`. Nobody ever received the new tokens.
    - upstream-aborts (the provider drops the request with the connection):
      nothing was rotated, so B's refresh succeeds and B answers 200.
    """
    delay = 2.0
    async with demo_upstream(refresh_delay=delay, abort_on_disconnect=not upstream_completes) as up:
        configs = [gateway_config(up.url, redis_server.url, "redis") for _ in range(2)]
        async with (
            gateways(tmp_path, *configs) as (a, b),
            client() as http,
            redis_client(redis_server.url) as store,
        ):
            cookie = await login(http, b.url)
            up.authority.expire_access_tokens()
            doomed = asyncio.ensure_future(call(http, "GET", f"{a.url}/api/user", cookie))
            await asyncio.wait_for(up.refresh_started.wait(), timeout=20)
            locks = [key async for key in store.scan_iter("bff:refresh:lock:demo:*")]
            assert len(locks) == 1  # A holds the lock while the provider works
            assert a.proc is not None
            a.proc.kill()
            with pytest.raises(aiohttp.ClientError):
                await doomed

            answers = await asyncio.wait_for(
                asyncio.gather(*(call(http, "GET", f"{b.url}/api/user", cookie) for _ in range(5))),
                timeout=LEASE_SECONDS + delay + 5,
            )

            assert up.stats.refresh_calls == 2  # A's orphaned call, then B's once the lease ended
            if upstream_completes:
                for answer in answers:
                    assert_error(answer, 401, "session_expired")
                    assert answer.clears_cookie
                assert up.stats.revoked_families == 1
                assert_error(
                    await call(http, "GET", f"{b.url}/api/user", cookie), 401, "login_required"
                )
            else:
                assert [answer.status for answer in answers] == [200] * 5
                assert {answer.body["username"] for answer in answers} == {"demo"}
                assert up.stats.revoked_families == 0
                assert (await call(http, "GET", f"{b.url}/api/user", cookie)).status == 200
                assert up.stats.refresh_calls == 2
            assert [key async for key in store.scan_iter("bff:refresh:lock:*")] == []


# -- Redis going away and coming back ------------------------------------------------------


async def test_redis_outage_is_a_clean_503_and_service_resumes_by_itself(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with demo_upstream() as up:
        data = gateway_config(up.url, redis_server.url, "redis")
        async with gateways(tmp_path, data) as (gateway,), client() as http:
            cookie = await login(http, gateway.url)
            assert (await call(http, "GET", f"{gateway.url}/api/user", cookie)).status == 200
            assert (await call(http, "GET", f"{gateway.admin_url}/readyz")).status == 200

            redis_server.stop()
            seen = up.stats.authorized_requests + up.stats.unauthorized_requests
            assert_error(
                await call(http, "GET", f"{gateway.url}/api/user", cookie), 503, "store_unavailable"
            )
            assert_error(
                await call(http, "GET", f"{gateway.url}/auth/demo/session", cookie),
                503,
                "store_unavailable",
            )
            assert_error(
                await call(http, "POST", f"{gateway.url}/auth/demo/logout", cookie, headers=CSRF),
                503,
                "store_unavailable",
            )
            assert up.stats.authorized_requests + up.stats.unauthorized_requests == seen
            assert (await call(http, "GET", f"{gateway.admin_url}/readyz")).status == 503
            assert (await call(http, "GET", f"{gateway.admin_url}/healthz")).status == 200
            public = await call(http, "GET", f"{gateway.url}/pub/headers")
            assert public.status == 200 and public.body["path"] == "/public/headers"

            await asyncio.to_thread(redis_server.start)  # same port, empty: sessions are gone
            deadline = time.monotonic() + 20
            while (await call(http, "GET", f"{gateway.admin_url}/readyz")).status != 200:
                assert time.monotonic() < deadline, "readyz did not recover"
                await asyncio.sleep(0.1)

            old = await call(http, "GET", f"{gateway.url}/api/user", cookie)
            assert_error(old, 401, "login_required")
            assert old.clears_cookie
            fresh = await login(http, gateway.url)
            answer = await call(http, "GET", f"{gateway.url}/api/user", fresh)
            assert answer.status == 200 and answer.body["username"] == "demo"
            assert gateway.proc is not None and gateway.proc.poll() is None  # never restarted
        assert "Traceback" not in gateway.log()


async def test_login_while_redis_is_down_is_a_clean_503(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with demo_upstream() as up:
        data = gateway_config(up.url, redis_server.url, "redis")
        async with gateways(tmp_path, data) as (gateway,), client() as http:
            redis_server.stop()
            answer = await call(
                http, "POST", f"{gateway.url}/auth/demo/login", json=CREDENTIALS, headers=CSRF
            )
            assert_error(answer, 503, "store_unavailable")
            assert answer.cookie is None


@pytest.mark.parametrize(
    ("store", "workers"),
    [
        ("redis", 2),
        ("cookie", 2),
        ("cookie", 1),
    ],
)
async def test_readyz_reports_a_redis_outage(
    store: str, workers: int, redis_server: RedisServer, tmp_path: Path
) -> None:
    """SPEC §7: /readyz is 503 when Redis is unreachable, in every deployment shape."""
    async with demo_upstream() as up:
        data = gateway_config(up.url, redis_server.url, store, workers=workers)
        async with gateways(tmp_path, data) as (gateway,), client() as http:
            if workers > 1:
                await asyncio.to_thread(listening_workers, gateway, workers)
            assert (await call(http, "GET", f"{gateway.admin_url}/readyz")).status == 200
            redis_server.stop()
            assert (await call(http, "GET", f"{gateway.admin_url}/readyz")).status == 503


async def test_redis_outage_with_stateless_cookies_fails_only_refreshes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """`store: cookie` + `redis_url`: Redis only coordinates refreshes. While it is down
    sessions still work; a refresh is 503 refresh_unavailable (cookies kept, the provider
    not called, since single flight cannot be guaranteed); afterwards it works again."""
    async with demo_upstream() as up:
        data = gateway_config(up.url, redis_server.url, "cookie")
        async with gateways(tmp_path, data) as (gateway,), client() as http:
            cookie = await login(http, gateway.url)
            redis_server.stop()
            assert (await call(http, "GET", f"{gateway.url}/api/user", cookie)).status == 200

            up.authority.expire_access_tokens()
            failed = await call(http, "GET", f"{gateway.url}/api/user", cookie)
            assert_error(failed, 503, "refresh_unavailable")
            assert not failed.clears_cookie and failed.cookie is None
            assert up.stats.refresh_calls == 0

            await asyncio.to_thread(redis_server.start)
            answer = await call(http, "GET", f"{gateway.url}/api/user", cookie)
            assert answer.status == 200 and answer.body["username"] == "demo"
            assert answer.cookie is not None
            assert up.stats.refresh_calls == 1


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 0])
def test_check_rejects_memory_store_with_several_workers(tmp_path: Path, workers: int) -> None:
    data = config_dict(
        [{"path": "/api/", "upstream": "http://127.0.0.1:9/"}],
        server={"workers": workers},
        session={"store": "memory"},
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    for command in ("check", "run"):
        done = subprocess.run(
            [sys.executable, "-m", "gateway", command, "--config", str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "session.store" in done.stderr and "workers" in done.stderr


# -- the components against a real Redis ------------------------------------------------------


def _session(access: str) -> Session:
    now = time.time()
    return Session.start("demo", Tokens(access, f"r-{access}", now + 600, {}), now)


async def test_sealed_session_entries_are_bound_to_their_key(redis_server: RedisServer) -> None:
    """Copying one session's entry onto another's key (Redis write access, no key ring)
    must not hand one browser another's tokens."""
    async with redis_client(redis_server.url) as client_:
        store = RedisStore(client_, KEYRING, idle=600, absolute=3600)
        victim = await store.save(_session("victim-token"), None)
        attacker = await store.save(_session("attacker-token"), None)
        loaded = await store.load(attacker)
        assert loaded is not None and loaded.access_token == "attacker-token"
        stolen = await client_.get(RedisStore._key(victim))
        await client_.set(RedisStore._key(attacker), stolen)
        assert await store.load(attacker) is None
        still = await store.load(victim)
        assert still is not None and still.access_token == "victim-token"


async def test_sealed_refresh_results_are_bound_to_their_token(redis_server: RedisServer) -> None:
    async with redis_client(redis_server.url) as client_:
        provider = CountingProvider()
        refresher = ClusterRefresher(provider, client_, KEYRING, grace=60, wait_limit=5)
        first = await refresher.refresh("refresh-one")
        assert first.access_token == "access-1"
        digest_one, digest_two = sha256("refresh-one"), sha256("refresh-two")
        sealed = await client_.get(f"bff:refresh:result:demo:{digest_one}")
        await client_.set(f"bff:refresh:result:demo:{digest_two}", sealed)
        second = await refresher.refresh("refresh-two")
        assert second.access_token == "access-2"  # its own refresh, not the transplanted one
        assert provider.calls == ["refresh-one", "refresh-two"]


class CountingProvider:
    """A provider that records each refresh and takes `delay` seconds to answer."""

    name = "demo"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[str] = []
        self.entered = asyncio.Event()

    async def refresh(self, refresh_token: str) -> Tokens:
        self.calls.append(refresh_token)
        self.entered.set()
        await asyncio.sleep(self.delay)
        n = len(self.calls)
        return Tokens(f"access-{n}", f"refresh-{n}", time.time() + 600, {})


async def test_lock_lease_is_renewed_while_a_slow_refresh_runs(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh taking several leases long keeps its lock: the other replica waits for
    the result instead of refreshing the same token a second time."""
    monkeypatch.setattr(cluster, "LEASE_SECONDS", 0.3)
    async with redis_client(redis_server.url) as one, redis_client(redis_server.url) as two:
        provider = CountingProvider(delay=1.2)
        replica_a = ClusterRefresher(provider, one, KEYRING, grace=60, wait_limit=10)
        replica_b = ClusterRefresher(provider, two, KEYRING, grace=60, wait_limit=10)
        holder = asyncio.ensure_future(replica_a.refresh("rotating"))
        await asyncio.wait_for(provider.entered.wait(), timeout=5)  # A holds the lock
        waiter = await replica_b.refresh("rotating")
        assert (await holder).access_token == waiter.access_token == "access-1"
        assert provider.calls == ["rotating"]


async def test_unreachable_redis_is_refresh_unavailable_without_calling_the_provider() -> None:
    async with redis_client(f"redis://127.0.0.1:{free_port()}/0") as dead:
        provider = CountingProvider()
        refresher = ClusterRefresher(provider, dead, KEYRING, grace=60, wait_limit=5)
        with pytest.raises(RefreshUnavailable):
            await refresher.refresh("refresh-one")
        assert provider.calls == []
        with pytest.raises(RedisError):
            await dead.ping()
