"""Single-flight token refresh with a grace cache (SPEC §4.3).

Rotating refresh tokens with reuse detection revoke the whole token family
when a refresh token is presented twice. So concurrent requests of one
session must cause exactly one refresh call, and requests that still carry
the pre-refresh cookie (sent by the browser before the new cookie arrived)
must be handed the *same* new tokens rather than refresh again. Both are
keyed by a hash of the refresh token, never the token itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Protocol

from gateway.sessions.model import Tokens


class RefreshRejected(Exception):
    """The provider said the refresh token is no good: the session is over."""


class RefreshUnavailable(Exception):
    """The provider could not answer now: try again later, keep the session."""


class InvalidAnswer(Exception):
    """The provider answered 2xx without the expected fields."""


class Refresher(Protocol):
    name: str

    async def refresh(self, refresh_token: str, stale_access: str = "") -> Tokens:
        """New tokens for ``refresh_token``; ``stale_access`` is the access token
        the caller already holds, so a shared result equal to it is no answer."""
        ...


class SharedTokens(Tokens):
    """Tokens another process or replica obtained: counted as ``coalesced``."""

    __slots__ = ()


ResultHook = Callable[[str, str], None]  # (provider, result)


def token_digest(refresh_token: str) -> str:
    """What identifies a refresh token in caches, locks and Redis: never the token."""
    return hashlib.sha256(refresh_token.encode()).hexdigest()


class RefreshCoordinator:
    """One process's refresh flights and grace cache for one provider."""

    def __init__(self, provider: Refresher, grace: float, on_result: ResultHook) -> None:
        self._provider = provider
        self._grace = grace
        self._on_result = on_result
        self._inflight: dict[str, asyncio.Task[Tokens]] = {}
        self._recent: dict[str, tuple[float, Tokens]] = {}

    async def refresh(self, refresh_token: str, stale_access: str) -> Tokens:
        """New tokens for a session holding ``stale_access`` and ``refresh_token``.

        A remembered result is handed out only if it is newer than what the
        session holds: with a provider that does not rotate refresh tokens,
        the same refresh token later needs a genuinely new access token.
        """
        key = token_digest(refresh_token)
        remembered = self._remembered(key, stale_access)
        if remembered is not None:
            self._on_result(self._provider.name, "coalesced")
            return remembered
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._flight(key, refresh_token, stale_access))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._landed(key, done))
        else:
            self._on_result(self._provider.name, "coalesced")
        # Shielded: a browser that goes away must not cancel the refresh that
        # other requests of the session are waiting for.
        return await asyncio.shield(task)

    def remembered(self, refresh_token: str, stale_access: str) -> Tokens | None:
        """What a refresh of ``refresh_token`` gave within the grace period, if it
        is newer than ``stale_access`` (the access token the caller holds)."""
        return self._remembered(token_digest(refresh_token), stale_access)

    def _remembered(self, key: str, stale_access: str) -> Tokens | None:
        recent = self._recent.get(key)
        if recent is None or recent[0] <= time.monotonic():
            return None
        return recent[1] if recent[1].access_token != stale_access else None

    def forget(self, refresh_token: str) -> None:
        """Drop a remembered result (its tokens were refused after all)."""
        self._recent.pop(token_digest(refresh_token), None)

    async def _flight(self, key: str, refresh_token: str, stale_access: str) -> Tokens:
        try:
            tokens = await self._provider.refresh(refresh_token, stale_access)
        except Exception as exc:
            self._on_result(self._provider.name, _result_of(exc))
            raise
        shared = isinstance(tokens, SharedTokens)
        self._on_result(self._provider.name, "coalesced" if shared else "success")
        self._remember(key, tokens)
        return tokens

    def _remember(self, key: str, tokens: Tokens) -> None:
        now = time.monotonic()
        # The grace period is constant, so insertion order is expiry order:
        # expired entries are always at the front.
        recent = self._recent
        while recent and next(iter(recent.values()))[0] <= now:
            del recent[next(iter(recent))]
        recent.pop(key, None)
        recent[key] = (now + self._grace, tokens)

    def _landed(self, key: str, task: asyncio.Task[Tokens]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is not reported


def _result_of(exc: Exception) -> str:
    return "rejected" if isinstance(exc, RefreshRejected) else "error"
