"""What a provider is to the rest of the gateway (SPEC §2, §3).

A provider is where a session's tokens come from. ``password`` (credentials
posted to a login API) and ``oauth2`` (an authorization server, OpenID Connect
or not) are two implementations chosen by config; the request path and the
auth endpoints see only this interface, so neither knows which one it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from gateway.auth.refresh import RefreshCoordinator
from gateway.sessions.model import Session, Tokens


@dataclass(frozen=True, slots=True)
class LoginStep:
    """One step of a login: the answer to send, and the tokens of a finished login.

    The caller starts the session (and adds its cookies to ``response``) when
    ``tokens`` is set; ``result`` is what ``bff_logins_total`` counts, None
    while the login is still under way (a redirect to the authorization server).
    """

    response: web.Response
    tokens: Tokens | None = None
    result: str | None = None
    bytes_in: int = 0  # a body the provider read itself (logged)


class Provider(Protocol):
    name: str
    # True: login and logout are browser navigations (GET /auth/P/login ->
    # the authorization server -> GET /auth/P/callback); False: login is an
    # API call (POST /auth/P/login with credentials).
    browser_flow: bool

    @property
    def can_refresh(self) -> bool:
        """Whether sessions of this provider can ever be refreshed."""
        ...

    async def start_login(self, request: web.BaseRequest, origin: str) -> LoginStep:
        """``origin`` is the browser's (public_origin or the request's own)."""
        ...

    async def finish_login(self, request: web.BaseRequest, origin: str) -> LoginStep:
        """The authorization server's redirect back (browser flows only)."""
        ...

    async def refresh(self, refresh_token: str, stale_access: str = "") -> Tokens:
        """New tokens; raises RefreshRejected, RefreshUnavailable or InvalidAnswer."""
        ...

    async def revoke(self, session: Session) -> None:
        """Tell the provider the session is over. Best effort: never raises."""
        ...

    def end_session_url(self, session: Session | None, origin: str) -> str | None:
        """Where a browser logout goes next to end the provider's own session, if anywhere."""
        ...


@dataclass(slots=True)
class ProviderRuntime:
    """A provider, ready to serve: its single-flight refresh and its refresh rules."""

    name: str
    provider: Provider
    coordinator: RefreshCoordinator
    refresh_on: frozenset[int]
    skew: float
