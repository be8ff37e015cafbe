"""Processes, listeners, signals and drain (SPEC §1, §7).

``workers: 1`` runs everything in one process. With more, a supervisor owns
the admin listener and starts N worker processes that each bind the public
port with SO_REUSEPORT (the kernel spreads connections across them); metrics
are shared through prometheus-client's multiprocess files, in a directory
the supervisor creates before the first worker starts and removes at exit.

Drain (SIGTERM or SIGINT): ``/readyz`` turns 503 and the listening sockets
close in the same step, in-flight requests get up to ``shutdown_timeout`` to
finish (then they are cut), the admin listener stays up until the end, and
the process exits 0. Workers ignore SIGINT (a Ctrl-C reaches the whole
process group): the supervisor turns it into one SIGTERM per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from gateway.app import Gateway
from gateway.config import Config, Listen
from gateway.listener import PublicServer
from gateway.observability.health import Exposition, Health, ReadyCheck, admin_app
from gateway.observability.logs import EVENTS, event, setup_logging
from gateway.sessions.redis_store import connect as connect_redis
from gateway.sessions.redis_store import ping as redis_ping

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_METRICS_DIR_PREFIX = "bff-metrics-"
_SUPERVISE_TICK = 0.2  # how often the supervisor looks at its workers
_PARENT_CHECK = 1.0  # how often a worker checks that its supervisor still lives
# Young-generation collections every 10,000 net allocations instead of 700:
# a proxied request allocates a few hundred objects, nearly none in cycles.
_GC_YOUNG_THRESHOLD = 10_000


class StartupError(Exception):
    """A one-line reason the gateway cannot start."""


def effective_workers(config: Config, override: int | None = None) -> int:
    workers = config.server.workers if override is None else override
    return workers or os.cpu_count() or 1


def check_port_free(listen: Listen, what: str = "") -> None:
    """Fail early, with one line, when another socket listens on the address.

    SO_REUSEADDR as the real listener sets it: without it, connections of a
    previous run still in TIME_WAIT would make a restart fail for a minute.
    """
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((listen.host, listen.port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {listen}{what}: {exc.strerror}") from None


def _server_ssl(config: Config) -> ssl.SSLContext | None:
    tls = config.server.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise StartupError(
            f"server.tls: cannot load {tls.cert_file} with {tls.key_file}: {reason}"
        ) from None
    return context


@dataclass
class Listeners:
    gateway: Gateway
    health: Health


@contextlib.asynccontextmanager
async def gateway_listeners(
    config: Config, *, reuse_port: bool, with_admin: bool
) -> AsyncIterator[Listeners]:
    """Start the public (and optionally admin) listener; drain and stop them on exit."""
    from gateway.observability.metrics import Metrics
    from gateway.proxy import client_session

    ssl_context = _server_ssl(config)  # a bad certificate fails before anything opens
    limits = config.server.limits
    client = client_session()
    redis = connect_redis(config.session.redis_url) if config.session.redis_url else None
    metrics = Metrics()
    gateway = Gateway(config, client, metrics, redis)
    store = gateway.store
    server = PublicServer(
        gateway.handle,
        metrics=metrics,
        header_timeout=limits.header_timeout,
        max_connections=limits.max_connections,
        keepalive_timeout=limits.keepalive_timeout,
        handler_cancellation=True,
        max_line_size=limits.max_header_size,
        max_field_size=limits.max_header_size,
        max_headers=limits.max_headers,
        auto_decompress=False,
        access_log=None,
    )
    public = web.ServerRunner(server, shutdown_timeout=config.server.shutdown_timeout)
    health = Health(store.ping, checks=_redis_checks(redis, config, store_pings_it=True))
    admin: web.BaseRunner | None = None
    try:
        await public.setup()
        listen = config.server.listen
        try:
            await web.TCPSite(
                public,
                listen.host,
                listen.port,
                ssl_context=ssl_context,
                reuse_port=reuse_port,
                backlog=1024,
            ).start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {listen}: {exc.strerror}") from None
        if with_admin and config.server.admin_listen is not None:
            admin = await start_admin(config.server.admin_listen, health, metrics.exposition)
        yield Listeners(gateway, health)
    finally:
        # Readiness turns 503 and the listening socket closes in the same
        # step (no await in between); the admin listener stays up meanwhile.
        health.draining = True
        gateway.websockets.drain()  # 1001 to every open WebSocket: they must not hold the drain
        await public.cleanup()  # stop accepting, let in-flight requests finish
        if admin is not None:
            await admin.cleanup()
        await client.close()
        await gateway.upstreams.close()
        await gateway.websockets.close()
        await store.close()
        if redis is not None:
            await redis.aclose()


def _redis_checks(
    redis: Redis | None, config: Config, *, store_pings_it: bool
) -> list[tuple[str, ReadyCheck]]:
    """Readiness needs Redis whenever it is configured: as the session store or only
    for cluster-wide refresh coordination. A process with a Redis session store of
    its own leaves it to the store's ping; the supervisor has none and pings itself."""
    as_store = config.session.store == "redis"
    if redis is None or (as_store and store_pings_it):
        return []
    reason = "session store unreachable" if as_store else "redis unreachable"
    return [(reason, functools.partial(redis_ping, redis))]


async def start_admin(listen: Listen, health: Health, exposition: Exposition) -> web.BaseRunner:
    runner = web.AppRunner(admin_app(health, exposition), access_log=None, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, listen.host, listen.port).start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {listen} (admin): {exc.strerror}") from None
    return runner


def _stop_event(*signals: signal.Signals) -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    return stop


def settle_heap() -> None:
    """Tune the cyclic garbage collector of a serving process, once it has started.

    Everything built at startup (config, aiohttp, pydantic, prometheus-client)
    lives as long as the process; left in the collector's care, every full
    collection walks all of it again, and those pauses made the p99 latency of
    `make bench` three times its p50. Frozen, they are never walked again.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, middle, old)


async def serve_single(config: Config) -> None:
    stop = _stop_event(signal.SIGTERM, signal.SIGINT)
    async with gateway_listeners(config, reuse_port=False, with_admin=True) as listeners:
        settle_heap()
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


# -- workers ----------------------------------------------------------------


async def serve_worker(config: Config, ready: ProcessEvent | None = None) -> None:
    """One worker: the public listener only; drains on SIGTERM or when orphaned."""
    stop = _stop_event(signal.SIGTERM)
    parent = os.getppid()
    async with gateway_listeners(config, reuse_port=True, with_admin=False) as listeners:
        settle_heap()
        if ready is not None:
            ready.set()
        event("worker ready", listen=str(config.server.listen))
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=_PARENT_CHECK)
            if os.getppid() != parent:
                # The supervisor was killed: do not keep holding the port forever.
                event("supervisor gone; draining", level=logging.WARNING)
                break
        listeners.health.draining = True


def _worker_main(config: Config, ready: ProcessEvent) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor sends SIGTERM
    setup_logging(config.logging.level, config.logging.format, config.logging.access_log)
    try:
        run_loop(serve_worker(config, ready))
    except StartupError as exc:
        event("worker cannot start", level=logging.ERROR, reason=str(exc))
        sys.exit(1)
    except Exception:
        EVENTS.exception("worker failed")
        sys.exit(1)


@dataclass
class _Worker:
    process: BaseProcess
    ready: ProcessEvent


class _Pool:
    """The worker processes of a supervisor."""

    def __init__(self, config: Config, size: int) -> None:
        self._config = config
        self._context = multiprocessing.get_context("spawn")
        self.size = size
        self.workers: list[_Worker] = []
        self.started = False  # every first-generation worker has bound the port

    def spawn(self) -> _Worker:
        ready = self._context.Event()
        process = self._context.Process(
            target=_worker_main, args=(self._config, ready), name="bff-worker", daemon=False
        )
        process.start()
        return _Worker(process, ready)

    def start(self) -> None:
        self.workers = [self.spawn() for _ in range(self.size)]

    async def serving(self) -> bool:
        """Ready once all workers started, and while at least one live worker serves."""
        return self.started and any(w.ready.is_set() and w.process.is_alive() for w in self.workers)

    def tend(self) -> str | None:
        """Restart crashed workers; return a reason to give up, if there is one."""
        from prometheus_client import multiprocess

        if not self.started and all(w.ready.is_set() for w in self.workers):
            self.started = True
            event("workers ready", pids=[w.process.pid for w in self.workers])
        for index, worker in enumerate(self.workers):
            process = worker.process
            if process.is_alive():
                continue
            if process.pid is not None:
                # Its live gauge (active requests) must not count any more;
                # its counters stay, as Prometheus counters never go down.
                multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
            if not worker.ready.is_set():
                # It died before it could serve: restarting would loop forever.
                return f"a worker exited before it could serve (exit code {process.exitcode})"
            event(
                "worker exited; restarting",
                level=logging.WARNING,
                worker=process.pid,
                code=process.exitcode,
            )
            self.workers[index] = self.spawn()
        return None

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker, wait up to ``grace`` seconds, then kill what is left."""
        for worker in self.workers:
            if worker.process.pid is not None and worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for worker in self.workers:
            while worker.process.is_alive() and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if worker.process.is_alive():
                event("worker did not stop; killing it", level=logging.WARNING)
                worker.process.kill()
            worker.process.join(timeout=5)


async def supervise(config: Config, workers: int) -> None:
    """Start workers, keep them alive, serve the admin listener, drain on a signal."""
    from gateway.observability.metrics import multiprocess_exposition

    stop = _stop_event(signal.SIGTERM, signal.SIGINT)
    pool = _Pool(config, workers)
    redis = connect_redis(config.session.redis_url) if config.session.redis_url else None
    health = Health(
        checks=[
            ("workers not serving", pool.serving),
            *_redis_checks(redis, config, store_pings_it=False),
        ]
    )
    admin: web.BaseRunner | None = None
    failure: str | None = None
    try:
        if config.server.admin_listen is not None:
            admin = await start_admin(config.server.admin_listen, health, multiprocess_exposition)
        pool.start()
        event(
            "listening",
            listen=str(config.server.listen),
            workers=workers,
            admin=str(config.server.admin_listen),
        )
        while not stop.is_set() and failure is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=_SUPERVISE_TICK)
            if not stop.is_set():
                failure = pool.tend()
        health.draining = True
        event("draining", timeout=config.server.shutdown_timeout)
        await pool.stop(config.server.shutdown_timeout + 5)
    finally:
        health.draining = True
        if admin is not None:
            await admin.cleanup()
        if redis is not None:
            await redis.aclose()
    if failure is not None:
        raise StartupError(failure)
    event("stopped")


def _sweep_stale_metrics_dirs() -> None:
    """Remove the metrics directories of supervisors that died without cleaning up (SIGKILL)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_METRICS_DIR_PREFIX}*"):
        owner = path.name[len(_METRICS_DIR_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or int(owner) == os.getpid():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # alive (another user's process): not ours to touch


def _serve_workers(config: Config, workers: int) -> None:
    """Run the supervisor with a fresh multiprocess-metrics directory, removed at exit.

    A fresh directory, even when the environment names one: files left by an
    earlier run would be summed into this run's counters. Its name carries the
    supervisor's pid, so that a later start can remove it if this one is killed.
    """
    _sweep_stale_metrics_dirs()
    directory = tempfile.mkdtemp(prefix=f"{_METRICS_DIR_PREFIX}{os.getpid()}-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = directory  # inherited by every worker spawned below
    try:
        run_loop(supervise(config, workers))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        asyncio.run(main)
    else:
        uvloop.run(main)


def run(config: Config, workers_override: int | None = None) -> int:
    """``bff-gateway run``: 0 after a drain, 1 with a one-line reason on stderr."""
    setup_logging(config.logging.level, config.logging.format, config.logging.access_log)
    workers = effective_workers(config, workers_override)
    try:
        _server_ssl(config)
        check_port_free(config.server.listen)
        if config.server.admin_listen is not None:
            check_port_free(config.server.admin_listen, " (admin)")
        if workers == 1:
            run_loop(serve_single(config))
        else:
            if config.session.store == "memory":
                raise StartupError("session.store: memory needs a single worker")
            _serve_workers(config, workers)
    except StartupError as exc:
        print(f"bff-gateway: {exc}", file=sys.stderr)
        return 1
    return 0
