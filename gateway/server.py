"""Processes, listeners, signals and drain (SPEC §1, §7).

``workers: 1`` runs everything in one process. With more, a supervisor owns
the admin listener and starts N worker processes that each bind the public
port with SO_REUSEPORT (the kernel spreads connections across them); metrics
are shared through prometheus-client's multiprocess files.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from gateway.config import Config, Listen, load_config
from gateway.observability.health import Exposition, Health, admin_app
from gateway.observability.logs import event, setup_logging


class StartupError(Exception):
    """A one-line reason the gateway cannot start."""


def effective_workers(config: Config) -> int:
    return config.server.workers or os.cpu_count() or 1


def check_port_free(listen: Listen) -> None:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((listen.host, listen.port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {listen}: {exc.strerror}") from None


def _server_ssl(config: Config) -> ssl.SSLContext | None:
    tls = config.server.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


@dataclass
class Listeners:
    public: web.BaseRunner
    admin: web.BaseRunner | None
    health: Health


@contextlib.asynccontextmanager
async def gateway_listeners(
    config: Config, *, reuse_port: bool, with_admin: bool
) -> AsyncIterator[Listeners]:
    """Start the public (and optionally admin) listener; stop them on exit."""
    from gateway.app import Gateway, default_store
    from gateway.observability.metrics import Metrics
    from gateway.proxy import client_session

    limits = config.server.limits
    client = client_session()
    store = default_store(config)
    metrics = Metrics()
    gateway = Gateway(config, client, metrics, store)
    server = web.Server(
        gateway.handle,
        handler_cancellation=True,
        max_line_size=limits.max_header_size,
        max_field_size=limits.max_header_size,
        max_headers=limits.max_headers,
        auto_decompress=False,
        access_log=None,
    )
    public = web.ServerRunner(server, shutdown_timeout=config.server.shutdown_timeout)
    await public.setup()
    listen = config.server.listen
    try:
        await web.TCPSite(
            public,
            listen.host,
            listen.port,
            ssl_context=_server_ssl(config),
            reuse_port=reuse_port,
            backlog=1024,
        ).start()
    except OSError as exc:
        await public.cleanup()
        await client.close()
        raise StartupError(f"cannot listen on {listen}: {exc.strerror}") from None
    health = Health(store.ping)
    admin: web.BaseRunner | None = None
    if with_admin and config.server.admin_listen is not None:
        admin = await start_admin(config.server.admin_listen, health, metrics.exposition)
    try:
        yield Listeners(public, admin, health)
    finally:
        health.draining = True
        await public.cleanup()  # stop accepting, let in-flight requests finish
        if admin is not None:
            await admin.cleanup()
        await client.close()
        await store.close()


async def start_admin(listen: Listen, health: Health, exposition: Exposition) -> web.BaseRunner:
    runner = web.AppRunner(admin_app(health, exposition), access_log=None, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, listen.host, listen.port).start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {listen} (admin): {exc.strerror}") from None
    return runner


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_single(config: Config) -> None:
    stop = _stop_event()
    async with gateway_listeners(config, reuse_port=False, with_admin=True) as listeners:
        event(
            "listening",
            listen=str(config.server.listen),
            workers=1,
            admin=str(config.server.admin_listen),
        )
        await stop.wait()
        event("draining", timeout=config.server.shutdown_timeout)
        listeners.health.draining = True
    event("stopped")


async def serve_worker(config: Config) -> None:
    stop = _stop_event()
    async with gateway_listeners(config, reuse_port=True, with_admin=False) as listeners:
        await stop.wait()
        listeners.health.draining = True


def _worker_main(config_path: str) -> None:
    config = load_config(config_path)
    setup_logging(config.logging.level, config.logging.format, config.logging.access_log)
    run_loop(serve_worker(config))


async def supervise(config: Config, config_path: str, workers: int) -> None:
    """Start workers, keep them alive, serve the admin listener, drain on a signal."""
    from prometheus_client import multiprocess

    from gateway.observability.metrics import multiprocess_exposition

    stop = _stop_event()
    context = multiprocessing.get_context("spawn")
    health = Health()
    admin = (
        await start_admin(config.server.admin_listen, health, multiprocess_exposition)
        if config.server.admin_listen is not None
        else None
    )
    procs = []

    def spawn() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_worker_main, args=(config_path,), daemon=False)
        process.start()
        return process

    procs = [spawn() for _ in range(workers)]
    event(
        "listening",
        listen=str(config.server.listen),
        workers=workers,
        admin=str(config.server.admin_listen),
    )
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        for index, process in enumerate(procs):
            if not process.is_alive() and not stop.is_set():
                event("worker exited; restarting", pid=process.pid, code=process.exitcode)
                if process.pid is not None:
                    multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                procs[index] = spawn()
    health.draining = True
    event("draining", timeout=config.server.shutdown_timeout)
    for process in procs:
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + config.server.shutdown_timeout + 5
    for process in procs:
        while process.is_alive() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if process.is_alive():
            process.kill()
    if admin is not None:
        await admin.cleanup()
    event("stopped")


def run_loop(main: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        asyncio.run(main)  # type: ignore[arg-type]
    else:
        uvloop.run(main)  # type: ignore[arg-type]


def run(config: Config, config_path: str, workers_override: int | None = None) -> int:
    setup_logging(config.logging.level, config.logging.format, config.logging.access_log)
    workers = workers_override if workers_override is not None else effective_workers(config)
    if workers_override is not None and workers_override == 0:
        workers = os.cpu_count() or 1
    try:
        check_port_free(config.server.listen)
        if config.server.admin_listen is not None:
            check_port_free(config.server.admin_listen)
        if workers == 1:
            run_loop(serve_single(config))
        else:
            if config.session.store == "memory":
                raise StartupError("session.store: memory needs a single worker")
            directory = tempfile.mkdtemp(prefix="bff-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
            run_loop(supervise(config, config_path, workers))
    except StartupError as exc:
        print(f"bff-gateway: {exc}", file=sys.stderr)
        return 1
    return 0
