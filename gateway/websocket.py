"""WebSocket relay with the session's token (SPEC §4.1, issue 14).

A ``GET`` with ``Upgrade: websocket`` on a proxied route comes here from
``Gateway._dispatch`` once the route matched and its methods allowed it. The
order of the steps is the point:

1. turned away first when the worker is at ``max_websockets`` or draining;
2. the ``Origin`` check against cross-site WebSocket hijacking (a browser
   sends cookies with a cross-site handshake, and no CSRF header can be added
   to one, so ``Origin`` is the only proof of who opened it);
3. the browser's handshake must be valid (before anything else is spent);
4. the session (``Gateway.require_session``: refreshed first when close to
   expiry), then the upstream's handshake with the §4.1 request headers on a
   dedicated client without a cookie jar; a ``refresh_on`` status there
   refreshes and retries once, as for a request;
5. only once the upstream accepted is the browser's side prepared, with the
   upstream's chosen subprotocol and any refreshed session cookies.

Then two pumps copy messages both ways. Each waits for its write to drain
before reading the next message, and aiohttp pauses reading a socket whose
queue is full, so a slow reader slows the writer at the far end instead of
filling memory. aiohttp reassembles fragmented messages (up to the route's
``max_message_size``) and the relay sends each as one frame: RFC 6455 §5.4
lets an intermediary change fragmentation when no extension is negotiated,
and permessage-deflate is negotiated off on both sides for that reason (and
so that the gateway never inflates what a peer chose to compress). Ping and
pong frames pass with their payloads (the gateway answers none itself), and a
close frame's code and reason are passed to the other side.

A relay also ends when its session ends server-side (logout on this worker
through ``SessionManager.on_forget``, or the store no longer holding it when
re-checked every ``session_check_interval``; the absolute timeout) with 1008,
when nothing passed either way for ``idle_timeout`` (1001), and when the
gateway drains (1001).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from gateway.auth.csrf import CsrfPolicy
from gateway.auth.session_access import SessionAccess, bearer
from gateway.client_origin import ClientOrigin
from gateway.config import Config, WebSocketSettings
from gateway.context import Context, Target
from gateway.errors import GatewayError, UpstreamFailure, bad_request, upstream_failure_of
from gateway.headers import ForwardedFor, upstream_request_headers
from gateway.observability.logs import EVENTS
from gateway.observability.metrics import Metrics
from gateway.proxy import map_client_error
from gateway.routing import upstream_path
from gateway.sessions.manager import SessionState
from gateway.sessions.stores import CookieStore, SessionStore, StoreUnavailable


class Host(Protocol):
    """What the relay needs of the gateway that hands it an upgrade (``Gateway``)."""

    config: Config
    store: SessionStore
    sessions: SessionAccess | None
    metrics: Metrics
    csrf: CsrfPolicy
    origin: ClientOrigin
    cookie_prefix: str
    in_flight: int  # requests being handled: an open relay leaves the count

    async def add_session_cookies(self, headers: CIMultiDict[str], ctx: Context) -> None: ...


# The browser's handshake headers: the gateway's client makes its own for the
# upstream (a forwarded Sec-WebSocket-Extensions would let the upstream turn
# on compression the relay does not speak).
_HANDSHAKE_HEADERS = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "sec-websocket-accept",
    }
)
CLOSE_TIMEOUT = 5.0  # how long each side gets to answer a close frame
TO_UPSTREAM = "to_upstream"
TO_CLIENT = "to_client"

_Side = web.WebSocketResponse[Any] | aiohttp.ClientWebSocketResponse[Any]
_Remote = aiohttp.ClientWebSocketResponse[Any]

# RFC 6455 §7.4: codes that may be sent in a close frame.
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})
GOING_AWAY = 1001
INTERNAL_ERROR = 1011
POLICY_VIOLATION = 1008
BAD_GATEWAY = 1014

_OVERLOADED = GatewayError(
    503, "overloaded", "the gateway is at its WebSocket limit; retry shortly", {"Retry-After": "1"}
)
_DRAINING = GatewayError(
    503, "overloaded", "the gateway is shutting down; retry shortly", {"Retry-After": "1"}
)


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    """A GET asking for a WebSocket (RFC 6455 §4.1: Upgrade names websocket)."""
    if request.method != "GET":
        return False
    upgrade = request.headers.get("Upgrade")
    return upgrade is not None and any(
        token.strip().lower() == "websocket" for token in upgrade.split(",")
    )


def sendable_close_code(code: int | None) -> int:
    """A code that may be put on the wire for one a peer sent (or none)."""
    if not code or code == 1005:  # an empty close frame: "no status", a normal close
        return 1000
    if code in _SENDABLE or 3000 <= code <= 4999:
        return code
    return 1002  # the peer sent a code no one may send: a protocol error


class _BrowserSocket(web.WebSocketResponse):
    """The browser's side; ``body_length`` (the access log's bytes_out) counts the
    payload bytes relayed to the browser, which aiohttp's writer does not."""

    relayed_out = 0

    @property
    def body_length(self) -> int:
        return self.relayed_out


def _browser_socket(max_message_size: int, protocol: str | None) -> _BrowserSocket:
    """The browser's side: the relay answers pings and closes itself, by passing
    them on; no compression (see the module's docstring); text stays bytes."""
    return _BrowserSocket(
        protocols=(protocol,) if protocol is not None else (),
        autoclose=False,
        autoping=False,
        compress=False,
        max_msg_size=max_message_size + 1,  # aiohttp refuses a message of its limit
        decode_text=False,
        timeout=CLOSE_TIMEOUT,
    )


@dataclass(slots=True)
class _Counters:
    messages: Any
    size: Any


class Relay:
    """One browser socket joined to one upstream socket."""

    def __init__(
        self,
        route: str,
        browser: _BrowserSocket,
        upstream: _Remote,
        settings: WebSocketSettings,
        counters: tuple[_Counters, _Counters],
        session_key: bytes | None,
    ) -> None:
        self.route = route
        self.browser = browser
        self.upstream = upstream
        self.settings = settings
        self.counters = counters
        self.session_key = session_key
        self.last_activity = time.monotonic()
        self.bytes_in = 0
        self.ended_by: tuple[int, str, str] | None = None  # (code, reason, metric label)
        self._stop = asyncio.Event()

    def end(self, code: int, reason: str, why: str) -> None:
        """Close both sides with ``code`` (the first reason given wins)."""
        if self.ended_by is None:
            self.ended_by = (code, reason, why)
            self._stop.set()

    async def _pump(
        self,
        source: _Side,
        sink: _Side,
        counters: _Counters,
        to_browser: bool,
    ) -> aiohttp.WSMessage:
        """Copy messages until the source closes or fails; return that last message."""
        messages, size = counters.messages, counters.size
        while True:
            message = await source.receive()
            kind = message.type
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                data: bytes = message.data  # decode_text=False: text stays bytes
                self.last_activity = time.monotonic()
                messages.inc()
                size.inc(len(data))
                if to_browser:
                    self.browser.relayed_out += len(data)
                else:
                    self.bytes_in += len(data)
                await sink.send_frame(data, kind)
            elif kind is WSMsgType.PING:
                self.last_activity = time.monotonic()
                await sink.ping(message.data)
            elif kind is WSMsgType.PONG:
                self.last_activity = time.monotonic()
                await sink.pong(message.data)
            else:  # CLOSE, CLOSING (our own close broke the wait), CLOSED, ERROR
                return message

    async def run(self, check_session: Callable[[], Any] | None, ends_at: float | None) -> str:
        """Relay until one side closes or the relay is ended; return why it ended."""
        browser, upstream = self.browser, self.upstream
        to_upstream = asyncio.create_task(
            self._pump(browser, upstream, self.counters[0], to_browser=False)
        )
        to_client = asyncio.create_task(
            self._pump(upstream, browser, self.counters[1], to_browser=True)
        )
        stopped = asyncio.create_task(self._stop.wait())
        pumps = {to_upstream, to_client}
        settings = self.settings
        next_check = time.monotonic() + settings.session_check_interval
        try:
            while True:
                now = time.monotonic()
                deadlines = [self.last_activity + settings.idle_timeout]
                if check_session is not None:
                    deadlines.append(next_check)
                if ends_at is not None:
                    deadlines.append(now + max(0.0, ends_at - time.time()))
                timeout = max(0.0, min(deadlines) - now)
                done, _ = await asyncio.wait(
                    {*pumps, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    break
                now = time.monotonic()
                if ends_at is not None and time.time() >= ends_at:
                    self.end(POLICY_VIOLATION, "session ended", "session_ended")
                elif now - self.last_activity >= settings.idle_timeout:
                    self.end(GOING_AWAY, "idle timeout", "idle_timeout")
                elif check_session is not None and now >= next_check:
                    next_check = now + settings.session_check_interval
                    if not await check_session():
                        self.end(POLICY_VIOLATION, "session ended", "session_ended")
            if self.ended_by is not None:
                code, reason, why = self.ended_by
                await asyncio.gather(_close(browser, code, reason), _close(upstream, code, reason))
                return why
            finished = to_upstream if to_upstream.done() else to_client
            return await self._finish(finished is to_upstream, finished)
        finally:
            for task in (to_upstream, to_client, stopped):
                task.cancel()
            await asyncio.gather(to_upstream, to_client, stopped, return_exceptions=True)
            if not upstream.closed:  # cancelled (the browser's connection was lost)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await upstream.close(code=GOING_AWAY)

    async def _finish(self, from_browser: bool, pump: asyncio.Task[aiohttp.WSMessage]) -> str:
        """One side stopped: tell the other why, in the code it understands."""
        browser, upstream = self.browser, self.upstream
        source: Any = browser if from_browser else upstream
        sink: Any = upstream if from_browser else browser
        try:
            last = pump.result()
        except Exception:  # a write to the other side failed: that side is gone
            last = None
            source, sink = sink, source
            from_browser = not from_browser
        if last is not None and last.type is WSMsgType.CLOSE:
            code = sendable_close_code(last.data)
            reason = str(last.extra or "")
            # Close the far side first (waits for its answer), then answer the
            # side that closed: it learns the far side's code when there is one.
            await _close(sink, code, reason)
            await _close(source, code, reason)
            return "client_closed" if from_browser else "upstream_closed"
        # The source broke off (no close frame) or sent something aiohttp refused
        # (aiohttp has already closed it, with 1009 for a message over the limit).
        too_big = last is not None and last.type is WSMsgType.ERROR and _too_big(last.data)
        code, reason = (
            (GOING_AWAY, "client went away") if from_browser else (BAD_GATEWAY, "upstream failed")
        )
        await _close(sink, code, reason)
        await _close(source, code, "")
        if too_big:
            return "message_too_big"
        return "client_failed" if from_browser else "upstream_failed"


async def _outlive_cancellation(run: Coroutine[Any, Any, str]) -> str:
    """Await the relay in a task of its own, to its end.

    aiohttp cancels a handler whose connection is lost, and closing the browser's
    side (the relay's own doing, or the browser vanishing) loses it: the relay
    still has to close the upstream and count what happened, and the access log
    should show the 101 it was, not a 499.
    """
    task = asyncio.create_task(run)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is None or task.cancelled():
            raise
        current.uncancel()
        # The browser's side is gone: its pump sees that and the relay ends.
        return await task


def close_reason(reason: str) -> bytes:
    """At most 123 bytes of UTF-8 (RFC 6455 §5.5: a control frame carries 125, two of
    them the code), never cut inside a character."""
    return reason.encode()[:123].decode(errors="ignore").encode()


def _too_big(error: Any) -> bool:
    return isinstance(error, aiohttp.WebSocketError) and error.code == 1009


async def _close(side: _Side, code: int, reason: str) -> None:
    if side.closed:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT + 1):
            await side.close(code=code, message=close_reason(reason))


class WebSockets:
    """A worker's WebSocket relays: the limit, the registry by session, the drain."""

    def __init__(self, gateway: Host) -> None:
        self.gateway = gateway
        config = gateway.config
        self.limit = config.server.limits.max_websockets
        self.settings = {route.path: route.websocket for route in config.routes}
        self.reserved = 0  # relays opening or open: what the limit counts
        self.relays: set[Relay] = set()
        self.by_session: dict[bytes, set[Relay]] = {}
        self.draining = False
        self._client: aiohttp.ClientSession | None = None
        self._counters: dict[str, tuple[_Counters, _Counters]] = {}
        self._cookie_store = isinstance(gateway.store, CookieStore)
        if gateway.sessions is not None:
            gateway.sessions.manager.on_forget.append(self.session_ended)

    # -- lifecycle -----------------------------------------------------------

    def drain(self) -> None:
        """Refuse new upgrades and close every open relay with 1001."""
        self.draining = True
        for relay in list(self.relays):
            relay.end(GOING_AWAY, "gateway shutting down", "drain")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    def session_key(self, state: SessionState) -> bytes | None:
        """What identifies a session across its cookie's rewrites: the store's
        handle (a server-side id), or for the cookie store, whose handle is the
        session itself, its provider and creation time."""
        if self._cookie_store:
            session = state.session
            if session is None:
                return None
            return f"{session.provider}|{session.created_at!r}".encode()
        return state.handle

    def session_ended(self, state: SessionState) -> None:
        """``SessionManager.forget`` hook: a logout or a replaced session on this worker."""
        key = self.session_key(state)
        for relay in list(self.by_session.get(key, ())) if key is not None else ():
            relay.end(POLICY_VIOLATION, "session ended", "session_ended")

    def _client_session(self) -> aiohttp.ClientSession:
        """The relays' own client (DESIGN.md): upgraded connections are never pooled."""
        if self._client is None:
            # ws_connect follows redirects and takes no switch for it: refusing one
            # from a trace hook is the only way (SPEC §4.1: never followed; a
            # followed one would take the token and injected secrets elsewhere).
            never_follow = aiohttp.TraceConfig()
            never_follow.on_request_redirect.append(_refuse_redirect)
            self._client = aiohttp.ClientSession(
                trace_configs=[never_follow],
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
                cookie_jar=aiohttp.DummyCookieJar(),  # one user's cookies never reach another
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                timeout=aiohttp.ClientTimeout(total=None),
                trust_env=False,
            )
        return self._client

    def _route_counters(self, route: str) -> tuple[_Counters, _Counters]:
        counters = self._counters.get(route)
        if counters is None:
            metrics = self.gateway.metrics

            def of(direction: str) -> _Counters:
                return _Counters(
                    metrics.websocket_messages.labels(route, direction),
                    metrics.websocket_bytes.labels(route, direction),
                )

            counters = (of(TO_UPSTREAM), of(TO_CLIENT))
            self._counters[route] = counters
        return counters

    # -- one upgrade ---------------------------------------------------------

    async def handle(
        self,
        request: web.BaseRequest,
        target: Target,
        remainder: str,
        query: str,
        forwarded: ForwardedFor,
        ctx: Context,
    ) -> web.StreamResponse:
        gateway = self.gateway
        if self.draining:
            raise _DRAINING
        if self.reserved >= self.limit:
            gateway.metrics.rejections.labels("max_websockets").inc()
            raise _OVERLOADED
        provider = target.provider
        if provider is not None or target.forward_cookies:
            # The browser's credentials would ride on this handshake: only its own pages may.
            gateway.csrf.check_origin(
                request.headers, gateway.origin.own_origin(request, forwarded)
            )
        probe = web.WebSocketResponse(protocols=_offered_protocols(request))  # no warning
        if not probe.can_prepare(request).ok:
            raise bad_request("not a valid WebSocket handshake")
        self.reserved += 1
        try:
            return await self._open(request, target, remainder, query, forwarded, ctx)
        finally:
            self.reserved -= 1

    async def _open(
        self,
        request: web.BaseRequest,
        target: Target,
        remainder: str,
        query: str,
        forwarded: ForwardedFor,
        ctx: Context,
    ) -> web.StreamResponse:
        gateway = self.gateway
        provider = target.provider
        settings = self.settings[target.label]
        sessions = gateway.sessions
        state = None
        if provider is not None:
            assert sessions is not None  # config validation: a provider needs session keys
            state = await sessions.require(request, provider, ctx)
        upstream = target.upstream
        assert upstream is not None
        scheme = "wss" if upstream.endpoint.tls is not None else "ws"
        path = upstream.target(upstream_path(upstream.base_path, remainder), query)
        url = URL(f"{scheme}://{upstream.host_header}{path}", encoded=True)
        headers = upstream_request_headers(
            request.headers,
            forwarded=forwarded,
            req_id=ctx.request_id,
            drop=target.drop | _HANDSHAKE_HEADERS,
            cookie_prefix=gateway.cookie_prefix,
            forward_cookies=target.forward_cookies,
            inject=upstream.inject_headers,
            authorization=bearer(state),
        )
        protocols = _offered_protocols(request)
        timeouts = upstream.timeouts
        handshake_deadline = timeouts.total or ((timeouts.connect or 60) + (timeouts.read or 60))
        while True:
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(handshake_deadline):
                    remote = await self._client_session().ws_connect(
                        url,
                        protocols=protocols,
                        headers=headers,
                        autoclose=False,
                        autoping=False,
                        compress=0,
                        max_msg_size=settings.max_message_size
                        + 1,  # aiohttp refuses a message of its limit
                        decode_text=False,
                        ssl=upstream.endpoint.tls or True,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                    )
            except aiohttp.WSServerHandshakeError as refused:
                ctx.upstream_seconds = time.perf_counter() - sent
                status = refused.status
                if (
                    provider is not None
                    and state is not None
                    and not ctx.refresh_tried
                    and status in provider.refresh_on
                    and sessions is not None
                    and sessions.can_refresh(provider, state)
                ):
                    session = await sessions.refresh(provider, state, ctx)
                    headers["Authorization"] = f"Bearer {session.access_token}"
                    continue
                raise _handshake_refused(status) from None
            except _Redirected:
                ctx.upstream_seconds = time.perf_counter() - sent
                raise _handshake_refused(302) from None
            except Exception as exc:
                raise _connect_failure(exc) from None
            break
        ctx.upstream_seconds = time.perf_counter() - sent
        browser = _browser_socket(settings.max_message_size, remote.protocol)
        try:
            browser.headers["X-Request-Id"] = ctx.request_id
            await gateway.add_session_cookies(browser.headers, ctx)
            await browser.prepare(request)
        except BaseException:
            await _close(remote, GOING_AWAY, "")
            raise
        return await self._relay(target.label, browser, remote, settings, state, ctx)

    async def _relay(
        self,
        route: str,
        browser: _BrowserSocket,
        remote: _Remote,
        settings: WebSocketSettings,
        state: SessionState | None,
        ctx: Context,
    ) -> web.StreamResponse:
        gateway = self.gateway
        key = self.session_key(state) if state is not None else None
        relay = Relay(route, browser, remote, settings, self._route_counters(route), key)
        self.relays.add(relay)
        if key is not None:
            self.by_session.setdefault(key, set()).add(relay)
        metrics = gateway.metrics
        metrics.open_websockets.inc()
        # A relay is counted by max_websockets, not as a request in flight:
        # idle sockets must not use up the worker's request capacity.
        gateway.in_flight -= 1
        check, ends_at = self._session_watch(state, relay)
        why = "error"
        try:
            if self.draining:
                relay.end(GOING_AWAY, "gateway shutting down", "drain")
            why = await _outlive_cancellation(relay.run(check, ends_at))
        except Exception:
            # The 101 is out: an error answer now would be written into the
            # WebSocket stream. Log it and close both sides.
            EVENTS.exception("websocket relay failed", extra={"fields": {"route": route}})
            await asyncio.gather(
                _close(browser, INTERNAL_ERROR, "gateway error"),
                _close(remote, GOING_AWAY, "gateway error"),
            )
        finally:
            ctx.bytes_in = relay.bytes_in
            gateway.in_flight += 1
            metrics.open_websockets.dec()
            metrics.websocket_closes.labels(route, why).inc()
            self.relays.discard(relay)
            if key is not None:
                peers = self.by_session.get(key)
                if peers is not None:
                    peers.discard(relay)
                    if not peers:
                        del self.by_session[key]
        return browser

    def _session_watch(
        self, state: SessionState | None, relay: Relay
    ) -> tuple[Callable[[], Any] | None, float | None]:
        """How a relay learns that its session ended: its absolute end, and for a
        server-side store a re-check (a logout on another worker deletes it there).

        The re-check also counts the browser's messages as session activity, as a
        request would be: a page in use over its socket alone does not reach the
        idle timeout. (Saved only over the session it read: stores.py.)"""
        sessions = self.gateway.sessions
        if state is None or state.session is None or sessions is None:
            return None, None
        manager = sessions.manager
        session = state.session
        ends_at = manager.ends_at(session)
        handle = state.handle
        if self._cookie_store or handle is None:
            return None, ends_at
        store, provider = manager.store, session.provider

        sent = relay.bytes_in  # what the browser had sent at the last check

        async def alive() -> bool:
            nonlocal sent
            now = time.time()
            try:
                current = await store.load(handle)
                if current is None or current.provider != provider or manager.expired(current, now):
                    return False
                if relay.bytes_in != sent and now - current.last_seen > manager.touch_every:
                    await store.save(current.touched(now), handle, current)
            except StoreUnavailable:
                return True  # a store that is down has not ended anything
            sent = relay.bytes_in
            return True

        return alive, ends_at


class _Redirected(Exception):
    """The upstream answered the handshake with a redirect (not followed)."""


async def _refuse_redirect(
    session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestRedirectParams
) -> None:
    raise _Redirected(params.response.status)


def _offered_protocols(request: web.BaseRequest) -> list[str]:
    return [
        token.strip()
        for line in request.headers.getall("Sec-WebSocket-Protocol", ())
        for token in line.split(",")
        if token.strip()
    ]


def _handshake_refused(status: int) -> GatewayError:
    if 400 <= status <= 599:
        return GatewayError(
            status,
            "websocket_rejected",
            f"the upstream refused the WebSocket handshake with status {status}",
        )
    # A 101 without a valid accept key, a 200, a redirect: not a WebSocket server.
    return UpstreamFailure(
        502, "upstream_unavailable", "the upstream did not accept a WebSocket", "protocol"
    )


def _connect_failure(exc: Exception) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return upstream_failure_of("tls")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return upstream_failure_of("connect")
    return map_client_error(exc)
