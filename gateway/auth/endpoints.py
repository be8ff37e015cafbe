"""``/auth/...`` on the public listener (SPEC §3), for every provider type.

Which steps a provider has is its own business (see ``Provider``): here are
the rules common to all of them — the methods allowed, CSRF, sessions started
and ended the same way, the login counter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from gateway.auth.csrf import UNSAFE_METHODS, CsrfPolicy
from gateway.auth.provider import LoginStep, ProviderRuntime
from gateway.auth.return_to import local_return_to, redirect, with_error
from gateway.auth.session_access import SessionAccess
from gateway.context import Context
from gateway.errors import GatewayError, json_response, method_not_allowed
from gateway.observability.metrics import Metrics

OriginOf = Callable[[web.BaseRequest], str]


def _not_found() -> GatewayError:
    return GatewayError(404, "not_found", "no such auth endpoint")


class AuthEndpoints:
    def __init__(
        self,
        providers: dict[str, ProviderRuntime],
        sessions: SessionAccess | None,
        csrf: CsrfPolicy,
        origin_of: OriginOf,
        public_origin: str | None,
        metrics: Metrics,
    ) -> None:
        self.providers = providers
        self.sessions = sessions
        self.csrf = csrf
        self.origin_of = origin_of
        self.public_origin = public_origin
        self.metrics = metrics

    async def handle(self, request: web.BaseRequest, path: str, ctx: Context) -> web.StreamResponse:
        parts = path.split("/")  # ['', 'auth', P, action]
        method = request.method
        if path == "/auth/logout":
            self._allow(method, "POST")
            return await self.logout(request, list(self.providers.values()), ctx)
        if len(parts) != 4 or parts[2] not in self.providers:
            raise _not_found()
        provider = self.providers[parts[2]]
        ctx.route = f"/auth/{provider.name}"
        browser_flow = provider.provider.browser_flow
        action = parts[3]
        if action == "login":
            self._allow(method, "GET" if browser_flow else "POST")
            return await self.login(request, provider, ctx)
        if action == "callback" and browser_flow:
            self._allow(method, "GET")
            return await self.callback(request, provider, ctx)
        if action == "logout":
            if method == "GET" and browser_flow:
                return await self.logoutredirect(request, provider, ctx)
            self._allow(method, *(("GET", "POST") if browser_flow else ("POST",)))
            return await self.logout(request, [provider], ctx)
        if action == "session":
            self._allow(method, "GET", "HEAD")
            return await self.session(request, provider, ctx)
        raise _not_found()

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise method_not_allowed(method, allowed)

    def _origin(self, request: web.BaseRequest) -> str:
        return self.public_origin or self.origin_of(request)

    def _csrf(self, request: web.BaseRequest) -> None:
        self.csrf.check(request.method, request.headers, self.origin_of(request))

    def _sessions(self) -> SessionAccess:
        # Config validation demands session keys whenever a provider exists.
        assert self.sessions is not None
        return self.sessions

    async def _respond(self, response: web.Response, ctx: Context) -> web.Response:
        await self._sessions().add_cookies(response.headers, ctx)
        return response

    async def login(
        self, request: web.BaseRequest, provider: ProviderRuntime, ctx: Context
    ) -> web.Response:
        if request.method in UNSAFE_METHODS:
            self._csrf(request)
        try:
            step = await provider.provider.start_login(request, self._origin(request))
        except GatewayError:
            self.metrics.logins.labels(provider.name, "error").inc()
            raise
        return await self._finish(request, provider, step, ctx)

    async def callback(
        self, request: web.BaseRequest, provider: ProviderRuntime, ctx: Context
    ) -> web.Response:
        step = await provider.provider.finish_login(request, self._origin(request))
        return await self._finish(request, provider, step, ctx)

    async def _finish(
        self, request: web.BaseRequest, provider: ProviderRuntime, step: LoginStep, ctx: Context
    ) -> web.Response:
        ctx.bytes_in = step.bytes_in
        if step.result is not None:
            self.metrics.logins.labels(provider.name, step.result).inc()
        if step.tokens is not None:
            await self._sessions().start(request, provider, step.tokens, ctx)
        return await self._respond(step.response, ctx)

    async def logout(
        self, request: web.BaseRequest, providers: list[ProviderRuntime], ctx: Context
    ) -> web.Response:
        self._csrf(request)
        sessions = self._sessions()
        for provider in providers:
            session = await sessions.end(request, provider, ctx)
            if session is not None:
                await provider.provider.revoke(session)
        return await self._respond(web.Response(status=204), ctx)

    async def logoutredirect(
        self, request: web.BaseRequest, provider: ProviderRuntime, ctx: Context
    ) -> web.Response:
        """``GET /auth/P/logout?return_to=/path``: a navigation that ends the session,
        revokes the refresh token, then goes on to the provider's end-session endpoint
        (RP-initiated logout) or back to ``return_to``."""
        return_to = local_return_to(request.query.get("return_to"))
        if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
            # Another site cannot log the user out by linking here.
            return redirect(with_error(return_to, "csrf_failed"))
        session = await self._sessions().end(request, provider, ctx)
        if session is not None:
            await provider.provider.revoke(session)
        target = provider.provider.end_session_url(session, self._origin(request))
        return await self._respond(redirect(target or return_to), ctx)

    async def session(
        self, request: web.BaseRequest, provider: ProviderRuntime, ctx: Context
    ) -> web.Response:
        sessions = self._sessions()
        manager = sessions.manager
        now = time.time()
        state = await sessions.load(request, provider, ctx)
        session = state.session
        if (
            session is not None
            and session.expires_at is not None
            and session.expires_at <= now
            and not sessions.can_refresh(provider, state)
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
