"""From the browser's cookies to a Session and back (SPEC §6).

Reads the (possibly chunked) cookie of one provider, unseals it, loads the
session from the store and applies the idle and absolute timeouts; and writes
the Set-Cookie lines that save, re-seal or clear it.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.config import SessionConfig
from gateway.headers import Headers
from gateway.sessions.cookies import cookie_attributes, cookies_named, expired_cookie, name_base
from gateway.sessions.model import Session
from gateway.sessions.seal import KeyRing, assemble_cookie, chunk_cookie, cookie_names_for
from gateway.sessions.stores import SessionStore, StoreUnavailable


class Absent(enum.Enum):
    NONE = "none"  # no cookie: login required
    INVALID = "invalid"  # a cookie that does not unseal or names no session
    EXPIRED = "expired"  # idle or absolute timeout


@dataclass(slots=True)
class SessionState:
    """One provider's session as this request sees it."""

    cookie_name: str
    present: list[str]  # cookie names of this session the browser sent (all chunks)
    # The store's handle (with the cookie store, the whole session): never in a repr.
    handle: bytes | None = field(default=None, repr=False)
    session: Session | None = None
    absent: Absent | None = None
    dirty: bool = False  # the cookie must be written on this response
    cleared: bool = False  # every chunk of the cookie must be expired on this response
    # The session as the store held it when this request read it; None once the
    # request replaced it (a login, a refresh). While set, the request has only
    # touched or re-sealed it, and saves it only over that same session.
    loaded: Session | None = field(default=None, repr=False)
    stored: bool = False  # ``session`` is in the store already: commit writes the cookie only


class SessionManager:
    def __init__(self, config: SessionConfig, keyring: KeyRing, store: SessionStore) -> None:
        self.store = store
        self._keyring = keyring
        # Browsers send the same cookie on every request: remember recent
        # unseal results (AES-GCM and base64 checks are most of a session
        # route's own cost). Keyed by the exact sealed value and cookie name,
        # so nothing unauthenticated is ever returned from it.
        self._unseal = functools.lru_cache(maxsize=1024)(keyring.unseal)
        self._idle = config.idle_timeout
        self._absolute = config.absolute_timeout
        # Rewriting the cookie on every request only to move last_seen would
        # cost a seal and a Set-Cookie each time; do it at this granularity.
        self.touch_every = min(60.0, config.idle_timeout / 10)
        self._name_prefix = name_base(config.cookie_prefix, config.secure) + "-"
        self._attributes = cookie_attributes(config.secure, config.same_site)
        # Told when a stored session is deleted (logout, a new login replacing
        # it): open WebSocket relays of that session close (gateway/websocket.py).
        self.on_forget: list[Callable[[SessionState], None]] = []

    def cookie_name(self, provider: str) -> str:
        return self._name_prefix + provider

    def read_cookies(self, headers: Headers) -> dict[str, str]:
        """The gateway's own session cookies from the Cookie header(s)."""
        return cookies_named(headers, self._name_prefix)

    async def load(self, cookies: Mapping[str, str], provider: str, now: float) -> SessionState:
        """``cookies`` as returned by :meth:`read_cookies` (any mapping works)."""
        name = self.cookie_name(provider)
        present = cookie_names_for(name, cookies) if cookies else []
        state = SessionState(name, present)
        if not present:
            state.absent = Absent.NONE
            return state
        value = assemble_cookie(name, cookies)
        unsealed = self._unseal(value, name) if value is not None else None
        if unsealed is None:
            state.absent = Absent.INVALID
            return state
        session = await self.store.load(unsealed.plaintext)
        if session is None or session.provider != provider:
            state.absent = Absent.INVALID
            return state
        state.handle = unsealed.plaintext
        state.loaded = session
        if self.expired(session, now):
            state.absent = Absent.EXPIRED
            return state
        state.session = session
        if unsealed.stale_key:
            state.dirty = True  # re-seal under the first key on this response
        if now - session.last_seen > self.touch_every:
            state.session = session.touched(now)
            state.dirty = True
        return state

    def replace(self, state: SessionState, session: Session) -> None:
        state.session = session
        state.absent = None
        state.dirty = True
        state.loaded = None
        state.stored = False

    async def persist(self, state: SessionState) -> None:
        """Save a replaced session now rather than with the response.

        A refresh must be in the store before the request that made it ends
        (a long poll, a slow upload): a request that reads the session meanwhile
        would otherwise find the old refresh token, which the provider may have
        spent. If the store fails, the response's commit tries again.
        """
        if state.session is None:
            return
        try:
            state.handle = await self.store.save(state.session, state.handle)
        except StoreUnavailable:
            return
        state.stored = True

    async def commit(self, state: SessionState) -> list[str]:
        """Persist a changed session and return the Set-Cookie lines for this response."""
        if state.cleared:
            return [self._expire(n) for n in state.present or [state.cookie_name]]
        if state.session is None or not state.dirty:
            return []
        if not state.stored:
            state.handle = await self.store.save(state.session, state.handle, state.loaded)
        handle = state.handle
        assert handle is not None
        value = self._keyring.seal(handle, state.cookie_name)
        max_age = max(0, int(self.ends_at(state.session) - state.session.last_seen))
        chunks = chunk_cookie(state.cookie_name, value)
        written = {chunk_name for chunk_name, _ in chunks}
        lines = [
            f"{chunk_name}={chunk_value}; Max-Age={max_age}; {self._attributes}"
            for chunk_name, chunk_value in chunks
        ]
        # A session that shrank leaves chunks behind: expire them too.
        lines.extend(self._expire(n) for n in state.present if n not in written)
        state.dirty = False
        return lines

    async def clear(self, state: SessionState) -> None:
        """End the session: delete it from the store and expire every cookie chunk."""
        await self.forget(state)
        state.session = None
        state.cleared = True

    async def forget(self, state: SessionState) -> None:
        """Delete the stored session (a new login replaces it; its cookie is rewritten)."""
        if state.handle is not None:
            for listener in self.on_forget:
                listener(state)
            await self.store.delete(state.handle)
            state.handle = None

    def ends_at(self, session: Session) -> float:
        """When the absolute timeout ends the session."""
        return session.created_at + self._absolute

    def expired(self, session: Session, now: float) -> bool:
        """Ended by the idle or the absolute timeout."""
        return now > self.ends_at(session) or now - session.last_seen > self._idle

    def _expire(self, name: str) -> str:
        return expired_cookie(name, self._attributes)
