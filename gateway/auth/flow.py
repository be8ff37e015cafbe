"""The state of one authorization-code login between ``/login`` and ``/callback``.

It rides in the browser, in a short-lived cookie sealed like the session
(AES-256-GCM, bound to its name), with ``SameSite=Lax`` so that the
authorization server's redirect back (a cross-site top-level navigation)
carries it. One cookie per flow, named after a hash of its ``state``: logins
started in several tabs at once do not overwrite each other, and the callback
finds its own flow by the ``state`` it is handed.

A flow is single use: the ledger remembers the flows that reached the callback
(in Redis when there is one, so across workers and replicas), and a replayed
flow cookie is refused even before the provider sees its code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.config import SessionConfig
from gateway.headers import Headers
from gateway.sessions.cookies import cookie_attributes, cookies_named, expired_cookie, name_base
from gateway.sessions.seal import KeyRing

FLOW_SECONDS = 600
MAX_PARALLEL_FLOWS = 3  # logins under way in one browser; older ones are dropped


def random_token(size: int = 32) -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(size)).rstrip(b"=").decode()


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class Flow:
    provider: str
    state: str
    verifier: str = field(repr=False)  # PKCE code_verifier: a secret until the exchange
    nonce: str | None = field(repr=False)  # OpenID Connect only
    return_to: str
    expires_at: float

    @classmethod
    def start(cls, provider: str, return_to: str, oidc: bool) -> Flow:
        return cls(
            provider=provider,
            state=random_token(),
            verifier=random_token(48),  # 64 characters: RFC 7636 wants 43 to 128
            nonce=random_token() if oidc else None,
            return_to=return_to,
            expires_at=time.time() + FLOW_SECONDS,
        )

    def to_bytes(self) -> bytes:
        return json.dumps(
            [self.provider, self.state, self.verifier, self.nonce, self.return_to, self.expires_at]
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Flow | None:
        try:
            provider, state, verifier, nonce, return_to, expires_at = json.loads(data)
        except (ValueError, TypeError):
            return None
        if not (
            isinstance(provider, str)
            and isinstance(state, str)
            and isinstance(verifier, str)
            and (nonce is None or isinstance(nonce, str))
            and isinstance(return_to, str)
            and isinstance(expires_at, int | float)
        ):
            return None
        return cls(provider, state, verifier, nonce, return_to, expires_at)


def flow_digest(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


class FlowCookies:
    def __init__(self, session: SessionConfig, keyring: KeyRing) -> None:
        self._keyring = keyring
        # "~" cannot appear in a cookie_prefix or provider name: no session cookie
        # is ever named like a flow cookie.
        self._marker = name_base(session.cookie_prefix, session.secure) + "~flow-"
        # Lax whatever the session's SameSite: the provider's redirect back is a
        # cross-site navigation, and it must carry this cookie.
        self._attributes = cookie_attributes(session.secure, "Lax")

    def name(self, state: str) -> str:
        return f"{self._marker}{flow_digest(state)[:24]}"

    def set_cookie(self, flow: Flow) -> str:
        name = self.name(flow.state)
        value = self._keyring.seal(flow.to_bytes(), name)
        return f"{name}={value}; Max-Age={FLOW_SECONDS}; {self._attributes}"

    def clear_cookie(self, state: str) -> str:
        return self.clear_named(self.name(state))

    def stale(self, headers: Headers) -> list[str]:
        """Names of this browser's flow cookies to expire before a new flow starts:
        any that does not unseal, and all but the newest ``MAX_PARALLEL_FLOWS - 1``.

        Abandoned logins would otherwise pile up in the Cookie header (each is
        about 400 bytes) until it outgrows ``max_header_size``.
        """
        found: list[tuple[float, str]] = []
        drop: list[str] = []
        for name, value in cookies_named(headers, self._marker).items():
            unsealed = self._keyring.unseal(value, name)
            flow = Flow.from_bytes(unsealed.plaintext) if unsealed is not None else None
            if flow is None:
                drop.append(name)
            else:
                found.append((flow.expires_at, name))
        found.sort(reverse=True)
        drop.extend(name for _, name in found[MAX_PARALLEL_FLOWS - 1 :])
        return drop

    def clear_named(self, name: str) -> str:
        return expired_cookie(name, self._attributes)

    def read(self, headers: Headers, state: str) -> Flow | None:
        """The flow whose cookie the browser sent for ``state``; None if absent or forged."""
        name = self.name(state)
        value = cookies_named(headers, name).get(name)
        if value is None:
            return None
        unsealed = self._keyring.unseal(value, name)
        if unsealed is None:
            return None
        flow = Flow.from_bytes(unsealed.plaintext)
        if flow is None or not secrets.compare_digest(flow.state, state):
            return None
        return flow


# Flows remembered in memory at most (with no Redis, or Redis failing): about 22
# MiB (measured). Anyone can mint flows and bring them to the callback, so the list
# needs a bound; past it the oldest is forgotten, and a replay of that one is
# still refused by the provider, for whom a code is single use (RFC 6749 §4.1.2).
USED_FLOWS_KEPT = 100_000


class FlowLedger:
    """Which flows already reached the callback (each is single use)."""

    def __init__(self, redis: Redis | None, kept: int = USED_FLOWS_KEPT) -> None:
        self._redis = redis
        self._used: OrderedDict[str, float] = OrderedDict()  # O(1) removal of the oldest
        self._kept = kept

    def __len__(self) -> int:
        return len(self._used)

    async def first_use(self, flow: Flow) -> bool:
        """True the first time a flow is presented, False on any replay."""
        digest = flow_digest(flow.state)
        now = time.time()
        if self._redis is not None:
            try:
                taken = await self._redis.set(
                    f"bff:flow:used:{digest}", b"1", nx=True, ex=FLOW_SECONDS + 60
                )
                return bool(taken)
            except RedisError:
                pass  # fall back to this process's memory
        used = self._used
        # Forget flows that have expired anyway (their cookie is refused on its expiry),
        # oldest first, stopping at the first live one: entries go in in about the order
        # they expire, and anyone can add them, so a scan of all on every callback would
        # make a flood of logins quadratic.
        while used:
            oldest, until = next(iter(used.items()))
            if until > now:
                break
            del used[oldest]
        if digest in used:
            return False
        if len(used) >= self._kept:
            del used[next(iter(used))]
        used[digest] = flow.expires_at + 60
        return True
