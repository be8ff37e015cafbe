"""`bff-gateway run` as a real process: workers, metrics across workers, drain, refusals.

SPEC §1 (run, SIGTERM drain, startup refusals) and §7 (metrics summed over
workers). Every gateway here is a subprocess (`python -m gateway run`); its
upstreams run in the test's own event loop on loopback, so an upstream
handler can hold a response open until the test releases it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml
from aiohttp import web

from tests.support import (
    REPO,
    GatewayProcess,
    Hold,
    Samples,
    async_gateway_process,
    config_dict,
    fetch,
    json_lines,
    parse_metrics,
    reached,
    running_app,
)

TIMEOUT = aiohttp.ClientTimeout(total=30)  # a misbehaving gateway fails a test, never hangs it

CHUNK = b"0123456789abcdef" * 4096  # 64 KiB
STREAM_CHUNKS = 16  # after the first one: a 1 MiB+ streamed body


# -- helpers -----------------------------------------------------------------


class Upstream:
    """A loopback upstream whose slow handlers park until the test releases them."""

    def __init__(self) -> None:
        self.slow = Hold()
        self.stream = Hold()

    def app(self) -> web.Application:
        async def ok(_: web.Request) -> web.Response:
            return web.Response(body=b"ok")

        async def slow(_: web.Request) -> web.Response:
            self.slow.arrived.set()
            await self.slow.release.wait()
            return web.Response(body=b"slow done")

        async def stream(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            response.content_type = "application/octet-stream"
            await response.prepare(request)
            await response.write(CHUNK)
            self.stream.arrived.set()
            await self.stream.release.wait()
            for _ in range(STREAM_CHUNKS):
                await response.write(CHUNK)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_get("/ok", ok)
        app.router.add_get("/slow", slow)
        app.router.add_get("/stream", stream)
        return app

    def release_all(self) -> None:
        self.slow.release.set()
        self.stream.release.set()


@asynccontextmanager
async def upstream_and_gateway(
    tmp_path: Path, *args: str, **server: Any
) -> AsyncIterator[tuple[Upstream, GatewayProcess]]:
    upstream = Upstream()
    async with running_app(upstream.app()) as up:
        data = config_dict([{"path": "/api/", "upstream": up + "/", "auth": "none"}], server=server)
        async with async_gateway_process(data, tmp_path, *args) as process:
            try:
                yield upstream, process
            finally:
                upstream.release_all()


def restarted(
    gateway: GatewayProcess, tmp_path: Path
) -> AbstractAsyncContextManager[GatewayProcess]:
    """Another gateway process from ``gateway``'s config file (the same ports), logging
    under tmp_path/again."""
    (tmp_path / "again").mkdir()
    return async_gateway_process(yaml.safe_load(gateway.path.read_text()), tmp_path / "again")


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 15) -> Any:
    """Poll another process's observable state (no event can cross the process line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


async def status_of(url: str) -> int | None:
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client, client.get(url) as answer:
            await answer.read()
            return answer.status
    except aiohttp.ClientConnectionError:
        return None


async def has_status(url: str, expected: int) -> bool:
    return await status_of(url) == expected


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def scrape(admin_url: str) -> Samples:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as client,
        client.get(admin_url + "/metrics") as answer,
    ):
        assert answer.status == 200
        text = await answer.text()
    samples, _ = parse_metrics(text)
    return samples


def requests_total(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "bff_requests_total")


async def wait_exit(process: GatewayProcess, timeout: float = 30) -> int:
    assert process.proc is not None
    return await asyncio.to_thread(process.proc.wait, timeout)


def worker_pids(process: GatewayProcess) -> list[int]:
    """The live worker processes of a supervisor (not its resource tracker)."""
    assert process.proc is not None
    pids = []
    for child in psutil.Process(process.proc.pid).children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if "spawn_main" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            continue  # it exited meanwhile
    return pids


def live_entries(process: GatewayProcess) -> list[dict[str, Any]]:
    """The complete lines logged so far by a running process (a last partial line waits)."""
    text = process.log()
    return json_lines(text[: text.rfind("\n") + 1])


def served_by(process: GatewayProcess) -> set[int]:
    """The pids that logged an access line so far."""
    return {e["pid"] for e in live_entries(process) if e["event"] == "request"}


async def hold_slow_and_stream(
    client: aiohttp.ClientSession, url: str, upstream: Upstream
) -> tuple[asyncio.Task[tuple[int, bytes]], asyncio.Task[tuple[int, bytes]]]:
    """Start GET /api/slow and GET /api/stream on the gateway at ``url``; return their tasks
    once the upstream holds both and the client has read the stream's first chunk."""
    slow = asyncio.create_task(fetch(client, url + "/api/slow"))
    first_chunk = asyncio.Event()

    async def read_stream() -> tuple[int, bytes]:
        async with client.get(url + "/api/stream") as answer:
            head = await answer.content.readexactly(len(CHUNK))
            first_chunk.set()
            return answer.status, head + await answer.read()

    stream = asyncio.create_task(read_stream())
    await reached(upstream.slow.arrived, slow, stream)
    await reached(upstream.stream.arrived, slow, stream)
    await reached(first_chunk, slow, stream)
    return slow, stream


# -- drain -------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path, workers: int) -> None:
    async with upstream_and_gateway(tmp_path, "--workers", str(workers), shutdown_timeout=20) as (
        upstream,
        gateway,
    ):
        assert gateway.proc is not None
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            slow, stream = await hold_slow_and_stream(client, gateway.url, upstream)

            gateway.proc.send_signal(signal.SIGTERM)
            readyz = gateway.admin_url + "/readyz"
            await wait_until(
                lambda: has_status(readyz, 503), "/readyz to turn 503 during the drain"
            )
            assert await status_of(gateway.admin_url + "/healthz") == 200
            if workers == 1:
                # The listening socket closes in the step that turns /readyz 503.
                assert await refused(gateway.config.server.listen.port)
            else:
                await wait_until(
                    lambda: refused(gateway.config.server.listen.port),
                    "new connections to be refused",
                )
            assert not slow.done() and not stream.done()
            assert gateway.proc.poll() is None  # waiting for the in-flight requests

            upstream.release_all()
            assert await asyncio.wait_for(slow, 30) == (200, b"slow done")
            status, body = await asyncio.wait_for(stream, 30)
            assert status == 200
            assert body == CHUNK * (STREAM_CHUNKS + 1)
        assert await wait_exit(gateway) == 0
    events = [e["event"] for e in json_lines(gateway.log())]
    assert "draining" in events
    assert events[-1] == "stopped"


@pytest.mark.parametrize("workers", [1, 2])
async def test_shutdown_timeout_cuts_requests_held_longer(tmp_path: Path, workers: int) -> None:
    async with upstream_and_gateway(tmp_path, "--workers", str(workers), shutdown_timeout=1) as (
        upstream,
        gateway,
    ):
        assert gateway.proc is not None
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            slow, stream = await hold_slow_and_stream(client, gateway.url, upstream)
            started = time.monotonic()
            gateway.proc.send_signal(signal.SIGTERM)
            # The upstream never answers in time: the drain must not wait for it.
            assert await wait_exit(gateway, timeout=20) == 0
            elapsed = time.monotonic() - started
            with pytest.raises(aiohttp.ClientError):
                await asyncio.wait_for(slow, 10)
            # A cut stream is never presented as a complete body.
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(stream, 10)
    assert elapsed < 15  # bounded by shutdown_timeout (1 s): the upstream never answers


@pytest.mark.parametrize("workers", [1, 2])
async def test_ctrl_c_drains_once_and_exits_0(tmp_path: Path, workers: int) -> None:
    """A terminal's Ctrl-C sends SIGINT to every process of the group."""
    async with upstream_and_gateway(tmp_path, "--workers", str(workers)) as (upstream, gateway):
        assert gateway.proc is not None
        pids = worker_pids(gateway)
        assert len(pids) == (0 if workers == 1 else 2)
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            slow = asyncio.create_task(fetch(client, gateway.url + "/api/slow"))
            await reached(upstream.slow.arrived, slow)
            for pid in [gateway.proc.pid, *pids]:
                os.kill(pid, signal.SIGINT)
            await wait_until(
                lambda: has_status(gateway.admin_url + "/readyz", 503), "/readyz to turn 503"
            )
            upstream.release_all()
            assert await asyncio.wait_for(slow, 30) == (200, b"slow done")
        assert await wait_exit(gateway) == 0
    entries = json_lines(gateway.log())  # no KeyboardInterrupt traceback anywhere
    events = [e["event"] for e in entries]
    assert events.count("draining") == 1
    assert events[-1] == "stopped"


async def test_a_drained_gateway_restarts_on_the_same_ports_at_once(tmp_path: Path) -> None:
    """The connections it closed linger in TIME_WAIT; a restart must not mistake them for
    another listener ("port taken")."""
    async with upstream_and_gateway(tmp_path) as (_, gateway):
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            for _ in range(3):
                assert await fetch(client, gateway.url + "/api/ok") == (200, b"ok")
            assert await asyncio.to_thread(gateway.stop) == 0  # closes the idle keep-alives
        async with restarted(gateway, tmp_path) as again:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
                assert await fetch(client, again.url + "/api/ok") == (200, b"ok")
            assert await asyncio.to_thread(again.stop) == 0


# -- workers -----------------------------------------------------------------


async def test_two_workers_share_the_port_and_metrics_sum_over_them(tmp_path: Path) -> None:
    count = 40
    async with upstream_and_gateway(tmp_path, workers=2) as (_, gateway):
        pids = worker_pids(gateway)
        assert len(pids) == 2
        connector = aiohttp.TCPConnector(force_close=True)  # a fresh connection per request
        async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as client:
            for _ in range(count):
                assert await fetch(client, gateway.url + "/api/ok") == (200, b"ok")

        async def counted() -> bool:
            return requests_total(await scrape(gateway.admin_url)) >= count

        await wait_until(counted, "the workers' counters to reach the supervisor")
        samples = await scrape(gateway.admin_url)
        assert requests_total(samples) == count
        key = frozenset({"route": "/api/", "method": "GET", "status": "200"}.items())
        assert samples[("bff_requests_total", key)] == count
        route = frozenset({"route": "/api/"}.items())
        assert samples[("bff_request_duration_seconds_count", route)] == count
        assert samples[("bff_upstream_duration_seconds_count", route)] == count
        assert samples[("bff_active_requests", frozenset())] == 0
        multiproc_dir = Path(psutil.Process(pids[0]).environ()["PROMETHEUS_MULTIPROC_DIR"])
        assert multiproc_dir.is_dir()

        assert gateway.stop() == 0
    entries = json_lines(gateway.log())
    served = [e["pid"] for e in entries if e["event"] == "request"]
    assert len(served) == count
    assert set(served) == set(pids)  # both workers served some (and only workers did)
    assert not multiproc_dir.exists()  # the supervisor removed its metrics files


async def test_a_crashed_worker_is_replaced_and_its_counts_are_kept(tmp_path: Path) -> None:
    async with upstream_and_gateway(tmp_path, workers=2) as (_, gateway):
        assert gateway.proc is not None
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as client:
            for _ in range(10):
                assert (await fetch(client, gateway.url + "/api/ok"))[0] == 200

            async def first_ten_counted() -> bool:
                # A worker counts a request just after the response left it; a
                # SIGKILL in between would (rightly) lose that count.
                return requests_total(await scrape(gateway.admin_url)) >= 10

            await wait_until(first_ten_counted, "the first requests counted")
            before = worker_pids(gateway)
            victim = before[0]
            os.kill(victim, signal.SIGKILL)

            def replaced() -> bool:
                pids = worker_pids(gateway)
                return len(pids) == 2 and victim not in pids

            await wait_until(replaced, "a replacement worker")
            (newcomer,) = set(worker_pids(gateway)) - set(before)

            def newcomer_ready() -> bool:
                return any(
                    e["event"] == "worker ready" and e["pid"] == newcomer
                    for e in live_entries(gateway)
                )

            await wait_until(newcomer_ready, "the replacement to listen")
            assert await has_status(gateway.admin_url + "/readyz", 200)
            sent = 10
            # Fresh connections until the kernel hands one to the newcomer.
            while newcomer not in served_by(gateway) and sent < 200:
                assert (await fetch(client, gateway.url + "/api/ok"))[0] == 200
                sent += 1
            assert newcomer in served_by(gateway)

        async def counted() -> bool:
            return requests_total(await scrape(gateway.admin_url)) >= sent

        await wait_until(counted, "every request counted")
        samples = await scrape(gateway.admin_url)
        assert requests_total(samples) == sent  # the dead worker's counts stay
        assert samples[("bff_active_requests", frozenset())] == 0
        assert gateway.stop() == 0
    restarts = [e for e in json_lines(gateway.log()) if e["event"] == "worker exited; restarting"]
    assert len(restarts) == 1
    assert restarts[0]["worker"] == victim
    assert restarts[0]["pid"] == gateway.proc.pid  # logged by the supervisor
    assert restarts[0]["level"] == "warning"


async def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    async with upstream_and_gateway(tmp_path, workers=2) as (_, gateway):
        assert gateway.proc is not None
        pids = worker_pids(gateway)
        leftover = Path(psutil.Process(pids[0]).environ()["PROMETHEUS_MULTIPROC_DIR"])
        gateway.proc.kill()  # a SIGKILLed supervisor cannot remove its metrics directory
        gateway.proc.wait()

        def gone() -> bool:
            return not any(
                psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                for pid in pids
            )

        await wait_until(gone, "orphaned workers to exit")
        assert await refused(gateway.config.server.listen.port)
        assert leftover.is_dir()

        # The port is free again, and the next supervisor sweeps the dead one's files.
        try:
            async with restarted(gateway, tmp_path) as again:
                assert not leftover.exists()
                assert await asyncio.to_thread(again.stop) == 0
        finally:
            shutil.rmtree(leftover, ignore_errors=True)


# -- startup refusals ----------------------------------------------------------


def run_gateway(
    tmp_path: Path, data: dict[str, Any] | str, *args: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "refused.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "BFF_TEST_UNSET"}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=env,
    )


def assert_refused(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bff-gateway: ")
    for fragment in fragments:
        assert fragment in lines[0]
    json_lines(result.stdout)


def routes() -> list[dict[str, Any]]:
    return [{"path": "/api/", "upstream": "http://127.0.0.1:9/", "auth": "none"}]


def test_run_refuses_a_bad_config(tmp_path: Path) -> None:
    data = config_dict(routes())
    data["server"]["listne"] = "127.0.0.1:1"
    assert_refused(run_gateway(tmp_path, data), "listne")


def test_run_refuses_an_unset_environment_variable(tmp_path: Path) -> None:
    data = config_dict(routes())
    data["routes"][0]["inject_headers"] = {"X-Api-Key": "${BFF_TEST_UNSET}"}
    assert_refused(run_gateway(tmp_path, data), "BFF_TEST_UNSET")


@pytest.mark.parametrize("which", ["listen", "admin_listen"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_refuses_a_taken_port(tmp_path: Path, which: str, workers: str) -> None:
    data = config_dict(routes())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data["server"][which] = f"127.0.0.1:{port}"
        result = run_gateway(tmp_path, data, "--workers", workers)
    assert_refused(result, f"127.0.0.1:{port}")
    if which == "admin_listen":
        assert "admin" in result.stderr


def test_run_refuses_an_unreadable_tls_certificate(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    data = config_dict(routes(), server={"tls": {"cert_file": str(cert), "key_file": str(key)}})
    assert_refused(run_gateway(tmp_path, data), "server.tls")


def test_run_refuses_memory_store_with_workers(tmp_path: Path) -> None:
    data = config_dict(routes(), session={"store": "memory"})
    assert_refused(run_gateway(tmp_path, data, "--workers", "2"), "memory")
