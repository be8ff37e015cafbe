"""Server-side sessions in Redis (SPEC §2 ``store: redis``, §6).

The cookie carries only a sealed random session id. The entry is keyed by a
hash of that id (a dump of Redis yields no usable cookie) and its value is
the session sealed with the same key ring as cookies (encrypted at rest).
The entry's TTL is the shorter of the idle and the absolute timeout left.

The seal's associated data names the entry's key, so a sealed value copied
onto another session's key (by someone who can write to Redis but has no
session key) does not unseal. An existing session is only ever updated in
place (``SET XX``): a request that finishes after a logout on another replica
cannot write the deleted session back, and a request that only touched its
session writes it only if the entry is still what it read (WATCH/MULTI).
"""

from __future__ import annotations

import contextlib
import hashlib
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from gateway.sessions.model import Session
from gateway.sessions.seal import KeyRing
from gateway.sessions.stores import StoreUnavailable, new_session_id

_SEAL_NAME = "bff-session"


async def ping(client: aioredis.Redis) -> bool:
    """Whether Redis answers (a readiness check: never raises for Redis's own errors)."""
    try:
        return bool(await client.ping())
    except RedisError:
        return False


def connect(url: str) -> aioredis.Redis:
    # Short timeouts: a request waiting on a dead Redis should fail fast (503)
    # rather than hang; the client reconnects by itself when Redis returns.
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        health_check_interval=10,
        retry_on_timeout=False,
    )


class RedisStore:
    def __init__(
        self, client: aioredis.Redis, keyring: KeyRing, idle: float, absolute: float
    ) -> None:
        self._redis = client
        self._keyring = keyring
        self._idle = idle
        self._absolute = absolute

    @staticmethod
    def _key(handle: bytes) -> str:
        return "bff:session:" + hashlib.sha256(handle).hexdigest()

    async def load(self, handle: bytes) -> Session | None:
        key = self._key(handle)
        try:
            value = await self._redis.get(key)
        except RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        if value is None:
            return None
        plaintext = unseal_from_key(self._keyring, value, _SEAL_NAME, key)
        return Session.from_bytes(plaintext) if plaintext is not None else None

    async def save(
        self, session: Session, handle: bytes | None, expected: Session | None = None
    ) -> bytes:
        existing = handle is not None
        handle = handle or new_session_id()
        key = self._key(handle)
        remaining = session.created_at + self._absolute - time.time()
        ttl_ms = max(1, int(min(self._idle, remaining) * 1000))
        sealed = seal_for_key(self._keyring, session.to_bytes(), _SEAL_NAME, key)
        try:
            if expected is not None:
                await self._save_if_unchanged(key, sealed, ttl_ms, expected)
            else:
                # XX: a session deleted meanwhile (logout, expiry) stays deleted; the
                # cookie written with this answer then names nothing (401 next time).
                await self._redis.set(key, sealed, px=ttl_ms, xx=existing)
        except RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return handle

    async def _save_if_unchanged(
        self, key: str, sealed: str, ttl_ms: int, expected: Session
    ) -> None:
        # Optimistic: WATCH the entry, compare it with what the request read, then
        # write in MULTI/EXEC, which Redis refuses if the entry changed after WATCH.
        # Seals are randomised, so the comparison is of the unsealed sessions.
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            value = await pipe.get(key)
            plaintext = (
                unseal_from_key(self._keyring, value, _SEAL_NAME, key)
                if value is not None
                else None
            )
            if plaintext is None or Session.from_bytes(plaintext) != expected:
                return  # deleted, or saved by another request meanwhile: that one stands
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            pipe.set(key, sealed, px=ttl_ms, xx=True)
            with contextlib.suppress(WatchError):
                await pipe.execute()

    async def delete(self, handle: bytes) -> None:
        try:
            await self._redis.delete(self._key(handle))
        except RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    async def ping(self) -> bool:
        return await ping(self._redis)

    async def close(self) -> None:
        return None  # the Redis client belongs to whoever created it


def seal_for_key(keyring: KeyRing, data: bytes, purpose: str, key: str) -> str:
    """Seal a value stored in Redis, bound to its purpose and its own key: copied
    under another key (someone with write access to Redis), it no longer opens."""
    return keyring.seal(data, f"{purpose}|{key}")


def unseal_from_key(keyring: KeyRing, value: bytes | str, purpose: str, key: str) -> bytes | None:
    text = value if isinstance(value, str) else value.decode("ascii", "replace")
    unsealed = keyring.unseal(text, f"{purpose}|{key}")
    return unsealed.plaintext if unsealed is not None else None
