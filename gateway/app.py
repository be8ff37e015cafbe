"""The request path: guard, route, session, forward, respond (DESIGN.md).

``Gateway.handle`` is the one handler of the public listener (a low-level
aiohttp server: no router, no middleware chain on the hot path). Every error
the gateway produces goes through ``error_response``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import aiohttp
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict
from redis.asyncio import Redis

from gateway.auth.csrf import UNSAFE_METHODS, CsrfPolicy
from gateway.auth.endpoints import AuthEndpoints
from gateway.auth.registry import build_providers
from gateway.auth.session_access import SessionAccess, bearer
from gateway.client_origin import ClientOrigin
from gateway.config import Config, Route
from gateway.context import Context, Target
from gateway.errors import GatewayError, UpstreamFailure, error_response, method_not_allowed
from gateway.headers import request_id, response_headers, upstream_request_headers
from gateway.observability.logs import ACCESS, EVENTS, AccessRecord, log_access
from gateway.observability.metrics import Metrics
from gateway.proxy import (
    RequestBody,
    Upstream,
    UpstreamBodyBroken,
    payload_too_large,
    relay,
    reply_to,
    upstream_failure,
)
from gateway.routing import RouteTable, split_target, upstream_path
from gateway.sessions.manager import SessionManager, SessionState
from gateway.sessions.redis_store import RedisStore
from gateway.sessions.seal import KeyRing
from gateway.sessions.stores import CookieStore, MemoryStore, SessionStore, StoreUnavailable
from gateway.static import StaticSite
from gateway.upstream_client import UpstreamClient
from gateway.websocket import WebSockets, is_websocket_upgrade

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# CONNECT turns the client connection into a raw tunnel (aiohttp then streams
# every later byte as its "body", and relays the answer without any framing);
# TRACE makes an upstream echo the request, injected Authorization included.
_NEVER_FORWARDED = {
    "CONNECT": "CONNECT is not supported: this is not a forward proxy",
    "TRACE": "TRACE is not supported: it would echo injected credentials",
}
_FORWARDABLE = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
_OVERLOADED = GatewayError(
    503, "overloaded", "the gateway is at its request limit; retry shortly", {"Retry-After": "1"}
)


class Gateway:
    def __init__(
        self,
        config: Config,
        client: aiohttp.ClientSession,
        metrics: Metrics,
        redis: Redis | None = None,
    ) -> None:
        self.config = config
        self.client = client  # login and refresh calls
        server = config.server
        # Forwarded requests (its docstring says why not ClientSession).
        self.upstreams = UpstreamClient(
            connections=server.limits.upstream_connections,
            queue_timeout=server.limits.upstream_queue_timeout,
            on_busy=metrics.rejections.labels("upstream_busy").inc,
        )
        self.metrics = metrics
        self.retry_buffer = server.limits.retry_buffer_size
        self.max_in_flight = server.limits.max_in_flight
        self.body_timeout = server.limits.body_timeout
        self.in_flight = 0
        self.origin = ClientOrigin(
            server.trusted_proxies, "https" if server.tls is not None else "http"
        )
        session_config = config.session
        self.csrf = CsrfPolicy(
            session_config.csrf.header, server.public_origin, session_config.csrf.allowed_origins
        )
        self.cookie_prefix = session_config.cookie_prefix
        # Config validation demands keys whenever a provider exists, so a
        # gateway without keys has no sessions at all; its store still gets a
        # ring (a throwaway random key) so that readiness checks stay uniform.
        keys = [(k.id, k.key_bytes()) for k in session_config.keys] or [("none", os.urandom(32))]
        keyring = KeyRing(keys)
        self.store = build_store(config, keyring, redis)
        self.providers = build_providers(config, client, keyring, redis, metrics.refresh_result)
        self.sessions: SessionAccess | None = (
            SessionAccess(
                SessionManager(session_config, keyring, self.store),
                {name: runtime.coordinator for name, runtime in self.providers.items()},
            )
            if session_config.keys
            else None
        )
        self.table = RouteTable(config.routes)
        self.targets = [self._target(route) for route in config.routes]
        self.auth = AuthEndpoints(
            self.providers,
            self.sessions,
            self.csrf,
            self.origin.own_origin,
            server.public_origin,
            metrics,
        )
        self.websockets = WebSockets(self)

    def _target(self, route: Route) -> Target:
        server = self.config.server
        provider = self.providers.get(route.auth) if route.auth != "none" else None
        drop = {self.csrf.header.lower()}
        if provider is not None:
            drop.add("authorization")
        # Injected headers replace the client's copies of them.
        drop.update(name.lower() for name in route.inject_headers)
        return Target(
            label=route.path,
            methods=frozenset(route.methods) if route.methods is not None else None,
            max_body=route.max_body_size
            if route.max_body_size is not None
            else server.limits.max_body_size,
            upstream=Upstream.from_route(route, server.timeouts) if route.upstream else None,
            static=StaticSite(route.static) if route.static is not None else None,
            provider=provider,
            forward_cookies=route.forward_cookies,
            drop=frozenset(drop),
        )

    # -- the handler -------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.in_flight >= self.max_in_flight:
            return self._overloaded(request)
        self.in_flight += 1
        ctx = Context(start=time.perf_counter(), request_id=request_id(request.headers))
        self.metrics.active.inc()
        status = 499  # the client went away before an answer (nginx's convention)
        response: web.StreamResponse | None = None
        try:
            try:
                response = await self._dispatch(request, ctx)
            except GatewayError as error:
                if isinstance(error, UpstreamFailure):
                    self.metrics.upstream_errors.labels(ctx.route, error.kind).inc()
                response = await self._error(request, error, ctx)
            except UpstreamBodyBroken as broken:
                self.metrics.upstream_errors.labels(ctx.route, broken.kind).inc()
                response = broken.response
            except StoreUnavailable:
                response = await self._error(
                    request,
                    GatewayError(503, "store_unavailable", "the session store is unavailable"),
                    ctx,
                )
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                raise
            except Exception:
                EVENTS.exception(
                    "unhandled error", extra={"fields": {"request_id": ctx.request_id}}
                )
                response = await self._error(
                    request,
                    GatewayError(500, "internal_error", "the gateway failed to handle the request"),
                    ctx,
                )
            if isinstance(response, web.Response) and not response.prepared:
                # Sent here rather than by aiohttp after we return, so that the
                # access record's duration and bytes_out include it. (Not a
                # FileResponse: its prepare() is not idempotent.)
                await response.prepare(request)
                await response.write_eof()
                if ctx.body is not None and ctx.body.stalled:
                    # aiohttp would linger up to 10 s for the rest of a body
                    # this client has stopped sending: close once the answer is out.
                    request.protocol.force_close()
                    self.metrics.rejections.labels("body_timeout").inc()
        finally:
            if response is not None:
                status = response.status
            self._observe(request, ctx, status, response)
        return response

    def _observe(
        self,
        request: web.BaseRequest,
        ctx: Context,
        status: int,
        response: web.StreamResponse | None,
    ) -> None:
        duration = time.perf_counter() - ctx.start
        self.in_flight -= 1
        metrics = self.metrics
        metrics.active.dec()
        metrics.request_done(ctx.route, request.method, status, duration, ctx.upstream_seconds)
        if ACCESS.isEnabledFor(logging.INFO):
            upstream_seconds = ctx.upstream_seconds
            log_access(
                AccessRecord(
                    request_id=ctx.request_id,
                    method=request.method,
                    path=request.raw_path.partition("?")[0][:2048],
                    route=ctx.route,
                    status=status,
                    duration_ms=duration * 1000,
                    upstream_ms=upstream_seconds * 1000 if upstream_seconds is not None else None,
                    bytes_in=ctx.body.received if ctx.body is not None else ctx.bytes_in,
                    bytes_out=response.body_length if response is not None else 0,
                    refreshed=ctx.refreshed,
                    client=request.remote or "",
                )
            )

    def _overloaded(self, request: web.BaseRequest) -> web.Response:
        """Turned away before any session, upstream or logging work: shedding must be
        cheaper than serving, or it sheds nothing."""
        self.metrics.rejections.labels("max_in_flight").inc()
        response = error_response(_OVERLOADED)
        if request.body_exists:
            response.force_close()  # its body is never read
        return response

    async def _error(
        self, request: web.BaseRequest, error: GatewayError, ctx: Context
    ) -> web.Response:
        response = error_response(error)
        response.headers["X-Request-Id"] = ctx.request_id
        if request.body_exists and not request.content.at_eof():
            # The body was refused unread (413, 401, 403...): close rather than
            # wait for a body the client may never send (Expect: 100-continue).
            response.force_close()
        cookies: CIMultiDict[str] = CIMultiDict()
        # The error itself may be the store's: then answer without cookies
        # (gathered apart, so that a store failing midway adds none).
        with contextlib.suppress(StoreUnavailable):
            await self.add_session_cookies(cookies, ctx)
            response.headers.extend(cookies)
        return response

    async def add_session_cookies(self, headers: CIMultiDict[str], ctx: Context) -> None:
        """Save what changed in this request's sessions; add their Set-Cookie lines."""
        if self.sessions is not None:
            await self.sessions.add_cookies(headers, ctx)

    async def _dispatch(self, request: web.BaseRequest, ctx: Context) -> web.StreamResponse:
        path, query = split_target(request.raw_path)
        if request.method in _NEVER_FORWARDED:
            raise method_not_allowed(request.method, _FORWARDABLE, _NEVER_FORWARDED[request.method])
        if path.startswith("/auth/"):
            ctx.route = "/auth/"
            return await self.auth.handle(request, path, ctx)
        match = self.table.match(path)
        if match is None:
            raise GatewayError(404, "not_found", "no route matches this path")
        target = self.targets[match.index]
        ctx.route = target.label
        if target.methods is not None and request.method not in target.methods:
            raise method_not_allowed(request.method, sorted(target.methods))
        if target.static is not None:
            if request.method not in ("GET", "HEAD"):
                raise method_not_allowed(
                    request.method, ("GET", "HEAD"), "static files are read-only"
                )
            return await target.static.serve(request, match.remainder)
        assert target.upstream is not None
        length = request.content_length
        if length is not None and length > target.max_body:
            raise payload_too_large(target.max_body)

        state: SessionState | None = None
        provider = target.provider
        forwarded = self.origin.forwarded_for(request)
        if is_websocket_upgrade(request):
            return await self.websockets.handle(
                request, target, match.remainder, query, forwarded, ctx
            )
        sessions = self.sessions
        if provider is not None:
            if request.method in UNSAFE_METHODS:
                self.csrf.check(
                    request.method, request.headers, self.origin.own_origin(request, forwarded)
                )
            assert sessions is not None  # config validation: a provider needs keys
            state = await sessions.require(request, provider, ctx)

        expects_continue = request.headers.get("Expect", "").lower() == "100-continue"
        if expects_continue and request.version >= HttpVersion11:
            # Answered here, not forwarded: the client would otherwise wait
            # for the upstream's 100 (DESIGN.md). Sent only after every check.
            await request.writer.write(_CONTINUE)
            request.writer.output_size = 0

        body = None
        if request.body_exists:
            body = ctx.body = RequestBody(
                request.content, target.max_body, self.retry_buffer, self.body_timeout
            )
        # Forwarding is inline rather than in helpers: this is every request's
        # path, and each coroutine layer costs on every suspension and resumption.
        upstream = target.upstream
        target_path = upstream.target(upstream_path(upstream.base_path, match.remainder), query)
        headers = upstream_request_headers(
            request.headers,
            forwarded=forwarded,
            req_id=ctx.request_id,
            drop=target.drop,
            cookie_prefix=self.cookie_prefix,
            forward_cookies=target.forward_cookies,
            inject=upstream.inject_headers,
            authorization=bearer(state),
        )
        headers["Host"] = upstream.host_header
        method = request.method
        while True:
            sent = time.perf_counter()
            try:
                answer = await self.upstreams.request(
                    method, upstream.endpoint, target_path, headers, body, upstream.timeouts
                )
            except Exception as exc:
                # Only failures to open the call are mapped: what is raised
                # while the response is held (a relay cut short, a store that
                # failed) passes through, since the client may have its headers.
                raise upstream_failure(exc, body) from None
            try:  # not `async with`: one coroutine less on every request
                ctx.upstream_seconds = time.perf_counter() - sent
                wants_refresh = (
                    provider is not None
                    and state is not None
                    and not ctx.refresh_tried
                    and answer.status in provider.refresh_on
                    and sessions is not None
                    and sessions.can_refresh(provider, state)
                )
                if wants_refresh and body is not None and not body.replayable:
                    # Too big to replay: the client gets this answer, but the
                    # next request already carries the refreshed session.
                    assert provider is not None and state is not None and sessions is not None
                    await sessions.refresh(provider, state, ctx)
                    wants_refresh = False
                if not wants_refresh:
                    response = reply_to(answer)
                    response_headers(answer.headers, self.cookie_prefix, response.headers)
                    upstream.scrub_response_headers(response.headers)
                    await self.add_session_cookies(response.headers, ctx)
                    return await relay(request, answer, response)
            finally:
                answer.release()
            assert provider is not None and state is not None and sessions is not None
            session = await sessions.refresh(provider, state, ctx)
            headers["Authorization"] = f"Bearer {session.access_token}"  # for the replay


def build_store(config: Config, keyring: KeyRing, redis: Redis | None) -> SessionStore:
    session = config.session
    if session.store == "memory":
        return MemoryStore(session.absolute_timeout)
    if session.store == "redis":
        assert redis is not None, "config validation requires redis_url for store: redis"
        return RedisStore(redis, keyring, session.idle_timeout, session.absolute_timeout)
    return CookieStore()
