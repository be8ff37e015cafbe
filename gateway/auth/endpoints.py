"""``/auth/...`` on the public listener (SPEC §3)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.errors import GatewayError, json_response, method_not_allowed
from gateway.sessions.manager import SessionState
from gateway.sessions.model import Session

if TYPE_CHECKING:
    from gateway.app import Context, Gateway, ProviderRuntime

LOGIN_BODY_LIMIT = 64 * 1024
_LOGIN_TYPES = ("application/json", "application/x-www-form-urlencoded")


def _not_found() -> GatewayError:
    return GatewayError(404, "not_found", "no such auth endpoint")


def _login_too_large() -> GatewayError:
    return GatewayError(413, "payload_too_large", "the login body is over 64 KiB")


class AuthEndpoints:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def handle(self, request: web.BaseRequest, path: str, ctx: Context) -> web.StreamResponse:
        parts = path.split("/")  # ['', 'auth', P, action]
        method = request.method
        if path == "/auth/logout":
            self._allow(method, "POST")
            return await self.logout(request, list(self.gateway.providers.values()), ctx)
        if len(parts) != 4 or parts[2] not in self.gateway.providers:
            raise _not_found()
        provider = self.gateway.providers[parts[2]]
        ctx.route = f"/auth/{provider.name}"
        action = parts[3]
        if action == "login":
            self._allow(method, "POST")
            return await self.login(request, provider, ctx)
        if action == "logout":
            self._allow(method, "POST")
            return await self.logout(request, [provider], ctx)
        if action == "session":
            self._allow(method, "GET", "HEAD")
            return await self.session(request, provider, ctx)
        raise _not_found()

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise method_not_allowed(method, allowed)

    def _csrf(self, request: web.BaseRequest) -> None:
        self.gateway.csrf.check(request.method, request.headers, self.gateway.own_origin(request))

    async def _respond(self, response: web.Response, ctx: Context) -> web.Response:
        await self.gateway.add_session_cookies(response.headers, ctx)
        return response

    async def login(
        self, request: web.BaseRequest, provider: ProviderRuntime, ctx: Context
    ) -> web.Response:
        self._csrf(request)
        manager = self.gateway.sessions
        assert manager is not None
        content_type = request.content_type
        if content_type not in _LOGIN_TYPES:
            raise GatewayError(400, "bad_request", "send the credentials as JSON or a form")
        length = request.content_length
        if length is not None and length > LOGIN_BODY_LIMIT:
            raise _login_too_large()
        body = await _read_limited(request, LOGIN_BODY_LIMIT)
        ctx.bytes_in = len(body)
        try:
            result = await provider.login.login(body, request.headers.get("Content-Type", ""))
        except GatewayError:
            self.gateway.metrics.logins.labels(provider.name, "error").inc()
            raise
        if result.tokens is None:
            self.gateway.metrics.logins.labels(provider.name, "rejected").inc()
            return json_response(result.body, result.status)
        # A new login replaces whatever session this browser had for the provider.
        state = await manager.load(
            manager.read_cookies(request.headers), provider.name, time.time()
        )
        ctx.states.append(state)
        await manager.forget(state)
        manager.replace(state, Session.start(provider.name, result.tokens, time.time()))
        self.gateway.metrics.logins.labels(provider.name, "success").inc()
        return await self._respond(json_response(result.body, 200), ctx)

    async def logout(
        self, request: web.BaseRequest, providers: list[ProviderRuntime], ctx: Context
    ) -> web.Response:
        self._csrf(request)
        manager = self.gateway.sessions
        assert manager is not None
        now = time.time()
        cookies = manager.read_cookies(request.headers)
        for provider in providers:
            state = await manager.load(cookies, provider.name, now)
            ctx.states.append(state)
            session = state.session
            await manager.clear(state)
            if session is not None:
                await provider.login.logout(session.access_token, session.refresh_token)
        return await self._respond(web.Response(status=204), ctx)

    async def session(
        self, request: web.BaseRequest, provider: ProviderRuntime, ctx: Context
    ) -> web.Response:
        manager = self.gateway.sessions
        assert manager is not None
        now = time.time()
        state: SessionState = await manager.load(
            manager.read_cookies(request.headers), provider.name, now
        )
        ctx.states.append(state)
        session = state.session
        if (
            session is not None
            and session.expires_at is not None
            and session.expires_at <= now
            and not self.gateway.can_refresh(provider, state)
        ):
            # Expired and cannot be refreshed: the session is over (SPEC §4.3), so do not
            # tell the app it is logged in only for its next API call to fail.
            await manager.clear(state)
            session = None
        if session is None:
            if state.present and not state.cleared:
                await manager.clear(state)
            return await self._respond(json_response({"authenticated": False}), ctx)
        return await self._respond(
            json_response(
                {
                    "authenticated": True,
                    "provider": provider.name,
                    "expires_at": session.expires_at,
                    "session_expires_at": manager.ends_at(session),
                    "claims": session.claims,
                }
            ),
            ctx,
        )


async def _read_limited(request: web.BaseRequest, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise _login_too_large()
        chunks.append(chunk)
    return b"".join(chunks)
