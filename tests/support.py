"""Helpers to run real gateways and upstreams on loopback in tests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Config, load_config_text
from gateway.observability.logs import JsonFormatter
from gateway.server import Listeners, gateway_listeners
from tests.ports import free_port

TEST_KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"  # 32 zero bytes, base64url
TEST_KEY_2 = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE"  # 32 bytes of 0x01
REPO = Path(__file__).resolve().parent.parent


def config_dict(routes: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """A full config with free ports, a test key and plain-http cookies."""
    server = {"listen": f"127.0.0.1:{free_port()}", "admin_listen": f"127.0.0.1:{free_port()}"}
    server.update(sections.pop("server", {}))
    session = {"secure": False, "keys": [{"id": "k1", "secret": TEST_KEY}]}
    session.update(sections.pop("session", {}))
    return {"server": server, "session": session, "routes": routes, **sections}


def build_config(data: dict[str, Any]) -> Config:
    return load_config_text(yaml.safe_dump(data), env={}, source="test")


class _Addresses:
    """The public and admin URLs of a gateway under test, from its config."""

    config: Config

    @property
    def url(self) -> str:
        return f"http://{self.config.server.listen}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.config.server.admin_listen}"


@dataclass
class RunningGateway(_Addresses):
    listeners: Listeners
    config: Config

    @property
    def port(self) -> int:
        return self.config.server.listen.port


@contextlib.asynccontextmanager
async def running_gateway(data: dict[str, Any]) -> AsyncIterator[RunningGateway]:
    """The production wiring (gateway_listeners) in this process, on free ports."""
    config = build_config(data)
    async with gateway_listeners(config, reuse_port=False, with_admin=True) as listeners:
        yield RunningGateway(listeners, config)


@contextlib.asynccontextmanager
async def running_app(app: web.Application, **site: Any) -> AsyncIterator[str]:
    """Serve an aiohttp app on a free loopback port; yield its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, **site).start()
    scheme = "https" if site.get("ssl_context") else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_app_with(app: web.Application, **runner_options: Any) -> AsyncIterator[str]:
    """Like running_app (plain http), but the keyword arguments go to web.AppRunner, e.g.
    ``auto_decompress=False``, ``handler_cancellation=True`` or ``max_field_size=...``."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, **runner_options)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def raw_request(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    """Send raw bytes to 127.0.0.1:port and return everything read back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        if read_until_close:
            return await asyncio.wait_for(reader.read(-1), timeout=10)
        return await asyncio.wait_for(reader.read(65536), timeout=10)
    finally:
        writer.close()


def error_of(body: bytes) -> str:
    return str(json.loads(body)["error"])


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` (a process's output, a captured log), each of which must be
    a JSON object: any other line fails the test."""
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> tuple[Samples, dict[str, str]]:
    """Prometheus text, parsed by prometheus-client: samples keyed by (sample name,
    labels) and each family's declared type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, types


@contextlib.contextmanager
def handler_attached(
    handler: logging.Handler, logger: str = "", level: int | None = None
) -> Iterator[None]:
    """Attach ``handler`` to the named logger (the root by default) and, given ``level``,
    set that logger's level; both are undone on exit."""
    target = logging.getLogger(logger)
    previous = target.level
    target.addHandler(handler)
    if level is not None:
        target.setLevel(level)
    try:
        yield
    finally:
        target.removeHandler(handler)
        if level is not None:
            target.setLevel(previous)


@contextlib.contextmanager
def captured_json_logs(logger: str = "", level: int | None = None) -> Iterator[io.StringIO]:
    """What reaches the named logger (the root by default), formatted by the production
    JsonFormatter, one line a record; ``level`` as for handler_attached."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    with handler_attached(handler, logger, level):
        yield stream


class GatewayProcess(_Addresses):
    """`bff-gateway run` as a real subprocess (for RSS, signals and workers)."""

    def __init__(self, data: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> None:
        self.config = build_config(data)
        self.path = tmp / "gateway.yaml"
        self.path.write_text(yaml.safe_dump(data))
        self.log_path = tmp / "gateway.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.path), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        import urllib.request

        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("gateway did not become ready")

    def kill(self) -> None:
        """Kill the process if it still runs (a test's cleanup, whatever happened)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout=60)
        self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text()


@contextlib.contextmanager
def gateway_process(data: dict[str, Any], tmp: Path, *args: str) -> Iterator[GatewayProcess]:
    process = GatewayProcess(data, tmp)
    process.start(*args)
    try:
        yield process
    finally:
        process.kill()


@contextlib.asynccontextmanager
async def async_gateway_process(
    data: dict[str, Any], tmp: Path, *args: str
) -> AsyncIterator[GatewayProcess]:
    """gateway_process for async tests: the start (a wait for /readyz) runs in a thread, so
    that upstreams served by the test's own event loop keep answering meanwhile."""
    process = GatewayProcess(data, tmp)
    try:
        await asyncio.to_thread(process.start, *args)
        yield process
    finally:
        process.kill()


async def get_json(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with session.get(url, **kw) as response:
        return response.status, await response.json(content_type=None)


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    """GET ``url``: (status, body)."""
    async with session.get(url) as response:
        return response.status, await response.read()


class RssSampler:
    """Samples a process's RSS (plus its children's) every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        import psutil

        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                total += child.memory_info().rss
        return int(total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.rss())
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.rss())

    @property
    def peak(self) -> int:
        return max(self.samples)


def pid_of(process: GatewayProcess) -> int:
    assert process.proc is not None and process.proc.poll() is None
    return process.proc.pid


class Hold:
    """An upstream handler parks here: it sets ``arrived`` and waits for ``release``."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()


async def reached(event: asyncio.Event, *tasks: asyncio.Task[Any], timeout: float = 10) -> None:
    """Await ``event``; if a client task ends first, its error (or result) says why."""
    waiter = asyncio.create_task(event.wait())
    done, _ = await asyncio.wait({waiter, *tasks}, timeout=timeout, return_when="FIRST_COMPLETED")
    if waiter in done:
        return
    waiter.cancel()
    for task in tasks:
        if task in done:
            pytest.fail(f"the request ended before the upstream held it: {task.result()!r}")
    pytest.fail("timed out waiting for the upstream to hold the request")


def fuzz_examples(default: int) -> int:
    """How many examples a fuzz property runs: ``default`` (sized so that the whole
    suite's fuzzing stays well under a minute), or ``BFF_FUZZ_EXAMPLES`` when set."""
    return int(os.environ.get("BFF_FUZZ_EXAMPLES") or default)


def fuzz_settings(default: int, **more: Any) -> Any:
    """Hypothesis settings for a fuzz property: ``fuzz_examples(default)`` examples, no
    deadline, derandomized unless ``BFF_FUZZ_EXAMPLES`` asks for exploration
    (tests/conftest.py loads the profile)."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=fuzz_examples(default),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
            HealthCheck.filter_too_much,
        ],
        **more,
    )
