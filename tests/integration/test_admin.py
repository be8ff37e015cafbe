"""The admin listener and the Prometheus metrics of SPEC §7, against real loopback servers.

Every number asserted here is the count of requests this test itself sent
through a real gateway (`running_gateway`: the production wiring) to real
upstreams on loopback, read back from `/metrics` with prometheus-client's own
parser.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web

from gateway.demo.api import STATS_KEY, create_demo_api
from gateway.observability.metrics import Metrics
from tests.session_support import demo_provider
from tests.support import (
    Hold,
    Samples,
    config_dict,
    fetch,
    free_port,
    parse_metrics,
    reached,
    running_app,
    running_gateway,
)

TIMEOUT = aiohttp.ClientTimeout(total=30)  # a misbehaving gateway fails a test, never hangs it

ADMIN_PATHS = ("/healthz", "/readyz", "/metrics")

# -- helpers -----------------------------------------------------------------


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def scrape(admin_url: str) -> tuple[Samples, dict[str, str]]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as client,
        client.get(admin_url + "/metrics") as answer,
    ):
        assert answer.status == 200
        assert answer.content_type == "text/plain"
        return parse_metrics(await answer.text())


def upstream_app(hold: Hold, stall: asyncio.Event) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=b"ok:" + body)

    async def slow(_: web.Request) -> web.Response:
        hold.arrived.set()
        await hold.release.wait()
        return web.Response(body=b"slow done")

    async def never(_: web.Request) -> web.Response:
        await stall.wait()  # longer than the route's read timeout
        return web.Response(body=b"too late")

    app = web.Application()
    app.router.add_route("*", "/ok", ok)
    app.router.add_get("/slow", slow)
    app.router.add_get("/never", never)
    return app


def set_cookies(answer: aiohttp.ClientResponse) -> str:
    """The Cookie header a browser would send back after this answer."""
    pairs = [f"{name}={morsel.value}" for name, morsel in answer.cookies.items() if morsel.value]
    assert pairs, "expected session cookies"
    return "; ".join(pairs)


@contextlib.asynccontextmanager
async def metrics_setup() -> AsyncIterator[dict[str, Any]]:
    hold, stall = Hold(), asyncio.Event()
    demo = create_demo_api(access_ttl=5)  # refresh_skew 30 > 5: every request refreshes first
    async with running_app(upstream_app(hold, stall)) as up, running_app(demo) as demo_url:
        data = config_dict(
            [
                {"path": "/api/", "upstream": up + "/", "auth": "none"},
                {
                    "path": "/stall/",
                    "upstream": up + "/",
                    "auth": "none",
                    "timeouts": {"read": 0.3},
                },
                {"path": "/dead/", "upstream": f"http://127.0.0.1:{free_port()}/", "auth": "none"},
                {"path": "/demo/", "upstream": demo_url + "/", "auth": "demo"},
            ],
            providers={"demo": demo_provider(demo_url, refresh_skew=30)},
        )
        try:
            async with running_gateway(data) as gateway:
                yield {"gateway": gateway, "hold": hold, "stats": demo[STATS_KEY]}
        finally:
            hold.release.set()
            stall.set()


def listening_ports() -> set[int]:
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


# -- the admin listener --------------------------------------------------------


async def test_admin_paths_answer_on_the_admin_port_only() -> None:
    async with (
        running_gateway(config_dict([])) as gateway,
        aiohttp.ClientSession(timeout=TIMEOUT) as client,
    ):
        async with client.get(gateway.admin_url + "/healthz") as answer:
            assert answer.status == 200
            assert await answer.json() == {"status": "ok"}
        async with client.get(gateway.admin_url + "/readyz") as answer:
            assert answer.status == 200
            assert await answer.json() == {"status": "ready"}
        async with client.get(gateway.admin_url + "/metrics") as answer:
            assert answer.status == 200
            _, types = parse_metrics(await answer.text())
            assert types["bff_active_requests"] == "gauge"
        for path in ADMIN_PATHS:
            async with client.get(gateway.url + path) as answer:
                assert answer.status == 404, path
                assert answer.content_type == "application/json"
                assert (await answer.json())["error"] == "not_found"
        # The admin port's own errors are JSON as well.
        async with client.get(gateway.admin_url + "/nope") as answer:
            assert answer.status == 404
            assert (await answer.json())["error"] == "not_found"
        async with client.post(gateway.admin_url + "/metrics") as answer:
            assert answer.status == 405
            assert (await answer.json())["error"] == "method_not_allowed"


async def test_admin_listen_null_opens_no_admin_socket() -> None:
    admin_port = free_port()
    before = listening_ports()
    data = config_dict([], server={"admin_listen": f"127.0.0.1:{admin_port}"})
    async with running_gateway(data) as gateway:
        assert listening_ports() - before == {gateway.port, admin_port}
    data = config_dict([], server={"admin_listen": None})
    async with running_gateway(data) as gateway, aiohttp.ClientSession(timeout=TIMEOUT) as client:
        assert listening_ports() - before == {gateway.port}  # the public listener only
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.get(f"http://127.0.0.1:{admin_port}/healthz")
        async with client.get(gateway.url + "/metrics") as answer:
            assert answer.status == 404
            assert (await answer.json())["error"] == "not_found"


async def test_readyz_turns_503_while_draining_and_the_admin_port_stays_up() -> None:
    """In-process drain: leaving gateway_listeners with a request in flight."""
    hold = Hold()
    stall = asyncio.Event()
    async with (
        running_app(upstream_app(hold, stall)) as up,
        aiohttp.ClientSession(timeout=TIMEOUT) as client,
    ):
        data = config_dict([{"path": "/api/", "upstream": up + "/", "auth": "none"}])
        leave = asyncio.Event()
        ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def serve() -> None:
            async with running_gateway(data) as gateway:
                ready.set_result(gateway)
                await leave.wait()

        server = asyncio.create_task(serve())
        gateway = await asyncio.wait_for(ready, 10)

        call = asyncio.create_task(fetch(client, gateway.url + "/api/slow"))
        await reached(hold.arrived, call)
        leave.set()  # the drain starts: the request is still held upstream
        async with aiohttp.ClientSession(timeout=TIMEOUT) as admin:
            for _ in range(200):  # the draining flag is set within a loop step or two
                async with admin.get(gateway.admin_url + "/readyz") as answer:
                    if answer.status == 503:
                        assert await answer.json() == {"status": "draining"}
                        break
                await asyncio.sleep(0)
            else:
                pytest.fail("/readyz never turned 503 during the drain")
            async with admin.get(gateway.admin_url + "/healthz") as answer:
                assert answer.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession(timeout=TIMEOUT) as fresh:
                await fresh.get(gateway.url + "/api/ok")
        assert not server.done()  # still waiting for the in-flight request
        hold.release.set()
        assert await asyncio.wait_for(call, 10) == (200, b"slow done")
        await asyncio.wait_for(server, 10)


# -- metrics -------------------------------------------------------------------


async def test_every_metric_family_counts_the_requests_sent() -> None:
    async with metrics_setup() as setup, aiohttp.ClientSession(timeout=TIMEOUT) as client:
        gateway, stats = setup["gateway"], setup["stats"]
        url = gateway.url
        sent: list[tuple[str, str, str]] = []  # (route, method, status)

        async def call(method: str, path: str, route: str, **kw: Any) -> aiohttp.ClientResponse:
            async with client.request(method, url + path, **kw) as answer:
                await answer.read()
                sent.append((route, method, str(answer.status)))
                return answer

        for _ in range(3):
            assert (await call("GET", "/api/ok", "/api/")).status == 200
        assert (await call("POST", "/api/ok", "/api/", data=b"x" * 100)).status == 200
        assert (await call("GET", "/nothing/here", "unmatched")).status == 404
        assert (await call("GET", "/dead/x", "/dead/")).status == 502
        assert (await call("GET", "/stall/never", "/stall/")).status == 504

        csrf = {"X-CSRF": "1"}
        bad = await call(
            "POST",
            "/auth/demo/login",
            "/auth/demo",
            json={"username": "demo", "password": "wrong"},
            headers=csrf,
        )
        assert bad.status == 401
        good = await call(
            "POST",
            "/auth/demo/login",
            "/auth/demo",
            json={"username": "demo", "password": "demo"},
            headers=csrf,
        )
        assert good.status == 200
        cookie = set_cookies(good)
        # The token expires within refresh_skew: the first call refreshes; the
        # second still carries the pre-refresh cookie and is handed the same
        # new tokens (coalesced), not a second refresh.
        first = await call("GET", "/demo/user", "/demo/", headers={"Cookie": cookie})
        assert first.status == 200
        second = await call("GET", "/demo/user", "/demo/", headers={"Cookie": cookie})
        assert second.status == 200
        assert stats.refresh_calls == 1

        samples, types = await scrape(gateway.admin_url)

    assert types["bff_requests"] == "counter"
    assert types["bff_request_duration_seconds"] == "histogram"
    assert types["bff_upstream_duration_seconds"] == "histogram"
    assert types["bff_upstream_errors"] == "counter"
    assert types["bff_token_refresh"] == "counter"
    assert types["bff_logins"] == "counter"
    assert types["bff_active_requests"] == "gauge"

    expected: dict[tuple[str, str, str], int] = {}
    for key in sent:
        expected[key] = expected.get(key, 0) + 1
    for (route, method, status), count in expected.items():
        got = value(samples, "bff_requests_total", route=route, method=method, status=status)
        assert got == count, (route, method, status)
    assert total(samples, "bff_requests_total") == len(sent)

    routes = {route for route, _, _ in sent}
    for route in routes:
        count = sum(1 for r, _, _ in sent if r == route)
        assert value(samples, "bff_request_duration_seconds_count", route=route) == count, route
        inf = value(samples, "bff_request_duration_seconds_bucket", route=route, le="+Inf")
        assert inf == count
    assert total(samples, "bff_request_duration_seconds_count") == len(sent)

    # Upstream time is observed for each upstream answer: 4 on /api/, 2 on /demo/.
    assert value(samples, "bff_upstream_duration_seconds_count", route="/api/") == 4
    assert value(samples, "bff_upstream_duration_seconds_count", route="/demo/") == 2
    assert value(samples, "bff_upstream_duration_seconds_count", route="/dead/") == 0
    assert value(samples, "bff_upstream_duration_seconds_sum", route="/api/") > 0

    assert value(samples, "bff_upstream_errors_total", route="/dead/", kind="connect") == 1
    assert value(samples, "bff_upstream_errors_total", route="/stall/", kind="timeout") == 1
    assert total(samples, "bff_upstream_errors_total") == 2

    assert value(samples, "bff_token_refresh_total", provider="demo", result="success") == 1
    assert value(samples, "bff_token_refresh_total", provider="demo", result="coalesced") == 1
    assert total(samples, "bff_token_refresh_total") == 2

    assert value(samples, "bff_logins_total", provider="demo", result="success") == 1
    assert value(samples, "bff_logins_total", provider="demo", result="rejected") == 1
    assert total(samples, "bff_logins_total") == 2

    assert value(samples, "bff_active_requests") == 0


async def test_active_requests_gauge_follows_a_held_request() -> None:
    async with metrics_setup() as setup, aiohttp.ClientSession(timeout=TIMEOUT) as client:
        gateway, hold = setup["gateway"], setup["hold"]
        samples, _ = await scrape(gateway.admin_url)
        assert value(samples, "bff_active_requests") == 0

        call = asyncio.create_task(fetch(client, gateway.url + "/api/slow"))
        await reached(hold.arrived, call)
        samples, _ = await scrape(gateway.admin_url)
        assert value(samples, "bff_active_requests") == 1
        assert value(samples, "bff_requests_total", route="/api/", method="GET", status="200") == 0
        hold.release.set()
        assert await asyncio.wait_for(call, 10) == (200, b"slow done")
        samples, _ = await scrape(gateway.admin_url)
        assert value(samples, "bff_active_requests") == 0
        assert value(samples, "bff_requests_total", route="/api/", method="GET", status="200") == 1


async def test_metrics_exposition_is_valid_prometheus_text() -> None:
    """The body parses, each family has HELP and TYPE, and nothing secret-looking leaks."""
    async with metrics_setup() as setup, aiohttp.ClientSession(timeout=TIMEOUT) as client:
        gateway = setup["gateway"]
        async with client.get(gateway.url + "/api/ok?token=sekrit-in-query") as answer:
            assert answer.status == 200
        async with client.get(gateway.admin_url + "/metrics") as answer:
            text = await answer.text()
            assert answer.headers["Content-Type"].startswith("text/plain; version=")
    assert "sekrit" not in text
    for family in (
        "bff_requests_total",
        "bff_request_duration_seconds",
        "bff_upstream_duration_seconds",
        "bff_upstream_errors_total",
        "bff_token_refresh_total",
        "bff_logins_total",
        "bff_active_requests",
    ):
        assert f"# HELP {family} " in text, family
        assert f"# TYPE {family} " in text, family


def test_request_done_bounds_labels_and_counts_every_call() -> None:
    """Metrics.request_done: the one call per answered request that app.py can make."""
    metrics = Metrics()
    for method in ("GET", "GET", "BREW", "XYZZY"):
        metrics.request_done("/api/", method, 200, 0.002, 0.001)
    metrics.request_done("unmatched", "GET", 404, 0.0001, None)
    samples, _ = parse_metrics(metrics.exposition().decode())
    assert value(samples, "bff_requests_total", route="/api/", method="GET", status="200") == 2
    assert value(samples, "bff_requests_total", route="/api/", method="OTHER", status="200") == 2
    assert {dict(ls)["method"] for (n, ls) in samples if n == "bff_requests_total"} == {
        "GET",
        "OTHER",
    }
    assert value(samples, "bff_request_duration_seconds_count", route="/api/") == 4
    assert value(samples, "bff_upstream_duration_seconds_count", route="/api/") == 4
    assert value(samples, "bff_request_duration_seconds_count", route="unmatched") == 1
    assert value(samples, "bff_upstream_duration_seconds_count", route="unmatched") == 0
    assert value(samples, "bff_request_duration_seconds_bucket", route="/api/", le="0.0025") == 4
    assert value(samples, "bff_request_duration_seconds_bucket", route="/api/", le="0.001") == 0
