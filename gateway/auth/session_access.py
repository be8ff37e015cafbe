"""A request's sessions: require one, refresh it (single flight), start or end one,
and write what changed (SPEC §4.3, §6). Shared by the request path and the auth
endpoints, whatever the provider's type."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from aiohttp import web
from multidict import CIMultiDict

from gateway.auth.oidc import same_end_user
from gateway.auth.provider import ProviderRuntime
from gateway.auth.refresh import (
    InvalidAnswer,
    RefreshCoordinator,
    RefreshRejected,
    RefreshUnavailable,
)
from gateway.context import Context
from gateway.errors import GatewayError
from gateway.observability.logs import event
from gateway.sessions.manager import Absent, SessionManager, SessionState
from gateway.sessions.model import Session, Tokens


def bearer(state: SessionState | None) -> str | None:
    """The Authorization value for a request with this session, if it has one."""
    if state is None or state.session is None:
        return None
    return f"Bearer {state.session.access_token}"


def session_expired() -> GatewayError:
    return GatewayError(401, "session_expired", "the session has ended; log in again")


class SessionAccess:
    def __init__(
        self, manager: SessionManager, coordinators: Mapping[str, RefreshCoordinator]
    ) -> None:
        self.manager = manager
        # Each provider's single-flight refresh, by name: what add_cookies asks
        # whether a session was refreshed meanwhile by another request.
        self._coordinators = coordinators

    async def load(
        self, request: web.BaseRequest, provider: ProviderRuntime, ctx: Context
    ) -> SessionState:
        """The request's session state for ``provider`` (written back on its response)."""
        manager = self.manager
        state = await manager.load(
            manager.read_cookies(request.headers), provider.name, time.time()
        )
        ctx.states.append(state)
        return state

    async def require(
        self, request: web.BaseRequest, provider: ProviderRuntime, ctx: Context
    ) -> SessionState:
        """The request's live session for ``provider``, refreshed if about to expire."""
        # Not through self.load: this is every session request's path, and each
        # coroutine layer costs on every suspension and resumption.
        manager = self.manager
        now = time.time()
        state = await manager.load(manager.read_cookies(request.headers), provider.name, now)
        ctx.states.append(state)
        if state.session is None:
            if state.absent is not Absent.NONE:
                await self.manager.clear(state)
            if state.absent is Absent.EXPIRED:
                raise session_expired()
            raise GatewayError(401, "login_required", "log in first")
        expires_at = state.session.expires_at
        if expires_at is not None and expires_at - provider.skew <= now:
            if self.can_refresh(provider, state):
                await self.refresh(provider, state, ctx)
            elif expires_at <= now:
                await self.manager.clear(state)
                raise session_expired()
        return state

    @staticmethod
    def can_refresh(provider: ProviderRuntime, state: SessionState) -> bool:
        return (
            provider.provider.can_refresh
            and state.session is not None
            and state.session.refresh_token is not None
        )

    async def refresh(
        self, provider: ProviderRuntime, state: SessionState, ctx: Context
    ) -> Session:
        """Refresh the session's tokens (single flight); return the new session."""
        assert state.session is not None and state.session.refresh_token is not None
        ctx.refresh_tried = True
        try:
            tokens = await provider.coordinator.refresh(
                state.session.refresh_token, state.session.access_token
            )
        except RefreshRejected:
            await self.manager.clear(state)
            raise session_expired() from None
        except RefreshUnavailable:
            raise GatewayError(
                503, "refresh_unavailable", "the token service is unavailable; try again"
            ) from None
        except InvalidAnswer:
            raise GatewayError(
                502, "upstream_invalid_response", "the token service answered without a token"
            ) from None
        if not same_end_user(state.session.id_token, tokens.id_token):
            # The provider now vouches for someone else: neither identity can be
            # trusted, and no other request of this session may pick these tokens up.
            provider.coordinator.forget(state.session.refresh_token)
            event(
                "refresh refused",
                logging.WARNING,
                provider=provider.name,
                reason="the refreshed ID token names another end user",
            )
            await self.manager.clear(state)
            raise session_expired()
        ctx.refreshed = True
        session = state.session.with_tokens(tokens, time.time())
        self.manager.replace(state, session)
        await self.manager.persist(state)
        return session

    async def start(
        self, request: web.BaseRequest, provider: ProviderRuntime, tokens: Tokens, ctx: Context
    ) -> None:
        """A new login replaces whatever session this browser had for the provider."""
        state = await self.load(request, provider, ctx)
        await self.manager.forget(state)
        # An oauth2 callback is a navigation from the provider's site, which does not
        # carry a SameSite=Strict session cookie: an old unchunked one the browser still
        # holds would win over the new session written as chunks, so it is expired too.
        # (A password login is a same-site request: it sees every cookie.)
        if provider.provider.browser_flow and state.cookie_name not in state.present:
            state.present.append(state.cookie_name)
        self.manager.replace(state, Session.start(provider.name, tokens, time.time()))

    async def end(
        self, request: web.BaseRequest, provider: ProviderRuntime, ctx: Context
    ) -> Session | None:
        """End the session (store entry deleted, cookies expired); return what it was."""
        state = await self.load(request, provider, ctx)
        session = state.session
        await self.manager.clear(state)
        return session

    async def add_cookies(self, headers: CIMultiDict[str], ctx: Context) -> None:
        """Save what changed in this request's sessions; add their Set-Cookie lines."""
        for state in ctx.states:
            if state.dirty or state.cleared:
                self._catch_up(state)
                for line in await self.manager.commit(state):
                    headers.add("Set-Cookie", line)

    def _catch_up(self, state: SessionState) -> None:
        """A session this request only touched, but which another request refreshed
        meanwhile (this one began first and took longer), is written with the new
        tokens: its own copy holds a refresh token the provider may have spent.

        For the cookie store, the only guard (the browser keeps whichever cookie
        came last), within ``refresh_grace``. Server-side stores still save it only
        over the session this request read (``state.loaded`` is kept), so a
        session refreshed twice meanwhile is not set back to the first refresh."""
        session = state.session
        if state.loaded is None or session is None or session.refresh_token is None:
            return
        coordinator = self._coordinators.get(session.provider)
        if coordinator is None:
            return
        newer = coordinator.remembered(session.refresh_token, session.access_token)
        if newer is not None and same_end_user(session.id_token, newer.id_token):
            # Now as last_seen: the request answering is the browser's activity.
            state.session = session.with_tokens(newer, time.time())
