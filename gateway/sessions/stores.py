"""Where sessions live, behind one small interface (load / save / delete).

The browser's cookie always carries a sealed *handle*. For the ``cookie``
store the handle is the whole session; for server-side stores it is a random
session id and the tokens stay on the server.
"""

from __future__ import annotations

import functools
import secrets
import time
from typing import Protocol

from gateway.sessions.model import Session


class StoreUnavailable(Exception):
    """The session store cannot be reached right now (answered as 503)."""


class SessionStore(Protocol):
    async def load(self, handle: bytes) -> Session | None: ...

    async def save(
        self, session: Session, handle: bytes | None, expected: Session | None = None
    ) -> bytes:
        """Persist the session; return the handle to seal into the cookie.

        With ``expected`` (the session as this request read it), only if the
        store still holds exactly that: a request that merely touched its
        session must not write it back over one that another request saved
        meanwhile (refreshed tokens: the old refresh token may be spent), nor
        bring back one that was deleted. The cookie store cannot check this.
        """
        ...

    async def delete(self, handle: bytes) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


# Sessions are immutable and decoding is pure: the same cookie decodes once.
_decode_session = functools.lru_cache(maxsize=1024)(Session.from_bytes)


class CookieStore:
    """Stateless: the sealed cookie holds the session itself."""

    async def load(self, handle: bytes) -> Session | None:
        return _decode_session(handle)

    async def save(
        self, session: Session, handle: bytes | None, expected: Session | None = None
    ) -> bytes:
        return session.to_bytes()

    async def delete(self, handle: bytes) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def new_session_id() -> bytes:
    return secrets.token_urlsafe(32).encode()


class MemoryStore:
    """Server-side sessions in this process only (config requires workers: 1)."""

    def __init__(self, lifetime: float) -> None:
        self._lifetime = lifetime
        self._sessions: dict[bytes, tuple[float, Session]] = {}
        self._saves = 0

    async def load(self, handle: bytes) -> Session | None:
        entry = self._sessions.get(handle)
        if entry is None:
            return None
        deadline, session = entry
        if deadline < time.time():
            del self._sessions[handle]
            return None
        return session

    async def save(
        self, session: Session, handle: bytes | None, expected: Session | None = None
    ) -> bytes:
        if handle is None:
            handle = new_session_id()
        else:
            # As Redis's SET XX: a session deleted meanwhile (logout, expiry) stays
            # deleted; with ``expected``, one saved meanwhile stands.
            entry = self._sessions.get(handle)
            if entry is None or (expected is not None and entry[1] is not expected):
                return handle  # (load hands out the very object it holds)
        self._sessions[handle] = (session.created_at + self._lifetime, session)
        self._saves += 1
        if self._saves % 1024 == 0:
            self._prune()
        return handle

    async def delete(self, handle: bytes) -> None:
        self._sessions.pop(handle, None)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._sessions.clear()

    def _prune(self) -> None:
        now = time.time()
        for handle in [h for h, (deadline, _) in self._sessions.items() if deadline < now]:
            del self._sessions[handle]
