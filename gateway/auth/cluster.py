"""Cluster-wide single-flight refresh through Redis (SPEC §4.3, ``redis_url``).

Wraps a provider so that, across every worker and replica sharing Redis,
one refresh token is sent to the provider at most once:

1. A refresh result already shared under the token's hash (the grace entry)
   is used as it is.
2. Otherwise take a lock keyed by the token's hash (``SET NX PX``). The
   holder refreshes, stores the result (sealed with the session key ring:
   encrypted at rest, and bound to the result's key so that a result copied
   onto another token's key does not unseal) for ``refresh_grace`` seconds
   (at least one lease, so that everyone waiting now sees it even with
   ``refresh_grace: 0``), then releases the lock. Its lease is renewed while
   the provider call runs, so a slow refresh does not lose the lock; a holder
   that dies stops renewing and the lease expires, so nobody waits forever.
3. Everyone else waits for the result (or for the lock to free up, then
   tries to take it), bounded by a deadline.

The in-process ``RefreshCoordinator`` sits in front of this, so one process
sends at most one request per token to Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.auth.refresh import (
    Refresher,
    RefreshRejected,
    RefreshUnavailable,
    SharedTokens,
    token_digest,
)
from gateway.sessions.model import Tokens
from gateway.sessions.redis_store import seal_for_key, unseal_from_key
from gateway.sessions.seal import KeyRing

LEASE_SECONDS = 5.0
POLL_SECONDS = 0.05
_SEAL_NAME = "bff-refresh"

# Delete / extend the lock only while we still own it.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"
_EXTEND = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end"
)


def _encode(tokens: Tokens | None) -> bytes:
    if tokens is None:
        return json.dumps({"rejected": True}).encode()
    return json.dumps(
        {
            "access": tokens.access_token,
            "refresh": tokens.refresh_token,
            "exp": tokens.expires_at,
            "claims": tokens.claims,
            "id": tokens.id_token,
        }
    ).encode()


def _decode(data: bytes) -> SharedTokens | None:
    value = json.loads(data)
    if value.get("rejected"):
        return None
    return SharedTokens(
        value["access"], value["refresh"], value["exp"], value["claims"], value.get("id")
    )


class ClusterRefresher:
    """A ``Refresher`` that coordinates through Redis before calling the provider."""

    def __init__(
        self,
        provider: Refresher,
        client: aioredis.Redis,
        keyring: KeyRing,
        grace: float,
        wait_limit: float,
    ) -> None:
        self.name = provider.name
        self._provider = provider
        self._redis = client
        self._keyring = keyring
        # Waiters on other processes only learn the result by reading it: it
        # must outlive their polling even when no grace is wanted.
        self._grace_ms = int(max(grace, LEASE_SECONDS) * 1000)
        self._wait_limit = wait_limit

    async def refresh(self, refresh_token: str, stale_access: str = "") -> Tokens:
        digest = token_digest(refresh_token)
        result_key = f"bff:refresh:result:{self.name}:{digest}"
        lock_key = f"bff:refresh:lock:{self.name}:{digest}"
        owner = secrets.token_hex(16)
        deadline = time.monotonic() + self._wait_limit
        try:
            while True:
                shared = await self._shared(result_key, stale_access)
                if shared is not None:
                    return shared
                if await self._redis.set(lock_key, owner, nx=True, px=int(LEASE_SECONDS * 1000)):
                    return await self._refresh_holding(
                        refresh_token, stale_access, result_key, lock_key, owner
                    )
                if time.monotonic() > deadline:
                    raise RefreshUnavailable()
                await asyncio.sleep(POLL_SECONDS)
        except RedisError:
            raise RefreshUnavailable() from None

    async def _shared(self, result_key: str, stale_access: str) -> Tokens | None:
        """A result another holder stored and newer than what the caller holds;
        raise if it was a rejection."""
        sealed = await self._redis.get(result_key)
        if sealed is None:
            return None
        plaintext = unseal_from_key(self._keyring, sealed, _SEAL_NAME, result_key)
        if plaintext is None:
            return None
        tokens = _decode(plaintext)
        if tokens is None:
            raise RefreshRejected()
        if tokens.access_token == stale_access:
            return None  # a non-rotating provider's earlier answer: ask again
        return tokens

    async def _refresh_holding(
        self, refresh_token: str, stale_access: str, result_key: str, lock_key: str, owner: str
    ) -> Tokens:
        renewer = asyncio.create_task(self._renew(lock_key, owner))
        try:
            # Someone may have finished between our read and our lock.
            shared = await self._shared(result_key, stale_access)
            if shared is not None:
                return shared
            try:
                tokens: Tokens | None = await self._provider.refresh(refresh_token)
            except RefreshRejected:
                tokens = None
            sealed = seal_for_key(self._keyring, _encode(tokens), _SEAL_NAME, result_key)
            # The provider has already rotated the token: losing these tokens
            # to a Redis hiccup would strand the session on a revoked one.
            with contextlib.suppress(RedisError):
                await self._redis.set(result_key, sealed, px=self._grace_ms)
            if tokens is None:
                raise RefreshRejected()
            return tokens
        finally:
            renewer.cancel()
            with contextlib.suppress(RedisError, asyncio.CancelledError):
                await asyncio.shield(self._redis.eval(_RELEASE, 1, lock_key, owner))

    async def _renew(self, lock_key: str, owner: str) -> None:
        with contextlib.suppress(RedisError):
            while True:
                await asyncio.sleep(LEASE_SECONDS / 3)
                await self._redis.eval(_EXTEND, 1, lock_key, owner, int(LEASE_SECONDS * 1000))
