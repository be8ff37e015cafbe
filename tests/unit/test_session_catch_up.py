"""SessionAccess's catch-up: a request that only touched its session answers with the
tokens another request of the session refreshed meanwhile (the cookie store's guard
against a long request's Set-Cookie undoing a refresh), never with tokens the
refresh itself refused because they name another end user (OIDC Core §12.2).

Real SessionManager, cookie store, key ring and RefreshCoordinator; the provider is a
stand-in whose refresh answer the test chooses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jwt
import pytest
from multidict import CIMultiDict

from gateway.auth.provider import ProviderRuntime
from gateway.auth.refresh import RefreshCoordinator
from gateway.auth.session_access import SessionAccess
from gateway.config import SessionConfig
from gateway.context import Context
from gateway.errors import GatewayError
from gateway.sessions.manager import SessionManager, SessionState
from gateway.sessions.model import Session, Tokens
from gateway.sessions.seal import KeyRing, decode_key
from gateway.sessions.stores import CookieStore
from tests.support import TEST_KEY


def id_token(sub: str) -> str:
    # Signature and lifetime do not matter here: same_end_user compares iss and sub.
    return jwt.encode({"iss": "https://idp.example", "sub": sub}, "k" * 32, algorithm="HS256")


@dataclass
class Provider:
    """A stand-in provider: refresh answers with tokens for ``sub``."""

    sub: str
    name: str = "oidc"
    browser_flow: bool = True
    can_refresh: bool = True
    calls: list[str] = field(default_factory=list)

    async def refresh(self, refresh_token: str, stale_access: str = "") -> Tokens:
        self.calls.append(refresh_token)
        claims = {"sub": self.sub}
        return Tokens(
            f"at-{self.sub}", f"rt-{self.sub}", time.time() + 300, claims, id_token(self.sub)
        )


def setup(refreshed_sub: str) -> tuple[SessionAccess, ProviderRuntime, dict[str, str]]:
    keyring = KeyRing([("k1", decode_key(TEST_KEY))])
    manager = SessionManager(SessionConfig(idle_timeout=100, secure=False), keyring, CookieStore())
    provider = Provider(refreshed_sub)
    runtime = ProviderRuntime(
        name="oidc",
        provider=provider,  # type: ignore[arg-type]
        coordinator=RefreshCoordinator(provider, 60, lambda *_: None),
        refresh_on=frozenset({401}),
        skew=0,
    )
    now = time.time()
    # Last seen 50 s ago (touch due), access token expired: a request refreshes it.
    old = Session(
        "oidc", "at-0", "rt-0", now - 1, now - 50, now - 50, {"sub": "alice"}, id_token("alice")
    )
    name = manager.cookie_name("oidc")
    access = SessionAccess(manager, {"oidc": runtime.coordinator})
    return access, runtime, {name: keyring.seal(old.to_bytes(), name)}


async def answer_of(access: SessionAccess, state: SessionState) -> Session:
    """The session in the Set-Cookie this request's answer carries."""
    headers: CIMultiDict[str] = CIMultiDict()
    ctx = Context(start=0, request_id="r")
    ctx.states.append(state)
    await access.add_cookies(headers, ctx)
    name, value = headers["Set-Cookie"].split(";")[0].split("=", 1)
    unsealed = access.manager._unseal(value, name)
    assert unsealed is not None
    session = Session.from_bytes(unsealed.plaintext)
    assert session is not None
    return session


@pytest.mark.parametrize("refreshed_sub", ["alice", "mallory"])
async def test_a_touched_request_catches_up_only_with_the_same_end_users_tokens(
    refreshed_sub: str,
) -> None:
    access, runtime, cookies = setup(refreshed_sub)
    manager = access.manager
    # A: a long request that read the session first (and touched it).
    slow = await manager.load(cookies, "oidc", time.time())
    assert slow.dirty and slow.session is not None
    # B: refreshes meanwhile.
    fast = await manager.load(cookies, "oidc", time.time())
    ctx = Context(start=0, request_id="b")
    if refreshed_sub == "alice":
        await access.refresh(runtime, fast, ctx)
    else:
        with pytest.raises(GatewayError) as refused:
            await access.refresh(runtime, fast, ctx)
        assert refused.value.code == "session_expired" and fast.cleared
    # A ends: its answer carries B's tokens only if they are alice's.
    written = await answer_of(access, slow)
    if refreshed_sub == "alice":
        assert (written.access_token, written.refresh_token) == ("at-alice", "rt-alice")
    else:
        assert (written.access_token, written.refresh_token) == ("at-0", "rt-0")
        assert written.claims == {"sub": "alice"}
        assert runtime.coordinator.remembered("rt-0", "at-0") is None
